"""One source's stream: shards -> shuffled samples -> packed micro-batches, split over ranks and workers,
with a position that is saved in every checkpoint and restored exactly.

Each source is split into S logical streams (whole shards order[s::S], or with fewer shards than streams
every S-th sample of each), read by the G = world_size x workers global workers (stream s by worker s mod G),
shuffled and packed into rows. Every micro-batch carries the states of its streams (epoch, shard, offset,
caption cursor `sub`, shuffle buffer positions and RNG, the unfinished document, the worker's turn); the main
process keeps those of the last micro-batch it consumed, and a checkpoint stores them. Resumed on the same
layout, the run yields exactly the micro-batches an uninterrupted run would have; on another (elastic
resume), the stream states are dealt over the new workers, and on more global workers than S every stream is
split by samples (`split_streams`), so no sample of the epoch is replayed or skipped. How a caption sample
with several captions is visited (`caption_choice`) is part of the position. The full description, the
one copy of it: docs/data.md, "What resume guarantees for the data".

Faults. A shard that vanishes or breaks is skipped and counted; so is a remote one (a URL or pipe:, see
`kosmos.data.remote`) that keeps failing after its retries, by reason, and the stream's state names it
(`failed`) so that the training log can say which. The rules that stop a source are per worker, over all the
streams it reads. A stream whose whole pass finds no sample while the worker's other streams yield simply
goes on to its next pass, after the worker's other streams have each made a pass too (so that a stream whose
only shard is broken does not re-read it in a tight loop). Remote reads that keep failing one after the other
(storage down: each costs its timeouts and retries) stop the run with a `DataError` once they have taken
`data.read_give_up` seconds, over all the worker's streams, without a sample in between. A worker none of
whose streams finds a sample in a whole pass although it found some before (its shards deleted or unmounted
mid-run) waits and tries again (`RETRY_WAITS`), each stream re-reading the same pass, then stops the run with
a `DataError` naming the source; so does a worker that never found any sample. Workers ignore SIGTERM and
SIGINT, which go to the whole process group (`timeout`, SLURM, container stops, Ctrl-C): the main process
handles them, saves a checkpoint and ends the workers.

How the workers start (a forkserver), what they take from the main process, their signals and how they end:
`kosmos.data.workers`.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from kosmos.config import ConfigError
from kosmos.data.packing import Packer, Row, collate
from kosmos.data.format import CAPTION_CHOICES, LOSSES, captions
from kosmos.data.samples import BadSample, Encoded, encode_sample
from kosmos.data.remote import DEFAULT as DEFAULT_READ
from kosmos.data.remote import ReadOptions
from kosmos.data.shards import DataError, read_positions, read_shard  # noqa: F401 - DataError: its home before
from kosmos.data.state import shard_digest
from kosmos.data.workers import Launch, close_workers, open_loader, start_worker_server
from kosmos.sequence import SequenceEncoder


MAX_STREAMS = 64
"""Logical streams per source in training, unless there are fewer shards (or more global workers). A resume on
more global workers (world_size x workers) than a checkpoint's streams splits them (docs/data.md,
"Scaling up")."""

MAX_FAILED = 20
"""Skipped shards a stream's state names (the newest); all of them are counted in `skipped`."""

RETRY_WAITS = (1.0, 2.0, 4.0)
"""Seconds a worker waits before each new pass when a whole pass of all its streams found no sample (shards
gone mid-run, or a file system that comes back); after the last, a DataError stops the run."""

def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


EMPTY_PASS = None
"""What a stream yields, in place of a sample, after a whole pass that found no sample (infinite streams):
the worker's turn goes on to its other streams (see _Turns)."""


class _Reads:
    """What a worker's streams share about their reads: the seconds spent in shard reads that failed since
    the worker's last sample (checked against `data.read_give_up`), and the newest failure."""

    def __init__(self):
        self.failing = 0.0
        self.last_failure = ""


