"""Train KOSMOS-1: `python train_kosmos.py --config configs/tiny.yaml` or
`accelerate launch train_kosmos.py ...`.

The script is the checkout's entry point for `accelerate launch`; the trainer is `kosmos.train`
(`python -m kosmos.train`, `accelerate launch -m kosmos.train`, `kosmos-train`): see its docstring, or
`--help`. Installed by pip as the top-level module `train_kosmos` for one more release only (deprecated: a
generic name in site-packages); from a checkout it stays.
"""

import sys
from pathlib import Path

from kosmos.train import *  # noqa: F403 - the command's names (main, train, parse_args, ...), as before
from kosmos.train import __doc__ as _doc
from kosmos.train import main

__doc__ = _doc

if __name__ == "__main__":
    if not (Path(__file__).resolve().parent / "kosmos" / "train.py").is_file():  # the installed module
        print("note: the installed module `train_kosmos` is deprecated and goes in the next release; use "
              "`kosmos-train` or `python -m kosmos.train`", file=sys.stderr)
    main()
