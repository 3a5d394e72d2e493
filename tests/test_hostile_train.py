"""Hostile and unlucky cases on the training side (issue 11): each is planted here and must end in a clear
one-line error naming the file or key (exit 2, no traceback), a counted skip, or a documented recovery."""

import sys
from pathlib import Path

import pytest

import train_kosmos
from tests.helpers import ROOT, MixtureStandIn, loader_workers, process_gone

TINY = str(ROOT / "configs" / "tiny.yaml")


def _exit_2(capsys, args) -> str:
    """Run train_kosmos.main(args), which must exit 2 with a one-line error; returns that line."""
    with pytest.raises(SystemExit) as e:
        train_kosmos.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    return err.splitlines()[-1]


# ----------------------------------------------------------------------------- refused at start


def test_vocab_smaller_than_the_tokenizer_is_a_one_line_error(tiny_tokenizer, capsys):
    err = _exit_2(capsys, ["--config", TINY, f"tokenizer.path={tiny_tokenizer.path}",
                           "decoder.vocab_size=500",
                           "train.tracker=none"])
    assert "'decoder.vocab_size': 500 is smaller than the tokenizer's 1000 ids" in err


def test_tracker_not_installed_is_refused_with_the_install_hint(tiny_tokenizer, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib finds no wandb, installed or not
    err = _exit_2(capsys, ["--config", TINY, f"tokenizer.path={tiny_tokenizer.path}", "train.tracker=wandb"])
    assert "'train.tracker': wandb is not installed (`pip install wandb`" in err


def test_brace_pattern_naming_missing_shards_is_refused_or_allowed_with_a_count(tiny_tokenizer, tmp_path,
                                                                                capsys):
    from types import SimpleNamespace

    from kosmos.config import load_config
    from kosmos.data import build_mixture
    from kosmos.sequence import SequenceEncoder
    from kosmos.training import check_config, describe_mixture
    from tests.helpers import text_shards

    text_shards(tmp_path, 4, 3)  # text-000000.tar .. text-000003.tar
    args = [f"tokenizer.path={tiny_tokenizer.path}", "train.tracker=none", "data.captions.tokens_per_step=0",
            "data.interleaved.tokens_per_step=0",
            f"data.text.shards=['{tmp_path}/text-{{000000..000009}}.tar']"]
    err = _exit_2(capsys, ["--config", TINY, *args])
    assert "config key 'data.text.shards': 6 of the 10 shards named by" in err
    assert (f"{tmp_path}/text-000004.tar, {tmp_path}/text-000005.tar, {tmp_path}/text-000006.tar and 3 more"
            in err)
    assert "data.allow_missing_shards=true" in err

    cfg = load_config(TINY, [*args, "data.allow_missing_shards=true"])
    check_config(cfg)
    mixture = build_mixture(cfg, SequenceEncoder.from_config(cfg))
    assert len(mixture.loaders["text"].dataset.shards) == 4
    block = describe_mixture(SimpleNamespace(mixed_precision="no"), cfg, mixture)
    assert (f"WARNING: 6 shard(s) named in data.text.shards do not exist, training on the 4 found (allowed "
            f"by data.allow_missing_shards): {tmp_path}/text-000004.tar") in block


# ----------------------------------------------------------------------------- checkpoints


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


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


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
        _truncate(path / file)
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
    _truncate(three / "model.safetensors")
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
    _truncate(one / "optimizer.pt")
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
    from kosmos.config import ConfigError, load_config

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
                "data.text.shards: ['demo_out/shards/text'] -> ['elsewhere']",
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


# ----------------------------------------------------------------------------- data faults and signals


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fault", ["deleted", "emptied"])
def test_shards_gone_mid_run_stop_the_source_after_a_bounded_retry(tiny_tokenizer, tmp_path, monkeypatch,
                                                                   workers, fault):

    from kosmos.data import stream
    from kosmos.data.stream import DataError, SourceDataset, SourceLoader
    from kosmos.sequence import SequenceEncoder
    from tests.helpers import text_shards

    monkeypatch.setattr(stream, "RETRY_WAITS", (0.05, 0.1))  # the dataset carries it to its workers
    shards = text_shards(tmp_path, 4, 10)
    ds = SourceDataset("text", shards, SequenceEncoder(tiny_tokenizer, 4, 32), max_len=64, micro_batch_size=2,
                       num_workers=workers, shuffle_buffer=0)
    loader = SourceLoader(ds)
    for _ in range(max(1, workers)):  # every worker has read samples (round robin): a mid-run loss
        next(loader)
    for s in shards:
        if fault == "deleted":
            Path(s).unlink()
        else:
            Path(s).write_bytes(b"")
    with pytest.raises(DataError) as e:
        for _ in range(1000):  # what was prefetched or buffered, then the error: no endless loop
            next(loader)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("text: no readable shard left: 3 passes over the "), msg
    assert ("'missing_shard'" if fault == "deleted" else "'broken_shard'") in msg
    assert "resume with --resume latest" in msg


def test_a_shard_gone_among_others_is_skipped_and_counted(tiny_tokenizer, tmp_path):
    from kosmos.data.stream import SourceDataset, SourceLoader
    from kosmos.sequence import SequenceEncoder
    from tests.helpers import text_shards

    shards = text_shards(tmp_path, 3, 5)
    ds = SourceDataset("text", shards, SequenceEncoder(tiny_tokenizer, 4, 32), max_len=64, micro_batch_size=2,
                       shuffle_buffer=0, infinite=False)
    Path(shards[1]).unlink()
    loader = SourceLoader(ds)
    seen = {tuple(p) for b in loader for p in b["sample_positions"]}
    assert {s for s, _ in seen} == {0, 2} and len(seen) == 10
    assert loader.skipped() == {"missing_shard": 1}


def test_a_second_signal_stops_at_once(monkeypatch):
    import os
    import signal

    from kosmos import checkpoint as ck

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with ck.StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested  # the first: a checkpoint at the end of the step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the handlers it replaced are back


def test_workers_ignore_sigterm_and_sigint_while_the_run_lives_and_end_at_exit(tiny_tokenizer, tmp_path):
    """A signal to the process group reaches the workers too: they go on (the main process saves and ends
    them); once the main process exits, multiprocessing's terminate() ends workers it was not closed."""
    import os
    import signal
    import subprocess

    from kosmos.data.stream import SourceDataset, SourceLoader
    from kosmos.sequence import SequenceEncoder
    from tests.helpers import text_shards

    shards = text_shards(tmp_path, 4, 10)
    ds = SourceDataset("text", shards, SequenceEncoder(tiny_tokenizer, 4, 32), max_len=64, micro_batch_size=2,
                       num_workers=2, shuffle_buffer=0)
    loader = SourceLoader(ds)
    next(loader)
    workers = loader_workers()
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    # no "DataLoader worker ... killed by signal": a worker has at most prefetch_factor batches made ahead,
    # so each of the two hands over at least one batch made after its signals (no sleep needed)
    for _ in range(2 * (loader.prefetch_factor + 1)):
        next(loader)
    assert not any(process_gone(pid) for pid in workers)
    loader.close()
    assert all(process_gone(pid) for pid in workers)

    # a process that leaves a loader's workers running (a reference cycle keeps it) still exits at once
    code = (f"from kosmos.data.stream import SourceDataset, SourceLoader\n"
            f"from kosmos.sequence import SequenceEncoder\nfrom tokenizer import KosmosTokenizer\n"
            f"ds = SourceDataset('text', {shards!r}, SequenceEncoder(KosmosTokenizer.from_dir("
            f"{str(tiny_tokenizer.path)!r}), 4, 32), max_len=64, micro_batch_size=2, num_workers=2)\n"
            f"loader = SourceLoader(ds)\nloader.cycle = loader\nnext(loader)\nprint('ok')\n")
    # it exits by itself (it would hang in multiprocessing's exit handler, joining workers that ignore the
    # SIGTERM of terminate()); the timeout only ends a hang
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def _loader_script(shards, tokenizer_dir, *lines, **kw) -> str:
    """Python code that makes `loader`, a SourceLoader of a text source over `shards` with 2 workers, then
    runs `lines`."""
    args = ", ".join(f"{k}={v}" for k, v in kw.items())
    return "\n".join([
        "import os, signal, sys, time", "from kosmos.data.remote import ReadOptions",
        "from kosmos.data.stream import SourceDataset, SourceLoader",
        "from kosmos.sequence import SequenceEncoder",
        "from tokenizer import KosmosTokenizer",
        f"enc = SequenceEncoder(KosmosTokenizer.from_dir({str(tokenizer_dir)!r}), 4, 32)",
        f"loader = SourceLoader(SourceDataset('text', {shards!r}, enc, max_len=64, micro_batch_size=2, "
        f"num_workers=2, shuffle_buffer=0{', ' + args if args else ''}))", *lines, ""])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_the_main_process_even_killed_with_sigkill(tiny_tokenizer):
    """A main process killed with SIGKILL runs no exit handler: its workers, here both blocked reading a
    shard that never comes (a `pipe:` command that sleeps), must end with it all the same, not go on as
    orphans."""
    import os
    import signal
    import subprocess
    import time

    # next(loader) waits for a sample for ever: the workers read a shard that never comes
    code = _loader_script(["pipe:sleep 600"], tiny_tokenizer.path, "next(loader)",
                          read_options="ReadOptions(timeout=600, retries=0)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        def running(workers) -> bool:  # both workers run their stream (their init done, SIGINT ignored)
            status = [open(f"/proc/{w}/status").read() for w in workers]
            return len(workers) == 2 and all(int(s.split("SigIgn:")[1].split()[0], 16) & 2 for s in status) \
                and all(any(open(f"/proc/{t}/comm").read().strip() == "sleep" for t in _children(w))
                        for w in workers)

        workers: list[int] = []
        deadline = time.monotonic() + 300  # a deadline for a hang only
        while not running(workers):
            assert proc.poll() is None and time.monotonic() < deadline, f"workers did not start: {workers}"
            time.sleep(0.1)
            workers = loader_workers(proc.pid)
        proc.kill()
        proc.wait()
        for _ in range(300):
            if all(process_gone(w) for w in workers):
                break
            time.sleep(0.1)
        assert all(process_gone(w) for w in workers), "a worker outlived its main process killed with SIGKILL"
    finally:
        proc.kill()
        os.killpg(proc.pid, signal.SIGKILL)  # the `sleep`s the workers started


def _children(pid: int) -> list[int]:
    """The pids of the children of `pid` and theirs (the shell of a `pipe:` command, its `sleep`)."""
    import os

    kids = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += [int(c) for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except FileNotFoundError:
            pass
    return kids + [g for k in kids for g in _children(k) if not process_gone(k)]


def test_a_sigterm_to_the_whole_process_group_leaves_the_workers_and_their_server_running(tiny_tokenizer,
                                                                                         tmp_path):
    """`timeout`, SLURM and container stops signal the whole process group: the process that starts the
    workers (multiprocessing's forkserver) must not die of it either, or the main process (which handles the
    signal) takes its workers for dead while it still needs batches for its last step."""
    import os
    import subprocess

    from tests.helpers import text_shards

    shards = text_shards(tmp_path, 4, 10)
    code = _loader_script(
        shards, tiny_tokenizer.path,
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN)",
        "next(loader)", "os.killpg(0, signal.SIGTERM); os.killpg(0, signal.SIGINT); time.sleep(1)",
        "for _ in range(6): next(loader)", "loader.close()", "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ----------------------------------------------------------------------------- end to end (slow)


def _captions_only(tiny_run, out, *extra):
    return [*tiny_run, f"train.output_dir={out}", "data.text.tokens_per_step=0",
            "data.interleaved.tokens_per_step=0", "optim.total_steps=100000", "optim.warmup_steps=5", *extra]


@pytest.mark.slow
def test_every_shard_deleted_mid_run_stops_the_run_with_a_clear_error(tiny_run, tmp_path):
    import os
    import shutil
    import subprocess
    import time

    src = next(o.split("=", 1)[1].strip("[]") for o in tiny_run if o.startswith("data.captions.shards="))
    shutil.copytree(src, tmp_path / "captions")
    args = _captions_only(tiny_run, tmp_path / "run", f"data.captions.shards=[{tmp_path / 'captions'}]",
                          "train.max_steps=100000", "train.save_every=100000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_kosmos.py"), "--config", TINY,
                                 "--no-progress", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        deadline = time.time() + 120
        while "step      5" not in (tmp_path / "log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.1)
        for shard in (tmp_path / "captions").glob("*.tar"):
            shard.unlink()
        try:
            rc = proc.wait(300)  # it stops by itself (the passes and their short waits); 300 s: a hang
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    text = (tmp_path / "log").read_text()
    assert rc == 2 and "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: captions: no readable shard left: 4 passes over"), text


@pytest.mark.slow
def test_resume_on_the_command_line_falls_back_and_refuses_changed_data_settings(tiny_run, tmp_path, capsys):
    from kosmos import checkpoint as ck

    out = tmp_path / "run"
    base = ["--config", TINY, "--no-progress"]
    overrides = _captions_only(tiny_run, out, "data.captions.workers=0", "train.save_every=1")
    assert train_kosmos.main([*base, *overrides, "train.max_steps=2"])["step"] == 2
    one, two = ck.list_checkpoints(out)
    _truncate(two / "model.safetensors")
    capsys.readouterr()

    err = _exit_2(capsys, [*base, *overrides, "train.max_steps=3", "--resume", str(two)])  # no fallback
    assert err.startswith(f"error: {two / 'model.safetensors'}: ")
    err = _exit_2(capsys, [*base, *overrides, "train.max_steps=3", "seed=1",
                           "data.captions.micro_batch_size=4", "--resume", "latest"])
    assert f"error: {one} was trained with other settings that change the data order or shapes: " in err
    assert "data.captions.micro_batch_size: 8 -> 4; seed: 0 -> 1." in err
    assert err.endswith("--allow-config-change data.captions.micro_batch_size,seed")

    state = train_kosmos.main([*base, *overrides, "train.max_steps=3", "seed=1", "--resume", "latest",
                               "--allow-config-change", "seed"])
    assert state["step"] == 3
    log = (out / "train.log").read_text()
    assert f"{two / 'model.safetensors'}: " in log
    assert "falling back to the previous checkpoint, step_00000001" in log
    assert "config changed since the checkpoint (allowed): seed: 0 -> 1" in log
    assert f"resumed from {one} at step 1" in log
    assert ck.check_checkpoint(two)["step"] == 2  # written again, whole


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
