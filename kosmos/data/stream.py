"""One source's stream: shards -> shuffled samples -> packed micro-batches, split over ranks and workers,
with a position that is saved in every checkpoint and restored exactly.

Who reads what. The G = world_size x workers global workers each get their own share: with at least G
shards, global worker g reads shards order[g::G] whole (order: the sorted shard list, shuffled per epoch
with the seed); with fewer shards than workers, every worker reads every shard and keeps the samples whose
offset in the shard is g modulo G. Either way one pass gives every sample to exactly one worker. In
training the stream is infinite (epoch after epoch, a new shard order each time); for evaluation it is one
pass in the sorted order.

The resume guarantee. Each micro-batch leaves its worker with that worker's state: the epoch, how far it
has read (shard and sample offset), the positions of the samples in its shuffle buffer, the buffer's RNG
state, and the sample the next row starts with (position and token offset). The main process keeps, per
worker, the state of the last micro-batch it actually consumed, and which worker comes next. A resumed run
(same world size and workers per rank) rebuilds every worker exactly there: the shuffle buffer is re-read
from its positions, the unfinished document is re-read and cut at its offset, and DataLoader's round robin
restarts at the saved next worker. So it yields exactly the micro-batches that the uninterrupted run would
have yielded next: nothing consumed is replayed and nothing is skipped. Micro-batches that workers had
prefetched but the trainer had not consumed are not part of the state; they are produced again.

Every caption counts. A caption sample with several captions (`KEY.json` `"captions"`, see
`kosmos.data.format.captions`) is visited as `data.<source>.caption_choice` says:

    first    KEY.txt, every time (what training did before the key existed)
    random   (default) one caption per visit, drawn from (seed, epoch, shard, offset): each epoch still sees
             every image once, so the source's images and epoch length are as with one caption, while over
             the epochs every caption is used; the draw is a pure function of the position, so a resumed or
             repeated run draws the same captions
    all      each caption is a sample of its own: an image with 5 captions is visited 5 times per epoch
             (spread by the shuffle buffer; without one its captions follow each other)

Such a visit's position is `(shard, offset, caption)` (a sample with one caption keeps `(shard, offset)`), and
the cursor also remembers how many visits of the sample at `offset` were read (`sub`), so that the caption is
part of what a checkpoint stores and restores.

Faults. A shard that vanishes or breaks is skipped and counted; so is a remote one (a URL or pipe:, see
`kosmos.data.remote`) that keeps failing after its retries, by reason, and the worker's state names it
(`failed`) so that the training log can say which. Remote reads that keep failing one after the other
(storage down: each costs its timeouts and retries) stop the run with a `DataError` once they have taken
`data.read_give_up` seconds without a sample in between. A worker whose whole pass finds no sample
although it found some before (its shards deleted or unmounted mid-run) waits and tries again
(`RETRY_WAITS`), then stops the run with a `DataError` naming the source; so does a source with no sample at
all. Workers ignore SIGTERM and SIGINT, which go to the whole process group (`timeout`, SLURM, container
stops, Ctrl-C): the main process handles them, saves a checkpoint and ends the workers.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kosmos.config import ConfigError
from kosmos.data.packing import Packer, Row, collate
from kosmos.data.format import CAPTION_CHOICES, LOSSES, captions
from kosmos.data.samples import BadSample, Encoded, encode_sample
from kosmos.data.remote import DEFAULT as DEFAULT_READ
from kosmos.data.remote import ReadOptions
from kosmos.data.shards import read_positions, read_shard
from kosmos.sequence import SequenceEncoder


MAX_FAILED = 20
"""Skipped shards a worker's state names (the newest); all of them are counted in `skipped`."""

RETRY_WAITS = (1.0, 2.0, 4.0)
"""Seconds a worker waits before each new pass when a whole pass found no sample (shards gone mid-run, or a
file system that comes back); after the last, a DataError stops the run."""


class DataError(RuntimeError):
    """A source that cannot go on: no sample at all, or no readable shard left. Raised in the main process,
    with a one-line message naming the source."""


_EXITING = multiprocessing.Event()
"""Set when the main process exits: from then on a worker takes SIGTERM as multiprocessing's exit handler's
terminate(), which it must obey, and no longer as a signal to the process group."""
atexit.register(_EXITING.set)  # registered after multiprocessing's own exit handler, so it runs before it


