"""Model weights: finding a checkpoint, checking it, loading it for inference, and CLIP's weights.

The layer between the model (`kosmos.model`, which builds a randomly initialised network and never reads a
file) and training checkpoints (`kosmos.checkpoint`, which saves and resumes runs). Everything here reads
without unpickling code: safetensors, or torch files with `weights_only=True`.

    model = load_model("runs/kosmos")                 # a checkpoint dir, or a run dir (its newest one)
    load_clip_weights(model.vision)                   # vision.pretrained: an open_clip tag or a local file

Every failure a user can fix is a `CheckpointError` (a `KosmosError`) naming the file and what to do: weights
that do not fit the config, a sharded checkpoint where a whole one is needed, weights that cannot be fetched
offline, NaN in a tensor.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from kosmos.config import Config, ConfigError, load_config
from kosmos.errors import KosmosError, MissingFileError
from kosmos.untrusted import load_json

STEP_RE = re.compile(r"^step_(\d{8})$")
SHARDED = "sharded"
"""The folder of a sharded (FSDP2) checkpoint's model and optimizer shards (torch.distributed.checkpoint)."""


class CheckpointError(KosmosError, ValueError):
    """A checkpoint that cannot be used: incomplete, damaged (truncated, not parseable), with non-finite
    weights, or weights that do not fit the config. The message names the file."""


class CheckpointNotFound(CheckpointError, MissingFileError):
    """No checkpoint where one was named (or a sharded one where a whole one is needed)."""


# ----------------------------------------------------------------------------- finding


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


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from `path`: the directory itself when it holds `model.safetensors` (or, from a
    sharded run, `sharded/`), else the newest complete checkpoint of a run's output directory (or of its
    `checkpoints/` folder)."""
    path = Path(path)
    if (path / "model.safetensors").is_file() or (path / SHARDED / ".metadata").is_file():
        return path  # a sharded one is read in this process (load_sharded_weights)
    for root in (path, path.parent if path.name == "checkpoints" else None):
        if root is not None and list_checkpoints(root):
            return list_checkpoints(root)[-1]
    raise CheckpointNotFound(f"{path}: neither a checkpoint (no model.safetensors) nor a run directory with "
                             "complete checkpoints in checkpoints/")


# ----------------------------------------------------------------------------- checking


def check_safetensors(path: Path) -> None:
    """A truncated or padded safetensors file, from its header alone (the file is not read)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"a header of {n} bytes")
            header = load_json(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file, or truncated ({size} bytes; {e})") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: {size} bytes, but its header describes {8 + n + end}: truncated or "
                              "damaged")


def check_finite(model: torch.nn.Module, path: str | Path) -> None:
    """Refuse weights with NaN or inf, naming the tensors: a damaged file or a diverged run would otherwise
    load silently and fail later as a non-finite loss. One pass over the weights, at load time only. A
    sharded model (FSDP2) is checked shard by shard, the counts summed over the ranks (one all-reduce), so
    that every rank raises the same error."""
    import torch.distributed as dist

    from kosmos.sharding import local

    names, counts, sharded = [], [], False
    for name, t in model.state_dict().items():
        shard = local(t)  # a DTensor: this rank's shard
        t, sharded = shard, sharded or shard is not t
        if t.is_floating_point():
            names.append(name)
            counts.append(torch.stack([torch.isnan(t).sum(), torch.isinf(t).sum()]))
    if not counts:
        return
    total = torch.stack(counts)
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    bad = [f"{name} ({nan} NaN, {inf} inf)" for name, (nan, inf) in zip(names, total.tolist(), strict=True)
           if nan or inf]
    if bad:
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        raise CheckpointError(f"{path}: non-finite weights in {len(bad)} tensor(s): {', '.join(bad[:4])}"
                              f"{more}; resume from an earlier checkpoint (--resume PATH)")


def _size_mismatches(e: RuntimeError) -> list[str]:
    """The `size mismatch for KEY: ...` lines of torch's load_state_dict error (the rest is a listing)."""
    return [line.strip() for line in str(e).splitlines() if "size mismatch" in line]


