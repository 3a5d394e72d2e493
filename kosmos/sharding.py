"""Sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`): the project's one wrapping function,
and the helpers that see through its DTensors. Wrapping only: sharded checkpoints
(torch.distributed.checkpoint) and their consolidation into one model.safetensors live in `kosmos.checkpoint`.

`shard_model` is used everywhere a model is sharded: under `accelerate launch` with
configs/accelerate/fsdp.yaml (FSDP2 on GPUs: accelerate finds the model already sharded and keeps it), and
with `train.sharding=fsdp2` under any other distributed launch (the CPU tests: accelerate turns an FSDP
request on CPU into DDP, so there the trainer shards the model itself and accelerate only sees a plain
multi-process run).

Units, innermost first: every decoder layer, every CLIP block (the frozen ones run under no_grad: they are
all-gathered for the forward and never reduced; the trainable last block is a unit of its own, so no unit
mixes frozen CLIP blocks with trainable ones), the resampler, then the root, which keeps the token embedding
(tied to the output projection: one parameter, one unit), the projection, the final norms and the frozen
CLIP stem. FSDP2 shards each parameter on its own (a DTensor), so frozen and trainable parameters in the
root unit are fine: a parameter without a gradient is simply not reduced. The weights are never
re-initialised after wrapping (Magneto's init scaling is applied in torchscale's constructor).

Every unit's forward and backward is a collective, so every rank must run the same units in every
micro-batch: a sharded model encodes one blank image in a text-only micro-batch (its output times zero),
where the unsharded model only touches the image parameters with a zero.

bitsandbytes' AdamW8bit cannot step DTensor shards (its fused kernel refuses DTensor arguments), so a
sharded run uses `optim.name=adamw8bit_torchao` (torchao's AdamW8bit, which keeps its 8-bit state as a
DTensor of the same sharding) with the same hyperparameters, or `adamw`.
"""

from __future__ import annotations

import torch
from torch import nn


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded with FSDP2 (`fully_shard` makes it an FSDPModule)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def mixed_precision_policy(mixed_precision: str, device: torch.device):
    """bf16 parameters for compute and fp32 gradient reduction on GPUs with `bf16`; None (fp32 throughout)
    otherwise, CPU included."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision == "bf16" and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP2 units, innermost first (the root, `model` itself, comes last)."""
    blocks = list(model.vision.visual.transformer.resblocks)
    return [*model.decoder.layers, *blocks, model.resampler, model]


def shard_model(model: nn.Module, mp_policy=None, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` (a kosmos.model.Kosmos, on its device, weights final) in place with FSDP2 over `mesh`
    (None: the default process group); returns it. Build the optimizer afterwards: its parameters are the
    sharded ones."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
          "mp_policy": mp_policy or MixedPrecisionPolicy()}
    *inner, root = units(model)
    for m in inner:
        fully_shard(m, **kw)
    fully_shard(root, **kw)  # now an FSDPModule: Kosmos.embed runs every unit in every micro-batch
    return model


def shard_for_run(acc, cfg, model: nn.Module) -> nn.Module:
    """The trainer's hook: `model` sharded when the launch asks for it (accelerate's FSDP, or
    `train.sharding=fsdp2`), else unchanged. Refuses settings sharding cannot run, naming the key."""
    from accelerate.utils import DistributedType

    from kosmos.config import ConfigError

    fsdp = acc.distributed_type == DistributedType.FSDP
    if not fsdp and cfg.train.sharding == "none":
        return model
    if fsdp and not acc.is_fsdp2:
        raise ConfigError("the accelerate config asks for FSDP version 1; set fsdp_version: 2 (as "
                          "configs/accelerate/fsdp.yaml does): the project shards with FSDP2 only")
    if not torch.distributed.is_initialized():
        raise ConfigError("config key 'train.sharding': fsdp2 needs a distributed launch (accelerate launch "
                          "--multi_gpu or torchrun); one process has nothing to shard over")
    if cfg.optim.name == "adamw8bit":
        raise ConfigError("config key 'optim.name': bitsandbytes' adamw8bit cannot step FSDP2's sharded "
                          "parameters (DTensors); use adamw8bit_torchao (the same 8-bit AdamW, "
                          "DTensor-aware) or adamw")
    if cfg.train.eval_tasks:
        raise ConfigError("config key 'train.eval_tasks': benchmarks are not run on a sharded model; "
                          "consolidate a checkpoint (python -m kosmos.checkpoint consolidate) and run "
                          "python -m kosmos.eval run on it")
    model.to(acc.device)
    return shard_model(model, mixed_precision_policy(acc.mixed_precision, acc.device))


def gradient_sync(model: nn.Module, sync: bool) -> None:
    """Whether the next backward reduce-scatters the gradients (False: accumulate them unreduced)."""
    model.set_requires_gradient_sync(sync)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place changes reach the DTensor); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: every rank must call it); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
