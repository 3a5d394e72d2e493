"""The project's one error type, and the wrapper every command runs under.

Every error a user can fix (a bad config key, a missing or damaged file, a sharded checkpoint where a whole
one is needed, weights that cannot be fetched offline, unreadable data) is a `KosmosError` whose message is
one line naming the key, file or command that fixes it. `run_cli` runs a command's `main`: a `KosmosError`
becomes `error: <message>` on stderr and the error's exit code (2), without a traceback; `--debug` on the
command line (or `KOSMOS_DEBUG=1`) shows the traceback instead. Anything else is a bug and keeps its
traceback.

The classes keep the builtin base they had before (`ConfigError` is a `ValueError`, a missing file a
`FileNotFoundError`), so code that caught those still does. This module imports nothing of kosmos: every
layer may use it (`tests/test_layout.py`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

DEBUG_ENV = "KOSMOS_DEBUG"


class KosmosError(Exception):
    """An error the user can fix; its message is one line that says how. `exit_code`: the command's exit
    status (2, as for a command-line usage error)."""

    exit_code = 2


class MissingFileError(KosmosError, FileNotFoundError):
    """A file or folder the command needs is not there (the message names it and what makes it)."""


def command_name(module: str, sub: str = "") -> str:
    """How the running command was called, for its usage line: the console script (`kosmos-eval run`) when
    it was one, else `python -m MODULE` (argparse's default would say `__main__.py` or `generate.py`)."""
    import os

    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    name = script if script.startswith("kosmos-") else f"python -m {module}"
    return f"{name} {sub}".strip()


def debugging(argv: Sequence[str] | None = None) -> bool:
    """Whether the traceback is wanted: `--debug` in `argv`, or KOSMOS_DEBUG set to anything but 0/empty."""
    return "--debug" in (argv or ()) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(main: Callable[..., Any], argv: Sequence[str] | None = None) -> int:
    """Run `main` as a command: its int result is the exit status (anything else, e.g. the data a main
    returns for tests and notebooks, is 0); a `KosmosError` is printed as one `error: ...` line and exits with
    its code, unless debugging (`--debug`, which is taken out of the arguments, or KOSMOS_DEBUG=1). `main` is
    called with `argv` (with no argument when argv is None and there is no `--debug`: its parser reads
    sys.argv).

        if __name__ == "__main__":
            raise SystemExit(run_cli(main))
    """
    given = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(given)
    if "--debug" in given:
        argv = [a for a in given if a != "--debug"]
    try:
        result = main() if argv is None else main(list(argv))
    except KosmosError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
