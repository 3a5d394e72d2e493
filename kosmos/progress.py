"""Progress on stderr for the commands' long steps, the one rule for all of them: shown on a terminal only
(tqdm's `disable=None`: nothing in a log file or a pipe) and never with the command's `--no-progress` /
`--quiet`.

`bar` is a tqdm bar over a loop (`kosmos-eval loss`'s micro-batches, `kosmos-eval run`'s, the converters'
inputs, the tokenizer's corpus reading). The training bar (kosmos.metrics) is its own: it also carries the
log lines. `heartbeat` is for a step with no loop to hang a bar on, a single call that
runs for long (SentencePiece's training in C++, torch.distributed.checkpoint's load in `kosmos-consolidate`):
a thread writes `WHAT ... N s` every few seconds until the call returns. This module imports nothing of
kosmos: every layer may use it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

HEARTBEAT_EVERY = 10.0
"""Seconds between two heartbeat lines."""


def on_terminal() -> bool:
    """Whether stderr is a terminal (progress is shown there only)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, OSError, ValueError):  # closed, or replaced by an object without the method
        return False


def bar(iterable: Iterable | None = None, *, desc: str, enabled: bool = True, **kwargs: Any):
    """A tqdm bar on stderr over `iterable` (kwargs: total, unit, ...), shown on a terminal only, never when
    not `enabled` (the command's --no-progress)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=None if enabled else True, file=sys.stderr, dynamic_ncols=True,
                **kwargs)


@contextmanager
def heartbeat(what: str, enabled: bool | None = None, every: float | None = None) -> Iterator[None]:
    """While the block runs, `WHAT ... N s` on stderr every `every` seconds (default HEARTBEAT_EVERY, read
    at each call). `enabled`: None shows it on a
    terminal only, False never, True always. The lines go to the stderr of when the block started (a copy
    of its descriptor), so that they still show while the block sends descriptor 2 elsewhere (SentencePiece's
    log is kept quiet that way)."""
    if enabled is None:
        enabled = on_terminal()
    if not enabled:
        yield
        return
    every = HEARTBEAT_EVERY if every is None else every
    sys.stderr.flush()
    try:
        fd = os.dup(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        fd = None
    stop = threading.Event()
    start = time.perf_counter()

    def write(line: str) -> None:
        if fd is None:
            print(line, file=sys.stderr, flush=True)
        else:
            os.write(fd, (line + "\n").encode("utf-8", "replace"))

    def beat() -> None:
        while not stop.wait(every):
            write(f"{what} ... {time.perf_counter() - start:.0f} s")

    thread = threading.Thread(target=beat, name="kosmos-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if fd is not None:
            os.close(fd)
