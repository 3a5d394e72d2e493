"""The pieces of the training loop in train_kosmos.py: checks, builders, one optimizer step, evaluation.

Nothing here is imported by model code (kosmos.model, kosmos.generate, ...): it pulls in accelerate and
the data pipeline. Checkpoints and the stop signal are in kosmos.checkpoint, the log window and the log
line in kosmos.metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kosmos.config import Config, ConfigError, flatten
from kosmos.data.packing import to_device

TRACKER_PACKAGES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX")}
"""The packages a `train.tracker` needs (any one of them); accelerate only warns and logs nothing without."""


def check_config(cfg: Config) -> None:
    """Fail on what would otherwise fail late: missing tokenizer, shards or init weights, a vocabulary
    smaller than the tokenizer, a tracker that is not installed."""
    import importlib.util

    from kosmos.data import plan
    from kosmos.data.shards import expand_shards

    if not cfg.tokenizer.path or not (Path(cfg.tokenizer.path) / "tokenizer.model").is_file():
        raise ConfigError(f"config key 'tokenizer.path': no tokenizer.model in {cfg.tokenizer.path!r} "
                          "(build one with `python -m kosmos.tokenizer.build`)")
    build_tokenizer(cfg)  # decoder.vocab_size against the tokenizer's ids (a fraction of a second)
    packages = TRACKER_PACKAGES.get(cfg.train.tracker, ())
    if packages and not any(importlib.util.find_spec(p) for p in packages):
        raise ConfigError(f"config key 'train.tracker': {cfg.train.tracker} is not installed (`pip install "
                          f"{packages[0]}` in this environment), or set train.tracker=none")
    cfg.vision.resolved()  # vision.model_name through open_clip's configs: a clear error when unknown
    init = cfg.train.init_from
    if init and not (Path(init).is_file() or (Path(init) / "model.safetensors").is_file()):
        raise ConfigError(f"config key 'train.init_from': no model.safetensors at {init!r} "
                          "(give a checkpoint directory or a .safetensors file)")
    try:  # at the launch's world size (accelerate launch sets WORLD_SIZE): the plan depends on it
        plan(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, src in cfg.data.active_sources().items():
        for key, patterns in (("shards", src.shards), ("eval_shards", src.eval_shards)):
            try:
                if patterns:
                    expand_shards(patterns, allow_missing=cfg.data.allow_missing_shards)
            except (FileNotFoundError, ValueError) as e:  # ValueError: a URL that cannot be read at all
                raise ConfigError(f"config key '{cfg.data.key(name)}.{key}': {e}") from None


# ----------------------------------------------------------------------------- building


def process_group_timeout(cfg: Config) -> float:
    """Seconds the process group gives a collective (and the rendezvous) before it fails:
    `train.collective_timeout` plus a minute, so that the watchdog (kosmos.watchdog), which names the wait,
    speaks first where it watches; at least 5 minutes, so that a short timeout (in tests) does not fail a
    rank that starts or loads slower than the others."""
    return max(cfg.train.collective_timeout + 60, 300.0)


def build_accelerator(cfg: Config):
    """The Accelerator: mixed precision, tracker, and the process group's timeout (process_group_timeout)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    log_with = None if cfg.train.tracker == "none" else cfg.train.tracker
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=process_group_timeout(cfg)))]
    if cfg.train.ddp_fixed_reduction_order:  # one bucket (kosmos.distributed.fixed_order_allreduce)
        handlers.append(DistributedDataParallelKwargs(bucket_cap_mb=2**20))
    return Accelerator(mixed_precision=mp, log_with=log_with, project_dir=cfg.train.output_dir,
                       kwargs_handlers=handlers)


def build_tokenizer(cfg: Config):
    from kosmos.tokenizer import KosmosTokenizer

    tok = KosmosTokenizer.from_dir(cfg.tokenizer.path)
    if len(tok) > cfg.decoder.vocab_size:
        raise ConfigError(f"config key 'decoder.vocab_size': {cfg.decoder.vocab_size} is smaller than the "
                          f"tokenizer's {len(tok)} ids ({cfg.tokenizer.path})")
    return tok


