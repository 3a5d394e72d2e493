"""Logical streams: which samples of a source each reader takes, in which order, and where it stands. Pure
Python (no torch): the positions are plain JSON, read by the checkpoint code and written by the workers.

Each source is split into S logical streams (whole shards order[s::S], or with fewer shards than streams
every S-th sample of each: the stream's part (a, A, b, B), `default_part`), read by the G = world_size x
workers global workers (stream s by worker s mod G), shuffled and packed into rows (`kosmos.data.stream`).
Every micro-batch carries the states of its streams (epoch, shard, offset, caption cursor `sub`, shuffle
buffer positions and RNG, the unfinished document, the worker's turn); the main process keeps those of the
last micro-batch it consumed, and a checkpoint stores them. Resumed on the same layout, the run yields exactly
the micro-batches an uninterrupted run would have; on another (elastic resume), the stream states are dealt
over the new workers, and on more global workers than S every stream is split by samples (`split_streams`),
so no sample of the epoch is replayed or skipped; a changed shard list moves the positions to the shards' new
places (`remap_streams`). How a caption sample with several captions is visited (`caption_choice`) is part of
the position. The full description, the one copy of it: docs/data.md, "What resume guarantees for the data".

Faults. A shard that vanishes or breaks is skipped and counted; so is a remote one (a URL or pipe:, see
`kosmos.data.remote`) that keeps failing after its retries, by reason, and the stream's state names it
(`failed`) so that the training log can say which. A stream whose whole pass finds no sample while the
worker's other streams yield simply goes on to its next pass, after the worker's other streams have each made
a pass too (so that a stream whose only shard is broken does not re-read it in a tight loop: `Turns`). The
rules that stop a source are per worker, over all the streams it reads: `kosmos.data.retry`.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from kosmos.data.format import BadSample, captions
from kosmos.data.remote import DEFAULT as DEFAULT_READ
from kosmos.data.remote import ReadOptions
from kosmos.data.retry import EmptyPasses, FailingReads
from kosmos.data.shards import DataError, read_positions, read_shard

if TYPE_CHECKING:
    from kosmos.data.samples import Encoded  # imports torch


MAX_STREAMS = 64
"""Logical streams per source in training, unless there are fewer shards (or more global workers). A resume on
more global workers (world_size x workers) than a checkpoint's streams splits them (docs/data.md,
"Scaling up")."""

MAX_FAILED = 20
"""Skipped shards a stream's state names (the newest); all of them are counted in `skipped`."""

def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


EMPTY_PASS = None
"""What a stream yields, in place of a sample, after a whole pass that found no sample (infinite streams):
the worker's turn goes on to its other streams (see Turns)."""