def check_checkpoint_fits(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Refuse the weights of checkpoint directory `ckpt` for a model whose config computes something else
    with them although every shape fits: settings that the weights do not record (the CLIP activation, the
    token embedding scale). Checkpoints without a saved config are not checked."""
    from kosmos.vision import resolve_quick_gelu

    cfg = getattr(model, "cfg", None)
    ckpt = Path(ckpt)
    if not isinstance(cfg, Config) or not ((ckpt / "config.yaml").is_file()
                                           or (ckpt / "trainer_state.json").is_file()):
        return
    try:
        saved = Config.from_checkpoint(ckpt)
    except (ConfigError, ValueError):  # a config this code cannot read: only the shapes are checked
        return
    wanted = {"vision.quick_gelu": (resolve_quick_gelu(saved.vision), resolve_quick_gelu(cfg.vision)),
              "decoder.scale_embedding": (saved.decoder.scale_embedding, cfg.decoder.scale_embedding)}
    for key, (theirs, ours) in wanted.items():
        if theirs != ours:
            theirs, ours = str(theirs).lower(), str(ours).lower()
            raise CheckpointError(
                f"{ckpt} was trained with {key}={theirs} but this model has {ours}; "
                "the weights would compute "
                f"something else: set {key}={theirs} (a checkpoint whose config.yaml lacks the key predates "
                "it and keeps the old behaviour)")


# ----------------------------------------------------------------------------- loading


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load `model.safetensors` (the file, or a checkpoint directory holding it; a sharded run's checkpoint
    directory is read shard by shard, `load_sharded_weights`) into `model`. Never unpickles; weights that do
    not fit the model fail with the file and the first mismatches named, and so do saved settings that the
    weights do not record (`check_checkpoint_fits`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(path)
    if path.is_dir():
        if not (path / "model.safetensors").is_file() and (path / SHARDED / ".metadata").is_file():
            check_checkpoint_fits(model, path)
            load_sharded_weights(model, path)  # a sharded run's checkpoint: its shards, in this process
            return
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointNotFound(f"no model weights at {path} (expected a .safetensors file or a checkpoint "
                                 "dir)")
    check_checkpoint_fits(model, path.parent)  # settings the weights do not record must agree too
    check_safetensors(path)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    except RuntimeError as e:
        lines = _size_mismatches(e)
        raise CheckpointError(f"{path}: weights do not fit this config ({len(lines)} mismatches, e.g. "
                              f"{'; '.join(lines[:2]) or e}); is it the config the checkpoint was trained "
                              "with?") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    check_finite(model, path)


def load_sharded_weights(model: torch.nn.Module, ckpt: str | Path, check_values: bool = True) -> None:
    """The model weights of a sharded (FSDP2) checkpoint `ckpt` (its `sharded/` folder), read into `model` in
    this one process, without a process group: what `kosmos-consolidate` (`python -m kosmos.checkpoint
    consolidate`) writes out once, done in memory, so that generation and evaluation take a sharded run's
    checkpoint as it is. The shard files are checked first (sizes, `check_sharded`); the optimizer's entries
    stay in the files; torch.distributed.checkpoint reads tensors and plain values only. `check_values`:
    refuse NaN/inf weights (`check_finite`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException

    src = Path(ckpt) / SHARDED
    if not (src / ".metadata").is_file():
        raise CheckpointNotFound(f"{ckpt}: not a sharded checkpoint (no {SHARDED}/.metadata)")
    check_sharded(src)  # every shard file there and long enough, named if not
    sd = model.state_dict()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: loading in a single process": meant
            planner = DefaultLoadPlanner(allow_partial_load=True)  # the optimizer's entries stay in the files
            dcp.load({"model": sd}, checkpoint_id=str(src), planner=planner)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - damaged bytes: miniz, the weights-only
        # reader, ...; DCP wraps them in a CheckpointException, a BaseException, whose text is a traceback
        raise CheckpointError(f"{src}: unreadable shard data ({_first_cause(e)})") from None
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        lines = _size_mismatches(e)
        detail = "; ".join(lines[:2]) or e
        raise CheckpointError(f"{src}: weights do not fit this config ({detail})") from None
    if check_values:
        check_finite(model, src)


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


def check_sharded(path: Path) -> None:
    """Every file that the metadata of sharded checkpoint `path` points into is there and long enough (sizes
    only, nothing read): a truncated or missing shard is a CheckpointError naming it, before any rank loads
    (a failure inside the collective load could leave the ranks disagreeing)."""
    from torch.distributed.checkpoint import FileSystemReader

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



_IDENTITY: dict[tuple, dict] = {}


def weights_identity(ckpt: str | Path) -> dict:
    """What a number computed from checkpoint directory `ckpt` came from: its resolved path, its step (from
    `trainer_state.json`, None without one) and the sha256 of its weights (`model.safetensors`, or a sharded
    checkpoint's files under `sharded/` in name order). Hashing reads the weights once per process (about 10
    s for the paper's 3.3 GB model); later calls for an unchanged file are free."""
    import hashlib

    ckpt = Path(ckpt).resolve()
    files = [ckpt / "model.safetensors"] if (ckpt / "model.safetensors").is_file() else \
        sorted(p for p in (ckpt / SHARDED).rglob("*") if p.is_file())
    key = (str(ckpt), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _IDENTITY:
        h = hashlib.sha256()
        for f in files:
            h.update(f.relative_to(ckpt).as_posix().encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        step = None
        state = ckpt / "trainer_state.json"
        if state.is_file():
            try:
                step = load_json(state.read_text()).get("step")
            except ValueError:
                step = None
        _IDENTITY[key] = {"path": str(ckpt), "step": step, "sha256": h.hexdigest()}
    return dict(_IDENTITY[key])


def load_model(checkpoint: str | Path | None = None, config: str | Path | None = None,
               overrides: list[str] | None = None, device: str | torch.device = "cpu"):
    """The one inference loader: a `Kosmos` in eval mode on `device`.

    A checkpoint directory (or a run's output directory: its newest checkpoint) is enough: its `config.yaml`
    builds the model (`Config.from_checkpoint`, with the tokenizer path pointed at the checkpoint's own
    copy, so `SequenceEncoder.from_config(model.cfg)` works from any directory) and `model.safetensors`
    fills it. `config` builds the model from a YAML instead: with a checkpoint too, for checkpoints that
    carry no config; alone, random weights plus CLIP's (`load_clip_weights`). `overrides`: dotted config
    overrides (e.g. `decoder.attention=torchscale`)."""
    from kosmos.model import Kosmos

    if checkpoint is None and config is None:
        raise KosmosError("give a checkpoint directory (or a config, for random weights)")
    ckpt = find_checkpoint(checkpoint) if checkpoint is not None else None
    if config is not None:
        cfg = load_config(config, overrides or [])
    else:
        cfg = Config.from_checkpoint(ckpt, overrides)
    model = Kosmos(cfg)
    if ckpt is not None:
        load_model_weights(model, ckpt)
    else:
        load_clip_weights(model.vision)
    return model.to(device).eval()


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file without unpickling code
    (`torch.load(weights_only=True)`). Nested {"state_dict": ...} checkpoints are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file's name
        raise CheckpointError(f"{path}: not a loadable weights-only torch file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def load_clip_weights(vision) -> None:
    """Fill a `kosmos.vision.VisionEncoder` with the CLIP weights its `vision.pretrained` names: an open_clip
    tag (open_clip fetches it: the only place anything may be downloaded) or a local file (safetensors or
    weights-only torch; a full CLIP checkpoint's image tower is taken). With `vision.pretrained` null the
    tower stays randomly initialised, with a warning. A tag that cannot be fetched (offline, no cache) is one
    `CheckpointError` saying how to get past it."""
    from kosmos.vision import is_local_weights

    cfg = vision.cfg
    spec = cfg.pretrained
    if not spec:
        warnings.warn(f"vision.pretrained is null: the {cfg.model_name} image encoder is randomly "
                      "initialised (fine for tests and toy runs; set vision.pretrained to a tag or a local "
                      "file to use CLIP)", stacklevel=2)
        return
    if is_local_weights(spec):
        sd = load_state_dict_file(spec)
        if any(k.startswith("visual.") for k in sd):  # a full CLIP checkpoint: keep the image tower
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        mean = std = None
    else:
        import open_clip
        from open_clip.model import CLIPVisionCfg

        from kosmos.config import open_clip_architecture

        arch = {**vars(CLIPVisionCfg()), **open_clip_architecture(cfg.model_name)["vision_cfg"]}
        changed = [f"vision.{k}={getattr(cfg, k)} (the weights' {arch.get(k)})"
                   for k in ("width", "layers", "patch_size", "head_width")
                   if getattr(cfg, k) is not None and getattr(cfg, k) != arch.get(k)]
        if changed:  # before anything is downloaded: these weights cannot fill this tower
            raise CheckpointError(
                f"vision.pretrained={spec!r}: {cfg.model_name}'s weights do not fit this tower: "
                f"{', '.join(changed)}; drop those overrides, or set vision.pretrained=null for a random "
                "tower (vision.image_size may differ: the position embedding is resized)")
        # open_clip 2.32 builds the architecture's activation whatever the tag (for `openai` it builds
        # nn.GELU and only warns), so we pass the resolved one, and our vision.* overrides with it (open_clip
        # resizes the position embedding to a changed image_size).
        try:
            clip = open_clip.create_model(cfg.model_name, pretrained=spec, quick_gelu=vision.quick_gelu,
                                          vision_cfg=cfg.resolved())
        except (OSError, RuntimeError, ValueError) as e:  # no network, no cache, a broken download
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(
                f"vision.pretrained={spec!r}: open_clip could not load the {cfg.model_name} weights "
                f"({type(e).__name__}: {first}); on a machine without network, download them once elsewhere "
                "(open_clip caches them under ~/.cache/huggingface) or set vision.pretrained to a local "
                "file, or to null for a random tower") from None
        sd = clip.visual.state_dict()
        mean, std = getattr(clip.visual, "image_mean", None), getattr(clip.visual, "image_std", None)
        del clip
    sd.pop("proj", None)
    own = vision.visual.state_dict()
    own.pop("proj", None)
    missing = sorted(set(own) - set(sd))
    if missing:
        raise CheckpointError(f"vision.pretrained={spec}: not a {type(vision.visual).__name__} checkpoint; "
                              f"missing keys {missing[:5]}...")
    try:
        vision.visual.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    except RuntimeError as e:
        lines = _size_mismatches(e)
        raise CheckpointError(f"vision.pretrained={spec}: its weights do not fit vision.* "
                              f"({'; '.join(lines[:2]) or e})") from None
    if mean is not None and std is not None:  # the statistics the tower was trained with
        vision.pixel_mean = tuple(float(m) for m in mean)
        vision.pixel_std = tuple(float(s) for s in std)