def build_model(cfg: Config, init_from: str | Path | None = None):
    """The model, with the weights of `init_from` (a checkpoint dir or .safetensors file) if given, else
    CLIP's (`vision.pretrained`); loaded before accelerate wraps (and, under FSDP, shards) it, so the same
    code serves every distributed type."""
    from kosmos.model import Kosmos
    from kosmos.weights import find_checkpoint, load_clip_weights, load_model_weights

    model = Kosmos(cfg)  # decoder.compile is applied inside (kosmos/decoder.py)
    if init_from is None:
        load_clip_weights(model.vision)
    else:  # a checkpoint dir, a run dir (its newest checkpoint), a sharded one, or a .safetensors file
        path = Path(init_from)
        load_model_weights(model, find_checkpoint(path) if path.is_dir() else path)  # vision weights too
    return model


def setup(acc, cfg: Config, init_from: str | Path | None = None):
    """Sequence encoder (tokenizer, latents, image size), model (with `init_from`'s weights if given),
    optimizer, schedule and data mixture, prepared for `acc`; the resolved config goes to
    train.output_dir/config.yaml."""
    from accelerate.utils import set_seed

    from kosmos.config import save_config
    from kosmos.data import build_mixture, start_worker_server
    from kosmos.optim import build_optimizer, build_scheduler
    from kosmos.sequence import SequenceEncoder
    from kosmos.sharding import is_sharded, shard_for_run

    if acc.is_main_process:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
    set_seed(cfg.seed)  # the same initial weights on every rank
    if any(src.workers for src in cfg.data.active_sources().values()):
        start_worker_server()  # its imports (seconds) overlap the model's build (kosmos/data/workers.py)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, init_from)
    model = shard_for_run(acc, cfg, model)  # FSDP2 when asked (kosmos.sharding); before the optimizer
    optimizer = build_optimizer(model, cfg.optim)
    if is_sharded(model) and not acc.is_fsdp2:  # sharded by train.sharding: no DDP wrapper around it
        optimizer = acc.prepare(optimizer)
    else:
        model, optimizer = acc.prepare(model, optimizer)
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if cfg.train.ddp_fixed_reduction_order and ddp:
            from kosmos.distributed import fixed_order_allreduce

            fixed_order_allreduce(model)  # bit-identical resumes on 3+ processes too
    # The scheduler stays unwrapped: accelerate's wrapper steps it once per process per call.
    scheduler = build_scheduler(getattr(optimizer, "optimizer", optimizer), cfg.optim)
    encoder = SequenceEncoder.from_config(cfg, tok)
    mixture = build_mixture(cfg, encoder, rank=acc.process_index, world_size=acc.num_processes)
    check_passes(acc, cfg, mixture)
    return encoder, model, optimizer, scheduler, mixture


