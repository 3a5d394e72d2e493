"""kosmos.watchdog: a wait that outlasts train.collective_timeout ends the rank, named, with its stacks and
without leaving its workers; ranks die with their launcher (kosmos.procs.die_with_parent). The 2-process
runs (an asymmetric collective, a stalled data worker, a killed launcher) are at the end (slow)."""

import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from kosmos.config import ConfigError
from kosmos.watchdog import Watchdog, descendants, kill_descendants, rank_log_path
from tests.helpers import (
    DDP_DEBUG,
    MARKER,
    ROOT,
    alive_with_marker,
    caption_shards,
    kill_group,
    kill_marked,
    launch,
    process_gone,
    start,
    tiny_config,
)


@pytest.fixture
def marker():
    """A unique KOSMOS_TEST_MARKER value for a run; whatever still has it at the end is killed (a failed test
    leaves nothing running)."""
    value = f"kosmos-test-{uuid.uuid4().hex}"
    yield value
    kill_marked(value)


def _wait_until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


class _Clock:
    """The watchdog's clock (Watchdog(clock=...)), moved by the test: what trips it is the time the test
    says has passed, never how long the test took on a loaded machine. `reads` counts the reads."""

    def __init__(self):
        self.now, self.reads = 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def _judged(clock: _Clock) -> None:
    """Until the watchdog's thread has looked at the clock as it is now and not tripped: its second read
    from here on comes after a whole look (a look that trips reads no more)."""
    reads = clock.reads
    _wait_until(lambda: clock.reads >= reads + 2)


def test_a_wait_longer_than_the_timeout_is_reported_with_the_stacks(tmp_path):
    tripped = []
    clock = _Clock()
    log = rank_log_path(tmp_path / "train.log", 1)
    assert log.name == "train.log.rank1" and rank_log_path(tmp_path / "train.log", 0).name == "train.log"
    with Watchdog(0.3, rank=1, log_path=log, poll=0.02, exit=lambda: tripped.append(1), clock=clock) as dog:
        dog.step = 7
        with dog.waiting("the gradient sync", compute=True):  # not warm: compile time is not a hang
            assert dog.watching is None
            clock.now += 0.5
        clock.now += 0.5  # between waits: compute, not watched
        assert dog.watching is None
        with dog.waiting("the stop-flag reduce"):
            clock.now += 0.1  # within the timeout
            _judged(clock)
        assert not tripped and not log.exists()
        with dog.waiting("data.captions"):
            clock.now += 0.4
            _wait_until(lambda: tripped)
    text = log.read_text()
    assert re.match(r"rank 1: no progress for 0\.\d s at step 7 waiting on data\.captions "
                    r"\(train\.collective_timeout=0\.3\)", text), text
    assert "most recent call first" in text and "_wait_until" in text, text  # the main thread's stack
    assert "Thread 0x" in text and "_run" in text  # the watchdog's own thread: all threads are dumped


def test_nested_waits_restart_the_outer_one_and_warm_waits_are_watched():
    tripped = []
    clock = _Clock()
    dog = Watchdog(0.4, poll=0.02, exit=lambda: tripped.append(dog.tripped), clock=clock).start()
    try:
        with dog.waiting("the checkpoint save"):
            for _ in range(3):
                with dog.waiting("inner"):
                    assert dog.watching == "inner"
                    clock.now += 0.25  # progress every 0.25 s: never 0.4 s on one wait
                    _judged(clock)
            assert dog.watching == "the checkpoint save"
            _judged(clock)  # 0.75 s since the outer wait began, 0 since the last inner one ended
        assert not tripped
        dog.warm = True
        with dog.waiting("the gradient sync", compute=True):
            clock.now += 0.5
            _wait_until(lambda: tripped)
        assert "waiting on the gradient sync" in tripped[0]
    finally:
        dog.close()


def test_collective_timeout_is_checked_and_sets_the_process_group_timeout():
    from kosmos.training import process_group_timeout

    assert tiny_config().train.collective_timeout == 600
    assert process_group_timeout(tiny_config()) == 660
    assert process_group_timeout(tiny_config("train.collective_timeout=5")) == 300  # never below 5 minutes
    with pytest.raises(ConfigError, match="train.collective_timeout"):
        tiny_config("train.collective_timeout=0")


_SPAWN = """
import subprocess, sys, time
subprocess.Popen(["sleep", "60"], start_new_session=True)  # a grandchild in its own session, like pipe:
time.sleep(60)
"""


def test_kill_descendants_finds_grandchildren_in_other_sessions():
    child = subprocess.Popen([sys.executable, "-c", _SPAWN])
    try:
        _wait_until(lambda: len(descendants(child.pid)) == 1)
        below = descendants(child.pid)
        kill_descendants(child.pid)
        _wait_until(lambda: process_gone(below[0]))
    finally:
        child.kill()
        child.wait()


_TRIP = """
import multiprocessing as mp, sys, time
from kosmos.watchdog import Watchdog

def worker():
    import subprocess
    subprocess.Popen(["sleep", "60"], start_new_session=True).wait()  # a stalled pipe: shard

if __name__ == "__main__":
    mp.set_start_method("fork")
    p = mp.Process(target=worker)
    p.start()
    print("pids", p.pid, flush=True)
    with Watchdog(0.5, rank=0, log_path=sys.argv[1]) as dog:
        dog.step = 3
        with dog.waiting("data.text"):
            p.join()
"""


