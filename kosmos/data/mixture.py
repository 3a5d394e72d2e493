"""The mixture: a token budget per source per optimizer step, turned into per-source micro-batches.

The paper's batch is 1.2M tokens: 0.5M text, 0.5M image-caption, 0.2M interleaved, a 5:5:2 ratio; any number
of sources is mixed the same way (`data.sources.<name>`), each by its name. A micro-batch of a source is
`micro_batch_size` rows of `max_len` tokens. The plan is made for the whole step, all ranks together, so that
neither the ratio nor the total depends on the number of processes:

* Each source gets about `tokens_per_step / (max_len * micro_batch_size)` micro-batches per step over all
  ranks. When a step's micro-batches can be dealt out evenly (every rank the same number of passes, within
  `data.mixture_tolerance`), that plan wins: no rank waits for another. Otherwise every source is rounded on
  its own and the ranks' pass counts differ by at most one (the others wait at the gradient sync).
* The step's micro-batches are dealt to the ranks in turn; rank r at step t takes the share of slot
  (r + t) mod world_size, so that over world_size steps every rank reads every source equally (each rank
  reads its own part of every source's shards, see kosmos/data/streams.py).
* The ratio or total off by more than `data.mixture_tolerance` (relative) is refused unless
  `data.allow_mixture_drift`; the effective numbers are printed at start (training.describe_mixture).

Every rank makes the same plan from the config; only the slot it takes differs. The slot rotation counter is
part of each rank's data state, so a resumed run deals the same micro-batches as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from kosmos.config import SOURCES, Config, DataConfig
from kosmos.data.remote import ReadOptions
from kosmos.data.shards import expand_shards
from kosmos.data.stream import SourceDataset, SourceLoader
from kosmos.sequence import SequenceEncoder


@dataclass
class SourcePlan:
    name: str
    micro_batches: int
    """Micro-batches per optimizer step over all ranks."""
    micro_batch_size: int
    tokens_per_step: int
    """Effective tokens per step over all ranks (row slots, padding and image slots included)."""
    budget: int
    """The configured `data.<name>.tokens_per_step`."""


@dataclass
class MixturePlan:
    """One step's micro-batches per source over all ranks, and which rank takes which."""

    sources: dict[str, SourcePlan]
    world_size: int
    slots: list[dict[str, int]] = field(default_factory=list)
    """Per slot (one per rank), micro-batches of each source; rank r takes slot (r + step) % world_size."""

    def counts(self, rank: int, step: int) -> dict[str, int]:
        """Micro-batches of each source that `rank` runs at its `step`-th mixture step."""
        return self.slots[(rank + step) % self.world_size]

    @property
    def tokens(self) -> int:
        return sum(p.tokens_per_step for p in self.sources.values())

    @property
    def budget(self) -> int:
        return sum(p.budget for p in self.sources.values())

    def shares(self) -> dict[str, float]:
        return {n: p.tokens_per_step / self.tokens for n, p in self.sources.items()}

    def target_shares(self) -> dict[str, float]:
        return {n: p.budget / self.budget for n, p in self.sources.items()}

    def drift(self) -> float:
        """The largest relative error of the total or of a source's share of the step."""
        target = self.target_shares()
        errors = [abs(self.tokens / self.budget - 1)]
        errors += [abs(s / target[n] - 1) for n, s in self.shares().items()]
        return max(errors)

    def passes(self) -> tuple[int, int]:
        """Fewest and most forward/backward passes of a rank in one step."""
        totals = [sum(s.values()) for s in self.slots]
        return min(totals), max(totals)

    @property
    def balanced(self) -> bool:
        lo, hi = self.passes()
        return lo == hi


def _largest_remainder(x: dict[str, float], total: int) -> dict[str, int]:
    """Integers summing to `total`, proportional to `x` (ties to the first source)."""
    s = sum(x.values())
    exact = {n: v * total / s for n, v in x.items()}
    out = {n: math.floor(v) for n, v in exact.items()}
    for n in sorted(x, key=lambda n: out[n] - exact[n])[: total - sum(out.values())]:
        out[n] += 1
    return out


def _deal(counts: dict[str, int], world_size: int) -> list[dict[str, int]]:
    """Deal the step's micro-batches, source after source, to `world_size` slots in turn (the count going on
    from one source to the next): slot totals, and each source's per-slot counts, differ by at most one."""
    slots = [dict.fromkeys(counts, 0) for _ in range(world_size)]
    k = 0
    for n, c in counts.items():
        for _ in range(c):
            slots[k % world_size][n] += 1
            k += 1
    return slots


