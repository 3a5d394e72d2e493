"""Optimizer and schedule (KOSMOS-1, Sec. 3.1 and Table 17).

AdamW 8-bit (bitsandbytes) with betas (0.9, 0.98), eps 1e-6, weight decay 0.01 on weight matrices only:
no decay on norms, biases or embeddings, and the frozen CLIP parameters are not given to the optimizer at
all. The learning rate warms up linearly for 375 steps to 2e-4, then decays linearly to 0 at 300k steps.
"""

from __future__ import annotations

import torch
from torch import nn

from kosmos.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (norms, biases, embeddings)."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.Embedding)) or "Norm" in type(module).__name__:
            no_decay_ids |= {id(p) for p in module.parameters(recurse=False)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        # 1-D tensors are biases, norm gains or learned tokens (resampler latents, CLIP class token)
        if id(p) in no_decay_ids or p.ndim < 2 or name.endswith(".bias") or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw8bit":
        import logging

        # bitsandbytes logs a warning about optional 4-bit CPU kernels at import; we use none of them.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
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
