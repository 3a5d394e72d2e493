"""Checkpoints: written atomically, read without unpickling code; resume; the stop signal.

    OUTPUT/checkpoints/step_00001000/
        model.safetensors       model weights (tied embedding stored once)
        optimizer.pt            optimizer state (tensors and numbers only: torch.load(weights_only=True))
        scheduler.pt            scheduler state (same)
        rng_rank{R}.pt          torch/CUDA/python/numpy RNG of each rank (same)
        data_rank{R}.json       each rank's data position (kosmos.data.stream explains it; a resume with
                                another number of processes or workers reads them all)
        trainer_state.json      step, counters, world size, the resolved config
        config.yaml             the resolved config (kosmos.config.save_config)
        tokenizer/              a copy of the tokenizer files (tokenizer.model, tokenizer.vocab, ...)
        sharded/                sharded runs only: the model and optimizer shards (FSDP2: kosmos.sharding, no
                                model.safetensors: `python -m kosmos.checkpoint consolidate` makes one)

Every file goes into `step_XXXXXXXX.tmp/`, which is renamed to `step_XXXXXXXX/` once complete: a run killed
at any moment leaves either a complete checkpoint or a `.tmp` folder that is ignored (and later removed).
A checkpoint directory is all that inference needs: weights, config and tokenizer.

On resume a checkpoint is checked before anything is loaded (every file there, JSON that parses, a safetensors
file as long as its header says, zip-complete torch files) and its weights must be finite; a damaged one is a
`CheckpointError` naming the file, and `--resume latest` then falls back to the previous complete checkpoint,
saying so. Keys that change the data order or shapes (`kosmos.config.FIXED`) must be those the checkpoint was
trained with, unless `--allow-config-change` names them.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kosmos.errors import KosmosError
from kosmos.optim import keep_configured_peaks
from kosmos.sharding import is_sharded
from kosmos.untrusted import load_json
from kosmos.weights import (  # noqa: F401 - finding and checking weights; re-exported for training
    SHARDED,
    STEP_RE,
    CheckpointError,
    CheckpointNotFound,
    check_finite,
    check_safetensors,
    check_sharded,
    checkpoint_dir,
    find_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_sharded_weights,
)


def resume_candidates(spec: str | None, output_dir: str | Path) -> list[Path]:
    """The checkpoints `--resume spec` may start from, in the order to try: for `latest`, the complete ones
    of output_dir, newest first (an unusable one falls back to the one before it); else the given path."""
    if not spec:
        return []
    if spec == "latest":
        return list_checkpoints(output_dir)[::-1]
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"--resume {spec}: not a complete checkpoint (no trainer_state.json in it)")
    return [path]


def resolve_resume(spec: str, output_dir: str | Path) -> Path | None:
    """`latest` -> the newest complete checkpoint of output_dir (None if there is none); else a path."""
    found = resume_candidates(spec, output_dir)
    return found[0] if found else None


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
    version, internal, gauss = load_json(st["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1))


def read_json(path: Path):
    return load_json(path.read_text())


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


@contextmanager
def _writing(tmp: Path):
    """Writes into the unfinished checkpoint folder `tmp`: one that fails (disk full, quota, an I/O error) is
    a one-line CheckpointError naming the checkpoint, the cause and the free space, and the folder is
    removed, giving its space back. The earlier checkpoints are untouched: `--resume latest`, once there is
    room, continues from the last of them."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as e:  # RuntimeError: torch.save's failed zip write
        try:
            free = f"; {shutil.disk_usage(tmp.parent).free / 1e6:.1f} MB free there"  # before the removal
        except OSError:
            free = ""
        shutil.rmtree(tmp, ignore_errors=True)
        first = (str(e).splitlines() or [""])[0][:200]
        cause = e.strerror if isinstance(e, OSError) and e.strerror else first
        where = f": {e.filename}" if isinstance(e, OSError) and e.filename else ""
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        raise CheckpointError(f"{final}: the checkpoint could not be written ({type(e).__name__}: {cause}"
                              f"{where}{free}); make room and resume with --resume latest") from None


