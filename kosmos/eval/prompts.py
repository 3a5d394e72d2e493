"""What goes into the model for a query, whatever the task kind: templates filled, demonstrations picked,
images loaded (or skipped with a reason).

`query_text` asks the task's kind (`kosmos.eval.kinds`) for a demonstration's answer; everything else here
is the same for every kind.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kosmos.eval.datasets import Item
from kosmos.eval.tasks import TaskSpec


def fill(template: str, **values: str) -> str:
    """`template` with `{name}` replaced by each value (`{image}` markers stay; braces in values are kept
    literally, and a literal `{image}` in a value cannot become an image marker)."""
    out = template
    for name, value in values.items():
        out = out.replace("{" + name + "}", str(value).replace("{image}", "(image)"))
    return out


@dataclass
class Shots:
    """How demonstrations are picked for few-shot."""

    k: int = 0
    support: list[Item] = field(default_factory=list)
    seed: int = 0
    similar: Callable[[Item, int], list[int]] | None = None
    """RICES (`kosmos.eval.rices`): the indices into `support` of the k most similar items to a query
    (None: random)."""

    def pick(self, item: Item) -> list[Item]:
        if not self.k:
            return []
        if self.similar is not None:
            chosen = [i for i in self.similar(item, self.k + 1) if self.support[i].id != item.id][: self.k]
        else:  # seeded by the item: the same demonstrations whatever the batch or process count
            pool = [i for i, s in enumerate(self.support) if s.id != item.id]
            chosen = random.Random(f"{self.seed}:{self.k}:{item.id}").sample(pool, min(self.k, len(pool)))
        return [self.support[i] for i in chosen]


def query_text(spec: TaskSpec, item: Item, demos: list[Item], seed: int = 0) -> tuple[str, list[Any]]:
    """(prompt text with `{image}` markers, the images in order) for an item and its demonstrations."""
    from kosmos.eval.kinds import get_kind

    kind = get_kind(spec.kind)
    parts, images = [], []
    for d in demos:
        rng = random.Random(f"{seed}:demo:{d.id}")
        parts.append(fill(spec.demo, answer=kind.demo_answer(d, rng), **d.fields))
        images.extend(d.images)
    parts.append(fill(spec.prompt, **item.fields))
    images.extend(item.images)
    return spec.separator.join(parts), images


def build_prompt(encoder, text: str, images: list):
    """The model's prompt (`kosmos.generate.build_prompt`) for a text with `{image}` markers."""
    from kosmos.generate import build_prompt as build

    return build(encoder, text, images)


class Skip(Exception):
    """An item that cannot be predicted: its `reason` (counted in metrics.json) and the path or detail."""

    def __init__(self, reason: str, path: str):
        super().__init__(f"{reason}: {path}")
        self.reason, self.path = reason, path


class ImageLoader:
    """uint8 images at the model's size; a missing or unusable one raises `Skip(reason, path)`: its reason is
    `kosmos.untrusted.ImageError`'s (``missing_image``, ``decompression_bomb``, ``truncated_image``, ...;
    ``bad_image`` for the rest), so an image PIL refuses is skipped and named, never the end of the run."""

    SAME = ("missing_image", "decompression_bomb", "truncated_image")
    """Reasons kept as they are; other failures count as ``bad_image``."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, image: Any):
        from kosmos.untrusted import ImageError, image_errors, open_image

        shard = isinstance(image, (bytes, bytearray))
        where = "(shard bytes)" if shard else str(image)
        try:
            if shard:
                with open_image(image) as im, image_errors():
                    return self.encoder.image(im)
            return self.encoder.load_image(Path(image))
        except ImageError as e:
            reason = "missing_image" if e.reason == "not_a_file" else (
                e.reason if e.reason in self.SAME else "bad_image")
            raise Skip(reason, f"{where} {e.detail}" if shard else where) from None
