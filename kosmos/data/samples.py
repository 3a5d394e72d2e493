"""Raw shard samples -> token sequences with their images, per source kind (the format and its parsing:
`kosmos.data.format`; here images are decoded and the segments tokenized).

    text         KEY.txt                                 <s> text </s>
    captions     KEY.jpg|png|webp|jpeg + KEY.txt          <s> <image> [slots] </image> caption </s>
    interleaved  KEY.json {"segments": [...]} + KEY.imgN  <s> text <image> [slots] </image> text ... </s>

A sample that cannot be used raises `BadSample(reason)`; the stream skips it and counts the reason.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch

from kosmos.data.format import BadSample, ImageSegment, parse_sample
from kosmos.image import clip_resize_crop
from kosmos.sequence import SequenceEncoder


@dataclass
class Encoded:
    """A sample ready to pack."""

    pos: tuple[int, int]
    """(shard, offset) of the raw sample, to read it back on resume."""
    ids: list[int]
    image_mask: list[bool]
    images: list[torch.Tensor] = field(default_factory=list)
    """uint8 (3, S, S) per image, in sequence order."""
    image_starts: list[int] = field(default_factory=list)
    """Index of each image's `<image>` token in `ids`."""
    start: int = 0
    """Tokens already placed in earlier rows (a document longer than a row continues)."""


def _image(data: bytes, size: int) -> torch.Tensor:
    from PIL import Image

    if not data:
        raise BadSample("empty_image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when the image is much larger
            return clip_resize_crop(im, size)
    except Image.DecompressionBombError:
        raise BadSample("image_too_large") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise BadSample("bad_image") from None


def sample_segments(kind: str, raw: dict, image_size: int) -> list:
    """The sample's segments: strings and uint8 image tensors, in order."""
    segments = parse_sample(kind, raw)
    return [_image(s.data, image_size) if isinstance(s, ImageSegment) else s for s in segments]


def encode_sample(kind: str, raw: dict, pos: tuple[int, int], encoder: SequenceEncoder) -> Encoded:
    segments = sample_segments(kind, raw, encoder.image_size)
    seq = encoder.encode(segments, bos=True, eos=True)
    images = [s for s in segments if isinstance(s, torch.Tensor)]
    return Encoded(pos=pos, ids=seq.ids, image_mask=seq.image_mask, images=images, image_starts=seq.image_starts)
