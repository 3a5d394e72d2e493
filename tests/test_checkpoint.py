"""kosmos.checkpoint: training checkpoints written, listed, checked and loaded back (whole and sharded),
damage named file and all, `--resume latest` falling back over a damaged newest one, the config keys a
resume may not change, a full disk while saving, consolidation, and the stop flag that a signal sets.
(Moved here unchanged from test_train.py, test_hostile_train.py and test_sharding.py.)"""

import os
import signal
from pathlib import Path

import pytest
import torch

from kosmos import checkpoint as ck
from kosmos.config import ConfigError, load_config
from kosmos.weights import load_model
from tests.helpers import ROOT, MixtureStandIn, tiny_config, tiny_model, truncate

TINY = str(ROOT / "configs" / "tiny.yaml")


def test_checkpoint_listing_ignores_partial_and_keeps_last(tmp_path):
    for step in (5, 10, 15):
        tmp = ck.tmp_path_for(tmp_path, step)
        tmp.mkdir(parents=True)
        (tmp / "trainer_state.json").write_text("{}")
        ck.finalize(tmp_path, step, keep_last=2)
    ck.tmp_path_for(tmp_path, 20).mkdir()  # a run killed while writing step 20
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step_00000010", "step_00000015"]
    assert ck.resolve_resume("latest", tmp_path).name == "step_00000015"
    assert ck.resolve_resume("latest", tmp_path / "elsewhere") is None
    with pytest.raises(ck.CheckpointError, match="not a complete checkpoint"):
        ck.resolve_resume(str(ck.checkpoint_dir(tmp_path) / "step_00000020.tmp"), tmp_path)


def test_checkpoint_carries_config_and_tokenizer_and_loads_back(tiny_tokenizer, tmp_path):

    from kosmos.optim import build_optimizer, build_scheduler
    from kosmos.tokenizer import KosmosTokenizer
    from kosmos.training import build_accelerator

    cfg = load_config(TINY, [f"tokenizer.path={tiny_tokenizer.path}", f"train.output_dir={tmp_path}",
                             "train.tracker=none"])
    acc = build_accelerator(cfg)

    def objects(seed):
        model = tiny_model(seed=seed)
        opt = build_optimizer(model, cfg.optim)
        return model, opt, build_scheduler(opt, cfg.optim), MixtureStandIn(seed)

    model, opt, sched, data = objects(0)
    state = {"step": 3, "tokens": 10, "bad_steps": 1, "samples": 5}
    path = ck.save_checkpoint(acc, cfg, model, opt, sched, data, state)
    assert path == ck.checkpoint_dir(tmp_path) / "step_00000003" and not list(tmp_path.rglob("*.tmp"))
    assert load_config(path / "config.yaml") == cfg  # the resolved config, loadable as it is
    files = sorted(f.name for f in Path(tiny_tokenizer.path).iterdir() if f.is_file())
    assert "tokenizer.model" in files and sorted(f.name for f in (path / "tokenizer").iterdir()) == files
    text = "a red circle on the left"
    assert KosmosTokenizer.from_dir(path / "tokenizer").encode(text) == tiny_tokenizer.encode(text)

    model2, opt2, sched2, data2 = objects(1)
    assert ck.load_checkpoint(acc, path, model2, opt2, sched2, data2) == state and data2.pos == 0
    assert all(torch.equal(a, b)
               for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True))

    # the directory alone is a usable model: its config, its weights, its tokenizer copy
    from kosmos.sequence import SequenceEncoder

    model3 = load_model(path)
    assert all(torch.equal(a, b)
               for a, b in zip(model.state_dict().values(), model3.state_dict().values(), strict=True))
    assert Path(model3.cfg.tokenizer.path) == (path / "tokenizer").resolve()
    assert SequenceEncoder.from_config(model3.cfg).tokenizer.encode(text) == tiny_tokenizer.encode(text)


# ----------------------------------------------------------------------------- damage, fallback, resume


def _checkpoints(tiny_tokenizer, out, steps=(1, 2)):
    """Checkpoints of `steps` as the trainer writes them (a tiny model, a stand-in data position); returns
    what loads them back: (config, accelerator, a fresh (model, optimizer, scheduler, data))."""
    from kosmos import checkpoint as ck
    from kosmos.config import load_config
    from kosmos.optim import build_optimizer, build_scheduler
    from kosmos.training import build_accelerator
    from tests.helpers import tiny_model

    cfg = load_config(TINY, [f"tokenizer.path={tiny_tokenizer.path}", f"train.output_dir={out}",
                             "train.tracker=none", "optim.name=adamw", "train.keep_last=5"])
    acc = build_accelerator(cfg)

    def objects(seed=0):
        model = tiny_model(seed=seed)
        opt = build_optimizer(model, cfg.optim)
        return model, opt, build_scheduler(opt, cfg.optim), MixtureStandIn(seed)

    for step in steps:
        state = {"step": step, "tokens": 0, "bad_steps": 0, "samples": 0}
        ck.save_checkpoint(acc, cfg, *objects(step), state)
    return cfg, acc, objects


