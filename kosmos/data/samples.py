"""Raw shard samples -> token sequences with their images, per source kind (the format and its parsing:
`kosmos.data.format`; here images are decoded and the segments tokenized).

    text         KEY.txt                                 <s> text </s>  (instructions: <s> prompt answer </s>)
    captions     KEY.jpg|png|webp|jpeg + KEY.txt          <s> <image> [slots] </image> caption </s>
    interleaved  KEY.json {"segments": [...]} + KEY.imgN  <s> text <image> [slots] </image> text ... </s>

A sample that cannot be used raises `BadSample(reason)`; the stream skips it and counts the reason. A sample
longer than the source's `max_tokens` (`data.<source>.max_tokens`) is cut there, never inside an image span;
the rest (images included) is dropped and the stream counts it as truncated.

Loss on the prompt: an instruction sample (a text sample whose `KEY.json` has `prompt_chars`) is tokenized
as prompt then response in either case; with `loss="response"` (`data.<source>.loss`) its `<s>` and prompt
tokens get no loss (`Encoded.no_loss`, labels IGNORE_INDEX in `kosmos.data.packing.collate`). The paper
trains on the whole text: `loss="all"`, the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kosmos.data.format import LOSSES, BadSample, ImageSegment, parse_sample
from kosmos.image import decode_image
from kosmos.sequence import SequenceEncoder
from kosmos.untrusted import ImageError


@dataclass
class Encoded:
    """A sample ready to pack."""

    pos: tuple[int, ...]
    """(shard, offset) of the raw sample, to read it back on resume; (shard, offset, caption) for a visit of
    a caption sample with several captions (`kosmos.data.streams`)."""
    ids: list[int]
    image_mask: list[bool]
    images: list[torch.Tensor] = field(default_factory=list)
    """uint8 (3, S, S) per image, in sequence order."""
    image_starts: list[int] = field(default_factory=list)
    """Index of each image's `<image>` token in `ids`."""
    start: int = 0
    """Tokens already placed in earlier rows (a document longer than a row continues)."""
    truncated: bool = False
    """Cut to `max_tokens` (its tail dropped)."""
    no_loss: int = 0
    """Leading tokens that carry no loss: `<s>` and the prompt of an instruction sample under
    `loss="response"`, else 0."""


MAX_CHARS_PER_TOKEN = 16
"""SentencePiece's longest piece (its `max_sentencepiece_length` default): with a cap of n tokens, text
beyond n * 16 characters of a segment can never be kept, so it is dropped before tokenizing (a 1 MB caption
costs no more than a short one)."""


def _image(data: bytes, size: int) -> torch.Tensor:
    """Decoded pixels; `BadSample` ``empty_image``, ``image_too_large`` (a decompression bomb, refused from
    its header: `kosmos.untrusted.open_image`) or ``bad_image``, with PIL's words as its detail."""
    if not data:
        raise BadSample("empty_image")
    try:
        return decode_image(data, size, contiguous=False)  # collate copies it into the micro-batch
    except ImageError as e:
        reason = "image_too_large" if e.reason == "decompression_bomb" else "bad_image"
        raise BadSample(reason, e.detail) from None
    except Exception as e:  # noqa: BLE001 - anything else a decoder or the resize raises for odd data
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None


def sample_segments(kind: str, raw: dict, image_size: int, caption: int | None = None) -> list:
    """The sample's segments: strings and uint8 image tensors, in order (`caption`: which caption of a caption
    sample, see `kosmos.data.format.parse_sample`)."""
    segments = parse_sample(kind, raw, caption)
    return [_image(s.data, image_size) if isinstance(s, ImageSegment) else s for s in segments]


def encode_sample(kind: str, raw: dict, pos: tuple[int, ...], encoder: SequenceEncoder,
                  max_tokens: int = 0, loss: str = "all") -> Encoded:
    """The sample's tokens and images; with `max_tokens` (0: no cap) at most that many tokens (`truncated`
    set when anything was cut). A caption sample at a position `(shard, offset, caption)` uses that caption
    (`kosmos.data.format.captions`); `loss="response"` sets `no_loss` over an instruction sample's prompt."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    segments = sample_segments(kind, raw, encoder.image_size, pos[2] if len(pos) > 2 else None)
    cut_text = False
    if max_tokens:
        limit = max_tokens * MAX_CHARS_PER_TOKEN
        cut_text = any(isinstance(s, str) and len(s) > limit for s in segments)
        if cut_text:
            segments = [s[:limit] if isinstance(s, str) else s for s in segments]
    seq = encoder.encode(segments, bos=True, eos=True)
    images = [s for s in segments if isinstance(s, torch.Tensor)]
    item = Encoded(pos=pos, ids=seq.ids, image_mask=seq.image_mask, images=images,
                   image_starts=seq.image_starts)
    if kind == "text" and len(segments) == 2 and loss == "response":  # an instruction: prompt, response
        # <s> + the prompt, cut like the text above (an uncut 1 MB prompt would be tokenized here whole)
        item.no_loss = min(len(item.ids), 1 + len(encoder.tokenizer.encode(segments[0])))
    if max_tokens and (cut_text or len(item.ids) > max_tokens):
        _truncate(item, max_tokens, encoder.span)
    return item


def _truncate(item: Encoded, max_tokens: int, span: int) -> None:
    """Cut `item` to at most `max_tokens` tokens, before an image span that the cut would split."""
    cut = min(max_tokens, len(item.ids))
    for s in item.image_starts:
        if s < cut < s + span:
            cut = s
    kept = sum(1 for s in item.image_starts if s < cut)
    item.ids, item.image_mask = item.ids[:cut], item.image_mask[:cut]
    item.no_loss = min(item.no_loss, cut)
    item.images, item.image_starts = item.images[:kept], item.image_starts[:kept]
    item.truncated = True