def _worker_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGTERM and SIGINT sent to the whole process group (`timeout`, SLURM
    preemption, container stops, Ctrl-C) are the main process's to handle (a checkpoint, then a clean exit);
    a worker killed by one would crash the run instead. Once the main process exits, SIGTERM ends it."""
    exiting = get_worker_info().dataset.exiting

    def on_sigterm(signum, frame):
        if exiting.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class WorkerStream:
    """One global worker's deterministic, resumable stream of encoded samples."""

    def __init__(self, kind: str, shards: list[str], g: int, G: int, *, encoder: SequenceEncoder,
                 seed: int = 0, infinite: bool = True, shuffle_buffer: int = 0, max_tokens: int = 0,
                 loss: str = "all", caption_choice: str = "random", state: dict | None = None,
                 name: str | None = None, read_options: ReadOptions | None = None):
        self.kind, self.shards, self.g, self.G = kind, shards, g, G
        self.name = name or kind  # the source's name, for messages
        self.encoder, self.max_tokens = encoder, max_tokens
        self.loss, self.caption_choice = loss, caption_choice
        self.seed, self.infinite, self.buffer_size = seed, infinite, shuffle_buffer
        self.split_samples = len(shards) < G
        self.rng = random.Random(f"kosmos-shuffle-{seed}-{g}")
        self.skipped: Counter = Counter()
        self.read_options = read_options
        self.failed: dict[str, str] = {}  # shard -> why it was skipped (the newest MAX_FAILED), for the log
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
        order = list(range(len(self.shards)))
        if self.infinite:
            random.Random(f"kosmos-shards-{self.seed}-{epoch}").shuffle(order)
        return order if self.split_samples else order[self.g :: self.G]

    def _visits(self, shard: int, offset: int, raw: dict) -> list[tuple[int, ...]]:
        """The positions under which this epoch visits a sample: `(shard, offset)`, or for a caption sample
        with several captions `(shard, offset, caption)` per caption visited (module docstring)."""
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

    def _raw(self) -> Iterator[tuple[tuple[int, ...], dict]]:
        """(position, raw sample) from the cursor on, advancing it."""
        retries = 0
        failing = 0.0  # seconds spent in the shard reads that failed since the last sample
        give_up = (self.read_options or DEFAULT_READ).give_up
        while True:
            order = self._order(self.epoch)
            got = 0
            while self.k < len(order):
                shard = order[self.k]
                start, g, G, split = self.offset, self.g, self.G, self.split_samples
                t0, got_before = time.monotonic(), got

                def want(offset: int) -> bool:  # the samples before the cursor are streamed past, unread
                    return offset >= start and not (split and offset % G != g)

                for offset, raw in read_shard(self.shards[shard], self.skipped, want=want,
                                              options=self.read_options, failed=self.failed):
                    visits = self._visits(shard, offset, raw)
                    done = self.sub if offset == self.offset else 0
                    for i in range(done, len(visits)):
                        self.offset, self.sub = offset, i + 1
                        got += 1
                        yield visits[i], raw
                self.k, self.offset, self.sub = self.k + 1, -1, 0
                # A read that yielded nothing never paused, so its time is all spent failing.
                failed_now = self.shards[shard] in self.failed
                failing = 0.0 if got > got_before else failing + (time.monotonic() - t0) * failed_now
                if failing > give_up:
                    raise DataError(
                        f"{self.kind}: no sample for {failing:.0f}s: worker {self.g} of {self.G}'s shard "
                        f"reads keep failing (skipped: {dict(self.skipped)}{self._last_failure()}); is the "
                        f"storage reachable? Fix it and resume with --resume latest (data.read_give_up="
                        f"{give_up:g})")
                while len(self.failed) > MAX_FAILED:  # the newest are kept (all are counted)
                    del self.failed[next(iter(self.failed))]
            if not self.infinite:
                return
            if got == 0 and self.n_samples == 0:
                raise DataError(
                    f"{self.name}: worker {self.g} of {self.G} found no samples in a whole pass over "
                    f"{len(self.shards)} shard(s) (skipped: {dict(self.skipped)}{self._last_failure()}); use "
                    "fewer workers or check the shards with `python -m data_tools.verify`")
            if got == 0:  # it read samples before: the shards went away (or a file system is down)
                if retries == len(RETRY_WAITS):
                    raise DataError(
                        f"{self.name}: no readable shard left: {retries + 1} passes over the {len(order)} "
                        f"shard(s) of worker {self.g} of {self.G} ({self.shards[order[0]]}, ...) found no "
                        f"sample within {sum(RETRY_WAITS):.0f}s (skipped: {dict(self.skipped)}"
                        f"{self._last_failure()}); were they deleted or moved? Put them back and resume with "
                        "--resume latest")
                time.sleep(RETRY_WAITS[retries])
                retries += 1
                self.k, self.offset, self.sub = 0, -1, 0  # the same epoch again
                continue
            retries = 0
            self.epoch, self.k, self.offset, self.sub = self.epoch + 1, 0, -1, 0

    def _last_failure(self) -> str:
        if not self.failed:
            return ""
        spec, why = next(reversed(self.failed.items()))
        return f"; last: {spec}: {why}"

    def _shuffled(self) -> Iterator[tuple[tuple[int, int], dict]]:
        for item in self._raw():
            if self.buffer_size <= 1:
                yield item
                continue
            self.buffer.append(item)
            if len(self.buffer) >= self.buffer_size:
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

    def encoded(self) -> Iterator[Encoded]:
        """Encoded samples: first the unfinished document of a restored state, then the stream."""
        if self.carry is not None:  # already counted before the checkpoint
            carry, self.carry = self.carry, None
            yield carry
        for pos, raw in self._shuffled():
            item = self._encode(pos, raw)
            if item is not None:
                self.n_samples += 1
                self.truncated += item.truncated
                yield item

    # ------------------------------------------------------------------ state

    def state(self, carry: Encoded | None) -> dict:
        return {
            "epoch": self.epoch, "k": self.k, "offset": self.offset, "sub": self.sub,
            "buffer": [list(pos) for pos, _ in self.buffer],
            "rng": _rng_state(self.rng),
            "carry": [*carry.pos, carry.start] if carry is not None else None,  # position, then tokens done
            "skipped": dict(self.skipped), "samples": self.n_samples, "truncated": self.truncated,
            "failed": dict(self.failed),
        }

    def _restore(self, st: dict) -> None:
        self.epoch, self.k, self.offset = st["epoch"], st["k"], st["offset"]
        self.sub = st.get("sub", 1 if st["offset"] >= 0 else 0)  # older checkpoints: one visit per sample
        _set_rng_state(self.rng, st["rng"])
        self.skipped = Counter(st["skipped"])
        self.n_samples = st["samples"]
        self.truncated = st.get("truncated", 0)  # absent from checkpoints older than max_tokens
        self.failed = dict(st.get("failed", {}))
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