def check_passes(acc, cfg: Config, mixture) -> None:
    """train_step decides when a step ends; DeepSpeed (and FSDP, whose every pass is a collective) must see
    the same number of passes on every rank, and DeepSpeed must agree on it or it steps at other times.
    DeepSpeed steps inside the last backward, before train_step could rescale the gradients by the step's
    token count: the token objective is refused there."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED and cfg.train.loss_weighting == "tokens":
        raise ConfigError("config key 'train.loss_weighting': `tokens` rescales the gradients after the last "
                          "micro-batch, which DeepSpeed does not allow (it steps inside backward); use "
                          "`budget` with DeepSpeed, or DDP/FSDP")
    lo, hi = mixture.plan.passes()
    sharded = (acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
               or cfg.train.sharding != "none")
    if sharded and lo != hi:
        raise ConfigError(f"config key 'data.mixture_tolerance': the mixture gives ranks {lo} to {hi} passes "
                          f"per step; DeepSpeed and FSDP need the same number on every rank: change the "
                          f"budgets or micro_batch_size, or allow a larger tolerance")
    ds = acc.state.deepspeed_plugin
    if ds is not None and ds.deepspeed_config.get("gradient_accumulation_steps") != hi:
        raise ConfigError(f"DeepSpeed steps the optimizer every gradient_accumulation_steps backward passes: "
                          f"set it to {hi} (the micro-batches of one step) in the accelerate config")


def default_budgets(cfg: Config, mixture) -> list[str]:
    """Sources whose token budget is the default, not set in the YAML or an override: the paper's 0.5M
    tokens for a toy data set is an easy mistake to make and costly to notice late."""
    return [n for n in mixture.plans if not cfg.given(f"{cfg.data.key(n)}.tokens_per_step")]


def describe_mixture(acc, cfg: Config, mixture) -> str:
    """What one step really trains on (the budgets rounded to whole micro-batches), as a block of lines:
    per source the micro-batches per rank and over all ranks, rows, tokens and share against the budget;
    then the ranks' pass counts when they differ, and warnings: drift beyond the tolerance (allowed), budgets
    left at their defaults, a named source with shards left out by its budget of 0."""
    from kosmos.data.mixture import ratio

    p = mixture.plan
    L = cfg.decoder.max_len
    W = p.world_size
    per_rank = {n: (min(s[n] for s in p.slots), max(s[n] for s in p.slots)) for n in p.sources}
    target = p.target_shares()
    lines = [f"mixture per step: {W} process(es), {p.tokens:,} tokens (budget {p.budget:,}), ratio "
             f"{ratio(p)} (target {ratio(p, target=True, names=False)}), "
             f"objective {cfg.train.loss_weighting}, "
             f"mixed precision {acc.mixed_precision}"]
    for n, s in p.sources.items():
        lo, hi = per_rank[n]
        r = f"{lo}-{hi}" if lo != hi else str(lo)
        lines.append(f"  {n:<12} {r:>5} micro-batches/rank, {s.micro_batches:>4} in all "
                     f"x {s.micro_batch_size} rows x {L} = {s.tokens_per_step:>11,} tokens, "
                     f"share {p.shares()[n]:.3f} (budget {s.budget:,}, {target[n]:.3f})")
    lo, hi = p.passes()
    if lo != hi:
        idle = 1 - sum(s.micro_batches for s in p.sources.values()) / (hi * W)
        lines.append(f"  ranks run {lo} or {hi} passes per step (rotating): {idle:.0%} of pass slots wait at "
                     f"the gradient sync")
    if p.drift() > cfg.data.mixture_tolerance:
        lines.append(f"  WARNING: {p.drift():.1%} off the budgets, beyond data.mixture_tolerance="
                     f"{cfg.data.mixture_tolerance} (allowed by data.allow_mixture_drift)")
    for n, loader in mixture.loaders.items():
        if gone := loader.missing_shards:
            lines.append(f"  WARNING: {len(gone)} shard(s) named in {cfg.data.key(n)}.shards do not exist, "
                         f"training on the {len(loader.dataset.shards)} found "
                         f"(allowed by data.allow_missing_shards): "
                         f"{', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}")
    for n, src in cfg.data.sources.items():  # a named source's budget defaults to 0
        if src.shards and not src.tokens_per_step:
            lines.append(f"  WARNING: data.sources.{n} has shards but tokens_per_step 0: it is left out")
    for n in default_budgets(cfg, mixture):
        lines.append(f"  WARNING: {cfg.data.key(n)}.tokens_per_step not set: the default budget "
                     f"{p.sources[n].budget:,} tokens per step is used (the paper's); set it for your data")
    return "\n".join(lines)


def peak_flops(cfg: Config, device) -> float | None:
    """Dense bf16 peak of one device, for MFU: the config's, or a known GPU's."""
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("A10", 125e12),
                           ("L4", 121e12), ("4090", 165e12), ("3090", 71e12)):
            if key in name:
                return flops
    return None


def flat_config(cfg: Config) -> dict:
    """The config as flat `section.key` scalars, for trackers' hyperparameters."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in flatten(cfg.to_dict()).items()}


def hparam_metrics(cfg: Config, mixture) -> list[str]:
    """The tracker tags shown against the hyperparameters (TensorBoard's HParams tab): the loss, each
    source's, and the held-out losses of the sources evaluated."""
    names = list(mixture.plans)
    held = [n for n, src in cfg.data.named_sources().items() if src.eval_shards and cfg.train.eval_every]
    return ["train/loss", *(f"train/{n}_loss" for n in names), *(f"eval/{n}_loss" for n in held)]


# ----------------------------------------------------------------------------- forward, step, evaluation


def forward(acc, model, batch: dict):
    """The model on one micro-batch (uint8 images: the model normalises them)."""
    return model(**to_device(batch, acc.device))