class LogicalStream:
    """Logical stream s of S of a source: a deterministic, resumable stream of encoded samples, read by
    whichever global worker it is assigned to. `encode(raw, pos)` turns a raw sample into an Encoded one or
    raises BadSample (the dataset's `kosmos.data.samples.encode_sample`, with the source's encoder, loss
    and max_tokens): the stream decides which samples, in which order, not how they become tokens."""

    def __init__(self, kind: str, shards: list[str], s: int, S: int, *,
                 encode: Callable[[dict, tuple], Encoded], seed: int = 0, infinite: bool = True,
                 shuffle_buffer: int = 0, caption_choice: str = "random",
                 state: dict | None = None, name: str | None = None, read_options: ReadOptions | None = None,
                 reads: FailingReads | None = None):
        self.kind, self.shards, self.s, self.S = kind, shards, s, S
        self.name = name or kind  # the source's name, for messages
        self.read_options = read_options
        self.reads = reads or FailingReads()  # shared by the streams of one worker
        self.failed: dict[str, str] = {}  # shard -> why it was skipped (the newest MAX_FAILED), for the log
        self.wait: dict[int, int] = {}
        """After a pass that found no sample: the worker's other streams (then not waiting) and their epochs;
        this stream skips its turns until each of them has made a pass (or left the worker)."""
        self.empty_epoch: int | None = None  # the epoch of the empty pass, that a worker's retry re-reads
        self.encode, self.caption_choice = encode, caption_choice
        self.seed, self.infinite, self.buffer_size = seed, infinite, shuffle_buffer
        part = (state or {}).get("part")
        self.part: tuple[int, int, int, int] = tuple(part) if part else default_part(s, S, len(shards))
        """(a, A, b, B): this stream reads the shards order[a::A], of each the samples at offsets b mod B
        (docs/data.md, "Scaling up")."""
        self.split_samples = self.part[3] > 1
        pinned = (state or {}).get("order")
        self.pinned: tuple[int, list[int]] | None = \
            (pinned["epoch"], list(pinned["shards"])) if pinned else None
        """(epoch, shards): the shards this stream reads in that epoch, fixed when the shard list changed
        since the checkpoint (remap_streams): the rest of the pass that was under way, over the shards that
        remain."""
        self.rng = random.Random(f"kosmos-shuffle-{seed}-{s}")
        self.skipped: Counter = Counter()
        self.truncated = 0  # samples cut to max_tokens
        # reading cursor: epoch, index in this epoch's order, offset
        self.epoch, self.k, self.offset = 0, 0, -1
        self.sub = 0  # visits of the sample at `offset` already read (several with caption_choice "all")
        self.buffer: list[tuple[tuple[int, int], dict]] = []
        self.n_samples = 0
        self.carry: Encoded | None = None
        if state is not None:
            self._restore(state)

    # ------------------------------------------------------------------ order and reading

    def _order(self, epoch: int) -> list[int]:
        if self.pinned is not None and self.pinned[0] == epoch:
            return list(self.pinned[1])
        order = list(range(len(self.shards)))
        if self.infinite:
            random.Random(f"kosmos-shards-{self.seed}-{epoch}").shuffle(order)
        a, A = self.part[:2]
        return order[a::A]

    def _visits(self, shard: int, offset: int, raw: dict) -> list[tuple[int, ...]]:
        """The positions under which this epoch visits a sample: `(shard, offset)`, or for a caption sample
        with several captions `(shard, offset, caption)` per caption visited
        (docs/data.md, "Every caption counts")."""
        if self.kind != "captions" or self.caption_choice == "first":
            return [(shard, offset)]
        try:
            n = len(captions(raw))
        except BadSample:  # counted when it is encoded
            n = 1
        if n == 1:
            return [(shard, offset)]
        if self.caption_choice == "all":
            return [(shard, offset, c) for c in range(n)]
        c = random.Random(f"kosmos-caption-{self.seed}-{self.epoch}-{shard}-{offset}").randrange(n)
        return [(shard, offset, c)]

    def _raw(self) -> Iterator[tuple[tuple[int, ...], dict] | None]:
        """(position, raw sample) from the cursor on, advancing it; EMPTY_PASS after a whole pass of an
        infinite stream that found no sample (the cursor then at the next epoch: `rewind` re-reads it)."""
        give_up = (self.read_options or DEFAULT_READ).give_up
        reads = self.reads
        while True:
            order = self._order(self.epoch)
            got = 0
            whole = (self.k, self.offset) == (0, -1)  # not a pass resumed part-way (perhaps at its very end)
            while self.k < len(order):
                shard = order[self.k]
                start, (_, _, b, B) = self.offset, self.part
                t0, got_before = time.monotonic(), got

                def want(offset: int, start=start, B=B, b=b) -> bool:  # noqa: N803 - the part's names
                    return offset >= start and offset % B == b  # before the cursor: streamed past, unread

                for offset, raw in read_shard(self.shards[shard], self.skipped, want=want,
                                              options=self.read_options, failed=self.failed):
                    visits = self._visits(shard, offset, raw)
                    done = self.sub if offset == self.offset else 0
                    for i in range(done, len(visits)):
                        self.offset, self.sub = offset, i + 1
                        got += 1
                        reads.sample()
                        yield visits[i], raw
                self.k, self.offset, self.sub = self.k + 1, -1, 0
                # A read that yielded nothing never paused, so its time is all spent failing.
                spec = self.shards[shard]
                if got == got_before and spec in self.failed:
                    reads.failed(time.monotonic() - t0, spec, self.failed[spec], give_up=give_up,
                                 name=self.name, worker=self.worker, skipped=dict(self.skipped))
                while len(self.failed) > MAX_FAILED:  # the newest are kept (all are counted)
                    del self.failed[next(iter(self.failed))]
            if not self.infinite:
                return
            self.epoch, self.k, self.offset, self.sub = self.epoch + 1, 0, -1, 0
            if got == 0 and whole:
                self.empty_epoch = self.epoch - 1
                yield EMPTY_PASS
                self.empty_epoch = None

    worker = "the worker"
    """How messages name the worker reading this stream (set by SourceDataset)."""

    def rewind(self) -> None:
        """After EMPTY_PASS, when the worker retries: read the empty pass's epoch again."""
        if self.empty_epoch is not None:
            self.epoch, self.k, self.offset, self.sub = self.empty_epoch, 0, -1, 0

    def _shuffled(self) -> Iterator[tuple[tuple[int, int], dict]]:
        for item in self._raw():
            if item is EMPTY_PASS or (self.buffer_size <= 1 and not self.buffer):
                yield item
                continue
            self.buffer.append(item)
            while len(self.buffer) >= max(1, self.buffer_size):  # drains a larger buffer restored
                yield self._pop()
        while self.buffer:
            yield self._pop()

    def _pop(self):
        i = self.rng.randrange(len(self.buffer))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def _encode(self, pos, raw) -> Encoded | None:
        try:
            return self.encode(raw, pos)
        except BadSample as e:
            self.skipped[e.reason] += 1
            return None

    def take_carry(self) -> Encoded | None:
        """The unfinished document of a restored state (already counted before the checkpoint), once."""
        carry, self.carry = self.carry, None
        return carry

    def encoded(self) -> Iterator[Encoded]:
        """Encoded samples: first the unfinished document of a restored state, then the stream."""
        carry = self.take_carry()
        if carry is not None:
            yield carry
        for got in self._shuffled():
            if got is EMPTY_PASS:
                yield EMPTY_PASS
                continue
            item = self._encode(*got)
            if item is not None:
                self.n_samples += 1
                self.truncated += item.truncated
                yield item

    # ------------------------------------------------------------------ state

    def state(self, carry: Encoded | None) -> dict:
        """The stream's position; `carry`: the packer's unfinished document taken from this stream (else a
        restored one not yet taken, if any)."""
        carry = carry if carry is not None else self.carry
        return {
            "epoch": self.epoch, "k": self.k, "offset": self.offset, "sub": self.sub,
            "buffer": [list(pos) for pos, _ in self.buffer],
            "rng": _rng_state(self.rng),
            "carry": [*carry.pos, carry.start] if carry is not None else None,  # position, then tokens done
            "skipped": dict(self.skipped), "samples": self.n_samples, "truncated": self.truncated,
            "failed": dict(self.failed), "wait": {str(s): e for s, e in self.wait.items()},
            "part": list(self.part),
            **({"order": {"epoch": self.pinned[0], "shards": self.pinned[1]}}
               if self.pinned is not None and self.pinned[0] == self.epoch else {}),
        }

    def _restore(self, st: dict) -> None:
        self.epoch, self.k, self.offset = st["epoch"], st["k"], st["offset"]
        self.sub = st.get("sub", 1 if st["offset"] >= 0 else 0)  # older checkpoints: one visit per sample
        _set_rng_state(self.rng, st["rng"])
        self.skipped = Counter(st["skipped"])
        self.n_samples = st["samples"]
        self.truncated = st.get("truncated", 0)  # absent from checkpoints older than max_tokens
        self.failed = dict(st.get("failed", {}))
        self.wait = {int(s): e for s, e in st.get("wait", {}).items()}
        buffer = [tuple(p) for p in st["buffer"]]
        carry = tuple(st["carry"][:-1]) if st["carry"] is not None else None  # (shard, offset[, caption])
        wanted = [p[:2] for p in buffer + ([carry] if carry else [])]
        raw = read_positions(self.shards, wanted, Counter(), self.read_options)
        missing = [p for p in wanted if p not in raw]
        if missing:
            raise DataError(f"{self.name}: cannot resume: samples {missing[:3]} are gone from the shards "
                            "(were the shards changed since the checkpoint?)")
        self.buffer = [(p, raw[p[:2]]) for p in buffer]
        if carry is not None:
            item = self._encode(carry, raw[carry[:2]])
            if item is None:
                raise DataError(f"{self.name}: cannot resume: sample {carry} no longer decodes")
            item.start = st["carry"][-1]
            self.carry = item


