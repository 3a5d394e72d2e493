"""RICES (retrieval-based in-context example selection, as OpenFlamingo's): few-shot demonstrations whose
images are most like the query's, by the cosine of mean-pooled features of the model's own vision tower.

`python -m kosmos.eval run --shots 4 --retrieval`; `kosmos.eval.run.build_shots` puts the index into
`Shots.similar`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kosmos.eval.datasets import Item
from kosmos.eval.prompts import ImageLoader, Skip


def rice_index(model, encoder, support: list[Item], batch_size: int = 32) -> Callable[[Item, int], list[int]]:
    """RICES: a function (query, n) -> the indices of the n support items whose images are most similar
    (cosine of mean-pooled features of the model's vision tower). Unreadable support images never match."""
    load = ImageLoader(encoder)
    device = next(model.parameters()).device

    @torch.no_grad()
    def features(images: list) -> torch.Tensor:
        feats = model.vision(torch.stack(images).to(device)).float().mean(1)
        return torch.nn.functional.normalize(feats, dim=-1)

    rows, ok = [], []
    for i in range(0, len(support), batch_size):
        imgs = []
        for j, s in enumerate(support[i:i + batch_size]):
            try:
                imgs.append(load(s.images[0]))
                ok.append(i + j)
            except Skip:
                pass
        if imgs:
            rows.append(features(imgs))
    bank = torch.cat(rows) if rows else torch.zeros(0, 1, device=device)
    index = torch.tensor(ok, dtype=torch.long)

    def similar(item: Item, n: int) -> list[int]:
        q = features([load(item.images[0])])  # a missing query image was already skipped
        order = (bank @ q[0]).argsort(descending=True)[:n].cpu()
        return index[order].tolist()

    return similar
