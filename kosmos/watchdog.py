"""No silent hang, nothing left running: a watchdog per rank.

`Watchdog` is a thread that the training loop (train_kosmos.py) tells what it is about to wait on
(`with dog.waiting("data.captions"): ...`). When one wait outlasts `train.collective_timeout`, the rank
writes `rank R: no progress for T s at step S waiting on WHAT` and the stacks of all its threads
(faulthandler) to its log (rank 0: train.output_dir/train.log; rank R > 0: train.log.rankR beside it) and to
stderr, kills its own descendants (DataLoader workers and the commands they run, `pipe:` shards included) and
exits with status `EXIT_STATUS`. The other ranks then see their peer gone (an error in their next
collective) or trip their own watchdog; the launcher ends them too.

A rank under a launcher also dies with it (`under_launcher`, kosmos.procs.die_with_parent in train_kosmos).
Stdlib only.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_STATUS = 3
"""The exit status of a rank ended by its watchdog."""


class Watchdog:
    """Ends this process when a wait announced with `waiting(what)` lasts longer than `timeout` seconds.

    Only announced waits are watched; the time between them (compute, logging, the `on_step` hook of tests)
    is not. `step` is what the message names (the caller keeps it current). A wait marked `compute=True`
    includes compute that the first step of a process can make very long (torch.compile, autotuning, the
    first CUDA kernels): it is watched from the second step on, once the loop sets `warm`. Waits nest: the
    inner one is watched, the outer one starts over when it ends. A context manager: the thread stops on exit.

    `exit` and `clock` (tests) replace the kill-and-exit at the end and `time.monotonic`; `poll` is how often
    the thread looks."""

    def __init__(self, timeout: float, rank: int = 0, log_path: str | Path | None = None,
                 poll: float | None = None, exit=None, clock=None):
        self.timeout = float(timeout)
        self.rank = rank
        self.log_path = Path(log_path) if log_path is not None else None
        self.step = 0
        self.warm = False
        self.poll = poll if poll is not None else min(1.0, self.timeout / 10)
        self._exit = exit or _end_process
        self._clock = clock or time.monotonic
        self._wait: tuple[str, float] | None = None  # (what, since): one attribute, swapped atomically
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tripped: str | None = None
        """The message, once tripped."""

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="kosmos-watchdog", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def waiting(self, what: str, compute: bool = False):
        """Watch the block as a wait on `what`."""
        if compute and not self.warm:
            yield
            return
        outer = self._wait
        self._wait = (what, self._clock())
        try:
            yield
        finally:
            self._wait = (outer[0], self._clock()) if outer is not None else None

    @property
    def watching(self) -> str | None:
        """What the wait watched now is on (`waiting(what)`), or None: between waits, and in a compute wait
        before `warm`."""
        wait = self._wait
        return wait[0] if wait is not None else None

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            wait = self._wait
            if wait is None:
                continue
            what, since = wait
            waited = self._clock() - since
            if waited > self.timeout and self._wait is wait:
                self.trip(what, waited)
                return

    def trip(self, what: str, waited: float) -> None:
        """Report the wait (message and all threads' stacks, to the log and stderr), then end the process."""
        self.tripped = (f"rank {self.rank}: no progress for {waited:.1f} s at step {self.step} waiting on "
                        f"{what} (train.collective_timeout={self.timeout:g}); the stacks of all threads "
                        f"follow")
        for out in self._outputs():
            try:
                out.write(self.tripped + "\n")
                out.flush()
                faulthandler.dump_traceback(out, all_threads=True)
                out.flush()
            except (OSError, ValueError):  # a closed stderr, a full disk: the other output may still work
                pass
        self._exit()

    def _outputs(self):
        yield sys.stderr
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_path, "a") as f:
                    yield f


def rank_log_path(log_path: str | Path, rank: int) -> Path:
    """Where rank `rank` writes what only it can tell (its watchdog's report): train.log for rank 0 (written
    by the main process's RunLog too, in line-buffered appends), train.log.rankR for the others."""
    p = Path(log_path)
    return p if rank == 0 else p.with_name(f"{p.name}.rank{rank}")


def _end_process() -> None:
    kill_descendants()
    os._exit(EXIT_STATUS)


def descendants(pid: int | None = None) -> list[int]:
    """The processes below `pid` (default: this one), children before grandchildren, read from /proc
    (Linux); elsewhere multiprocessing's children of this process."""
    pid = os.getpid() if pid is None else pid
    try:
        names = os.listdir("/proc")
    except OSError:
        import multiprocessing

        return [p.pid for p in multiprocessing.active_children()] if pid == os.getpid() else []
    parent_of = {}
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:  # gone meanwhile
                continue
            parent_of[int(name)] = int(stat[stat.rindex(b")") + 2:].split()[1])  # after "(comm) state"
    out, frontier = [], [pid]
    while frontier:
        frontier = [p for p, pp in parent_of.items() if pp in frontier]
        out += frontier
    return out


def kill_descendants(pid: int | None = None) -> None:
    """SIGKILL every process below `pid` (default: this one): DataLoader workers and what they started, in
    their own sessions or not, all found before any is killed (a killed worker's children would be orphaned,
    out of reach)."""
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


def under_launcher() -> bool:
    """Started by a launcher (`accelerate launch`, torchrun), which sets these for each rank: the rank is then
    to die with it (torchrun starts each rank in a session of its own, out of reach of a signal to the
    launcher's process group)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