def save_checkpoint(acc, cfg, model, optimizer, scheduler, mixture, state: dict) -> Path | None:
    """Write the checkpoint of `state["step"]` from every rank; returns its path on the main process (else
    None). All ranks must call it: it synchronises them."""
    from safetensors.torch import save_model

    from kosmos.config import save_config

    step = state["step"]
    tmp = tmp_path_for(cfg.train.output_dir, step)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if is_sharded(model):  # FSDP2 (kosmos.sharding): every rank writes its shard; no model.safetensors
        save_sharded(tmp / SHARDED, model, optimizer)
    elif _sharded(acc):
        # DeepSpeed (not installed here, never exercised; FSDP is the branch above): accelerate writes the
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
        unwrapped, optim_state = acc.unwrap_model(model), optimizer.state_dict()
        with _writing(tmp):
            save_model(unwrapped, str(tmp / "model.safetensors"))
            save_torch(optim_state, tmp / "optimizer.pt")
    sched_state, rng, data = scheduler.state_dict(), rng_state(), mixture.state_dict()
    with _writing(tmp):  # the writes alone: an error of anything else is not a full disk
        if acc.is_main_process:
            save_torch(sched_state, tmp / "scheduler.pt")
            save_config(cfg, tmp / "config.yaml")  # with tokenizer/: a checkpoint is all inference needs
            copy_tokenizer(cfg.tokenizer.path, tmp / "tokenizer")
        save_torch(rng, tmp / f"rng_rank{acc.process_index}.pt")
        write_json(data, tmp / f"data_rank{acc.process_index}.json")
    acc.wait_for_everyone()
    final = None
    if acc.is_main_process:
        with _writing(tmp):
            write_json({**state, "world_size": acc.num_processes, "config": cfg.to_dict()},
                       tmp / "trainer_state.json")
        final = finalize(cfg.train.output_dir, step, cfg.train.keep_last)
    acc.wait_for_everyone()
    return final


def _read(load, path: Path):
    """`load(path)`, any failure to read the file becoming a CheckpointError that names it."""
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises (zip, unpickler, JSON, I/O)
        first = str(e).split(". ")[0].splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {first})") from None


def check_checkpoint(path: Path) -> dict:
    """The trainer state of checkpoint `path` once every file of it is there and whole (JSON that parses, a
    safetensors file as long as its header says, torch files with their zip directory): cheap, nothing is
    loaded into a model. Else a CheckpointError naming the file."""
    state = _read(read_json, path / "trainer_state.json")
    if not isinstance(state, dict) or not {"step", "world_size", "config"} <= state.keys():
        raise CheckpointError(f"{path / 'trainer_state.json'}: not a trainer state (step, world_size, "
                              "config)")
    ranks = range(int(state["world_size"]))
    sharded = (path / "sharded").is_dir()
    fsdp2 = (path / "sharded" / ".metadata").is_file()  # kosmos.sharding: the weights are in the shards only
    needed = [*([] if fsdp2 else ["model.safetensors"]), "scheduler.pt", *(f"rng_rank{r}.pt" for r in ranks),
              *(f"data_rank{r}.json" for r in ranks), *([] if sharded else ["optimizer.pt"])]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    if fsdp2:

        check_sharded(path / "sharded")
    else:
        check_safetensors(path / "model.safetensors")
    from kosmos.data.state import DataStateError, check_data_state, check_trainer_state

    try:
        check_trainer_state(state, str(path / "trainer_state.json"))
    except DataStateError as e:
        raise CheckpointError(str(e)) from None
    data = {}
    for name in needed:
        if name.endswith(".pt") and not zipfile.is_zipfile(path / name):
            raise CheckpointError(f"{path / name}: truncated or not a torch file (no zip directory)")
        if name.endswith(".json"):
            data[name] = _read(read_json, path / name)
    for name, sd in data.items():  # the files whole, then what they say
        try:
            check_data_state(sd, str(path / name))
        except DataStateError as e:
            raise CheckpointError(str(e)) from None
    return state