class Turns:
    """A worker's samples from its streams: first the unfinished documents of restored states (in stream
    order), then one sample from each stream in turn, starting at stream `first` (a stream that ends, in a
    finite pass, leaves the turn). `last` is the stream of the latest sample, `next` whose turn it is.

    The rules that stop a source are the worker's, over all its streams (`kosmos.data.retry`): a stream whose
    whole pass found no sample gives up its turn, and waits (`LogicalStream.wait`) until the worker's other
    streams have each made a pass; only when every stream of the worker had an empty pass since its last
    sample does the worker wait and retry (`EmptyPasses`, `waits`), then stop with a DataError."""

    def __init__(self, streams: dict[int, LogicalStream], first: int | None, worker: str = "the worker",
                 name: str = "", waits: tuple[float, ...] | None = None):
        self.streams = streams
        self.retry = EmptyPasses(waits, worker, name)
        self.active = sorted(streams)
        self.i = self.active.index(first) if first in streams else 0
        self.last: int | None = None
        self.worker, self.name = worker, name

    @property
    def next(self) -> int | None:
        return self.active[self.i] if self.active else None

    def _waits(self, s: int) -> bool:
        """Whether stream s skips its turn: some stream it waits for has not made a pass since (a stream that
        left the worker, or waits itself, is no longer waited for)."""
        st = self.streams[s]
        st.wait = {o: e for o, e in st.wait.items()
                   if o in self.active and not self.streams[o].wait and self.streams[o].epoch <= e}
        return bool(st.wait)

    def _summary(self) -> tuple[dict, str]:
        skipped: Counter = Counter()
        for st in self.streams.values():
            skipped.update(st.skipped)
        last = next((st.reads.last_failure for st in self.streams.values()), "")
        return dict(skipped), last

    def __iter__(self) -> Iterator[Encoded]:
        for s in self.active:
            carry = self.streams[s].take_carry()
            if carry is not None:
                self.last = s
                yield carry
        its = {s: self.streams[s].encoded() for s in self.active}
        empty: set[int] = set()  # streams whose whole pass found no sample since the worker's last sample
        while self.active:
            s = self.active[self.i]
            if self._waits(s):
                self.i = (self.i + 1) % len(self.active)
                continue
            item = next(its[s], _END)
            if item is _END:
                self.active.pop(self.i)
                self.i = self.i % len(self.active) if self.active else 0
                continue
            self.i = (self.i + 1) % len(self.active)
            if item is not EMPTY_PASS:
                empty.clear()
                self.retry.sample()
                self.last = s
                yield item
                continue
            st = self.streams[s]
            empty.add(s)
            st.wait = {o: self.streams[o].epoch for o in self.active if o != s and not self._waits(o)}
            if not empty.issuperset(self.active):
                continue
            # a whole pass of every stream of the worker found nothing: wait, or a DataError
            skipped, last = self._summary()
            self.retry.retry(samples=sum(x.n_samples for x in self.streams.values()),
                             n_streams=len(self.active), shards=st.shards, skipped=skipped, last=last)
            empty.clear()
            for o in self.active:  # each stream re-reads its empty pass, in the usual turn
                self.streams[o].rewind()
                self.streams[o].wait = {}


