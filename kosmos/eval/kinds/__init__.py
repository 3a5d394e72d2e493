"""Task kinds: what differs between captioning, VQA, classification, choice and labels, one file each.

A task (`kosmos.eval.tasks.TASKS`) names its kind in `TaskSpec.kind`; the runner (`kosmos.eval.run`) asks
the kind's handler, a `TaskKind`, for everything that depends on it and does the rest (batching, processes,
resuming, skips, result files) the same for every kind:

    read            the items of --data (`kosmos.eval.datasets` readers -> `TaskData`)
    support_split   the split of --data that is the default few-shot support set (captioning: train)
    demo_answer     the answer a few-shot demonstration shows
    prompt          one item's prompt(s) for the model (raise `Skip` to skip it with a reason)
    prepare/predict what the model is asked for a batch of prompts (generation or ranking) -> records
    official_result one prediction in the benchmark's results format (results.json)
    has_reference / score   the metrics over the predicted items that have references

Adding a kind (for instance a likelihood-ranked choice, or extractive QA):
  1. write `kosmos/eval/kinds/NAME.py` with a subclass of `TaskKind` decorated with `@register`
     (`name = "NAME"`; `few_shot = True` if demonstrations make sense), overriding what differs from the
     defaults below: at least `read`, `predict` and `score`. Every module of this package is imported with
     it, so nothing else needs to know of the file;
  2. give it tasks in `kosmos.eval.tasks.TASKS` (`TaskSpec(kind="NAME", prompt=...)`), and add their names to
     `kosmos.config.EVAL_TASK_NAMES` (the config checks `train.eval_tasks` without importing the evaluation;
     tasks.py refuses to import when the two differ);
  3. a reader fixture and an end-to-end run on the tiny model, as tests/test_eval_run.py has for each kind
     (tests/test_eval_kinds.py registers a kind inside a test and runs it through `run_task`).
"""

from __future__ import annotations

import importlib
import pkgutil
import random
from pathlib import Path
from typing import Any, ClassVar

from kosmos.eval.datasets import Item, TaskData
from kosmos.eval.prompts import Skip, build_prompt, query_text
from kosmos.eval.tasks import TaskSpec


class TaskKind:
    """The handler of one task kind; the defaults suit a kind that generates one text per item and has
    references (captioning). `ctx` in the methods is the runner's `Predictor`: `model`, `encoder`, `spec`,
    `data`, `shots`, `load` (an `ImageLoader`), `state` (what `prepare` returned), `generate(prompts)`."""

    name: ClassVar[str] = ""
    few_shot: ClassVar[bool] = False
    """Whether k demonstrations may come before the query (`--shots`; the task needs a `demo` template)."""
    scorer_packages: ClassVar[tuple[str, ...]] = ()
    """The packages whose code scores this kind (their versions go into the provenance of its numbers)."""
    scorer_settings: ClassVar[tuple[str, ...]] = ()
    """TaskSpec fields that choose how this kind is scored (VQA: `vqa_rules`), recorded with the scorer."""

    # ------------------------------------------------------------------------- data

    def read(self, spec: TaskSpec, data: str, annotations: str | None, images: str | None, split: str,
             classnames: str | None) -> TaskData:
        """The items of `data` (arguments as `python -m kosmos.eval run` takes them)."""
        raise NotImplementedError(f"task kind {self.name!r} has no reader")

    def support_split(self, data: str) -> str | None:
        """The split of `data` that is the default few-shot support set (None: the evaluated items)."""
        return None

    def demo_answer(self, item: Item, rng: random.Random) -> str:
        """The answer a support item shows as a demonstration: by default a random reference."""
        return rng.choice(item.references)

    # ------------------------------------------------------------------------- predicting

    def generates(self, spec: TaskSpec) -> bool:
        """Whether predictions are generated (`kosmos.generate`, capped at the model's context): a prompt
        that leaves no room to generate is skipped."""
        return True

    def prepare(self, ctx) -> Any:
        """Per-run state for `predict` (e.g. the token ids of the class names), as `ctx.state`."""
        return None

    def prompt(self, ctx, item: Item) -> Any:
        """The model's prompt for `item` (its demonstrations before it); raises `Skip` for an unusable
        image or a prompt too long to generate after."""
        text, images = query_text(ctx.spec, item, ctx.shots.pick(item), ctx.shots.seed)
        prompt = build_prompt(ctx.encoder, text, [ctx.load(x) for x in images])
        max_len = ctx.model.cfg.decoder.max_len
        if self.generates(ctx.spec) and len(prompt.ids) >= max_len:  # no room left to generate
            raise Skip("prompt_too_long", f"{len(prompt.ids)} tokens, decoder.max_len {max_len}")
        return prompt

    def predict(self, ctx, items: list[Item], prompts: list) -> list[dict]:
        """One record per item, {"id", "prediction", ...} (what predictions.rankR.jsonl keeps)."""
        raise NotImplementedError(f"task kind {self.name!r} cannot predict")

    # ------------------------------------------------------------------------- results

    def official_result(self, data: TaskData, item: Item, record: dict) -> dict:
        """One prediction in the benchmark's results format."""
        return {"id": item.id, "prediction": record["prediction"]}

    def has_reference(self, item: Item) -> bool:
        """Whether `item` can be scored."""
        return bool(item.references)

    def score(self, spec: TaskSpec, items: list[Item], records: dict[str, dict]) -> dict[str, Any]:
        """The metrics over `items` (predicted, with references); `records` by `Item.key`."""
        raise NotImplementedError(f"task kind {self.name!r} has no metrics")


KINDS: dict[str, TaskKind] = {}
"""The registered kinds by name."""


def register(cls: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: register the kind (`cls.name`) for the tasks whose `TaskSpec.kind` names it."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a task kind needs a name")
    KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> TaskKind:
    """The handler of kind `name`, or a one-line ValueError listing the kinds."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task kind {name!r}; kinds: {', '.join(KINDS)}") from None


def check_exists(data: str) -> None:
    """A FileNotFoundError naming --data when it is not there."""
    if not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")


for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
