"""One source's stream for one rank: shards -> shuffled samples -> packed micro-batches, split over ranks and
workers, with a position that is saved in every checkpoint and restored exactly.

`SourceDataset` runs in each DataLoader worker: it reads the worker's logical streams in turn, packs their
samples into rows and yields micro-batches that carry the streams' states. `SourceLoader`, in the main
process, keeps the states of the last micro-batch it handed out (`state_dict`) and restores them
(`load_state_dict`): on the same layout exactly, on another dealt over the new workers (elastic resume).

    streams.py  logical streams (pure Python): parts, order, shuffle, positions; split, completed and
                remapped positions, upgrades of old saved ones
    retry.py    the rules that stop a source: reads that keep failing, passes that find nothing
    workers.py  the worker processes: forkserver, launch, signals, start and close

The full description, the one copy of it: docs/data.md, "What resume guarantees for the data".
"""

from __future__ import annotations

import functools
from collections import Counter

import torch
from torch.utils.data import IterableDataset, get_worker_info

from kosmos.config import ConfigError, SourceConfig
from kosmos.data import retry
from kosmos.data.format import CAPTION_CHOICES, LOSSES
from kosmos.data.packing import Packer, Row, collate
from kosmos.data.remote import ReadOptions
from kosmos.data.samples import Encoded, encode_sample
from kosmos.data.shards import DataError
from kosmos.data.state import shard_digest
from kosmos.data.streams import (  # noqa: F401 - re-exported: the names' home before kosmos.data.streams
    MAX_STREAMS,
    LogicalStream,
    Turns,
    complete_streams,
    default_part,
    rank_data_state,
    remap_streams,
    split_streams,
    upgrade_state,
)
from kosmos.data.workers import Launch, close_workers, open_loader, start_worker_server
from kosmos.sequence import SequenceEncoder


class SourceDataset(IterableDataset):
    """Packed micro-batches of one source for one rank; each carries its worker's state.

    `source`: the source's settings (`data.<name>`, kosmos.config.SourceConfig): its kind (how its samples
    are read), micro_batch_size, workers (per rank), shuffle_buffer, max_tokens, loss and caption_choice; its
    `shards` patterns are not read here: `shards` is the expanded list (kosmos.data.shards.expand_shards), the
    training or the evaluation shards. `infinite`: training (passes without end, shards shuffled per epoch) or
    one pass in order. `seed` orders the data (kosmos.data.mixture.source_seed); `streams`, the logical
    streams (0: the default, MAX_STREAMS at most); `name` (default: the kind) and `key` (its config key,
    default `data.<name>`) are for messages; `read_options`, for remote shards (`data.read_*`)."""

    def __init__(self, source: SourceConfig, shards: list[str], encoder: SequenceEncoder, *, max_len: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, infinite: bool = True, streams: int = 0,
                 name: str | None = None, key: str | None = None, read_options: ReadOptions | None = None):
        super().__init__()
        kind, max_tokens = source.kind, source.max_tokens
        self.read_options = read_options
        self.name = name = name or kind
        key = key or f"data.{name}"
        if not shards:
            raise ValueError(f"{name}: no shards")
        if source.loss not in LOSSES:
            raise ValueError(f"config key '{key}.loss': {source.loss!r} is not one of {', '.join(LOSSES)}")
        if source.caption_choice not in CAPTION_CHOICES:
            raise ValueError(f"config key '{key}.caption_choice': {source.caption_choice!r} is not one of "
                             f"{', '.join(CAPTION_CHOICES)}")
        self.loss, self.caption_choice = source.loss, source.caption_choice
        if 0 < max_tokens < encoder.span + 2:
            raise ValueError(f"config key '{key}.max_tokens': {max_tokens} cannot hold <s>, an image "
                             f"span ({encoder.span} tokens) and a token of text; use 0 (no cap) or at least "
                             f"{encoder.span + 2}")
        self.max_tokens = max_tokens
        self.kind, self.shards, self.encoder, self.max_len = kind, list(shards), encoder, max_len
        self.micro_batch_size, self.num_workers = source.micro_batch_size, source.workers
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.infinite = source.shuffle_buffer, infinite
        self.retry_waits = retry.RETRY_WAITS  # carried to the workers (a forkserver's worker has its own)
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

    def stream(self, s: int, shuffle_buffer: int | None = None,
               reads: retry.FailingReads | None = None) -> LogicalStream:
        encode = functools.partial(encode_sample, self.kind, encoder=self.encoder, max_tokens=self.max_tokens,
                                   loss=self.loss)
        return LogicalStream(self.kind, self.shards, s, self.n_streams, encode=encode, seed=self.seed,
                             infinite=self.infinite,
                             shuffle_buffer=self.shuffle_buffer if shuffle_buffer is None else shuffle_buffer,
                             caption_choice=self.caption_choice, state=self.states.get(s), name=self.name,
                             read_options=self.read_options, reads=reads)

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
            reads = retry.FailingReads()  # shared by the worker's streams: give_up counts all their failures
            streams = {s: self.stream(s, buffer, reads) for s in ids}
            for st in streams.values():
                st.worker = worker
            turns = Turns(streams, self.turns.get(logical), worker, self.name, self.retry_waits)
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
    def _state(turns: Turns, carry: Encoded | None) -> dict:
        streams = {s: st.state(carry if s == turns.last else None) for s, st in turns.streams.items()}
        return {"streams": streams, "next": turns.next}

    def _batch(self, rows: list[Row], turns: Turns, carry: Encoded | None, logical: int) -> dict:
        batch = collate(rows, self.encoder.image_size)
        batch["n_real"] = torch.tensor(sum(r.n_real for r in rows))
        batch["sample_positions"] = [pos for r in rows for pos in r.starts]
        batch["state"] = self._state(turns, carry)
        batch["worker"] = logical
        return batch


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
        return [int(self.states[s]["epoch"]) if s in self.states else 0
                for s in range(self.dataset.n_streams)]

    def state_dict(self) -> dict:
        """The position of what was consumed; with the digest of the shard list (and on rank 0 the list
        itself), so that a resume over a changed shard folder is noticed and remapped (remap_streams)."""
        ds = self.dataset
        return {"kind": ds.kind, "world_size": ds.world_size, "num_workers": self.num_workers,
                "n_streams": ds.n_streams, "next_worker": self.next_worker,
                "turns": {str(w): s for w, s in self.turns.items()},
                "streams": {str(s): st for s, st in self.states.items()},
                "shards_digest": shard_digest(ds.shards),
                **({"shards": list(ds.shards)} if ds.rank == 0 else {})}

    def _remapped(self, states: dict[int, dict], sd: dict, S: int, wanted) -> dict[int, dict]:
        """`states` for this run's shard list, when it is not the one they were saved with (remap_streams;
        the streams of `wanted` without a state completed first, with the old list's parts); refused, naming
        --reset-data, when the checkpoint holds the digest but not the list."""
        ds = self.dataset
        saved = sd.get("shards_digest")
        if saved is None or saved == shard_digest(ds.shards):  # the same list (or a checkpoint before
            # digests)
            return states
        old = sd.get("shards") or next((d.get("shards") for d in sd.get("ranks") or [] if d.get("shards")),
                                       None)
        if old is None:
            raise ConfigError(f"{ds.name}: the shard list changed since the checkpoint, which does not "
                              f"hold the list it was saved with (rank 0's data position); start this "
                              f"source's data over with --reset-data {ds.name}")
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
        own = upgrade_state(sd, ds.rank)
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
            states = {int(k): v for r, d in enumerate(ranks)
                      for k, v in upgrade_state(d, r)["streams"].items()}
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