def plan(cfg: Config, world_size: int = 1) -> MixturePlan:
    """The step's mixture for `world_size` ranks (see the module docstring); ValueError, naming the config
    key, when no source takes part or the ratio or total drifts beyond `data.mixture_tolerance`."""
    L = cfg.decoder.max_len
    sources = cfg.data.active_sources()
    if not sources:
        raise ValueError("no data: give at least one source (data.text, data.captions, data.interleaved or "
                         "data.sources.<name>) shards and a positive tokens_per_step")
    mbs = {n: s.micro_batch_size for n, s in sources.items()}
    ideal = {n: s.tokens_per_step / (L * mbs[n]) for n, s in sources.items()}

    def make(counts: dict[str, int]) -> MixturePlan:
        plans = {n: SourcePlan(n, c, mbs[n], c * mbs[n] * L, sources[n].tokens_per_step)
                 for n, c in counts.items()}
        return MixturePlan(plans, world_size, _deal(counts, world_size))

    # Every source rounded on its own, at least one micro-batch, and at least one pass per rank.
    free = {n: max(1, round(v)) for n, v in ideal.items()}
    if sum(free.values()) < world_size:
        free = _largest_remainder(ideal, world_size)
    candidates = [make(free)]
    # Balanced: N passes on every rank, the step's N * world_size micro-batches split by the budgets.
    n_ideal = sum(ideal.values()) / world_size
    for n in {max(1, math.floor(n_ideal)), max(1, math.ceil(n_ideal))}:
        counts = _largest_remainder(ideal, n * world_size)
        if all(counts.values()):
            candidates.append(make(counts))
    tol = cfg.data.mixture_tolerance
    balanced = [p for p in candidates if p.balanced and p.drift() <= tol]
    best = min(balanced or candidates, key=MixturePlan.drift)
    if best.drift() > tol and not cfg.data.allow_mixture_drift:
        raise ValueError(
            f"config key 'data.mixture_tolerance': on {world_size} process(es) the mixture can be at best "
            f"{ratio(best)} with {best.tokens:,} tokens per step, {best.drift():.1%} off the budgets "
            f"(target {ratio(best, target=True, names=False)}, {best.budget:,} tokens) and beyond the "
            f"tolerance {tol:.1%}; change {_most_off(cfg, best)}, or set data.allow_mixture_drift=true")
    return best


def _most_off(cfg: Config, p: MixturePlan) -> str:
    """The keys to change for the source(s) whose tokens per step are furthest from their budget once made of
    whole micro-batches (what the tolerance refusal names)."""
    off = {n: abs(s.tokens_per_step / s.budget - 1) for n, s in p.sources.items()}
    worst = [n for n, e in off.items() if e >= max(off.values()) - 1e-9]
    return " or ".join(
        f"{cfg.data.key(n)}.tokens_per_step or {cfg.data.key(n)}.micro_batch_size ({p.sources[n].budget:,} "
        f"tokens budgeted, {p.sources[n].tokens_per_step:,} in micro-batches of "
        f"{p.sources[n].micro_batch_size} x {cfg.decoder.max_len})" for n in worst)


def ratio(p: MixturePlan, target: bool = False, names: bool = True) -> str:
    """`text:captions:interleaved 0.419:0.419:0.162` (the source names): the shares of the step's tokens (or
    of the budgets); without `names`, the numbers only."""
    shares = p.target_shares() if target else p.shares()
    numbers = ":".join(f"{s:.3f}" for s in shares.values())
    return f"{':'.join(shares)} {numbers}" if names else numbers


def source_seed(cfg: Config, name: str) -> int:
    """The seed of source `name`'s data order (shard order, shuffle buffer, caption draws): `seed` for
    data.text/captions/interleaved, as before named sources existed; for a `data.sources.<name>`, one drawn
    from (seed, name), so that two sources given the same shards (to weigh them up, say) do not read them in
    the same order."""
    return cfg.seed if name in SOURCES else zlib.crc32(f"kosmos-source-{cfg.seed}-{name}".encode())


def build_loader(cfg: Config, name: str, encoder: SequenceEncoder, *, rank: int = 0, world_size: int = 1,
                 train: bool = True) -> SourceLoader:
    """The loader of source `name` (any of cfg.data.named_sources()): training (infinite, shuffled) or
    evaluation (one pass, in order)."""
    src = cfg.data.source(name)
    missing: list[str] = []
    shards = expand_shards(src.shards if train else src.eval_shards, cfg.data.allow_missing_shards, missing)
    read = ReadOptions(timeout=cfg.data.read_timeout, retries=cfg.data.read_retries,
                       give_up=cfg.data.read_give_up, min_speed=cfg.data.read_min_speed)
    ds = SourceDataset(src if train else dataclasses.replace(src, shuffle_buffer=0), shards, encoder,
                       max_len=cfg.decoder.max_len, rank=rank, world_size=world_size,
                       seed=source_seed(cfg, name), infinite=train, name=name, key=cfg.data.key(name),
                       read_options=read)
    loader = SourceLoader(ds)
    loader.missing_shards = missing
    return loader