class LogicalStream:
    """Logical stream s of S of a source: a deterministic, resumable stream of encoded samples, read by
    whichever global worker it is assigned to."""

    def __init__(self, kind: str, shards: list[str], s: int, S: int, *, encoder: SequenceEncoder,
                 seed: int = 0, infinite: bool = True, shuffle_buffer: int = 0, max_tokens: int = 0,
                 loss: str = "all", caption_choice: str = "random", state: dict | None = None,
                 name: str | None = None, read_options: ReadOptions | None = None,
                 reads: _Reads | None = None):
        self.kind, self.shards, self.s, self.S = kind, shards, s, S
        self.name = name or kind  # the source's name, for messages
        self.read_options = read_options
        self.reads = reads or _Reads()  # shared by the streams of one worker
        self.failed: dict[str, str] = {}  # shard -> why it was skipped (the newest MAX_FAILED), for the log
        self.wait: dict[int, int] = {}
        """After a pass that found no sample: the worker's other streams (then not waiting) and their epochs;
        this stream skips its turns until each of them has made a pass (or left the worker)."""
        self.empty_epoch: int | None = None  # the epoch of the empty pass, that a worker's retry re-reads
        self.encoder, self.max_tokens = encoder, max_tokens
        self.loss, self.caption_choice = loss, caption_choice
        self.seed, self.infinite, self.buffer_size = seed, infinite, shuffle_buffer
        part = (state or {}).get("part")
        self.part: tuple[int, int, int, int] = tuple(part) if part else default_part(s, S, len(shards))
        """(a, A, b, B): this stream reads the shards order[a::A], of each the samples at offsets b mod B
        (docs/data.md, "Scaling up")."""
        self.split_samples = self.part[3] > 1
        pinned = (state or {}).get("order")
        self.pinned: tuple[int, list[int]] | None = (pinned["epoch"], list(pinned["shards"])) if pinned else None
        """(epoch, shards): the shards this stream reads in that epoch, fixed when the shard list changed since
        the checkpoint (remap_streams): the rest of the pass that was under way, over the shards that remain."""
        self.rng = random.Random(f"kosmos-shuffle-{seed}-{s}")
        self.skipped: Counter = Counter()
        self.truncated = 0  # samples cut to max_tokens
        self.epoch, self.k, self.offset = 0, 0, -1  # reading cursor: epoch, index in this epoch's order, offset
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

                def want(offset: int) -> bool:  # the samples before the cursor are streamed past, unread
                    return offset >= start and offset % B == b

                for offset, raw in read_shard(self.shards[shard], self.skipped, want=want,
                                              options=self.read_options, failed=self.failed):
                    visits = self._visits(shard, offset, raw)
                    done = self.sub if offset == self.offset else 0
                    for i in range(done, len(visits)):
                        self.offset, self.sub = offset, i + 1
                        got += 1
                        reads.failing = 0.0
                        yield visits[i], raw
                self.k, self.offset, self.sub = self.k + 1, -1, 0
                # A read that yielded nothing never paused, so its time is all spent failing.
                spec = self.shards[shard]
                if got == got_before and spec in self.failed:
                    reads.failing += time.monotonic() - t0
                    reads.last_failure = f"; last: {spec}: {self.failed[spec]}"
                    if reads.failing > give_up:
                        raise DataError(
                            f"{self.name}: no sample for {reads.failing:.0f}s: {self.worker}'s shard reads "
                            f"keep failing (skipped: {dict(self.skipped)}{reads.last_failure}); is the "
                            "storage reachable? Fix it and resume with --resume latest (data.read_give_up="
                            f"{give_up:g})")
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
            return encode_sample(self.kind, raw, pos, self.encoder, self.max_tokens, self.loss)
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