_END = object()


# ------------------------------------------------------------ saved positions: parts, layouts, shard lists

def default_part(s: int, S: int, n_shards: int) -> tuple[int, int, int, int]:
    """The part (a, A, b, B) of a source that stream s of S reads when first made (and in a saved state
    without "part"): the whole shards order[s::S] when there are at least S shards, else of every shard the
    samples at offsets s mod S."""
    return (s, S, 0, 1) if n_shards >= S else (0, 1, s, S)


def remap_streams(states: dict[int, dict], S: int, old: list[str], new: list[str], seed: int,
                  infinite: bool = True) -> tuple[dict[int, dict], str]:
    """The states of S streams saved over the shard list `old`, for the list `new` (shards added, removed or
    renamed since the checkpoint): every position names a shard by its index in the sorted list, so each is
    moved to the same shard's new index. The pass under way goes on over the shards of it that remain, in
    its order (pinned as the stream's `order` for that epoch), from the same sample when its shard remains;
    shuffle-buffer samples and unfinished documents of removed shards are dropped; added shards are read
    from the next pass on. Returns the states and a note of what changed and what was dropped."""
    index = {name: i for i, name in enumerate(new)}
    moved = [index.get(name) for name in old]
    dropped = {"buffered samples": 0, "unfinished documents": 0, "shards of the current pass": 0}
    out: dict[int, dict] = {}
    for s, st in states.items():
        a, A, b, B = st.get("part") or default_part(s, S, len(old))
        if st.get("order") and st["order"]["epoch"] == st["epoch"]:
            order = list(st["order"]["shards"])
        else:
            order = list(range(len(old)))
            if infinite:
                random.Random(f"kosmos-shards-{seed}-{st['epoch']}").shuffle(order)
            order = order[a::A]
        rest = order[st["k"]:]
        kept = [moved[i] for i in rest if moved[i] is not None]
        dropped["shards of the current pass"] += len(rest) - len(kept)
        current_gone = bool(rest) and moved[rest[0]] is None
        buffer = [[moved[p[0]], *p[1:]] for p in st["buffer"] if moved[p[0]] is not None]
        dropped["buffered samples"] += len(st["buffer"]) - len(buffer)
        carry = st["carry"]
        if carry is not None and moved[carry[0]] is None:
            carry = None
            dropped["unfinished documents"] += 1
        elif carry is not None:
            carry = [moved[carry[0]], *carry[1:]]
        out[s] = {**st, "part": [a, A, b, B], "k": 0, "buffer": buffer, "carry": carry,
                  "order": {"epoch": st["epoch"], "shards": kept},
                  **({"offset": -1, "sub": 0} if current_gone else {})}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    lost = ", ".join(f"{n} {what}" for what, n in dropped.items() if n)
    note = (f"the shard list changed since the checkpoint: {len(added)} added, {len(removed)} removed"
            f"{' (' + ', '.join((removed or added)[:2]) + ', ...)' if added or removed else ''}; positions "
            f"moved to the shards' new places, the current pass goes on over the shards that remain"
            f"{', added ones are read from the next pass' if added else ''}"
            f"{'; dropped with the removed shards: ' + lost if lost else ''}")
    return out, note


