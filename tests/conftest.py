"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

TINY_VOCAB_SIZE = 1000


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A KosmosTokenizer of 1000 ids built from the shipped tiny corpus (well under a second)."""
    from tokenizer import TINY_CORPUS
    from tokenizer.build import build_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    return build_tokenizer([TINY_CORPUS], out, TINY_VOCAB_SIZE, character_coverage=0.995, quiet=True)