class Mixture:
    """Per optimizer step, this rank's share of the planned micro-batches of every source, interleaved."""

    STATE_KEY = "_mixture"
    """The data state's entry for the mixture itself (not a source name)."""

    def __init__(self, loaders: dict[str, SourceLoader], plan: MixturePlan, rank: int = 0):
        self.loaders, self.plan, self.rank = loaders, plan, rank
        self.steps = 0
        """Mixture steps taken (skipped optimizer steps included): which slot this rank takes next."""
        self._failures_logged: set[tuple[str, str]] = set()
        self.resume_note: str | None = None
        """Set by load_state_dict when the checkpoint's mixture differs from this run's: for the log."""

    @property
    def plans(self) -> dict[str, SourcePlan]:
        return self.plan.sources

    def counts(self) -> dict[str, int]:
        """This rank's micro-batches per source in the next step."""
        return self.plan.counts(self.rank, self.steps)

    def step(self, waiting=None) -> Iterator[tuple[str, dict]]:
        """(source, micro-batch) pairs of this rank for one optimizer step, sources taking turns. `waiting`:
        a context manager factory (kosmos.watchdog.Watchdog.waiting) that each wait for a micro-batch runs
        under, named by its source's config key (`data.captions`, `data.sources.web`)."""
        left = dict(self.counts())
        self.steps += 1
        while any(left.values()):
            for name in self.plans:
                if left[name]:
                    left[name] -= 1
                    with waiting(DataConfig.key(name)) if waiting else contextlib.nullcontext():
                        batch = next(self.loaders[name])
                    yield name, batch

    def _plan_state(self) -> dict[str, int]:
        return {n: p.micro_batches for n, p in self.plans.items()}

    def state_dict(self) -> dict:
        sd = {name: loader.state_dict() for name, loader in self.loaders.items()}
        sd[self.STATE_KEY] = {"steps": self.steps, "micro_batches": self._plan_state()}
        return sd

    def load_state_dict(self, sd: dict) -> None:
        for name, loader in self.loaders.items():
            if name in sd:
                loader.load_state_dict(sd[name])
        own = sd.get(self.STATE_KEY)
        if own is None:  # a checkpoint from before the whole-step plan: per-rank counts, no rotation
            self.resume_note = ("the checkpoint predates the whole-step mixture plan: data positions "
                                "restored, the mixture from here on follows this run's plan (printed below)")
            return
        self.steps = int(own["steps"])
        if own["micro_batches"] != self._plan_state():
            self.resume_note = (f"the mixture changed since the checkpoint: micro-batches per step were "
                                f"{own['micro_batches']}, now {self._plan_state()}")

    def close(self) -> None:
        """End every source's worker processes."""
        for loader in self.loaders.values():
            loader.close()

    def samples_seen(self) -> int:
        """Samples this rank has started packing, over all sources."""
        return sum(loader.samples_seen() for loader in self.loaders.values())

    def skipped(self) -> dict[str, dict[str, int]]:
        return {name: dict(loader.skipped()) for name, loader in self.loaders.items()}

    def shard_failures(self) -> list[str]:
        """Log lines for the shards skipped (named by this rank's workers' states) since the last call."""
        lines = []
        for name, loader in self.loaders.items():
            for spec, why in loader.failed_shards().items():
                if (name, spec) not in self._failures_logged:
                    self._failures_logged.add((name, spec))
                    lines.append(f"data.{name}: skipped shard {spec} ({why})")
        return lines

    def truncated(self) -> dict[str, int]:
        """Samples cut to `data.<source>.max_tokens` so far, per source (this rank)."""
        return {name: loader.truncated() for name, loader in self.loaders.items()}

    def figures(self) -> dict[str, dict]:
        """This rank's figures since the start of the run, per source, for metrics.Meter.report: `skipped`
        (by reason), `truncated`, `samples` (started) and `epochs` (per logical stream, see
        SourceLoader.epochs)."""
        return {"skipped": self.skipped(), "truncated": self.truncated(),
                "samples": {name: loader.samples_seen() for name, loader in self.loaders.items()},
                "epochs": {name: loader.epochs() for name, loader in self.loaders.items()}}


def build_mixture(cfg: Config, encoder: SequenceEncoder, *, rank: int = 0, world_size: int = 1) -> Mixture:
    p = plan(cfg, world_size)
    loaders = {name: build_loader(cfg, name, encoder, rank=rank, world_size=world_size) for name in p.sources}
    return Mixture(loaders, p, rank)