_SOURCE = object()
"""config_changes: the change is a source added or removed."""


def config_changes(path: Path, saved: dict, cfg, allowed=()) -> list[str]:
    """Compare the keys fixed on resume (`kosmos.config.is_fixed_on_resume`: field metadata) between the
    config checkpoint `path` was trained with (`saved`, a
    nested dict) and this run's `cfg`, and the sources that take part: a source added or removed is a change
    of its key (`data.sources.<name>`). A change that `allowed` does not name (a key, or a section such as
    `data.text`) is a ConfigError listing every such key; the allowed changes come back as lines for the log.
    Keys the checkpoint predates are not compared. Paths compare absolute: a checkpoint of older code saved
    them relative to the working directory (`kosmos.config.paths`)."""
    from kosmos.config import ConfigError, DataConfig, flatten, is_fixed_on_resume
    from kosmos.config.paths import resolve_paths

    ours = flatten(resolve_paths(cfg.to_dict(), Path.cwd()))
    theirs = flatten(resolve_paths(saved, Path.cwd()))
    for key in allowed:
        if not any(k == key or k.startswith(key + ".") for k in (*ours, *theirs)):
            raise ConfigError(f"--allow-config-change {key}: not a config key")
    changed = [(k, theirs[k], v) for k, v in ours.items()
               if is_fixed_on_resume(k) and k in theirs and theirs[k] != v]
    before = DataConfig.active_keys(saved.get("data") or {})
    now = DataConfig.active_keys(cfg.to_dict()["data"])
    # data.text/captions/interleaved are always in both configs: their keys compare above
    sources = [(k, "added") for k in now if k not in before and k.startswith("data.sources.")]
    sources += [(k, "removed") for k in before if k not in now and k.startswith("data.sources.")]
    changed += [(k, _SOURCE, how) for k, how in sources]

    def say(k, a, b) -> str:
        return f"source {k} {b}" if a is _SOURCE else f"{k}: {a!r} -> {b!r}"

    def ok(key: str) -> bool:
        return any(key == a or key.startswith(a + ".") for a in allowed)

    refused = [say(k, a, b) for k, a, b in changed if not ok(k)]
    if refused:
        keys = ",".join(k for k, _, _ in changed if not ok(k))
        raise ConfigError(f"{path} was trained with other settings that change the data order or shapes: "
                          f"{'; '.join(refused)}. Resume with the checkpoint's values, or allow the change "
                          f"with --allow-config-change {keys}")
    return [f"config changed since the checkpoint (allowed): {say(k, a, b)}" for k, a, b in changed]


def pick_checkpoint(candidates: list[Path], cfg, allowed=(), say=print) -> list[Path]:
    """`candidates` (resume_candidates) from the first whose files are all there and whole and whose config
    fits this run's (config_changes: a ConfigError otherwise); each damaged one before it is reported with
    `say`, as a fallback. Cheap: run before the model is built. When none is usable, a CheckpointError.
    (`Checkpointer.pick`.)"""
    return Checkpointer(cfg, allowed, say=say).pick(candidates)


def reset_sources(names, cfg) -> list[str]:
    """The sources `--reset-data NAME,...` names (`all`: every source of this run), checked against this
    run's sources: an unknown name is a ConfigError naming the known ones."""
    from kosmos.config import ConfigError

    known = list(cfg.data.active_sources())
    names = [n.strip() for n in names if n.strip()]
    if "all" in names:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--reset-data {','.join(unknown)}: not a source of this run; its sources are "
                          f"{', '.join(known)} (or give all)")
    return names