def test_a_tripped_rank_exits_non_zero_and_takes_its_workers_with_it(tmp_path, marker):
    env = {**os.environ, "PYTHONPATH": str(ROOT), MARKER: marker}
    res = subprocess.run([sys.executable, "-c", _TRIP, str(tmp_path / "train.log")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    assert re.search(r"rank 0: no progress for [\d.]+ s at step 3 waiting on data\.text", res.stderr)
    assert "most recent call first" in (tmp_path / "train.log").read_text()
    _wait_until(lambda: not alive_with_marker(marker), 10)  # the worker and its `sleep` are gone


# ----------------------------------------------------------------------------- 2 processes (slow)


def _tiny_overrides(tiny_run, out, steps, *extra):
    return [*tiny_run, f"train.output_dir={out}", f"train.max_steps={steps}", "optim.total_steps=30",
            "optim.warmup_steps=5", "train.save_every=100", "train.collective_timeout=8",
            *[f"data.{s}.shuffle_buffer=4" for s in ("captions", "text", "interleaved")], *extra]


def _check_ended_by_the_watchdog(res, out, marker, what):
    """Exit non-zero; a rank's message naming rank, step and wait, in its log with the stacks; nothing of the
    run left running."""
    text = res.stdout + res.stderr
    assert res.returncode != 0, text[-3000:]
    said = re.findall(r"rank (\d): no progress for [\d.]+ s at step (\d+) waiting on (.+?) \(train", text)
    assert said and any(w.startswith(what) for _, _, w in said), text[-3000:]
    logs = {int(r): rank_log_path(out / "train.log", int(r)).read_text() for r, _, _ in said}
    assert all(re.search(r"no progress .* step \d+ waiting on", t) and "most recent call first" in t
               and "kosmos/train.py" in t for t in logs.values()), logs  # the training loop's frame
    _wait_until(lambda: not alive_with_marker(marker), 30)
    return said


@pytest.mark.slow
def test_an_asymmetric_collective_ends_the_run_with_the_wait_named(tiny_run, tmp_path, marker):
    """Rank 1 makes one all-reduce more than rank 0 after step 2. Without the tests' collective checks
    (TORCH_DISTRIBUTED_DEBUG, KOSMOS_CHECK_COLLECTIVES), as in production, gloo hangs; the watchdog ends the
    run, names the wait, and nothing is left running."""
    out = tmp_path / "run"
    res = launch(2, ROOT / "tests" / "hang_check.py",
                 ["--extra-reduce", "2", *_tiny_overrides(tiny_run, out, 6)],
                 timeout=240, check=False, env={MARKER: marker, "KOSMOS_CHECK_COLLECTIVES": "0"}, debug="OFF")
    said = _check_ended_by_the_watchdog(res, out, marker, "the stop-flag reduce")
    assert ("1", "2", "the stop-flag reduce") in said, said
    assert "HANG_CHECK_DONE" not in res.stdout


@pytest.mark.slow
def test_a_stalled_data_worker_ends_the_run_with_the_source_named(tiny_run, tmp_path, marker):
    """Caption shards read through `pipe:` commands that stall once the shard is written (a storage that
    stops answering, data.read_timeout longer than the collective timeout): the rank waiting for a caption
    micro-batch ends the run, naming data.captions; its worker and the stalled commands are gone with it."""
    out = tmp_path / "run"
    shards = ",".join(f"'pipe:cat {s}; sleep 300'" for s in caption_shards(tmp_path / "captions", 2, 12))
    res = launch(2, ROOT / "tests" / "hang_check.py",
                 _tiny_overrides(tiny_run, out, 30, f"data.captions.shards=[{shards}]",
                                 "data.read_timeout=300"),
                 timeout=240, check=False, env={MARKER: marker}, debug=DDP_DEBUG)
    _check_ended_by_the_watchdog(res, out, marker, "data.captions")
    assert "HANG_CHECK_DONE" not in res.stdout


@pytest.mark.slow
def test_ranks_die_with_their_launcher(tiny_run, tmp_path, marker):
    """The launcher alone killed (SIGKILL, as a test's timeout or an OOM killer does): torchrun starts each
    rank in a session of its own, so only die_with_parent ends them. No DataLoader workers here (workers=0):
    that they die with their rank is kosmos.data.stream's part."""
    out = tmp_path / "run"
    no_workers = [f"data.{s}.workers=0" for s in ("captions", "text", "interleaved")]
    with open(tmp_path / "log", "w") as log:
        proc = start(2, ROOT / "tests" / "hang_check.py", _tiny_overrides(tiny_run, out, 10_000, *no_workers),
                     env={MARKER: marker}, debug=DDP_DEBUG, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until(lambda: "mixture per step" in (tmp_path / "log").read_text()
                        or proc.poll() is not None, 240)
            assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
            ranks = [p for p in descendants(proc.pid) if p in alive_with_marker(marker)]
            assert len(ranks) == 2, ranks
            proc.kill()  # the launcher only
            proc.wait()
            _wait_until(lambda: not alive_with_marker(marker), 30)
        finally:
            kill_group(proc)