def complete_streams(states: dict[int, dict], wanted, S: int, n_shards: int, seed: int) -> dict[int, dict]:
    """`states` with a fresh state (the start of the first pass, its part written out) for each stream of
    `wanted` that has none: a stream that no worker had read from when the checkpoint was written. Its part
    depends on the shard count and S it was made with, so it must be fixed before the streams are split or
    the shard list changes; else the new streams' defaults would overlap the split ones' samples."""
    out = dict(states)
    for s in wanted:
        if s not in out:
            out[s] = {"epoch": 0, "k": 0, "offset": -1, "sub": 0, "buffer": [], "carry": None,
                      "rng": _rng_state(random.Random(f"kosmos-shuffle-{seed}-{s}")), "skipped": {},
                      "samples": 0,
                      "truncated": 0, "failed": {}, "wait": {}, "part": list(default_part(s, S, n_shards))}
    return out


def split_streams(states: dict[int, dict], S: int, m: int, n_shards: int) -> dict[int, dict]:
    """The states of S streams split into S * m (docs/data.md, "Scaling up"): stream s, reading part
    (a, A, b, B), becomes the streams s + S*j (j < m) reading (a, A, b + B*j, B*m), each going on from s's
    cursor; s's shuffle buffer and unfinished document go to the child whose samples they are; each child's
    shuffle RNG is drawn from s's; the counts (samples, skipped, ...) stay with child 0, so that sums over
    the streams are unchanged."""
    out: dict[int, dict] = {}
    for s, st in states.items():
        a, A, b, B = st.get("part") or default_part(s, S, n_shards)

        def child(offset: int, b: int = b, B: int = B) -> int:  # which child reads the sample at offset
            return (offset % (B * m) - b) // B

        parent = random.Random()
        _set_rng_state(parent, st["rng"])
        key = parent.getrandbits(64)
        for j in range(m):
            out[s + S * j] = {
                **st, "part": [a, A, b + B * j, B * m],
                "buffer": [p for p in st["buffer"] if child(p[1]) == j],
                "carry": st["carry"] if st["carry"] is not None and child(st["carry"][1]) == j else None,
                "rng": _rng_state(random.Random(f"kosmos-split-{key}-{j}")), "wait": {},
                **({} if j == 0 else {"skipped": {}, "samples": 0, "truncated": 0, "failed": {}}),
            }
    return out


def upgrade_state(sd: dict, rank: int) -> dict:
    """A source's data position written before logical streams (one stream per global worker, S = G) in
    today's form."""
    if "streams" in sd:
        return sd
    nw = max(1, sd["num_workers"])
    return {**sd, "n_streams": sd["world_size"] * nw, "turns": {},
            "streams": {str(rank * nw + int(w)): st for w, st in sd["workers"].items()}}


def rank_data_state(per_rank: list[dict], rank: int) -> dict:
    """This rank's data state (Mixture.load_state_dict) from those every rank of a checkpoint wrote: its own
    (rank 0's for a rank the checkpoint did not have), each source's entry with every rank's entry of it under
    "ranks", from which SourceLoader.load_state_dict deals the streams over another layout."""
    own = per_rank[rank] if rank < len(per_rank) else per_rank[0]
    return {k: {**v, "ranks": [d[k] for d in per_rank]} if isinstance(v, dict) and "kind" in v else v
            for k, v in own.items()}
