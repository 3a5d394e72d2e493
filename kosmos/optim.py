"""Optimizer and schedule (KOSMOS-1, Sec. 3.1 and Table 17).

AdamW 8-bit (bitsandbytes) with betas (0.9, 0.98), eps 1e-6, weight decay 0.01 on the weights of linear
maps only (`param_groups`): no decay on norms, biases, embeddings or learned tokens and positions (the
resampler's latents and media position embedding), and the frozen CLIP parameters are not given to the
optimizer at all. The learning rate warms up linearly for 375 steps to 2e-4, then decays linearly to 0 at
300k steps.
"""

from __future__ import annotations

import torch
from torch import nn

from kosmos.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, vision_lr: float | None = None) -> list[dict]:
    """Trainable parameters in two groups: [decayed, not decayed]; with `vision_lr`, the CLIP tower's
    (`model.vision`) moved into two more groups of their own with that learning rate: [decayed, not decayed,
    tower decayed, tower not decayed] (those of them that have parameters).

    Decayed: the weight matrices of linear maps, i.e. the `weight` of nn.Linear and convolutions and the
    in-projection of nn.MultiheadAttention (CLIP's blocks). Everything else is not decayed: norm gains and
    biases, all biases, the token embedding (also when tied to the output projection, an nn.Linear), and
    learned vectors that are not maps (the resampler's latents and media position embedding, CLIP's class
    token and position embedding when trainable), which decay would pull towards zero for no reason. The
    rule is by module type, not by shape, since learned tokens are matrices too. Frozen parameters are in
    neither group; a shared parameter is listed once."""
    matrices, embeddings = set(), set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            matrices.add(id(module.weight))
        elif isinstance(module, nn.MultiheadAttention):
            own = module.named_parameters(recurse=False)
            matrices |= {id(p) for n, p in own if n.endswith("proj_weight")}  # in_proj_weight (or q/k/v)
        elif isinstance(module, nn.Embedding):
            embeddings.add(id(module.weight))
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # each parameter once, even when shared
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if id(p) in matrices and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if vision_lr is None:
        return groups
    tower = {id(p) for p in model.vision.parameters()}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in tower]} for g in groups]
    own = [{**g, "params": [p for p in g["params"] if id(p) in tower], "lr": vision_lr} for g in groups]
    return rest + [g for g in own if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    vision_lr = cfg.lr * cfg.vision_lr_scale if cfg.vision_lr_scale != 1 else None
    groups = param_groups(model, cfg.weight_decay, vision_lr)  # two groups unless the tower's lr differs
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw8bit":
        import logging

        # bitsandbytes logs a warning about optional 4-bit CPU kernels at import; we use none of them.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    if cfg.name == "adamw8bit_torchao":  # FSDP2's sharded parameters (kosmos.sharding explains why)
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise ImportError("optim.name=adamw8bit_torchao needs torchao "
                              "(pip install torchao==0.18.0)") from None
        return AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


class WarmupLinearDecay:
    """lr multiplier: step / warmup during the warmup, then linear from 1 to 0 at total_steps."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(cfg.warmup_steps, cfg.total_steps))


def keep_configured_peaks(scheduler: torch.optim.lr_scheduler.LambdaLR,
                          configured: list[float]) -> str | None:
    """This run's peak learning rates (`configured`: the scheduler's `base_lrs` as built from the config)
    after `scheduler.load_state_dict` brought back the checkpoint's (and the optimizer's state the rates of
    its step): each group is set to its configured peak times the schedule at the restored step, so that an
    `optim.lr` or `optim.vision_lr_scale` changed on resume takes effect instead of being silently replaced.
    Returns a line saying what changed, or None when nothing did."""
    old = list(scheduler.base_lrs)
    if old == configured:
        return None
    groups = scheduler.optimizer.param_groups
    for group, peak, factor in zip(groups, configured, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = peak
        group["lr"] = peak * factor(scheduler.last_epoch)
    scheduler.base_lrs = list(configured)
    scheduler._last_lr = [group["lr"] for group in groups]
    pairs = ", ".join(f"{a:.3g} -> {b:.3g}" for a, b in dict.fromkeys(zip(old, configured, strict=True)))
    return (f"peak learning rate changed since the checkpoint (optim.lr, optim.vision_lr_scale): {pairs}; "
            f"the schedule goes on from step {scheduler.last_epoch} at the new peak")