@dataclass
class StepResult:
    ok: bool
    """False: a non-finite loss or gradient; the gradients were dropped and nothing was stepped."""
    gnorm: float
    """Gradient norm before clipping."""
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per source: (loss sum, tokens) of this rank, on the device."""
    rows: int = 0
    """Row slots of this rank (padding included): the FLOP count."""
    real: int = 0
    """Non-padding tokens of this rank."""
    images: int = 0
    samples: list[tuple] = field(default_factory=list)
    """(source, shard, offset) of every sample the step started on this rank."""
    counts: dict[str, list[int]] = field(default_factory=dict)
    """Per source: non-padding tokens, images and samples started of this rank's micro-batches."""


def budget_weights(mixture) -> dict[str, float]:
    """`train.loss_weighting: budget`: per source, the weight of one micro-batch's mean loss, so that the
    step's loss is the budget-weighted sum of per-source mean losses. DDP averages over the ranks, so a
    micro-batch counts world_size / (micro-batches of its source over all ranks) of its source's share."""
    p = mixture.plan
    return {n: s.budget / p.budget * p.world_size / s.micro_batches for n, s in p.sources.items()}


def _unwatched(what: str, compute: bool = False):
    return contextlib.nullcontext()


def train_step(acc, model, optimizer, scheduler, mixture, grad_clip: float,
               loss_weighting: str = "tokens", waiting=_unwatched) -> StepResult:
    """One optimizer step: this rank's planned micro-batches (gradients synchronised over the ranks only on
    its last; ranks may run different numbers), clipping, then the optimizer and schedule step, unless the
    loss or the gradient is not finite: then the gradients are dropped and `ok` is False (the caller counts
    it).

    The objective (`tokens`) is the sum of the token losses of the whole step, all micro-batches of all
    ranks, over the step's loss-token count. That count is known only after the last micro-batch, so each
    micro-batch backpropagates its loss sum / the planned row slots of the step (a constant: gradients keep
    the size of a mean loss, which fp16 needs), and the gradients are then rescaled by
    slots * world_size / (loss tokens of the step): one all-reduce of the count per step, batches never held
    back, and world_size undoes DDP's mean over the ranks. Counting the labels of all micro-batches first
    would need the whole step's batches (images included) in host memory at once.

    `waiting(what, compute=False)` (kosmos.watchdog.Watchdog.waiting) is told of the waits: each micro-batch
    (`data.<source>`), and on several processes the gradient sync (the last micro-batch's forward and
    backward, where DDP all-reduces, with compute; then the step's reduction and the gradient norm)."""
    from kosmos.distributed import all_reduce_sum
    from kosmos.sharding import full, gradient_sync, is_sharded, local

    n_micro = sum(mixture.counts().values())
    fsdp2 = is_sharded(model)
    slots = mixture.plan.tokens
    weights = budget_weights(mixture) if loss_weighting == "budget" else None
    res = StepResult(ok=True, gnorm=0.0)
    n_tokens = torch.zeros((), device=acc.device, dtype=torch.long)
    several = acc.num_processes > 1
    for i, (name, batch) in enumerate(mixture.step(waiting)):
        res.samples += [(name, *pos) for pos in batch["sample_positions"]]
        res.rows += batch["input_ids"].numel()
        real, images = int(batch["n_real"]), len(batch["images"])
        res.real += real
        res.images += images
        c = res.counts.setdefault(name, [0, 0, 0])
        c[0], c[1], c[2] = c[0] + real, c[1] + images, c[2] + len(batch["sample_positions"])
        sync = i == n_micro - 1
        if fsdp2:  # reduce-scatter on the last micro-batch only (what acc.no_sync does under FSDP2)
            gradient_sync(model, sync)
        ctx = contextlib.nullcontext() if sync or fsdp2 or not several else acc.no_sync(model)
        wait = waiting("the gradient sync", compute=True) if sync and several else contextlib.nullcontext()
        with ctx, wait:
            out = forward(acc, model, batch)
            if weights is None:
                acc.backward(out.loss * out.n_tokens / slots)
            else:
                acc.backward(out.loss * weights[name])
        n_tokens += out.n_tokens
        s = torch.stack([out.loss.detach().float() * out.n_tokens, out.n_tokens.float()])
        res.losses[name] = res.losses[name] + s if name in res.losses else s
    # One reduction: the step's loss tokens and the ranks whose loss is not finite, so that every rank skips
    # the same steps (a rank stepping alone would leave the others behind, and their collectives apart).
    nonfinite = sum((~torch.isfinite(s[0])).double() for s in res.losses.values()) if res.losses else 0.0
    with waiting("the gradient sync") if several else contextlib.nullcontext():
        counts = all_reduce_sum(acc, torch.stack([n_tokens.double(),
                                                  torch.as_tensor(nonfinite, device=acc.device,
                                                                  dtype=torch.float64)]),
                                "loss tokens and non-finite losses of the step")
        if weights is None:
            total = counts[0]
            scale = (slots * acc.num_processes / total.clamp(min=1)).float()
            grads = [local(p.grad) for p in model.parameters() if p.grad is not None]  # FSDP2: this shard
            torch._foreach_mul_(grads, scale)
        if grad_clip > 0:
            gnorm = acc.clip_grad_norm_(model.parameters(), grad_clip)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        res.gnorm = float(full(gnorm))  # sync point: once per step, also the NaN/inf check
    res.ok = math.isfinite(res.gnorm) and float(counts[1]) == 0  # the same on every rank
    if res.ok:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return res


