"""Sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`): the project's one wrapping function,
sharded checkpoints (torch.distributed.checkpoint) and their consolidation into one model.safetensors.

    python -m kosmos.checkpoint consolidate RUN/checkpoints/step_00001000 OUT_DIR

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

import shutil
import sys
from pathlib import Path

import torch
from torch import nn

SHARDED = "sharded"
"""The checkpoint's folder of torch.distributed.checkpoint files (model and optimizer, every rank's shard)."""


def is_sharded(model: nn.Module) -> bool:
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
    fully_shard(root, **kw)
    model.always_encode_images = True  # every rank runs every unit in every micro-batch (Kosmos.embed)
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


# ----------------------------------------------------------------------------- checkpoints


def save_sharded(path: Path, model: nn.Module, optimizer) -> None:
    """Every rank writes its shard of the model and optimizer state into `path` (torch.distributed.checkpoint:
    one file per rank and a metadata file; nothing is gathered). All ranks must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, _inner(optimizer))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, optimizer) -> None:
    """Read `save_sharded`'s files into the sharded model and optimizer (same number of ranks). DCP reads
    tensors and plain values only: nothing is unpickled as code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: no sharded checkpoint here (no torch.distributed.checkpoint "
                                ".metadata)")
    opt = _inner(optimizer)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def check_sharded(path: Path) -> None:
    """Every file that the metadata of sharded checkpoint `path` points into is there and long enough (sizes
    only, nothing read): a truncated or missing shard is a CheckpointError naming it, before any rank loads
    (a failure inside the collective load could leave the ranks disagreeing)."""
    from torch.distributed.checkpoint import FileSystemReader

    from kosmos.checkpoint import CheckpointError

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as e:  # noqa: BLE001 - whatever a damaged metadata file raises
        raise CheckpointError(f"{path / '.metadata'}: unreadable ({type(e).__name__})") from None
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        f = path / name
        size = f.stat().st_size if f.is_file() else None
        if size is None or size < end:
            raise CheckpointError(f"{f}: {'missing' if size is None else f'{size} bytes'}, but the sharded "
                                  f"checkpoint's metadata needs {end}: truncated or incomplete")


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def consolidate(ckpt: str | Path, out_dir: str | Path) -> Path:
    """One process, no process group: the model weights of sharded checkpoint `ckpt` into
    out_dir/model.safetensors, with the checkpoint's config.yaml and tokenizer/, so that
    `Kosmos.from_checkpoint(out_dir)` (generation, evaluation) loads it. Returns out_dir."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_model
    from torch.distributed.checkpoint.api import CheckpointException

    from kosmos.config import save_config
    from kosmos.model import Kosmos, checkpoint_config

    from kosmos.checkpoint import CheckpointError

    ckpt, out = Path(ckpt), Path(out_dir)
    src = ckpt / SHARDED
    if not (src / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt}: not a sharded checkpoint (no {SHARDED}/.metadata)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; give a new or existing folder for the output")
    if out.resolve() == ckpt.resolve() or ckpt.resolve() in out.resolve().parents:
        raise CheckpointError(f"{out}: the output must not be the checkpoint {ckpt} or inside it (nothing is "
                              "written into the checkpoint); give another folder")
    check_sharded(src)  # every shard file there and long enough, named if not
    cfg = checkpoint_config(ckpt)
    cfg.decoder.compile = False  # nothing to compile for a copy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised": every weight comes from the checkpoint
        model = Kosmos(cfg, load_vision_weights=False)
    sd = model.state_dict()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: loading in a single process": meant
            dcp.load({"model": sd}, checkpoint_id=str(src), planner=_ModelOnly())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - damaged bytes: miniz, the weights-only
        # reader, ...; DCP wraps them in a CheckpointException, a BaseException, whose text is a traceback
        raise CheckpointError(f"{src}: unreadable shard data ({_first_cause(e)})") from None
    model.load_state_dict(sd)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_model(model, str(tmp))  # the tied embedding stored once, as in training
    tmp.replace(out / "model.safetensors")  # a cut write never leaves a model.safetensors behind
    save_config(cfg, out / "config.yaml")
    if (ckpt / "tokenizer").is_dir():
        shutil.copytree(ckpt / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    return out


def _first_cause(e: BaseException) -> str:
    """`Type: first line` of what went wrong under a DCP CheckpointException (which lists a traceback per
    rank), else of `e` itself."""
    failures = getattr(e, "failures", None)
    inner = next(iter(failures.values()), None) if isinstance(failures, dict) else None
    err = inner[0] if isinstance(inner, tuple) and inner else e  # DCP keeps (exception, stack summary)
    err = err if isinstance(err, BaseException) else e
    text = str(err).strip()
    first = text.splitlines()[0].split(". ")[0][:160] if text else ""  # no advice to unpickle after it
    return f"{type(err).__name__}: {first}"


def _ModelOnly():
    """A load planner that reads the model's entries and leaves the optimizer's in the file."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    return DefaultLoadPlanner(allow_partial_load=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m kosmos.checkpoint consolidate SHARDED_CKPT OUT_DIR`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kosmos.checkpoint",
                                 description="Tools for training checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consolidate", help="a sharded (FSDP2) checkpoint -> one model.safetensors with its "
                                           "config and tokenizer, for generation and evaluation")
    c.add_argument("ckpt", help="a checkpoint directory of a sharded run (it holds sharded/)")
    c.add_argument("out", help="output directory")
    args = ap.parse_args(argv)
    try:
        out = consolidate(args.ckpt, args.out)
    except (FileNotFoundError, ValueError) as e:  # ConfigError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output: no space left, no permission
        print(f"error: {args.out}: cannot write the consolidated model ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {out / 'model.safetensors'}")
    return 0