def resume(acc, candidates: list[Path], cfg, model, optimizer, scheduler, mixture, allowed=(),
           say=print, reset_data=()) -> tuple[Path, dict]:
    """Load the first usable checkpoint of `candidates` into the prepared objects; returns its path and
    trainer state (a dict). (`Checkpointer.resume`.)"""
    ckpt = Checkpointer(cfg, allowed, reset_data, say=say)
    ckpt.candidates = list(candidates)
    ckpt.attach(acc, model, optimizer, scheduler, mixture)
    path, state = ckpt.resume()
    return path, state.state_dict()


def check_param_groups(saved: dict, optimizer, where: Path) -> None:
    """A ConfigError when the saved optimizer state's parameter groups (how many, and the parameters in each)
    differ from this run's optimizer: the trainable parameters or their grouping changed since the checkpoint,
    which torch would report as a bare ValueError deep inside `load_state_dict`."""
    from kosmos.config import ConfigError

    theirs = [len(g.get("params", ())) for g in saved.get("param_groups", ())]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if theirs != ours:
        raise ConfigError(f"{where}: its parameter groups hold {theirs} parameters, this run's optimizer "
                          f"{ours}: which parameters train (vision.trainable_blocks) or their grouping "
                          "(optim.vision_lr_scale 1 or not) changed since the checkpoint. Resume with the "
                          "checkpoint's values, or start a new run from its weights with train.init_from")


def load_checkpoint(acc, path: Path, model, optimizer, scheduler, mixture, reset_data=(),
                    checked: dict | None = None) -> dict:
    """Restore everything `save_checkpoint` wrote into the prepared objects; returns the trainer state. A file
    that is missing, damaged or holds non-finite weights is a CheckpointError naming it. The sources named in
    `reset_data` keep their fresh data position. `checked`: `check_checkpoint(path)`'s result, when the caller
    has it already (the files are not checked twice)."""
    from kosmos.config import ConfigError
    from kosmos.data.state import DataStateError, check_data_state
    from kosmos.data.streams import rank_data_state

    state = dict(checked) if checked is not None else check_checkpoint(path)
    world = int(state["world_size"])
    if world != acc.num_processes and (is_sharded(model) or _sharded(acc)):
        raise ConfigError(f"{path} was written by {world} processes, this run has {acc.num_processes}; "
                          "FSDP/DeepSpeed state is sharded per rank, so resume with the same number (or "
                          "start a new run from its weights with train.init_from)")
    if is_sharded(model):  # FSDP2: every rank reads its shard (a damaged file: a CheckpointError naming it)
        _read(lambda p: load_sharded(p, model, optimizer), path / SHARDED)
        check_finite(model, path / SHARDED)
    elif _sharded(acc):
        acc.load_state(str(path / "sharded"))
    else:
        load_model_weights(acc.unwrap_model(model), path)
        saved = _read(load_torch, path / "optimizer.pt")
        check_param_groups(saved, optimizer, path / "optimizer.pt")
        optimizer.load_state_dict(saved)
    scheduler.load_state_dict(_read(load_torch, path / "scheduler.pt"))
    if acc.process_index < world:  # a rank the checkpoint did not have keeps its seeded RNG
        set_rng_state(_read(load_torch, path / f"rng_rank{acc.process_index}.pt"))
    # every rank's data position: with another layout the logical streams are dealt anew (kosmos.data.stream)
    data = [_read(read_json, path / f"data_rank{r}.json") for r in range(world)]
    data = [{k: v for k, v in d.items() if k not in reset_data} for d in data]
    sources = {n: (loader.dataset.kind, loader.dataset.shards)
               for n, loader in getattr(mixture, "loaders", {}).items() if n not in reset_data}
    notes: list[str] = []
    for r, d in enumerate(data):  # against this run's sources: their kind, their shards
        try:
            found = check_data_state(d, str(path / f"data_rank{r}.json"), sources)
        except DataStateError as e:
            raise CheckpointError(str(e)) from None
        notes = notes or found  # the same sources are missing from every rank's file
    mixture.load_state_dict(rank_data_state(data, acc.process_index))
    if notes:
        mixture.resume_note = "\n".join(["WARNING: " + n for n in notes] + ([mixture.resume_note]
                                                                          if mixture.resume_note else []))
    state.pop("config", None)
    state.pop("world_size", None)
    return state


