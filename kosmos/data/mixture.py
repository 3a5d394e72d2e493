"""The mixture: a token budget per source per optimizer step, turned into per-source micro-batches.

The paper's batch is 1.2M tokens: 0.5M text, 0.5M image-caption, 0.2M interleaved. With rows of `max_len`
tokens, `world_size` ranks and `micro_batch_size` rows per forward pass, a source gets
round(tokens_per_step / (max_len * micro_batch_size * world_size)) micro-batches per rank per step (at least
one). `plan()` reports the effective budgets so that a run says what it really trains on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kosmos.config import Config
from kosmos.data.shards import expand_shards
from kosmos.data.stream import SourceDataset, SourceLoader
from kosmos.sequence import SequenceEncoder


@dataclass
class SourcePlan:
    name: str
    micro_batches: int
    """Micro-batches per rank per optimizer step."""
    micro_batch_size: int
    tokens_per_step: int
    """Effective tokens per step over all ranks (padding included)."""


def plan(cfg: Config, world_size: int = 1) -> dict[str, SourcePlan]:
    L = cfg.decoder.max_len
    out = {}
    for name, src in cfg.data.sources().items():
        n = max(1, round(src.tokens_per_step / (L * src.micro_batch_size * world_size)))
        out[name] = SourcePlan(name, n, src.micro_batch_size, n * src.micro_batch_size * L * world_size)
    if not out:
        raise ValueError("no data: give at least one of data.text/captions/interleaved shards and a "
                         "positive tokens_per_step")
    return out


def build_loader(cfg: Config, name: str, encoder: SequenceEncoder, *, rank: int = 0, world_size: int = 1,
                 train: bool = True) -> SourceLoader:
    """The loader of one source: training (infinite, shuffled) or evaluation (one pass, in order)."""
    src = getattr(cfg.data, name)
    shards = expand_shards(src.shards if train else src.eval_shards)
    ds = SourceDataset(
        name, shards, encoder, max_len=cfg.decoder.max_len, micro_batch_size=src.micro_batch_size,
        num_workers=src.workers, rank=rank, world_size=world_size, seed=cfg.seed,
        shuffle_buffer=src.shuffle_buffer if train else 0, infinite=train)
    return SourceLoader(ds)


class Mixture:
    """Per optimizer step, the planned number of micro-batches from each source, interleaved."""

    def __init__(self, loaders: dict[str, SourceLoader], plans: dict[str, SourcePlan]):
        self.loaders, self.plans = loaders, plans

    def step(self) -> Iterator[tuple[str, dict]]:
        """(source, micro-batch) pairs for one optimizer step, sources taking turns."""
        left = {name: p.micro_batches for name, p in self.plans.items()}
        while any(left.values()):
            for name in self.plans:
                if left[name]:
                    left[name] -= 1
                    yield name, next(self.loaders[name])

    def state_dict(self) -> dict:
        return {name: loader.state_dict() for name, loader in self.loaders.items()}

    def load_state_dict(self, sd: dict) -> None:
        for name, loader in self.loaders.items():
            if name in sd:
                loader.load_state_dict(sd[name])

    def samples_seen(self) -> int:
        """Samples this rank has started packing, over all sources."""
        return sum(loader.samples_seen() for loader in self.loaders.values())

    def skipped(self) -> dict[str, dict[str, int]]:
        return {name: dict(loader.skipped()) for name, loader in self.loaders.items()}


def build_mixture(cfg: Config, encoder: SequenceEncoder, *, rank: int = 0, world_size: int = 1) -> Mixture:
    plans = plan(cfg, world_size)
    loaders = {name: build_loader(cfg, name, encoder, rank=rank, world_size=world_size) for name in plans}
    return Mixture(loaders, plans)
