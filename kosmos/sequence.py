"""Sequence assembly: `<s> text <image> [n image slots] </image> text </s>` (DESIGN.md, "The sequence").

A sample is a list of segments, each a text string or an image. Text is tokenised; each image becomes
`<image>`, `num_latents` slots that the model fills with the image's embeddings, and `</image>`. The
marker ids come from the tokenizer's special ids, which plain text can never produce, so a document that
literally contains the characters "<image>" stays text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100
"""Label of positions that carry no loss (image slots, padding)."""


@dataclass
class Sequence:
    ids: list[int] = field(default_factory=list)
    """Token ids; image slots hold the pad id (the model overwrites them)."""
    image_mask: list[bool] = field(default_factory=list)
    """True at image slots."""
    n_images: int = 0
    image_starts: list[int] = field(default_factory=list)
    """Index of each image's `<image>` token in `ids`, in order."""

    def __len__(self) -> int:
        return len(self.ids)


def is_text(segment: Any) -> bool:
    return isinstance(segment, str)


def encode_segments(tokenizer, segments: list[Any], num_latents: int, bos: bool = True,
                    eos: bool = True) -> Sequence:
    """Token ids and image-slot mask for a sample of text and image segments (images in order)."""
    seq = Sequence()

    def add(ids: list[int], is_image: bool = False) -> None:
        seq.ids.extend(ids)
        seq.image_mask.extend([is_image] * len(ids))

    if bos:
        add([tokenizer.bos_id])
    for seg in segments:
        if is_text(seg):
            add(tokenizer.encode(seg))
        else:
            seq.image_starts.append(len(seq.ids))
            add([tokenizer.image_id])
            add([tokenizer.pad_id] * num_latents, is_image=True)
            add([tokenizer.image_end_id])
            seq.n_images += 1
    if eos:
        add([tokenizer.eos_id])
    return seq
