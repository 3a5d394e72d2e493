"""Evaluation of a trained model: the paper's benchmarks and held-out loss.

    python -m kosmos.eval run --checkpoint runs/kosmos --task coco_captioning --data dataset_coco.json \\
        --images coco/ [--shots 0,4,8] [--out results/]
    python -m kosmos.eval score captioning --annotations REFS.json --predictions PREDS.json
    python -m kosmos.eval score vqa --questions Q.json --annotations A.json --predictions P.json [--rules R]
    python -m kosmos.eval loss --checkpoint runs/kosmos [--shards captions=shards/coco_val ...]
    python -m kosmos.eval compare results/step_1000 results/step_2000 [...]

`run` (kosmos.eval.run) predicts and scores a task (protocols in kosmos.eval.tasks); `score`
(kosmos.eval.score) scores an existing predictions file with the reference tools' metrics; `loss`
(kosmos.eval.loss) gives loss and perplexity per source on held-out shards, the numbers the trainer logs;
`compare` (kosmos.eval.compare) prints the metrics of several result folders in one table.
`python -m kosmos.eval --checkpoint ...` without a command is `loss`, as before.
"""

from __future__ import annotations

import sys

COMMANDS = ("run", "score", "loss", "compare")


def main(argv: list[str] | None = None) -> int:
    """Dispatch to `run`, `score` or `loss` (the default, for `python -m kosmos.eval --checkpoint ...`); an
    error the user can fix (`KosmosError`: a sharded checkpoint, weights that do not fit) is one `error:`
    line and exit 2 (`kosmos.errors.run_cli`; `--debug` shows the traceback)."""
    from kosmos.errors import run_cli

    return run_cli(_dispatch, argv)


def _dispatch(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        from kosmos.errors import command_name

        usage = f"{command_name('kosmos.eval')} {{{','.join(COMMANDS)}}} [options]"
        print(f"usage: {usage}  (--help after a command for its options)\n")
        print(__doc__)
        return 0 if argv else 2
    command = argv.pop(0) if argv[0] in COMMANDS else "loss"
    if command == "run":
        from kosmos.eval.run import main as run_main

        return run_main(argv)
    if command == "score":
        from kosmos.eval.score import main as score_main

        return score_main(argv)
    if command == "compare":
        from kosmos.eval.compare import main as compare_main

        return compare_main(argv)
    from kosmos.eval.loss import main as loss_main

    return loss_main(argv)


def __getattr__(name: str):
    # lazily: kosmos.eval.tasks and the metrics stay importable without torch
    if name == "source_loss":
        from kosmos.eval.loss import source_loss

        return source_loss
    raise AttributeError(name)


__all__ = ["COMMANDS", "main", "source_loss"]