@dataclass
class TrainState:
    """Where a run is: what `trainer_state.json` holds beside the world size and the config. The data position
    is not here: each rank's `data_rankR.json` comes from the mixture (`Mixture.state_dict`)."""

    step: int = 0
    """Optimizer steps taken (skipped steps not counted)."""
    tokens: int = 0
    """Target tokens trained on, all ranks."""
    samples: int = 0
    """Samples started, all ranks (summed at each save)."""
    bad_steps: int = 0
    """Steps skipped for a non-finite loss or gradient (kosmos.training.BadSteps)."""
    sources: dict[str, dict] = field(default_factory=dict)
    """Cumulative per-source figures of the last log line (kosmos.metrics.Report.sources)."""

    def state_dict(self) -> dict:
        out = {"step": self.step, "tokens": self.tokens, "bad_steps": self.bad_steps, "samples": self.samples}
        return {**out, "sources": self.sources} if self.sources else out

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        return cls(step=int(d.get("step", 0)), tokens=int(d.get("tokens", 0)),
                   samples=int(d.get("samples", 0)), bad_steps=int(d.get("bad_steps", 0)),
                   sources=dict(d.get("sources") or {}))


class Checkpointer:
    """What a run resumes from, and when and how it is saved.

    Resume: `pick` (before the model is built: cheap) checks each candidate once, files and config, and keeps
    the usable ones; `resume` (once the objects are prepared) loads the first, falling back to the next when
    one turns out damaged only when loaded (non-finite weights). Both go through one fallback loop,
    `_first_usable`. Save: `maybe_save` at `train.save_every`, the last step and a stop, unsharded or sharded
    (`save_checkpoint`); a collective, so every rank calls it at the same steps."""

    def __init__(self, cfg, allow_change=(), reset_data=(), say=print):
        self.cfg, self.allowed, self.say = cfg, tuple(allow_change), say
        self.reset_data = reset_sources(reset_data, cfg)
        self.candidates: list[Path] = []
        self.last_saved = 0
        self._checked: dict[Path, dict] = {}
        self._objects: tuple | None = None

    def attach(self, acc, model, optimizer, scheduler, mixture) -> None:
        """The prepared objects that a resume loads into and a save writes."""
        self._objects = (acc, model, optimizer, scheduler, mixture)

    def pick(self, candidates: list[Path]) -> list[Path]:
        """The candidates (resume_candidates) from the first usable one on; [] when there are none."""
        found = self._first_usable(candidates)
        self.candidates = list(candidates[found[0]:]) if found else []
        return self.candidates

    def resume(self) -> tuple[Path, TrainState]:
        """Load the first usable picked checkpoint into the attached objects: its path and state. The sources
        of `reset_data` keep the fresh data position they were built with, each with a warning."""
        acc, model, optimizer, scheduler, mixture = self._objects

        def load(path: Path, checked: dict) -> dict:
            return load_checkpoint(acc, path, model, optimizer, scheduler, mixture, self.reset_data, checked)

        configured = list(scheduler.base_lrs)  # this run's peaks; loading brings back the checkpoint's
        found = self._first_usable(self.candidates, load)
        if found is None:
            raise CheckpointError("no checkpoint to resume")
        _, path, state, notes = found
        for line in notes:
            self.say(line)
        if note := keep_configured_peaks(scheduler, configured):
            self.say(note)
        for name in self.reset_data:
            self.say(f"warning: --reset-data {name}: the data position of {self.cfg.data.key(name)} in "
                     f"{path.name} is not restored; its data starts from scratch (fresh streams for this "
                     "layout)")
        for loader in getattr(mixture, "loaders", {}).values():
            if getattr(loader, "resume_note", None):
                self.say(loader.resume_note)
        state = TrainState.from_dict(state)
        self.last_saved = state.step
        return path, state

    def _check(self, path: Path) -> dict:
        if path not in self._checked:
            self._checked[path] = check_checkpoint(path)
        return self._checked[path]

    def _first_usable(self, candidates: list[Path], load=None):
        """The one fallback loop: (index, path, state, config-change notes) of the first candidate whose files
        are whole, whose config fits (a refused change is a ConfigError, no fallback) and, with `load`, that
        loads; each unusable one before it is said, naming the next. None when there are no candidates; a
        CheckpointError when none is usable."""
        errors = []
        for i, path in enumerate(candidates):
            try:
                state = self._check(path)
                notes = config_changes(path, state["config"], self.cfg, self.allowed)
                return i, path, (load(path, state) if load is not None else state), notes
            except CheckpointError as e:
                errors.append(e)
                if i + 1 < len(candidates):
                    self.say(f"{e}; falling back to the previous checkpoint, {candidates[i + 1].name}")
        if len(errors) > 1 and load is None:
            raise CheckpointError(f"no usable checkpoint among the {len(errors)} in {candidates[0].parent}; "
                                  f"the newest: {errors[0]}")
        if errors:
            raise errors[-1] if load is not None else errors[0]
        return None

    def due(self, step: int, last: bool = False, stop: bool = False) -> bool:
        return step % self.cfg.train.save_every == 0 or last or stop

    def maybe_save(self, state: TrainState, last: bool = False, stop: bool = False,
                   before=None) -> Path | None:
        """Save `state.step` when due (`train.save_every`, the last step, a stop): `before()` first (the log
        window, so that the saved cumulative figures count every step), then every rank's samples seen are
        summed into `state.samples` and the checkpoint is written. Returns its path on the main process."""
        if not self.due(state.step, last, stop):
            return None
        from kosmos.distributed import all_reduce_sum

        acc, model, optimizer, scheduler, mixture = self._objects
        if before is not None:
            before()
        seen = torch.tensor(mixture.samples_seen(), device=acc.device)
        state.samples = int(all_reduce_sum(acc, seen, "samples seen"))  # every rank's
        saved = save_checkpoint(acc, self.cfg, model, optimizer, scheduler, mixture, state.state_dict())
        self.last_saved = state.step
        return saved


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the end of the current step; a second one
    (either) stops at once, without a checkpoint for the current step (KeyboardInterrupt). DataLoader workers
    ignore both (kosmos.data.stream), so a signal to the whole process group reaches the main process alone.
    A context manager: the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def any_rank(self, acc) -> bool:
        from kosmos.distributed import all_reduce_sum

        if acc.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=acc.device)
        return bool(all_reduce_sum(acc, flag, "stop flag").item() > 0)  # sync point, once per step