class SourceDataset(IterableDataset):
    """Packed micro-batches of one source for one rank; each carries its worker's state. `kind` says how its
    samples are read; `name` (default: the kind) and `key` (its config key, default `data.<name>`) are for
    messages."""

    def __init__(self, kind: str, shards: list[str], encoder: SequenceEncoder, *, max_len: int,
                 micro_batch_size: int, num_workers: int = 0, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, infinite: bool = True, max_tokens: int = 0, loss: str = "all",
                 caption_choice: str = "random", name: str | None = None, key: str | None = None,
                 read_options: ReadOptions | None = None):
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
        self.exiting = _EXITING  # the workers' copy (fork or spawn) of the main process's exit flag
        self.states: dict[int, dict] = {}  # logical worker -> state to resume from
        self.worker_offset = 0  # physical worker 0 plays this logical worker (DataLoader starts at 0)

    def worker_stream(self, logical: int) -> WorkerStream:
        nw = max(1, self.num_workers)
        return WorkerStream(self.kind, self.shards, self.rank * nw + logical, self.world_size * nw,
                            encoder=self.encoder, seed=self.seed, infinite=self.infinite, shuffle_buffer=self.shuffle_buffer,
                            max_tokens=self.max_tokens, loss=self.loss, caption_choice=self.caption_choice,
                            state=self.states.get(logical), name=self.name, read_options=self.read_options)

    def __iter__(self):
        info = get_worker_info()
        nw = max(1, self.num_workers)
        if info is not None and info.num_workers != nw:
            raise RuntimeError(f"SourceDataset built for {nw} workers runs under {info.num_workers}")
        logical = ((info.id if info else 0) + self.worker_offset) % nw
        packer = Packer(self.max_len, self.encoder.num_latents, self.encoder.pad_id)
        rows: list[Row] = []
        try:
            stream = self.worker_stream(logical)
            for row, carry in packer.pack(stream.encoded()):
                rows.append(row)
                if len(rows) == self.micro_batch_size:
                    yield self._batch(rows, stream, carry, logical)
                    rows = []
        except DataError as e:  # to the main process as an item: its message alone, not a worker traceback
            yield {"error": str(e), "worker": logical}
            return
        if rows:  # the end of a finite pass: a last, smaller micro-batch
            yield self._batch(rows, stream, None, logical)
        else:  # no batch left, but the final counts (skipped samples) must still reach the main process
            yield {"state": stream.state(None), "worker": logical, "empty": True}

    def _batch(self, rows: list[Row], stream: WorkerStream, carry: Encoded | None, logical: int) -> dict:
        batch = collate(rows, self.encoder.image_size)
        batch["n_real"] = torch.tensor(sum(r.n_real for r in rows))
        batch["sample_positions"] = [pos for r in rows for pos in r.starts]
        batch["state"] = stream.state(carry)
        batch["worker"] = logical
        return batch


