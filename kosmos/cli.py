"""Console scripts (see ``[project.scripts]`` in pyproject.toml) for the commands whose ``main`` returns data.

A console script runs ``sys.exit(main())``: an int is the exit status, None is 0, and any other object is
printed to stderr and exits 1. ``kosmos.train.main`` returns the final training state (a dict),
``kosmos.generate.main`` the generated texts and ``kosmos.summary.main`` the parameter counts, which suits
tests and notebooks but not a shell. These shims read the command line like the modules do (``main()``
with no argv parses sys.argv) and return 0; failures still exit non-zero through the exceptions and
``SystemExit`` the mains raise (argparse errors exit 2, a bad config exits 2).

    kosmos-train --config configs/tiny.yaml train.max_steps=50      # = python train_kosmos.py ...
    kosmos-generate --checkpoint runs/tiny --image a.png           # a checkpoint dir (or a run dir) is enough
    kosmos-summary configs/kosmos1.yaml
"""

from __future__ import annotations


def train() -> int:
    """``kosmos-train``: ``python -m kosmos.train`` (one process; for several, ``accelerate launch``)."""
    from kosmos.train import main

    main()
    return 0


def generate() -> int:
    """``kosmos-generate``: ``python -m kosmos.generate``."""
    from kosmos.errors import run_cli
    from kosmos.generate import main

    return run_cli(main)


def summary() -> int:
    """``kosmos-summary``: ``python -m kosmos.summary``."""
    from kosmos.errors import run_cli
    from kosmos.summary import main

    return run_cli(main)


def plan() -> int:
    """``kosmos-plan``: ``python -m kosmos.plan`` (memory, speed and duration of a config on N GPUs)."""
    from kosmos.errors import run_cli
    from kosmos.plan import main

    return run_cli(main)


def consolidate(argv: list[str] | None = None) -> int:
    """``kosmos-consolidate SHARDED_CKPT OUT_DIR``: ``python -m kosmos.checkpoint consolidate ...`` (one
    model.safetensors with the checkpoint's config and tokenizer; generation and evaluation also read a
    sharded checkpoint as it is, in memory)."""
    import sys

    from kosmos.checkpoint import main

    return main(["consolidate", *(sys.argv[1:] if argv is None else argv)])


def serve() -> int:
    """``kosmos-serve CHECKPOINT``: ``python -m kosmos.serve`` (an OpenAI-compatible server and its page)."""
    from kosmos.errors import run_cli
    from kosmos.serve import main

    return run_cli(main)
