"""Evaluation of a trained model.

    python -m kosmos.eval --checkpoint runs/kosmos [--shards captions=shards/coco_val ...] [--max-batches 50]

Today: loss and perplexity per source on held-out shards (the same numbers the trainer logs every
`train.eval_every` steps). The paper's benchmarks (captioning, VQA, zero-shot classification, few-shot)
build on the same pieces: `Kosmos.from_checkpoint`, `SequenceEncoder`, `kosmos.generate`.
"""

from kosmos.eval.loss import main, source_loss

__all__ = ["main", "source_loss"]
