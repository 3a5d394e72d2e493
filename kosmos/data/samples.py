"""Raw shard samples -> token sequences with their images, per source kind.

    text         KEY.txt                                 <s> text </s>
    captions     KEY.jpg|png|webp|jpeg + KEY.txt          <s> <image> [slots] </image> caption </s>
    interleaved  KEY.json {"segments": [...]} + KEY.imgN  <s> text <image> [slots] </image> text ... </s>

A sample that cannot be used raises `BadSample(reason)`; the stream skips it and counts the reason.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import torch

from kosmos.image import clip_resize_crop
from kosmos.sequence import SequenceEncoder

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KINDS = ("text", "captions", "interleaved")


class BadSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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


def _text(raw: dict, key: str, reason: str) -> str:
    if key not in raw:
        raise BadSample(f"missing_{reason}")
    try:
        text = raw[key].decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("not_utf8") from None
    if not text.strip():
        raise BadSample(f"empty_{reason}")
    return text


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
    if kind == "text":
        return [_text(raw, "txt", "text")]
    if kind == "captions":
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise BadSample("missing_image")
        caption = _text(raw, "txt", "caption")
        return [_image(raw[ext], image_size), caption.strip()]
    if kind == "interleaved":
        if "json" not in raw:
            raise BadSample("missing_json")
        try:
            doc = json.loads(raw["json"].decode("utf-8"))
            segments = doc["segments"]
            assert isinstance(segments, list)
        except Exception:  # noqa: BLE001
            raise BadSample("bad_json") from None
        out: list = []
        for seg in segments:
            if not isinstance(seg, dict):
                raise BadSample("bad_json")
            if seg.get("text"):
                out.append(str(seg["text"]))
            elif seg.get("image"):
                name = str(seg["image"]).lower()
                if name not in raw:
                    raise BadSample("missing_image")
                out.append(_image(raw[name], image_size))
        if not out:
            raise BadSample("empty_document")
        return out
    raise ValueError(f"unknown source kind {kind!r} (expected one of {KINDS})")


def encode_sample(kind: str, raw: dict, pos: tuple[int, int], encoder: SequenceEncoder) -> Encoded:
    segments = sample_segments(kind, raw, encoder.image_size)
    seq = encoder.encode(segments, bos=True, eos=True)
    images = [s for s in segments if isinstance(s, torch.Tensor)]
    return Encoded(pos=pos, ids=seq.ids, image_mask=seq.image_mask, images=images, image_starts=seq.image_starts)