class BadSteps:
    """A step with a NaN/inf loss or gradient is skipped and counted (`TrainState.bad_steps`, kept in
    checkpoints); `limit` in a row stop the run: by then the model has usually diverged."""

    def __init__(self, limit: int, info):
        self.limit, self.info, self.in_row = limit, info, 0

    def passed(self, res: StepResult, state) -> bool:
        """Whether the step counts; a skipped one adds to `state.bad_steps` (kosmos.checkpoint.TrainState)."""
        if res.ok:
            self.in_row = 0
            return True
        state.bad_steps += 1
        self.in_row += 1
        self.info(f"step {state.step}: non-finite loss or gradient, step skipped "
                  f"({self.in_row} in a row, {state.bad_steps} in all)")
        if self.in_row >= self.limit:
            raise RuntimeError(f"{self.in_row} steps in a row had a NaN/inf loss or gradient: stopping. "
                               f"Lower optim.lr, check the data, or resume from an earlier checkpoint.")
        return False


def evaluate(acc, cfg: Config, model, encoder, step: int = 0, waiting=_unwatched) -> dict[str, float]:
    """Loss and perplexity per source on its eval shards (at most train.eval_batches micro-batches each, per
    rank, and no more than the rank with the fewest has), summed over the ranks: the numbers `python -m
    kosmos.eval loss` gives for a checkpoint when every rank reads the same number of micro-batches; then the
    benchmarks of train.eval_tasks (`kosmos.train_eval`, as `python -m kosmos.eval run`), their predictions
    under train.output_dir/eval/step_XXXXXXXX/. `waiting` (kosmos.watchdog.Watchdog.waiting) is told of the
    held-out loss's reduces over the ranks (not of the benchmarks')."""
    from kosmos.data import build_loader
    from kosmos.eval.loss import perplexity, source_loss

    results = {}
    for name, src in cfg.data.active_sources().items():
        if not src.eval_shards:
            continue
        loader = build_loader(cfg, name, encoder, rank=acc.process_index, world_size=acc.num_processes,
                              train=False)
        with acc.autocast():
            loss, _ = source_loss(model, loader, acc.device, cfg.train.eval_batches,
                                  reduce=lambda t, name=name: _reduce(acc, t, waiting, name),
                                  ranks=acc.num_processes)
        loader.close()
        results[f"eval/{name}_loss"] = loss
        results[f"eval/{name}_ppl"] = perplexity(loss)
    if cfg.train.eval_tasks:
        from kosmos.config import EvalTaskConfig
        from kosmos.train_eval import evaluate_tasks

        tasks = [EvalTaskConfig.from_dict(t, f"train.eval_tasks[{i}]")
                 for i, t in enumerate(cfg.train.eval_tasks)]
        out = Path(cfg.train.output_dir) / "eval" / f"step_{step:08d}"
        with acc.autocast():
            source = {"run": str(Path(cfg.train.output_dir).resolve()), "step": step}  # the weights trained
            results.update(evaluate_tasks(acc, tasks, acc.unwrap_model(model), encoder, out, source))
    return results


def _reduce(acc, t: torch.Tensor, waiting, name: str) -> torch.Tensor:
    """A held-out loss reduction of source `name`, told to the watchdog."""
    from kosmos.distributed import all_reduce_sum

    with waiting(f"the evaluation of {name}"):
        return all_reduce_sum(acc, t, f"held-out {name}")