@pytest.mark.parametrize("damage", ["weights_truncated", "weights_garbage", "state_garbage",
                                    "optimizer_missing", "optimizer_truncated", "data_garbage",
                                    "rng_truncated"])
def test_a_damaged_checkpoint_is_named_file_and_all(tiny_tokenizer, tmp_path, damage):
    from kosmos import checkpoint as ck

    cfg, acc, objects = _checkpoints(tiny_tokenizer, tmp_path, steps=(1,))
    path = ck.list_checkpoints(tmp_path)[-1]
    file = {"weights_truncated": "model.safetensors", "weights_garbage": "model.safetensors",
            "state_garbage": "trainer_state.json", "optimizer_missing": "optimizer.pt",
            "optimizer_truncated": "optimizer.pt", "data_garbage": "data_rank0.json",
            "rng_truncated": "rng_rank0.pt"}[damage]
    if damage.endswith("truncated"):
        truncate(path / file)
    elif damage.endswith("garbage"):
        (path / file).write_bytes(b"\x00garbage{" * 5)
    else:
        (path / file).unlink()
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_checkpoint(acc, path, *objects())
    msg = str(e.value)
    assert (str(path / file) in msg or (damage == "optimizer_missing" and f"{path}: incomplete checkpoint, "
                                        "missing optimizer.pt" in msg)), msg
    assert "\n" not in msg and "weights_only=False" not in msg  # one line, no advice to unpickle
    with pytest.raises(ck.CheckpointError, match=str(path)):  # before anything is loaded: for the fallback
        ck.check_checkpoint(path)


