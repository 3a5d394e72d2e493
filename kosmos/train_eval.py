"""Benchmarks during training: the `train.eval_tasks` of a run, run on the model being trained every
`train.eval_every` steps (`kosmos.training.evaluate`), through the same `run_task` as `python -m kosmos.eval
run`; their numeric metrics go to the tracker as `eval/TASK/METRIC`.

Training policy, not evaluation: each task's data is read once per process and kept (`_TRAIN_DATA`), the
first `limit` items (default 200) are run, and a task whose files fail is logged and left out, never the end
of the training run (its config was checked for its keys only, `kosmos.config.EvalTaskConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from kosmos.config import EvalTaskConfig
from kosmos.model import evaluating

log = logging.getLogger(__name__)

_TRAIN_DATA: dict[str, object] = {}
"""Each task's data (`kosmos.eval.datasets.TaskData`) by its config, read once per process."""


def evaluate_tasks(acc, tasks: list[EvalTaskConfig], model, encoder, out: str | Path,
                   source: dict | None = None) -> dict[str, float]:
    """The `train.eval_tasks` of a run on the model being trained (all ranks take part): numeric metrics as
    `eval/TASK/METRIC` (`eval/TASK_Kshot/METRIC` for few-shot); predictions under `out`, their provenance
    `source` (the run and its step)."""
    from kosmos.eval.datasets import EvalDataError
    from kosmos.eval.run import build_shots, load_support, load_task_data, run_task
    from kosmos.eval.tasks import get_task

    results: dict[str, float] = {}
    with evaluating(model):
        for task in tasks:
            key = json.dumps(dataclasses.asdict(task), sort_keys=True)
            try:
                spec = get_task(task.task, **task.settings)
                if key not in _TRAIN_DATA:
                    data = load_task_data(spec, task.data, task.annotations, task.images, task.split,
                                          task.classnames)
                    if task.shots:
                        data.support = load_support(spec, task.data, task.support, task.support_annotations,
                                                    task.images, task.classnames)
                    _TRAIN_DATA[key] = data
                data = _TRAIN_DATA[key]
                shots = build_shots(model, encoder, spec, data, task.shots, task.seed, task.retrieval)
            except (ValueError, FileNotFoundError, EvalDataError) as e:
                log.warning("train.eval_tasks %s: %s (left out)", task.task, e)
                continue
            res = run_task(model, encoder, task.task, spec, data, out, shots, dist=acc, limit=task.limit,
                           progress=False, source=source)
            name = task.task + (f"_{shots.k}shot" if shots.k else "")
            for metric, value in res.metrics.items():
                if isinstance(value, (int, float)) and metric != "n":
                    results[f"eval/{name}/{metric}"] = float(value)
    return results
