"""Packing samples into fixed-length rows, "full-sentence" style (the paper's packing of documents).

* Whole samples fill a row one after another; when the next sample does not fit in what is left, the row
  is closed and padded at its tail, and the sample starts the next row.
* A document longer than a row fills the rest of the current row and goes on in the next rows.
* An image span `<image> [slots] </image>` is never cut: a cut that would fall inside one moves before it.
* Each row numbers its pieces of documents 1, 2, ... (`doc_ids`, 0 at the tail padding), for the optional
  document-masked attention (`decoder.document_mask`). A document continued from the previous row is the
  row's piece 1, a segment of its own: the model never sees the previous row anyway, so its positions
  restart at 0 there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import get_worker_info

from kosmos.data.samples import Encoded
from kosmos.sequence import IGNORE_INDEX


@dataclass
class Row:
    ids: list[int] = field(default_factory=list)
    image_mask: list[bool] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    n_real: int = 0
    """Tokens before the tail padding."""
    starts: list[tuple[int, int]] = field(default_factory=list)
    """Positions of the samples whose first token is in this row."""
    doc_ids: list[int] = field(default_factory=list)
    """Per token: which piece of a document it belongs to (1, 2, ... in row order; 0 at padding)."""
    no_loss: list[bool] = field(default_factory=list)
    """Per token: True where the sample puts no loss (an instruction's prompt under `loss: response`)."""


class Packer:
    def __init__(self, max_len: int, num_latents: int, pad_id: int):
        self.max_len, self.pad_id = max_len, pad_id
        self.span = num_latents + 2  # <image> + slots + </image>
        if self.span > max_len:
            raise ValueError(f"an image span ({self.span} tokens) does not fit in a row of {max_len}")

    def _safe_cut(self, item: Encoded, end: int) -> int:
        for s in item.image_starts:
            if s < end < s + self.span:
                return s
        return end

    def _put(self, row: Row, item: Encoded, end: int) -> None:
        start = item.start
        if start == 0 and end > 0:  # not when an image span at its head does not fit: the next row starts it
            row.starts.append(item.pos)
        row.doc_ids += [(row.doc_ids[-1] if row.doc_ids else 0) + 1] * (end - start)
        row.ids += item.ids[start:end]
        k = max(0, min(end, item.no_loss) - start)  # the tokens of [start, end) before item.no_loss
        row.no_loss += [True] * k + [False] * (end - start - k)
        row.image_mask += item.image_mask[start:end]
        row.images += [img for s, img in zip(item.image_starts, item.images, strict=True) if start <= s < end]
        item.start = end

    def _close(self, row: Row) -> Row:
        row.n_real = len(row.ids)
        pad = self.max_len - row.n_real
        row.ids += [self.pad_id] * pad
        row.image_mask += [False] * pad
        row.doc_ids += [0] * pad
        row.no_loss += [False] * pad
        return row

    def pack(self, items: Iterable[Encoded]) -> Iterator[tuple[Row, Encoded | None]]:
        """Yield (row, carry): each finished row, and the sample the next row starts with (its `start` says
        how much of it earlier rows took) or None. `carry` is what a resumed packer must begin with."""
        row = Row()
        for item in items:
            while item.start < len(item.ids):
                rest = len(item.ids) - item.start
                space = self.max_len - len(row.ids)
                if rest <= space:
                    self._put(row, item, len(item.ids))
                elif rest <= self.max_len and row.ids:
                    yield self._close(row), item  # fits in a fresh row: start one with it
                    row = Row()
                else:  # longer than a row: fill this one up to a safe cut, go on in the next
                    self._put(row, item, self._safe_cut(item, item.start + space))
                    yield self._close(row), item
                    row = Row()
        if row.ids:
            yield self._close(row), None


def collate(rows: list[Row], image_size: int) -> dict[str, torch.Tensor]:
    """Rows -> a micro-batch: ids, labels (IGNORE_INDEX at image slots, padding and the tokens a sample puts
    no loss on: `Row.no_loss`), masks, uint8 images, and doc_ids (B, L) (the model uses them only with
    `decoder.document_mask`)."""
    def tensor(lists, dtype) -> torch.Tensor:  # numpy reads lists of Python ints/bools 3-4x faster than torch
        return torch.from_numpy(np.array(lists, dtype=dtype))

    ids = tensor([r.ids for r in rows], np.int64)  # (B, L)
    image_mask = tensor([r.image_mask for r in rows], np.bool_)
    L = ids.shape[1]
    n_real = torch.tensor([r.n_real for r in rows])
    padding_mask = torch.arange(L)[None, :] >= n_real[:, None]
    no_loss = tensor([r.no_loss or [False] * L for r in rows], np.bool_)
    labels = ids.masked_fill(image_mask | padding_mask | no_loss, IGNORE_INDEX)
    images = _stack_images([img for r in rows for img in r.images], image_size)
    return {
        "input_ids": ids,
        "labels": labels,
        "image_mask": image_mask,
        "padding_mask": padding_mask,
        "doc_ids": tensor([r.doc_ids for r in rows], np.int64),  # (B, L)
        "images": images,
    }


def _stack_images(images: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """(N, 3, S, S) uint8 from N (3, S, S) images, each copied once. Decoded images that needed no resize
    are views of channels-last (S, S, 3) memory (`decode_image`'s `contiguous=False`), resized ones are
    channels first; the batch takes the layout most of its images have (copying an image across layouts
    costs ten times a plain copy), so a channels-last batch is a (N, 3, S, S) view of (N, S, S, 3) memory.
    The model's `VisionEncoder.normalize` makes the usual layout on the device. In a DataLoader worker the
    batch is made in shared memory, as torch's `default_collate` does, so that handing it to the main
    process copies nothing more."""
    n = len(images)
    last = sum(img.permute(1, 2, 0).is_contiguous() for img in images) * 2 > n
    shape = (n, image_size, image_size, 3) if last else (n, 3, image_size, image_size)
    if get_worker_info() is not None and images:
        out = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(math.prod(shape)))
        out = out.view(shape)
    else:
        out = torch.empty(shape, dtype=torch.uint8)
    for i, img in enumerate(images):
        out[i].copy_(img.permute(1, 2, 0) if last else img)
    return out.permute(0, 3, 1, 2) if last else out


def to_device(batch: dict, device) -> dict:
    """A micro-batch as the model's keyword arguments, on `device`; images stay uint8 (the model
    normalises them). `doc_ids` (document masking) is passed when the batch has it."""
    images = batch["images"]
    doc_ids = batch.get("doc_ids")
    return {
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "labels": batch["labels"].to(device, non_blocking=True),
        "image_mask": batch["image_mask"].to(device, non_blocking=True),
        "padding_mask": batch["padding_mask"].to(device, non_blocking=True),
        "images": images.to(device, non_blocking=True) if len(images) else None,
        "doc_ids": doc_ids.to(device, non_blocking=True) if doc_ids is not None else None,
    }
