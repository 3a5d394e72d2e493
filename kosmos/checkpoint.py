"""Checkpoints: written atomically, read without unpickling code; resume; the stop signal.

    OUTPUT/checkpoints/step_00001000/
        model.safetensors       model weights (tied embedding stored once)
        optimizer.pt            optimizer state (tensors and numbers only: torch.load(weights_only=True))
        scheduler.pt            scheduler state (same)
        rng_rank{R}.pt          torch/CUDA/python/numpy RNG of each rank (same)
        data_rank{R}.json       each rank's data position (kosmos.data.stream explains it)
        trainer_state.json      step, counters, world size, the resolved config
        config.yaml             the resolved config (kosmos.config.save_config)
        tokenizer/              a copy of the tokenizer files (tokenizer.model, tokenizer.vocab, ...)
        sharded/                sharded runs only: the model and optimizer shards (FSDP2: kosmos.sharding, no
                                model.safetensors: `python -m kosmos.checkpoint consolidate` makes one)

Every file goes into `step_XXXXXXXX.tmp/`, which is renamed to `step_XXXXXXXX/` once complete: a run killed
at any moment leaves either a complete checkpoint or a `.tmp` folder that is ignored (and later removed).
A checkpoint directory is all that inference needs: weights, config and tokenizer.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def resolve_resume(spec: str, output_dir: str | Path) -> Path | None:
    """`latest` -> the newest complete checkpoint of output_dir (None if there is none); else a path."""
    if spec == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {spec}: not a complete checkpoint (no trainer_state.json in it)")
    return path


def tmp_path_for(output_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(output_dir) / f"step_{step:08d}.tmp"


def finalize(output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Rename the finished `.tmp` folder into place, then prune old checkpoints and stale tmp folders."""
    tmp = tmp_path_for(output_dir, step)
    final = checkpoint_dir(output_dir) / f"step_{step:08d}"
    if final.exists():  # the same step saved again (e.g. the end of a run that just saved): replace it
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoint_dir(output_dir).glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_torch(obj, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": json.dumps(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(st: dict) -> None:
    version, internal, gauss = json.loads(st["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load `model.safetensors` (the file, or a checkpoint directory holding it) into `model`. Never
    unpickles; weights that do not fit the model fail with the file and the first mismatches named, and so
    do saved settings that the weights do not record (`kosmos.model.check_checkpoint_fits`)."""
    from safetensors.torch import load_model

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path} (expected a .safetensors file or a checkpoint dir)")
    from kosmos.model import check_checkpoint_fits

    check_checkpoint_fits(model, path.parent)  # settings the weights do not record must agree too
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise ValueError(f"{path}: weights do not fit this config ({len(lines)} mismatches, e.g. "
                         f"{'; '.join(lines[:2]) or e}); is it the config the checkpoint was trained with?") from None
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit this config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1))


def read_json(path: Path):
    return json.loads(path.read_text())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from `path`: the directory itself when it holds `model.safetensors`, else the
    newest complete checkpoint of a run's output directory (or of its `checkpoints/` folder)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    for root in (path, path.parent if path.name == "checkpoints" else None):
        if root is not None and list_checkpoints(root):
            return list_checkpoints(root)[-1]
    if (path / "sharded" / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: a sharded checkpoint; make its model.safetensors with "
                                f"`python -m kosmos.checkpoint consolidate {path} OUT_DIR`")
    raise FileNotFoundError(f"{path}: neither a checkpoint (no model.safetensors) nor a run directory with "
                            "complete checkpoints in checkpoints/")


# ----------------------------------------------------------------------------- training checkpoints


def _sharded(acc) -> bool:
    from accelerate import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    """Copy every regular file of the tokenizer directory (model, vocab, config) into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def save_checkpoint(acc, cfg, model, optimizer, scheduler, mixture, state: dict) -> Path | None:
    """Write the checkpoint of `state["step"]` from every rank; returns its path on the main process (else
    None). All ranks must call it: it synchronises them."""
    from safetensors.torch import save_model

    from kosmos.config import save_config
    from kosmos.sharding import SHARDED, is_sharded, save_sharded

    step = state["step"]
    tmp = tmp_path_for(cfg.train.output_dir, step)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if is_sharded(model):  # FSDP2 (kosmos.sharding): every rank writes its shard; no model.safetensors
        save_sharded(tmp / SHARDED, model, optimizer)
    elif _sharded(acc):
        # FSDP / DeepSpeed (not exercised in this project's CI, which has no GPUs): accelerate writes the
        # sharded model and optimizer itself (and reads them back with weights_only=True); we add a full
        # model.safetensors for generation.
        acc.save_state(str(tmp / "sharded"))
        full = acc.get_state_dict(model)
        if acc.is_main_process:
            from safetensors.torch import save_file

            if cfg.decoder.share_embeddings:  # stored once, as in the unsharded path
                full.pop("decoder.output_projection.weight", None)
            save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / "model.safetensors"))
    elif acc.is_main_process:
        save_model(acc.unwrap_model(model), str(tmp / "model.safetensors"))
        save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
    if acc.is_main_process:
        save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
        save_config(cfg, tmp / "config.yaml")  # with tokenizer/: a checkpoint is all inference needs
        copy_tokenizer(cfg.tokenizer.path, tmp / "tokenizer")
    save_torch(rng_state(), tmp / f"rng_rank{acc.process_index}.pt")
    write_json(mixture.state_dict(), tmp / f"data_rank{acc.process_index}.json")
    acc.wait_for_everyone()
    final = None
    if acc.is_main_process:
        write_json({**state, "world_size": acc.num_processes, "config": cfg.to_dict()},
                   tmp / "trainer_state.json")
        final = finalize(cfg.train.output_dir, step, cfg.train.keep_last)
    acc.wait_for_everyone()
    return final


def load_checkpoint(acc, path: Path, model, optimizer, scheduler, mixture) -> dict:
    """Restore everything `save_checkpoint` wrote into the prepared objects; returns the trainer state."""
    state = read_json(path / "trainer_state.json")
    if state["world_size"] != acc.num_processes:
        raise RuntimeError(f"{path} was written by {state['world_size']} processes, this run has "
                           f"{acc.num_processes}; the data position is per rank, so resume with the same "
                           "number (or start a new run from its weights with train.init_from)")
    from kosmos.sharding import SHARDED, is_sharded, load_sharded

    if is_sharded(model):
        load_sharded(path / SHARDED, model, optimizer)
    elif _sharded(acc):
        acc.load_state(str(path / "sharded"))
    else:
        load_model_weights(acc.unwrap_model(model), path)
        optimizer.load_state_dict(load_torch(path / "optimizer.pt"))
    scheduler.load_state_dict(load_torch(path / "scheduler.pt"))
    set_rng_state(load_torch(path / f"rng_rank{acc.process_index}.pt"))
    mixture.load_state_dict(read_json(path / f"data_rank{acc.process_index}.json"))
    state.pop("config", None)
    state.pop("world_size", None)
    return state


def start_point(resume: str | None, output_dir: str | Path,
                init_from: str | None) -> tuple[Path | None, Path | None]:
    """(checkpoint to resume, weights to start from): at most one is set. `--resume` wins over
    `train.init_from` when there is a checkpoint to resume, so that a killed fine-tuning run continues
    instead of starting over from its initial weights."""
    path = resolve_resume(resume, output_dir) if resume else None
    if path is not None or not init_from:
        return path, None
    return None, Path(init_from)


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the end of the current step. A context
    manager: the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def any_rank(self, acc) -> bool:
        if acc.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)  # sync point, once per step


if __name__ == "__main__":  # python -m kosmos.checkpoint consolidate SHARDED_CKPT OUT_DIR
    from kosmos.sharding import main

    raise SystemExit(main())