class SourceLoader:
    """A DataLoader over a SourceDataset that remembers, per worker, the state of the last micro-batch
    handed to the trainer, so that `state_dict()` is exactly the position of what was consumed."""

    def __init__(self, dataset: SourceDataset, prefetch_factor: int = 2):
        self.dataset = dataset
        self.num_workers = dataset.num_workers
        self.prefetch_factor = prefetch_factor
        self.states: dict[int, dict] = dict(dataset.states)
        self.next_worker = dataset.worker_offset
        self._it = None
        self._workers = None  # the DataLoader iterator that owns the worker processes
        self.missing_shards: list[str] = []
        """Shards named in the config that do not exist (allowed by data.allow_missing_shards), for the
        log."""

    def __iter__(self):
        kw = {"prefetch_factor": self.prefetch_factor, "worker_init_fn": _worker_signals} \
            if self.num_workers > 0 else {}
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, **kw)
        nw = max(1, self.num_workers)
        batches = iter(loader)
        if self.num_workers > 0:
            self._workers = batches
        for batch in batches:
            if "error" in batch:
                raise DataError(batch["error"])
            w = batch.pop("worker")
            self.states[w] = batch.pop("state")
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
        if batches is None:
            return
        procs = list(getattr(batches, "_workers", []))
        getattr(batches, "_shutdown_workers", lambda: None)()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()

    def skipped(self) -> Counter:
        """Bad samples skipped so far, by reason, over this rank's workers."""
        total: Counter = Counter()
        for st in self.states.values():
            total.update(st["skipped"])
        return total

    def samples_seen(self) -> int:
        return sum(st["samples"] for st in self.states.values())

    def failed_shards(self) -> dict[str, str]:
        """Shards skipped so far (the newest of each worker), by spec: reason and detail, for the log."""
        out: dict[str, str] = {}
        for st in self.states.values():
            out.update(st.get("failed", {}))
        return out

    def truncated(self) -> int:
        """Samples cut to `max_tokens` so far, over this rank's workers."""
        return sum(st.get("truncated", 0) for st in self.states.values())

    def state_dict(self) -> dict:
        return {"kind": self.dataset.kind, "world_size": self.dataset.world_size, "num_workers": self.num_workers,
                "next_worker": self.next_worker, "workers": {str(k): v for k, v in self.states.items()}}

    def load_state_dict(self, sd: dict) -> None:
        ds = self.dataset
        if (sd["world_size"], sd["num_workers"]) != (ds.world_size, self.num_workers):
            raise ConfigError(
                f"{ds.name}: the data position was saved with world_size={sd['world_size']} and "
                f"{sd['num_workers']} workers per rank, but this run has world_size={ds.world_size} and "
                f"{self.num_workers}; resume with the same layout (or start the data from scratch)")
        self.states = {int(k): v for k, v in sd["workers"].items()}
        self.next_worker = sd["next_worker"]
        ds.states = dict(self.states)
        ds.worker_offset = self.next_worker
        self._it = None
