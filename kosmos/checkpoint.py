"""Checkpoints: written atomically, read without unpickling code.

    OUTPUT/checkpoints/step_00001000/
        model.safetensors       model weights (tied embedding stored once)
        optimizer.pt            optimizer state (tensors and numbers only: torch.load(weights_only=True))
        scheduler.pt            scheduler state (same)
        rng_rank{R}.pt          torch/CUDA/python/numpy RNG of each rank (same)
        data_rank{R}.json       each rank's data position (kosmos.data.stream explains it)
        trainer_state.json      step, counters, world size, the resolved config

Every file goes into `step_XXXXXXXX.tmp/`, which is renamed to `step_XXXXXXXX/` once complete: a run killed
at any moment leaves either a complete checkpoint or a `.tmp` folder that is ignored (and later removed).
"""

from __future__ import annotations

import json
import random
import re
import shutil
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
    unpickles; weights that do not fit the model fail with the file and the first mismatches named."""
    from safetensors.torch import load_model

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path} (expected a .safetensors file or a checkpoint dir)")
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
    raise FileNotFoundError(f"{path}: neither a checkpoint (no model.safetensors) nor a run directory with "
                            "complete checkpoints in checkpoints/")
