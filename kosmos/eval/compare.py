"""`python -m kosmos.eval compare DIR [DIR ...]`: the metrics of several result folders in one table.

Each DIR is a `--out` folder of `kosmos.eval run` (or a training run's `eval/step_XXXXXXXX`): its
`TASK/Kshot/metrics.json` files. One row per task, shots and metric, one column per folder (headed by the
folder and the checkpoint's step and weights digest from its provenance), and the paper's number where it
has one (`kosmos.eval.tasks.PAPER`), so that the checkpoints of a run, or several runs, read side by side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kosmos.eval.datasets import EvalDataError
from kosmos.eval.tasks import PAPER
from kosmos.untrusted import load_json


def read_results(folder: Path) -> dict[tuple[str, int], dict]:
    """{(task, shots): metrics.json} of a result folder; an EvalDataError when it has none."""
    found = {}
    for path in sorted(Path(folder).glob("*/*shot/metrics.json")):
        try:
            m = load_json(path.read_text())
        except ValueError as e:
            raise EvalDataError(f"{path}: unreadable ({e})") from None
        found[(m["task"], int(m["shots"]))] = m
    if not found:
        raise EvalDataError(f"{folder}: no TASK/Kshot/metrics.json in it (a --out folder of kosmos.eval run)")
    return found


def _label(folder: Path, results: dict[tuple[str, int], dict]) -> str:
    src = next(((m.get("provenance") or {}).get("checkpoint") or {} for m in results.values()), {})
    parts = [f"step {src['step']}" if src.get("step") is not None else "",
             src["sha256"][:8] if src.get("sha256") else ""]
    extra = ", ".join(p for p in parts if p)
    return f"{folder.name} ({extra})" if extra else folder.name


def compare_table(folders: list[Path]) -> str:
    """The markdown table of `folders`' metrics (see the module docstring)."""
    runs = [(Path(f), read_results(Path(f))) for f in folders]
    keys = sorted({k for _, res in runs for k in res})
    head = "| task | shots | metric | " + " | ".join(_label(f, r) for f, r in runs) + " | KOSMOS-1 paper |"
    lines = [head, "|" + "---|" * (len(runs) + 4)]
    for task, shots in keys:
        metrics = sorted({name for _, res in runs
                          for name, v in res.get((task, shots), {}).get("metrics", {}).items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and name != "n"})
        paper = PAPER.get((task, shots), {})
        for name in metrics:
            cells = []
            for _, res in runs:
                v = res.get((task, shots), {}).get("metrics", {}).get(name)
                cells.append(f"{v:.2f}" if isinstance(v, (int, float)) else "-")
            row = f"| {task} | {shots} | {name} | " + " | ".join(cells)
            lines.append(row + f" | {paper.get(name, '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from kosmos.errors import command_name

    ap = argparse.ArgumentParser(prog=command_name("kosmos.eval", "compare"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", metavar="DIR", help="result folders (kosmos.eval run --out)")
    args = ap.parse_args(argv)
    print(compare_table([Path(f) for f in args.folders]), end="")
    return 0
