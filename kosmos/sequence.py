"""Sequence assembly: `<s> text <image> [n image slots] </image> text </s>`.

A sample is a list of segments, each a text string or an image. Text is tokenised; each image becomes
`<image>`, `num_latents` slots that the model fills with the image's embeddings, and `</image>`. The
marker ids come from the tokenizer's special ids, which plain text can never produce, so a document that
literally contains the characters "<image>" stays text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass
class SequenceEncoder:
    """Everything that turns text and images into model input, in one object shared by the data pipeline,
    prompt building and evaluation: the tokenizer, the image span length and the image size.

        enc = SequenceEncoder.from_config(cfg)             # tokenizer from cfg.tokenizer.path
        seq = enc.encode(["a photo of", enc.load_image("cat.jpg")])
    """

    tokenizer: Any
    """A KosmosTokenizer (or anything with encode/decode and the special ids)."""
    num_latents: int
    """Image slots per image (connector.num_latents)."""
    image_size: int
    """Pixels per side of the images the vision tower reads (vision.input_size)."""

    @classmethod
    def from_config(cls, cfg, tokenizer=None) -> SequenceEncoder:
        """From a Config; the tokenizer is loaded from `cfg.tokenizer.path` unless given."""
        if tokenizer is None:
            from kosmos.tokenizer import KosmosTokenizer

            if not cfg.tokenizer.path:
                raise ValueError("no tokenizer: set tokenizer.path "
                                 "(build one with `python -m kosmos.tokenizer.build`)")
            tokenizer = KosmosTokenizer.from_dir(cfg.tokenizer.path)
        return cls(tokenizer, cfg.connector.num_latents, cfg.vision.input_size)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    @property
    def span(self) -> int:
        """Tokens of one image span: `<image>`, the slots, `</image>`."""
        return self.num_latents + 2

    def encode(self, segments: list[Any], bos: bool = True, eos: bool = True) -> Sequence:
        return encode_segments(self.tokenizer, segments, self.num_latents, bos=bos, eos=eos)

    def image(self, image):
        """A PIL image -> uint8 (3, S, S) pixels at the tower's size (the model normalises them)."""
        from kosmos.image import clip_resize_crop

        return clip_resize_crop(image, self.image_size)

    def load_image(self, path: str | Path):
        """An image file -> uint8 (3, S, S) pixels."""
        from kosmos.image import load_image

        return load_image(path, self.image_size)

    def prompt(self, text: str, images: list) -> Sequence:
        """A generation prompt: `{image}` in `text` marks where each image goes; without it the images come
        first. Starts with `<s>`, no `</s>`."""
        parts = text.split("{image}")
        if len(parts) == 1:
            segments: list = [*images, text] if text else list(images)
        else:
            if len(parts) - 1 != len(images):
                raise ValueError(f"the prompt has {len(parts) - 1} {{image}} markers but {len(images)} "
                                 "images were given")
            segments = []
            for i, part in enumerate(parts):
                if part:
                    segments.append(part)
                if i < len(images):
                    segments.append(images[i])
        return self.encode(segments, bos=True, eos=False)
