"""Old module names kept working for one release: `tokenizer` and `data_tools` moved under `kosmos.`.

A shim at the old name calls `moved(...)` and becomes the new module: `import tokenizer.build` gives the very
module `kosmos.tokenizer.build` (one copy, so its classes and state are the new module's), with a
DeprecationWarning; `python -m data_tools.captions ...` prints one note naming the new command on stderr and
runs `kosmos.data_tools.captions` as the program, with the same arguments and exit status.
"""

from __future__ import annotations

import importlib
import runpy
import sys
import warnings

REMOVED_IN = "the next release"


def moved(old: str, new: str, *, main: bool = False, package: bool = False) -> None:
    """Make the module being imported as `old` (a shim's `__spec__.name`) stand for `new`.

    `main`: the shim runs as `python -m old` (its `__name__ == "__main__"`): run `new` as the program.
    `package`: the shim is a package's `__init__`; it stays in sys.modules (so that its shim submodules are
    found on its own `__path__`) and takes the new package's public names instead."""
    if main:
        print(f"note: `python -m {old}` is deprecated and goes in {REMOVED_IN}; "
              f"use `python -m {new}`", file=sys.stderr)
        runpy.run_module(new, run_name="__main__", alter_sys=True)
        return
    warnings.warn(f"the module `{old}` moved to `{new}`; the old name goes in {REMOVED_IN}",
                  DeprecationWarning, stacklevel=3)
    module = importlib.import_module(new)
    if package:
        shim = sys.modules[old]
        names = getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")])
        shim.__dict__.update({n: getattr(module, n) for n in names})
    else:
        sys.modules[old] = module  # the import system hands out what sys.modules holds after the shim ran