# ----------------------------------------------------------------------------- sharded checkpoints (FSDP2)


def save_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Every rank writes its shard of the model and optimizer state into `path` (torch.distributed.checkpoint:
    one file per rank and a metadata file; nothing is gathered). All ranks must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, _inner(optimizer))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Read `save_sharded`'s files into the sharded model and optimizer (same number of ranks). DCP reads
    tensors and plain values only: nothing is unpickled as code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / ".metadata").is_file():
        raise CheckpointNotFound(f"{path}: no sharded checkpoint here (no torch.distributed.checkpoint "
                                 ".metadata)")
    opt = _inner(optimizer)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def consolidate(ckpt: str | Path, out_dir: str | Path, progress: bool = False) -> Path:
    """One process, no process group: the model weights of sharded checkpoint `ckpt` into
    out_dir/model.safetensors, with the checkpoint's config.yaml and tokenizer/, so that
    `kosmos.weights.load_model(out_dir)` (generation, evaluation) loads it. Returns out_dir. `progress`: on a
    terminal, a line as the reading and the writing start, one every few seconds while they run (each is
    one call: kosmos.progress.heartbeat) and the time it all took."""
    import time

    from safetensors.torch import save_model

    from kosmos.config import Config, save_config
    from kosmos.model import Kosmos
    from kosmos.progress import heartbeat, on_terminal

    show = progress and on_terminal()
    start = time.perf_counter()

    def say(line: str) -> None:
        if show:
            print(f"consolidate: {line}", file=sys.stderr, flush=True)

    ckpt, out = Path(ckpt), Path(out_dir)
    src = ckpt / SHARDED
    if not (src / ".metadata").is_file():
        raise CheckpointNotFound(f"{ckpt}: not a sharded checkpoint (no {SHARDED}/.metadata)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; give a new or existing folder for the "
                              "output")
    if out.resolve() == ckpt.resolve() or ckpt.resolve() in out.resolve().parents:
        raise CheckpointError(f"{out}: the output must not be the checkpoint {ckpt} or inside it (nothing is "
                              "written into the checkpoint); give another folder")
    cfg = Config.from_checkpoint(ckpt)
    cfg.decoder.compile = False  # nothing to compile for a copy
    model = Kosmos(cfg)
    files = [f for f in src.iterdir() if f.is_file()]
    say(f"reading {len(files)} files ({sum(f.stat().st_size for f in files) / 1e6:,.1f} MB) of {src} ...")
    with heartbeat("consolidate: reading", enabled=show):
        load_sharded_weights(model, ckpt, check_values=False)  # every shard file checked first, named if not
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    say(f"writing {out / 'model.safetensors'} ...")
    with heartbeat("consolidate: writing", enabled=show):
        save_model(model, str(tmp))  # the tied embedding stored once, as in training
    tmp.replace(out / "model.safetensors")  # a cut write never leaves a model.safetensors behind
    save_config(cfg, out / "config.yaml")
    if (ckpt / "tokenizer").is_dir():
        shutil.copytree(ckpt / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    say(f"done in {time.perf_counter() - start:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m kosmos.checkpoint consolidate SHARDED_CKPT OUT_DIR`: a `KosmosError` is one `error:` line
    and exit 2 (`kosmos.errors.run_cli`)."""
    from kosmos.errors import run_cli

    return run_cli(_command, argv)


def _command(argv: list[str] | None = None) -> int:
    import argparse

    from kosmos.errors import command_name

    ap = argparse.ArgumentParser(prog=command_name("kosmos.checkpoint"),
                                 description="Tools for training checkpoints.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    prog = command_name("kosmos.checkpoint")  # kosmos-consolidate runs the sub-command itself
    c = sub.add_parser("consolidate", prog=prog if prog == "kosmos-consolidate" else f"{prog} consolidate",
                       help="a sharded (FSDP2) checkpoint -> one model.safetensors with its "
                                           "config and tokenizer, for generation and evaluation")
    c.add_argument("ckpt", help="a checkpoint directory of a sharded run (it holds sharded/)")
    c.add_argument("out", help="output directory")
    c.add_argument("--no-progress", action="store_true",
                   help="no progress lines (shown on a terminal only) while the shards are read and written")
    args = ap.parse_args(argv)
    try:
        out = consolidate(args.ckpt, args.out, progress=not args.no_progress)
    except OSError as e:  # the output: no space left, no permission
        if isinstance(e, KosmosError):
            raise
        raise KosmosError(f"{args.out}: cannot write the consolidated model ({e.strerror or e})") from None
    print(f"wrote {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":  # python -m kosmos.checkpoint consolidate SHARDED_CKPT OUT_DIR
    raise SystemExit(main())