class _Turns:
    """A worker's samples from its streams: first the unfinished documents of restored states (in stream
    order), then one sample from each stream in turn, starting at stream `first` (a stream that ends, in a
    finite pass, leaves the turn). `last` is the stream of the latest sample, `next` whose turn it is.

    The rules that stop a source are the worker's, over all its streams (module docstring): a stream whose
    whole pass found no sample gives up its turn, and waits (`LogicalStream.wait`) until the worker's other
    streams have each made a pass; only when every stream of the worker had an empty pass since its last
    sample does the worker wait and retry (`RETRY_WAITS`), then stop with a DataError."""

    def __init__(self, streams: dict[int, LogicalStream], first: int | None, worker: str = "the worker",
                 name: str = "", waits: tuple[float, ...] | None = None):
        self.streams = streams
        self.waits = RETRY_WAITS if waits is None else waits
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
        retries = 0
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
                retries = 0
                self.last = s
                yield item
                continue
            st = self.streams[s]
            empty.add(s)
            st.wait = {o: self.streams[o].epoch for o in self.active if o != s and not self._waits(o)}
            if not empty.issuperset(self.active):
                continue
            # a whole pass of every stream of the worker found nothing
            skipped, last = self._summary()
            n_shards = len(st.shards)
            if sum(x.n_samples for x in self.streams.values()) == 0:
                raise DataError(
                    f"{self.name}: {self.worker} found no samples in a whole pass of its {len(self.active)} "
                    f"stream(s) over {n_shards} shard(s) (skipped: {skipped}{last}); use fewer workers or "
                    "check the shards with `python -m data_tools.verify` (streams: kosmos/data/stream.py)")
            if retries == len(self.waits):  # it found samples before: its shards went away
                raise DataError(
                    f"{self.name}: no readable shard left: {retries + 1} passes over the {n_shards} shard(s) "
                    f"of {self.worker}'s {len(self.active)} stream(s) ({st.shards[0]}, ...) found no "
                    f"sample within {sum(self.waits):.0f}s (skipped: {skipped}{last}); were they deleted or "
                    "moved? Put them back and resume with --resume latest")
            time.sleep(self.waits[retries])
            retries += 1
            empty.clear()
            for o in self.active:  # each stream re-reads its empty pass, in the usual turn
                self.streams[o].rewind()
                self.streams[o].wait = {}


_END = object()


