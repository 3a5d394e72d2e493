"""Train KOSMOS-1: `python train_kosmos.py --config configs/tiny.yaml` or
`accelerate launch train_kosmos.py ...`.

The script's name is kept for `accelerate launch` and existing commands; the trainer is `kosmos.train`
(`python -m kosmos.train`, `kosmos-train`): see its docstring, or `--help`.
"""

from kosmos.train import *  # noqa: F403 - the command's names (main, train, parse_args, ...), as before
from kosmos.train import __doc__ as _doc
from kosmos.train import main

__doc__ = _doc

if __name__ == "__main__":
    main()
