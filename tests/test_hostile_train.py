"""Hostile and unlucky cases on the training side (issue 11): each is planted here and must end in a clear
one-line error naming the file or key (exit 2, no traceback), a counted skip, or a documented recovery."""

import sys
from pathlib import Path

import pytest

import train_kosmos
from tests.helpers import ROOT, loader_workers, process_gone, truncate

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


# ----------------------------------------------------------------------------- data faults and signals


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fault", ["deleted", "emptied"])
def test_shards_gone_mid_run_stop_the_source_after_a_bounded_retry(tiny_tokenizer, tmp_path, monkeypatch,
                                                                   workers, fault):

    from kosmos.data import retry
    from kosmos.data.shards import DataError
    from kosmos.data.stream import SourceLoader
    from kosmos.sequence import SequenceEncoder
    from tests.helpers import source_dataset, text_shards

    monkeypatch.setattr(retry, "RETRY_WAITS", (0.05, 0.1))  # the dataset carries it to its workers
    shards = text_shards(tmp_path, 4, 10)
    ds = source_dataset("text", shards, SequenceEncoder(tiny_tokenizer, 4, 32), max_len=64,
                        micro_batch_size=2, num_workers=workers, shuffle_buffer=0)
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
    from kosmos.data.stream import SourceLoader
    from kosmos.sequence import SequenceEncoder
    from tests.helpers import source_dataset, text_shards

    shards = text_shards(tmp_path, 3, 5)
    ds = source_dataset("text", shards, SequenceEncoder(tiny_tokenizer, 4, 32), max_len=64,
                        micro_batch_size=2, shuffle_buffer=0, infinite=False)
    Path(shards[1]).unlink()
    loader = SourceLoader(ds)
    seen = {tuple(p) for b in loader for p in b["sample_positions"]}
    assert {s for s, _ in seen} == {0, 2} and len(seen) == 10
    assert loader.skipped() == {"missing_shard": 1}


@pytest.mark.slow
def test_workers_ignore_sigterm_and_sigint_while_the_run_lives_and_end_at_exit(tiny_tokenizer, tmp_path):
    """A signal to the process group reaches the workers too: they go on (the main process saves and ends
    them); once the main process exits, multiprocessing's terminate() ends workers it was not closed."""
    import os
    import signal
    import subprocess

    from kosmos.data.stream import SourceLoader
    from kosmos.sequence import SequenceEncoder
    from tests.helpers import source_dataset, text_shards

    shards = text_shards(tmp_path, 4, 10)
    ds = source_dataset("text", shards, SequenceEncoder(tiny_tokenizer, 4, 32), max_len=64,
                        micro_batch_size=2, num_workers=2, shuffle_buffer=0)
    loader = SourceLoader(ds)
    others = set(loader_workers())  # those of loaders that earlier tests left to the garbage collector
    next(loader)
    workers = [pid for pid in loader_workers() if pid not in others]
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
    code = ("from kosmos.config import SourceConfig\n"
            "from kosmos.data.stream import SourceDataset, SourceLoader\n"
            f"from kosmos.sequence import SequenceEncoder\nfrom tokenizer import KosmosTokenizer\n"
            f"ds = SourceDataset(SourceConfig(kind='text', micro_batch_size=2, workers=2), {shards!r}, "
            f"SequenceEncoder(KosmosTokenizer.from_dir({str(tiny_tokenizer.path)!r}), 4, 32), max_len=64)\n"
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
        "from kosmos.config import SourceConfig",
        "from kosmos.data.stream import SourceDataset, SourceLoader",
        "from kosmos.sequence import SequenceEncoder",
        "from kosmos.tokenizer import KosmosTokenizer",
        f"enc = SequenceEncoder(KosmosTokenizer.from_dir({str(tokenizer_dir)!r}), 4, 32)",
        "source = SourceConfig(kind='text', micro_batch_size=2, workers=2, shuffle_buffer=0)",
        f"loader = SourceLoader(SourceDataset(source, {shards!r}, enc, max_len=64"
        f"{', ' + args if args else ''}))", *lines, ""])


@pytest.mark.slow
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


@pytest.mark.slow
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
    truncate(two / "model.safetensors")
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
