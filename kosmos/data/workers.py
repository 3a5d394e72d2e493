"""A source's DataLoader worker processes: how they start, what they take from the main process, their
signals, and how they end (`kosmos.data.stream.SourceLoader` starts and closes them).

How workers start. A source's DataLoader workers are not forked from the main process: they are forked by
multiprocessing's forkserver (`START_METHOD`), a process of its own that runs no thread. Forking a process
that runs other threads (tqdm's monitor, the queue feeder threads of the sources started before, a gloo or
s3fs thread) can leave the child waiting forever on a lock that one of them held at the fork (seen: a worker
stuck in PyOS_AfterFork_Child, a 2-process run hung); and loaders are started mid-run (each source at its
first micro-batch, evaluation loaders at every evaluation), when such threads always exist. The server is
started once per process (when training starts, before it builds the model, or else when the first loader with
workers is made) and imports what the workers need (`PRELOAD`: torch, kosmos.data.stream, the tokenizer, the
image decoders) before it forks any: about as long as `import torch, torchvision` (seconds; `python
bench/workers.py` measures), paid once and overlapping the trainer's own start, after which a worker starts in
well under a second and no longer imports torchvision for its first JPEG. A worker gets the dataset pickled
(the tokenizer by its serialized model), and the main process's environment and working directory as they are
when it starts (`Launch`); a module global patched in the main process is not seen by the workers (what they
must see travels in the dataset, as `retry_waits`). A worker dies with the main process, even one killed with
SIGKILL (`kosmos.procs`).

Signals. Workers ignore SIGTERM and SIGINT, which go to the whole process group (`timeout`, SLURM, container
stops, Ctrl-C): the main process handles them, saves a checkpoint and ends the workers. The server ignores
them too, as the workers do, and ends once the main process and its workers have.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import signal
import sys
import types
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kosmos.procs import die_with, die_with_parent

START_METHOD = "forkserver"
"""How the DataLoader workers are started (module docstring): "forkserver", or "fork" (what it was before;
bench/workers.py compares the two)."""

PRELOAD = ["kosmos.data._forkserver"]
"""What the forkserver imports once, before it forks any worker: the modules every worker needs (torch,
kosmos.data.stream, the tokenizer's and the image decoders'), so that no worker imports them again."""


def context():
    """The multiprocessing context the workers are started in; for the forkserver, with PRELOAD (which only
    takes effect when this process's forkserver starts, at its first worker)."""
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


_EXITING = None


def _exit_flag():
    """Set when the main process exits: from then on a worker takes SIGTERM as multiprocessing's exit
    handler's terminate(), which it must obey, and no longer as a signal to the process group. Made at the
    first worker start (a forkserver context's semaphore starts multiprocessing's resource tracker: not at
    import) and from that context, so that it pickles for the forkserver's workers (fork's workers share it
    all the same)."""
    global _EXITING
    if _EXITING is None:
        _EXITING = multiprocessing.get_context("forkserver").Event()
        atexit.register(_EXITING.set)  # registered after multiprocessing's own exit handler: runs before it
    return _EXITING


@dataclass
class Launch:
    """What a worker takes from the main process that starts it (SourceLoader): which process it must not
    outlive (`owner`, the main process: a forkserver's worker has the server as its parent), the exit flag,
    and the main process's environment and working directory (a forkserver's worker would otherwise have the
    server's, as they were when it started)."""

    owner: int
    exiting: Any
    environ: dict[str, str]
    cwd: str


def start_worker_server() -> None:
    """Start the workers' forkserver unless it runs (or START_METHOD is "fork"). It starts in the background:
    its imports (seconds) then overlap what the main process does before its first micro-batch (training
    calls it before it builds the model; a SourceLoader with workers, when it is made)."""
    if START_METHOD == "forkserver":
        from multiprocessing import forkserver

        context()  # its preload
        forkserver.ensure_running()


def _worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: the worker dies with the main process, even one killed with SIGKILL
    (`kosmos.procs`: the kernel's parent-death signal when the main process forked it, else a thread that
    waits for the main process), takes the main process's environment and working directory, and leaves
    SIGTERM and SIGINT sent to the process group to the main process (_worker_signals)."""
    launch: Launch = get_worker_info().dataset.launch
    if os.getppid() == launch.owner:
        die_with_parent(launch.owner)
    else:
        die_with(launch.owner)
    if os.environ != launch.environ:
        os.environ.clear()
        os.environ.update(launch.environ)
    os.chdir(launch.cwd)
    _worker_signals(launch.exiting)


def _worker_signals(exiting) -> None:
    """SIGTERM and SIGINT sent to the whole process group (`timeout`, SLURM preemption, container stops,
    Ctrl-C) are the main process's to handle (a checkpoint, then a clean exit); a worker killed by one would
    crash the run instead. Once the main process exits (`exiting` set), SIGTERM ends it."""

    def on_sigterm(signum, frame):
        if exiting.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # born with both blocked (kosmos.data._forkserver): what arrived since goes to the handlers above now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def start_workers(loader: DataLoader):
    """`iter(loader)`, which starts its worker processes.

    A forked worker (START_METHOD "fork", or a plain DataLoader) is forked with the garbage collector's
    objects frozen: it never collects what it inherited. Garbage of the main process (a torch.distributed
    process group no longer referenced, say, whose destructor joins threads that a forked child does not
    have) would otherwise be finalised inside a worker, which then hangs or aborts ("terminate called after
    throwing an instance of 'std::system_error'", seen in CI). The main process collects it as usual. (The
    forkserver's workers inherit nothing of the main process's heap.)

    A forkserver's worker would first re-run the main script (or import the main module), as multiprocessing
    does so that what the parent defined in `__main__` unpickles: the workers need nothing from it (the
    dataset and the worker functions are the project's), and a script without `if __name__ ==
    "__main__":` would start over in every worker. So `__main__` is hidden while the workers start."""
    main = sys.modules["__main__"]
    gc.freeze()
    try:
        if loader.num_workers and loader.multiprocessing_context is not None \
                and loader.multiprocessing_context.get_start_method() != "fork":
            sys.modules["__main__"] = types.ModuleType("__main__")
        return iter(loader)
    finally:
        sys.modules["__main__"] = main
        gc.unfreeze()


def open_loader(dataset: IterableDataset, num_workers: int, prefetch_factor: int = 2):
    """An iterator over `dataset`'s items (micro-batches, batch_size None): in this process without workers,
    else from `num_workers` worker processes, started now (module docstring). The dataset gets the `launch`
    its workers take from this process."""
    if num_workers == 0:
        return iter(DataLoader(dataset, batch_size=None, num_workers=0))
    ctx = context()
    start_worker_server()
    dataset.launch = Launch(os.getpid(), _exit_flag(), dict(os.environ), os.getcwd())
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch_factor,
                        worker_init_fn=_worker_init, multiprocessing_context=ctx)
    return start_workers(loader)


def close_workers(batches) -> None:
    """End the worker processes of `batches` (an iterator open_loader returned) now: DataLoader's shutdown,
    then SIGKILL for any still there (they ignore SIGTERM, DataLoader's fallback, until the main process
    exits)."""
    procs = list(getattr(batches, "_workers", []))
    getattr(batches, "_shutdown_workers", lambda: None)()
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
