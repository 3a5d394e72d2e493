"""The pieces of the training loop in train_kosmos.py: checks, builders, one optimizer step, evaluation.

Nothing here is imported by model code (kosmos.model, kosmos.generate, ...): it pulls in accelerate and
the data pipeline. Checkpoints and the stop signal are in kosmos.checkpoint, the log window and the log
line in kosmos.metrics.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kosmos.config import Config, ConfigError


def check_config(cfg: Config) -> None:
    """Fail on what would otherwise fail late: missing tokenizer, shards or init weights, a vocabulary
    mismatch."""
    from kosmos.data import plan
    from kosmos.data.shards import expand_shards

    if not cfg.tokenizer.path or not (Path(cfg.tokenizer.path) / "tokenizer.model").is_file():
        raise ConfigError(f"config key 'tokenizer.path': no tokenizer.model in {cfg.tokenizer.path!r} "
                          "(build one with `python -m tokenizer.build`)")
    cfg.vision.resolved()  # vision.model_name through open_clip's configs: a clear error when unknown
    init = cfg.train.init_from
    if init and not (Path(init).is_file() or (Path(init) / "model.safetensors").is_file()):
        raise ConfigError(f"config key 'train.init_from': no model.safetensors at {init!r} "
                          "(give a checkpoint directory or a .safetensors file)")
    try:
        plan(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, src in cfg.data.sources().items():
        for key, patterns in (("shards", src.shards), ("eval_shards", src.eval_shards)):
            try:
                if patterns:
                    expand_shards(patterns)
            except FileNotFoundError as e:
                raise ConfigError(f"config key 'data.{name}.{key}': {e}") from None


# ----------------------------------------------------------------------------- building


def build_accelerator(cfg: Config):
    from accelerate import Accelerator

    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    log_with = None if cfg.train.tracker == "none" else cfg.train.tracker
    return Accelerator(mixed_precision=mp, log_with=log_with, project_dir=cfg.train.output_dir)


def build_tokenizer(cfg: Config):
    from tokenizer import KosmosTokenizer

    tok = KosmosTokenizer.from_dir(cfg.tokenizer.path)
    if len(tok) > cfg.decoder.vocab_size:
        raise ConfigError(f"config key 'decoder.vocab_size': {cfg.decoder.vocab_size} is smaller than the "
                          f"tokenizer's {len(tok)} ids ({cfg.tokenizer.path})")
    return tok


def build_model(cfg: Config, init_from: str | Path | None = None):
    """The model, with the weights of `init_from` (a checkpoint dir or .safetensors file) if given; loaded
    before accelerate wraps (and, under FSDP, shards) it, so the same code serves every distributed type."""
    import warnings

    from kosmos.checkpoint import load_model_weights
    from kosmos.model import Kosmos

    if init_from is None:
        return Kosmos(cfg)  # decoder.compile is applied inside (kosmos/decoder.py)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised": the checkpoint brings the vision weights
        model = Kosmos(cfg, load_vision_weights=False)
    load_model_weights(model, init_from)
    return model


def setup(acc, cfg: Config, init_from: str | Path | None = None):
    """Sequence encoder (tokenizer, latents, image size), model (with `init_from`'s weights if given),
    optimizer, schedule and data mixture, prepared for `acc`; the resolved config goes to
    train.output_dir/config.yaml."""
    from accelerate.utils import set_seed

    from kosmos.config import save_config
    from kosmos.data import build_mixture
    from kosmos.optim import build_optimizer, build_scheduler
    from kosmos.sequence import SequenceEncoder

    if acc.is_main_process:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
    set_seed(cfg.seed)  # the same initial weights on every rank
    tok = build_tokenizer(cfg)
    model = build_model(cfg, init_from)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = acc.prepare(model, optimizer)
    # The scheduler stays unwrapped: accelerate's wrapper steps it once per process per call.
    scheduler = build_scheduler(getattr(optimizer, "optimizer", optimizer), cfg.optim)
    encoder = SequenceEncoder.from_config(cfg, tok)
    mixture = build_mixture(cfg, encoder, rank=acc.process_index, world_size=acc.num_processes)
    check_deepspeed(acc, mixture)
    return encoder, model, optimizer, scheduler, mixture


def check_deepspeed(acc, mixture) -> None:
    """train_step decides when a step ends; DeepSpeed must agree or it steps at other times."""
    n_micro = sum(p.micro_batches for p in mixture.plans.values())
    ds = acc.state.deepspeed_plugin
    if ds is not None and ds.deepspeed_config.get("gradient_accumulation_steps") != n_micro:
        raise ConfigError(f"DeepSpeed steps the optimizer every gradient_accumulation_steps backward passes: "
                          f"set it to {n_micro} (the micro-batches of one step) in the accelerate config")


def describe_mixture(acc, mixture) -> str:
    """What one step really trains on (the budgets rounded to whole micro-batches)."""
    sources = ", ".join(f"{p.name} {p.micro_batches}x{p.micro_batch_size} rows ({p.tokens_per_step:,} tok)"
                        for p in mixture.plans.values())
    return (f"mixture per step: {sources}; {acc.num_processes} process(es), "
            f"mixed precision {acc.mixed_precision}")


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

    def flat(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        return out

    return flat(cfg.to_dict(), "")


# ----------------------------------------------------------------------------- forward, step, evaluation


def forward(acc, model, batch: dict):
    """The model on one micro-batch (uint8 images: the model normalises them)."""
    from kosmos.eval.loss import to_device

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


def loss_weights(mixture) -> dict[str, float]:
    """Per source, the weight of one micro-batch's mean loss: the source's share of the step's token budget,
    split over its micro-batches (so the step's loss is the budget-weighted sum of per-source mean losses)."""
    plans = mixture.plans
    budget = sum(p.tokens_per_step for p in plans.values())
    return {name: p.tokens_per_step / budget / p.micro_batches for name, p in plans.items()}


def train_step(acc, model, optimizer, scheduler, mixture, grad_clip: float) -> StepResult:
    """One optimizer step: the planned micro-batches of every source (gradients synchronised over the ranks
    only on the last), clipping, then the optimizer and schedule step, unless the loss or the gradient is not
    finite: then the gradients are dropped and `ok` is False (the caller counts it)."""
    weights = loss_weights(mixture)
    n_micro = sum(p.micro_batches for p in mixture.plans.values())
    res = StepResult(ok=True, gnorm=0.0)
    for i, (name, batch) in enumerate(mixture.step()):
        res.samples += [(name, *pos) for pos in batch["sample_positions"]]
        res.rows += batch["input_ids"].numel()
        res.real += int(batch["n_real"])
        res.images += len(batch["images"])
        sync = i == n_micro - 1
        ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(model)
        with ctx:
            out = forward(acc, model, batch)
            acc.backward(out.loss * weights[name])
        s = torch.stack([out.loss.detach().float() * out.n_tokens, out.n_tokens.float()])
        res.losses[name] = res.losses[name] + s if name in res.losses else s
    if grad_clip > 0:
        gnorm = acc.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        gnorm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    res.gnorm = float(gnorm)  # sync point: once per step, also the NaN/inf check
    res.ok = math.isfinite(res.gnorm) and all(math.isfinite(float(s[0])) for s in res.losses.values())
    if res.ok:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return res


class BadSteps:
    """A step with a NaN/inf loss or gradient is skipped and counted (state["bad_steps"], kept in
    checkpoints); `limit` in a row stop the run: by then the model has usually diverged."""

    def __init__(self, limit: int, info):
        self.limit, self.info, self.in_row = limit, info, 0

    def passed(self, res: StepResult, state: dict) -> bool:
        if res.ok:
            self.in_row = 0
            return True
        state["bad_steps"] += 1
        self.in_row += 1
        self.info(f"step {state['step']}: non-finite loss or gradient, step skipped "
                  f"({self.in_row} in a row, {state['bad_steps']} in all)")
        if self.in_row >= self.limit:
            raise RuntimeError(f"{self.in_row} steps in a row had a NaN/inf loss or gradient: stopping. "
                               f"Lower optim.lr, check the data, or resume from an earlier checkpoint.")
        return False


def evaluate(acc, cfg: Config, model, encoder) -> dict[str, float]:
    """Loss and perplexity per source on its eval shards (at most train.eval_batches micro-batches each, per
    rank), summed over the ranks: the numbers `python -m kosmos.eval` gives for a checkpoint."""
    from kosmos.data import build_loader
    from kosmos.eval.loss import perplexity, source_loss

    results = {}
    for name, src in cfg.data.sources().items():
        if not src.eval_shards:
            continue
        loader = build_loader(cfg, name, encoder, rank=acc.process_index, world_size=acc.num_processes,
                              train=False)
        with acc.autocast():
            loss, _ = source_loss(model, loader, acc.device, cfg.train.eval_batches,
                                  reduce=lambda t: acc.reduce(t, reduction="sum"))
        results[f"eval/{name}_loss"] = loss
        results[f"eval/{name}_ppl"] = perplexity(loss)
    return results
