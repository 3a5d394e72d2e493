"""Child processes that end with their parent: a worker must not outlive the process that owns it.

A process killed with SIGKILL (the OOM killer, `kill -9`, a scheduler) runs no exit handler, so its children
are never told to stop: they go on as orphans, writing into the output folder a rerun writes to (the
converters' workers, `kosmos.data_tools.conversion`) or holding memory and file handles (the training data
workers, `kosmos.data.stream`). Called first thing in the child, `die_with_parent` asks the kernel to send
the child SIGKILL when its parent dies (PR_SET_PDEATHSIG); `die_with` ends it when another process does (a
worker forked by multiprocessing's forkserver: its parent is the server, which lives on while any worker
does, but what the worker must not outlive is the main process). This module imports nothing from the
project, so that any layer (and `kosmos.data_tools`) can use it.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time


def die_with_parent(parent: int) -> None:
    """In a child process: end it (SIGKILL) when the process `parent` (the pid that forked it) dies, even
    killed with SIGKILL. Linux's PR_SET_PDEATHSIG; where there is no prctl (not Linux), a daemon thread that
    watches the parent instead. A child whose parent died before this call exits at once."""
    import ctypes

    try:
        if ctypes.CDLL(None).prctl(1, signal.SIGKILL) != 0:  # PR_SET_PDEATHSIG: SIGKILL when the parent dies
            raise OSError("prctl failed")
    except Exception:  # noqa: BLE001 - no prctl (not Linux): a thread watches the parent instead
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before this
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def die_with(pid: int) -> None:
    """In a child process: end it (exit status 1) when process `pid`, its parent or not, ends, even killed
    with SIGKILL. A daemon thread waits for it on a pidfd (Linux 5.3 and later: at once), or polls it every
    half second where there is none. A child whose `pid` has ended before this call exits at once."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here
        fd = None
    threading.Thread(target=_wait_for, args=(pid, fd), daemon=True, name=f"die-with-{pid}").start()


def _wait_for(pid: int, fd: int | None) -> None:
    if fd is not None:
        select.select([fd], [], [])  # readable once the process has ended
    else:
        while _alive(pid):
            time.sleep(0.5)
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