class SourceDataset(IterableDataset):
    """Packed micro-batches of one source for one rank; each carries its worker's state. `kind` says how its
    samples are read; `name` (default: the kind) and `key` (its config key, default `data.<name>`) are for
    messages."""

    def __init__(self, kind: str, shards: list[str], encoder: SequenceEncoder, *, max_len: int,
                 micro_batch_size: int, num_workers: int = 0, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, infinite: bool = True, max_tokens: int = 0, loss: str = "all",
                 caption_choice: str = "random", streams: int = 0, name: str | None = None,
                 key: str | None = None, read_options: ReadOptions | None = None):
        super().__init__()
        self.read_options = read_options
        self.name = name = name or kind
        key = key or f"data.{name}"
        if not shards:
            raise ValueError(f"{name}: no shards")
        if loss not in LOSSES:
            raise ValueError(f"config key '{key}.loss': {loss!r} is not one of {', '.join(LOSSES)}")
        if caption_choice not in CAPTION_CHOICES:
            raise ValueError(f"config key '{key}.caption_choice': {caption_choice!r} is not one of "
                             f"{', '.join(CAPTION_CHOICES)}")
        self.loss, self.caption_choice = loss, caption_choice
        if 0 < max_tokens < encoder.span + 2:
            raise ValueError(f"config key '{key}.max_tokens': {max_tokens} cannot hold <s>, an image "
                             f"span ({encoder.span} tokens) and a token of text; use 0 (no cap) or at least "
                             f"{encoder.span + 2}")
        self.max_tokens = max_tokens
        self.kind, self.shards, self.encoder, self.max_len = kind, list(shards), encoder, max_len
        self.micro_batch_size, self.num_workers = micro_batch_size, num_workers
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.infinite = shuffle_buffer, infinite
        self.retry_waits = RETRY_WAITS  # carried to the workers (a forkserver's worker has its own module)
        self.launch: Launch | None = None  # set by SourceLoader when it starts workers
        G = self.global_workers
        if streams and streams < G:
            raise ValueError(f"{name}: {streams} logical streams cannot feed {G} global workers")
        self.n_streams = streams or (max(G, min(MAX_STREAMS, len(self.shards))) if infinite else G)
        """S, the logical streams (docs/data.md); a restored data position sets the saved one."""
        self.states: dict[int, dict] = {}  # logical stream -> state to resume from
        self.turns: dict[int, int] = {}  # logical worker -> the stream whose turn it is
        self.worker_offset = 0  # physical worker 0 plays this logical worker (DataLoader starts at 0)

    @property
    def global_workers(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def streams_of(self, logical: int) -> list[int]:
        """The logical streams that worker `logical` of this rank reads."""
        g = self.rank * max(1, self.num_workers) + logical
        return list(range(g, self.n_streams, self.global_workers))

    def stream(self, s: int, shuffle_buffer: int | None = None, reads: _Reads | None = None) -> LogicalStream:
        return LogicalStream(self.kind, self.shards, s, self.n_streams, encoder=self.encoder, seed=self.seed,
                             infinite=self.infinite,
                             shuffle_buffer=self.shuffle_buffer if shuffle_buffer is None else shuffle_buffer,
                             max_tokens=self.max_tokens, loss=self.loss, caption_choice=self.caption_choice,
                             state=self.states.get(s), name=self.name, read_options=self.read_options,
                             reads=reads)

    def __iter__(self):
        info = get_worker_info()
        nw = max(1, self.num_workers)
        if info is not None and info.num_workers != nw:
            raise RuntimeError(f"SourceDataset built for {nw} workers runs under {info.num_workers}")
        logical = ((info.id if info else 0) + self.worker_offset) % nw
        packer = Packer(self.max_len, self.encoder.num_latents, self.encoder.pad_id)
        rows: list[Row] = []
        ids = self.streams_of(logical)
        # the worker's shuffle buffer shared by its streams
        buffer = -(-self.shuffle_buffer // len(ids)) if self.shuffle_buffer > 1 else self.shuffle_buffer
        try:
            g = self.rank * nw + logical
            worker = f"worker {g} of {self.global_workers}"
            reads = _Reads()  # shared by the worker's streams: the give_up timer counts all their failures
            streams = {s: self.stream(s, buffer, reads) for s in ids}
            for st in streams.values():
                st.worker = worker
            turns = _Turns(streams, self.turns.get(logical), worker, self.name, self.retry_waits)
            for row, carry in packer.pack(turns):
                rows.append(row)
                if len(rows) == self.micro_batch_size:
                    yield self._batch(rows, turns, carry, logical)
                    rows = []
        except DataError as e:  # to the main process as an item: its message alone, not a worker traceback
            yield {"error": str(e), "worker": logical}
            return
        if rows:  # the end of a finite pass: a last, smaller micro-batch
            yield self._batch(rows, turns, None, logical)
        else:  # no batch left, but the final counts (skipped samples) must still reach the main process
            yield {"state": self._state(turns, None), "worker": logical, "empty": True}

    @staticmethod
    def _state(turns: _Turns, carry: Encoded | None) -> dict:
        streams = {s: st.state(carry if s == turns.last else None) for s, st in turns.streams.items()}
        return {"streams": streams, "next": turns.next}

    def _batch(self, rows: list[Row], turns: _Turns, carry: Encoded | None, logical: int) -> dict:
        batch = collate(rows, self.encoder.image_size)
        batch["n_real"] = torch.tensor(sum(r.n_real for r in rows))
        batch["sample_positions"] = [pos for r in rows for pos in r.starts]
        batch["state"] = self._state(turns, carry)
        batch["worker"] = logical
        return batch


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
            f"{' (' + ', '.join((removed or added)[:2]) + ', ...)' if added or removed else ''}; positions moved "
            f"to the shards' new places, the current pass goes on over the shards that remain"
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
                      "rng": _rng_state(random.Random(f"kosmos-shuffle-{seed}-{s}")), "skipped": {}, "samples": 0,
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


def _upgrade(sd: dict, rank: int) -> dict:
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


class SourceLoader:
    """A DataLoader over a SourceDataset that remembers, per logical stream, the state of the last
    micro-batch handed to the trainer, so that `state_dict()` is exactly the position of what was consumed."""

    def __init__(self, dataset: SourceDataset, prefetch_factor: int = 2):
        self.dataset = dataset
        self.num_workers = dataset.num_workers
        self.prefetch_factor = prefetch_factor
        self.states: dict[int, dict] = dict(dataset.states)  # logical stream -> state
        self.turns: dict[int, int] = dict(dataset.turns)
        self.next_worker = dataset.worker_offset
        self.resume_note: str | None = None
        """Set by load_state_dict on an elastic resume: for the log."""
        self._it = None
        self._workers = None  # the DataLoader iterator that owns the worker processes
        self.missing_shards: list[str] = []
        """Shards named in the config that do not exist (allowed by data.allow_missing_shards), for the
        log."""
        if self.num_workers > 0:
            start_worker_server()  # now, while the trainer still builds and loads

    def _start(self):
        """A new DataLoader iterator over the dataset: with workers, it starts them (kosmos.data.workers)."""
        batches = open_loader(self.dataset, self.num_workers, self.prefetch_factor)
        if self.num_workers:
            self._workers = batches
        return batches

    def __iter__(self):
        nw = max(1, self.num_workers)
        batches = self._start()
        for batch in batches:
            if "error" in batch:
                raise DataError(batch["error"])
            w = batch.pop("worker")
            state = batch.pop("state")
            self.states.update(state["streams"])
            if state["next"] is not None:
                self.turns[w] = state["next"]
            self.next_worker = (w + 1) % nw
            if not batch.get("empty"):
                yield batch

    def __next__(self):
        if self._it is None:
            self._it = iter(self)
        return next(self._it)

    def close(self) -> None:
        """End the worker processes now: DataLoader's shutdown, then SIGKILL for any still there (they ignore
        SIGTERM, DataLoader's fallback, until the main process exits). Training calls it at the end, and after
        each evaluation."""
        batches, self._workers, self._it = self._workers, None, None
        if batches is not None:
            close_workers(batches)

    def skipped(self) -> Counter:
        """Bad samples skipped so far, by reason, over this rank's streams."""
        total: Counter = Counter()
        for st in self.states.values():
            total.update(st["skipped"])
        return total

    def samples_seen(self) -> int:
        return sum(st["samples"] for st in self.states.values())

    def failed_shards(self) -> dict[str, str]:
        """Shards skipped so far (the newest of each stream), by spec: reason and detail, for the log."""
        out: dict[str, str] = {}
        for st in self.states.values():
            out.update(st.get("failed", {}))
        return out

    def truncated(self) -> int:
        """Samples cut to `max_tokens` so far, over this rank's streams."""
        return sum(st.get("truncated", 0) for st in self.states.values())

    def epochs(self) -> list[int]:
        """The epoch of each of the source's logical streams that this rank reads (0 for the others and for
        a stream not yet started): summed over the ranks, every stream's, since each is read by one rank."""
        return [int(self.states[s]["epoch"]) if s in self.states else 0 for s in range(self.dataset.n_streams)]

    def state_dict(self) -> dict:
        """The position of what was consumed; with the digest of the shard list (and on rank 0 the list
        itself), so that a resume over a changed shard folder is noticed and remapped (remap_streams)."""
        ds = self.dataset
        return {"kind": ds.kind, "world_size": ds.world_size, "num_workers": self.num_workers,
                "n_streams": ds.n_streams, "next_worker": self.next_worker,
                "turns": {str(w): s for w, s in self.turns.items()},
                "streams": {str(s): st for s, st in self.states.items()},
                "shards_digest": shard_digest(ds.shards), **({"shards": list(ds.shards)} if ds.rank == 0 else {})}

    def _remapped(self, states: dict[int, dict], sd: dict, S: int, wanted) -> dict[int, dict]:
        """`states` for this run's shard list, when it is not the one they were saved with (remap_streams;
        the streams of `wanted` without a state completed first, with the old list's parts); refused, naming
        --reset-data, when the checkpoint holds the digest but not the list."""
        ds = self.dataset
        saved = sd.get("shards_digest")
        if saved is None or saved == shard_digest(ds.shards):  # the same list (or a checkpoint before digests)
            return states
        old = sd.get("shards") or next((d.get("shards") for d in sd.get("ranks") or [] if d.get("shards")), None)
        if old is None:
            raise ConfigError(f"{ds.name}: the shard list changed since the checkpoint, which does not hold the "
                              f"list it was saved with (rank 0's data position); start this source's data over "
                              f"with --reset-data {ds.name}")
        states = complete_streams(states, wanted, S, len(old), ds.seed)
        states, note = remap_streams(states, S, old, ds.shards, ds.seed, ds.infinite)
        self.resume_note = f"{ds.name}: {note}"
        return states

    def load_state_dict(self, sd: dict) -> None:
        """Restore a data position: this rank's own when the layout (world size, workers per rank) is the
        checkpoint's; else the streams dealt over this layout from every rank's entry (`sd["ranks"]`, see
        rank_data_state), the turns and DataLoader's round robin starting afresh, and split by samples first
        (split_streams) when they are fewer than this layout's global workers."""
        ds = self.dataset
        self.resume_note = None
        own = _upgrade(sd, ds.rank)
        S, G = own["n_streams"], ds.global_workers
        layout = f"world_size={own['world_size']} and {own['num_workers']} workers per rank"
        if (own["world_size"], own["num_workers"]) == (ds.world_size, self.num_workers):
            if S < G:  # not written by this layout, which makes at least G streams
                raise ConfigError(
                    f"{ds.name}: the data position has {S} logical streams, fewer than this run's {G} "
                    f"global workers; start this source's data over with --reset-data {ds.name}")
            nw = max(1, self.num_workers)
            mine = [s for w in range(nw) for s in range(ds.rank * nw + w, S, G)]
            states = self._remapped({int(s): st for s, st in own["streams"].items()}, sd, S, mine)
            self.turns = {int(w): s for w, s in own["turns"].items()}
            self.next_worker = own["next_worker"]
        else:
            ranks = sd.get("ranks") or []
            if len(ranks) != own["world_size"]:
                raise ConfigError(f"{ds.name}: the data position was saved with {layout}; another layout "
                                  "needs the data positions of every rank (data_rank*.json), or start this "
                                  f"source's data over with --reset-data {ds.name}")
            states = {int(k): v for r, d in enumerate(ranks) for k, v in _upgrade(d, r)["streams"].items()}
            states = self._remapped(states, sd, S, range(S))
            self.turns, self.next_worker = {}, 0
            how = f"its {S} logical streams dealt over the new workers"
            if S < G:  # more global workers than streams: split each stream by samples
                m = -(-G // S)
                states = split_streams(complete_streams(states, range(S), S, len(ds.shards), ds.seed), S, m,
                                       len(ds.shards))
                how = f"its {S} logical streams split by samples into {S * m}, dealt over the new workers"
                S *= m
            self.resume_note = ((self.resume_note + "\n") if self.resume_note else "") + (
                                f"{ds.name}: data position saved with {layout}, resumed with "
                                f"world_size={ds.world_size} and {self.num_workers}: {how} (elastic resume)")
        ds.n_streams = S
        mine = set(s for w in range(max(1, self.num_workers)) for s in ds.streams_of(w))
        self.states = {int(s): st for s, st in states.items() if int(s) in mine}
        ds.states, ds.turns = dict(self.states), dict(self.turns)
        ds.worker_offset = self.next_worker
        self._it = None