def test_non_finite_weights_are_refused_naming_the_tensors(tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    from kosmos import checkpoint as ck
    from kosmos.weights import load_model

    cfg, acc, objects = _checkpoints(tiny_tokenizer, tmp_path, steps=(1,))
    path = ck.list_checkpoints(tmp_path)[-1]
    weights = load_file(path / "model.safetensors")
    fc1 = "decoder.layers.1.ffn.fc1.weight"
    assert fc1 in weights
    weights[fc1][0, :3] = float("nan")
    weights[fc1][1, 0] = float("inf")
    weights["proj.bias"][0] = -float("inf")
    save_file(weights, str(path / "model.safetensors"))
    ck.check_checkpoint(path)  # whole files: only loading finds the values
    for load in (lambda: ck.load_checkpoint(acc, path, *objects()), lambda: load_model(path)):
        with pytest.raises(ck.CheckpointError) as e:
            load()
        msg = str(e.value)
        assert msg.startswith(f"{path / 'model.safetensors'}: non-finite weights in 2 tensor(s): ")
        assert f"{fc1} (3 NaN, 1 inf)" in msg and "proj.bias (0 NaN, 1 inf)" in msg


def test_resume_latest_falls_back_over_a_damaged_newest_checkpoint(tiny_tokenizer, tmp_path):
    from kosmos import checkpoint as ck

    cfg, acc, objects = _checkpoints(tiny_tokenizer, tmp_path, steps=(1, 2, 3))
    one, two, three = ck.list_checkpoints(tmp_path)
    truncate(three / "model.safetensors")
    (two / "trainer_state.json").write_text('{"step": 2, "world_')  # cut while written by hand, say
    notes = []
    candidates = ck.pick_checkpoint(ck.resume_candidates("latest", tmp_path), cfg, say=notes.append)
    assert candidates == [one]
    assert notes[0].startswith(f"{three / 'model.safetensors'}: ") and notes[0].endswith(
        "falling back to the previous checkpoint, step_00000002")
    assert notes[1].startswith(f"{two / 'trainer_state.json'}: unreadable (JSONDecodeError")
    assert ck.resume(acc, candidates, cfg, *objects(), say=notes.append)[1]["step"] == 1

    with pytest.raises(ck.CheckpointError, match=str(three / "model.safetensors")):  # a path: no fallback
        ck.pick_checkpoint(ck.resume_candidates(str(three), tmp_path), cfg)
    truncate(one / "optimizer.pt")
    with pytest.raises(ck.CheckpointError, match=r"no usable checkpoint among the 3 in .*; the newest: "):
        ck.pick_checkpoint(ck.resume_candidates("latest", tmp_path), cfg)


def test_a_checkpoint_found_damaged_only_when_loaded_falls_back_too(tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    from kosmos import checkpoint as ck

    cfg, acc, objects = _checkpoints(tiny_tokenizer, tmp_path, steps=(1, 2))
    one, two = ck.list_checkpoints(tmp_path)
    weights = load_file(two / "model.safetensors")
    weights["proj.bias"][0] = float("nan")
    save_file(weights, str(two / "model.safetensors"))
    notes = []
    model, opt, sched, data = objects(seed=5)
    path, state = ck.resume(acc, ck.pick_checkpoint([two, one], cfg), cfg, model, opt, sched, data,
                            say=notes.append)
    assert (path, state["step"], data.pos) == (one, 1, 1)  # step 1's data position, over step 2's weights
    assert len(notes) == 1 and "non-finite weights in 1 tensor(s): proj.bias (1 NaN, 0 inf)" in notes[0]
    assert notes[0].endswith("falling back to the previous checkpoint, step_00000001")
    import torch

    ref = objects(seed=1)[0]  # step 1 was saved from the seed-1 model
    assert all(torch.equal(a, b)
               for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))


def test_resume_refuses_changed_data_settings_naming_them_unless_allowed(tiny_tokenizer, tmp_path):
    from kosmos import checkpoint as ck
    from kosmos.config import load_config

    cfg, acc, objects = _checkpoints(tiny_tokenizer, tmp_path, steps=(1,))
    path = ck.list_checkpoints(tmp_path)[-1]
    saved = ck.read_json(path / "trainer_state.json")["config"]
    assert ck.config_changes(path, saved, cfg) == []
    base = [f"tokenizer.path={tiny_tokenizer.path}", f"train.output_dir={tmp_path}", "train.tracker=none",
            "optim.name=adamw", "train.keep_last=5"]
    harmless = load_config(TINY, [*base, "train.max_steps=9", "optim.lr=1e-5", "data.text.workers=3",
                                  "data.captions.eval_shards=[x]", "data.allow_mixture_drift=true"])
    assert ck.config_changes(path, saved, harmless) == []
    changed = load_config(TINY, [*base, "seed=1", "data.captions.micro_batch_size=4", "decoder.max_len=128",
                                 "data.text.shards=[elsewhere]", "data.text.shuffle_buffer=7"])
    with pytest.raises(ConfigError) as e:
        ck.config_changes(path, saved, changed)
    msg = str(e.value)
    for key in ("seed: 0 -> 1", "decoder.max_len: 256 -> 128", "data.captions.micro_batch_size: 8 -> 4",
                # paths are compared and named absolute: tiny.yaml's against its folder, an override's
                # against the working directory
                f"data.text.shards: ['{ROOT / 'demo_out/shards/text'}'] -> "
                f"['{Path.cwd() / 'elsewhere'}']",
                "data.text.shuffle_buffer: 100 -> 7"):
        assert key in msg, (key, msg)
    assert msg.endswith("--allow-config-change decoder.max_len,data.text.shards,data.text.shuffle_buffer,"
                        "data.captions.micro_batch_size,seed") and "\n" not in msg
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1\. Resume .* --allow-config-change seed$"):
        ck.config_changes(path, saved, changed, ["decoder.max_len", "data"])  # a section allows its keys
    lines = ck.config_changes(path, saved, changed, ["seed", "decoder.max_len", "data.captions", "data.text"])
    assert len(lines) == 5 and lines[-1] == "config changed since the checkpoint (allowed): seed: 0 -> 1"
    with pytest.raises(ConfigError, match="--allow-config-change data.captions.micro_batch: not a config "
                                          "key"):
        ck.config_changes(path, saved, changed, ["data.captions.micro_batch"])
    older = {k: v for k, v in saved.items() if k != "seed"}  # a checkpoint from before a key: not compared
    assert "seed" not in str(ck.config_changes(path, older, changed, ["decoder", "data"]))


def test_a_second_signal_stops_at_once(monkeypatch):

    from kosmos import checkpoint as ck

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with ck.StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested  # the first: a checkpoint at the end of the step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the handlers it replaced are back


# ----------------------------------------------------------------------------- issue 22, item 12: a full disk


def test_a_full_disk_while_saving_is_one_line_naming_the_checkpoint_and_a_save_with_room_works(
        tiny_tokenizer, tmp_path):
    """The checkpoint save on a full disk ended with a traceback (SafetensorError from the weights). Now one
    line naming the checkpoint and the cause, the unfinished folder removed (its space given back); once there
    is room a save works and resumes. A tmpfs where this may mount one (ENOSPC), else a file size limit
    (EFBIG)."""
    from kosmos import checkpoint as ck
    from tests.helpers import SmallDisk

    _checkpoints(tiny_tokenizer, tmp_path / "ok", steps=(1,))
    weights = (ck.list_checkpoints(tmp_path / "ok")[0] / "model.safetensors").stat().st_size
    with SmallDisk(tmp_path / "disk", weights // 2) as disk:
        out = disk.folder / "run"
        with pytest.raises(ck.CheckpointError) as e:
            _checkpoints(tiny_tokenizer, out, steps=(1,))
        msg = str(e.value)
        assert msg.startswith(f"{out / 'checkpoints' / 'step_00000001'}: the checkpoint could not be written "
                              "(SafetensorError: "), msg
        assert msg.endswith("MB free there); make room and resume with --resume latest") and "\n" not in msg
        assert ("No space left on device" if disk.kind == "tmpfs" else "File too large") in msg, msg
        assert not (out / "checkpoints" / "step_00000001.tmp").exists() and not ck.list_checkpoints(out)
        disk.room()
        cfg, acc, objects = _checkpoints(tiny_tokenizer, out, steps=(1,))
        path = ck.list_checkpoints(out)[-1]
        assert ck.resume(acc, [path], cfg, *objects())[1]["step"] == 1


def test_the_other_writes_of_a_save_that_fail_are_one_line_too(tiny_tokenizer, tmp_path, monkeypatch):
    """torch.save on a full disk raises a RuntimeError whose message is its zip writer's (simulated here:
    the tiny run's torch files are too small to fill a disk alone); a plain file write, an OSError."""
    from kosmos import checkpoint as ck

    real = ck.save_torch

    def full(obj, path):
        if path.name == "optimizer.pt":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        real(obj, path)

    monkeypatch.setattr(ck, "save_torch", full)
    with pytest.raises(ck.CheckpointError, match=r"step_00000001: the checkpoint could not be written "
                                                 r"\(RuntimeError: \[enforce fail.*unexpected pos 576 vs "
                                                 r"534; "):
        _checkpoints(tiny_tokenizer, tmp_path, steps=(1,))
    monkeypatch.setattr(ck, "save_torch", real)
    monkeypatch.setattr(ck, "write_json", lambda obj, path: (_ for _ in ()).throw(
        OSError(28, "No space left on device", str(path))))
    with pytest.raises(ck.CheckpointError, match=r"\(OSError: No space left on device: .*step_00000001\.tmp/"
                                                 r"data_rank0\.json; "):
        _checkpoints(tiny_tokenizer, tmp_path, steps=(1,))
    assert not list((tmp_path / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- sharded checkpoints


def test_consolidate_names_what_is_wrong(tmp_path, capsys):
    from kosmos.checkpoint import main

    plain = tmp_path / "step_00000001"
    plain.mkdir()
    assert main(["consolidate", str(plain), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a sharded checkpoint" in err and err.count("\n") == 1
    (plain / "sharded").mkdir()
    (plain / "sharded" / ".metadata").write_bytes(b"")
    (plain / "config.yaml").write_text(Path(TINY).read_text())
    assert ck.find_checkpoint(plain) == plain  # inference reads a sharded checkpoint's shards itself
    with pytest.raises(ck.CheckpointError, match=r"sharded/\.metadata: unreadable"):
        load_model(plain)  # ... and names what is wrong with them


def test_consolidating_shows_its_progress_on_a_terminal(tmp_path, monkeypatch, one_process_group,
                                                        tiny_tokenizer):
    """Reading a large sharded checkpoint and writing model.safetensors take minutes, each one call: on a
    terminal a line as each starts, one every few seconds while it runs (kosmos.progress.heartbeat), and the
    time it took; nothing with --no-progress."""
    import sys

    import kosmos.progress
    from kosmos.checkpoint import SHARDED, main, save_sharded
    from kosmos.config import save_config
    from kosmos.optim import build_optimizer
    from kosmos.sharding import shard_model
    from tests.helpers import Terminal

    model = shard_model(tiny_model())
    ckpt = tmp_path / "step_00000001"
    save_sharded(ckpt / SHARDED, model, build_optimizer(model, tiny_config("optim.name=adamw").optim))
    save_config(model.cfg, ckpt / "config.yaml")
    slow_load = ck.load_sharded_weights

    def slow(*args, **kwargs):  # a tiny model reads in a blink
        import time

        time.sleep(0.3)
        return slow_load(*args, **kwargs)

    monkeypatch.setattr(ck, "load_sharded_weights", slow)
    monkeypatch.setattr(kosmos.progress, "HEARTBEAT_EVERY", 0.02)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["consolidate", str(ckpt), str(tmp_path / "out")]) == 0
    err = term.getvalue()
    assert "MB) of " in err and "consolidate: reading ... 0 s" in err, err
    assert "consolidate: writing " in err and "consolidate: done in " in err
    term.seek(0), term.truncate()
    assert main(["consolidate", str(ckpt), str(tmp_path / "quiet"), "--no-progress"]) == 0
    assert term.getvalue() == ""


def test_consolidating_damaged_or_odd_inputs_is_one_line_and_writes_nothing_into_the_checkpoint(
        tmp_path, capsys, one_process_group, tiny_tokenizer):
    """A missing or truncated shard file, shard bytes that do not decode, OUT the checkpoint itself, OUT an
    existing file: one `error:` line naming the file (before: FileNotFoundError, miniz's RuntimeError, a
    shutil.Error printed as a list of characters after model.safetensors was written into the checkpoint,
    FileExistsError)."""
    import shutil

    from kosmos.checkpoint import SHARDED, main, save_sharded
    from kosmos.config import save_config
    from kosmos.optim import build_optimizer
    from kosmos.sharding import shard_model

    model = shard_model(tiny_model())
    ckpt = tmp_path / "step_00000001"
    save_sharded(ckpt / SHARDED, model, build_optimizer(model, tiny_config("optim.name=adamw").optim))
    save_config(model.cfg, ckpt / "config.yaml")
    shutil.copytree(tiny_tokenizer.path, ckpt / "tokenizer")
    assert main(["consolidate", str(ckpt), str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    shard = next((ckpt / SHARDED).glob("*.distcp"))
    before = sorted(p.name for p in ckpt.rglob("*"))

    def one_line(args, *words):
        assert main(["consolidate", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err
        assert sorted(p.name for p in ckpt.rglob("*")) == before, "something was written into the checkpoint"

    one_line([ckpt, ckpt], "must not be the checkpoint")
    one_line([ckpt, ckpt / "inside"], "must not be the checkpoint")
    (tmp_path / "a-file").write_text("x")
    one_line([ckpt, tmp_path / "a-file"], "a-file: exists and is not a folder")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    one_line([ckpt, tmp_path / "o1"], str(shard), "truncated or incomplete")
    shard.write_bytes(data[:64] + bytes(len(data) - 64))  # the right length, the bytes gone
    one_line([ckpt, tmp_path / "o2"], str(ckpt / SHARDED), "unreadable shard data (UnpicklingError: ")
    assert not (tmp_path / "o2" / "model.safetensors").exists()
    shard.unlink()
    before.remove(shard.name)
    one_line([ckpt, tmp_path / "o3"], str(shard), "missing")


def test_non_finite_weights_of_a_sharded_model_are_named(one_process_group, tmp_path):
    """After a sharded load the weights are checked shard by shard (DTensors), as unsharded ones are."""
    from kosmos.sharding import shard_model

    model = shard_model(tiny_model())
    ck.check_finite(model, tmp_path)  # finite: nothing to say
    name, param = next((n, p) for n, p in model.named_parameters() if "layers.1." in n and p.dim() == 2)
    assert hasattr(param, "to_local")
    with torch.no_grad():
        local = param.to_local()
        local[0, :3] = float("nan")
        local[1, 0] = float("inf")
    with pytest.raises(ck.CheckpointError, match=rf"in 1 tensor\(s\): .*{name} \(3 NaN, 1 inf\)"):
        ck.check_finite(model, tmp_path)


def test_a_truncated_or_missing_shard_is_named_before_loading(tmp_path):
    import torch.distributed.checkpoint as dcp

    from kosmos.checkpoint import check_sharded

    path = tmp_path / "sharded"
    dcp.save({"model": tiny_model().state_dict()}, checkpoint_id=str(path))  # one process: no group needed
    check_sharded(path)  # whole
    shard = next(f for f in sorted(path.iterdir()) if f.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ck.CheckpointError, match=f"{shard.name}: .* bytes, but .* needs"):
        check_sharded(path)
    shard.unlink()
    with pytest.raises(ck.CheckpointError, match=f"{shard.name}: missing"):
        check_sharded(path)
    (path / ".metadata").write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="metadata: unreadable"):
        check_sharded(path)
