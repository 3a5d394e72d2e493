"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

TINY_VOCAB_SIZE = 1000


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A KosmosTokenizer of 1000 ids built from the shipped tiny corpus (well under a second)."""
    from kosmos.tokenizer import TINY_CORPUS
    from kosmos.tokenizer.build import build_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    return build_tokenizer([TINY_CORPUS], out, TINY_VOCAB_SIZE, character_coverage=0.995, quiet=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_tokenizer):
    """Shards of all three sources for training configs/tiny.yaml, and the overrides that point at them:
    generated shapes with captions (through kosmos.data_tools.captions), MMC4-style documents about them
    (through kosmos.data_tools.interleaved) and short text documents."""
    from kosmos.data_tools.shapes import toy_shards
    from tests.helpers import text_shards

    root = tmp_path_factory.mktemp("tiny_run")
    toy_shards(root)  # shapes, converted into caption and interleaved shards
    text_shards(root / "text", 4, 200)
    tok_dir = tiny_tokenizer.path
    return [f"tokenizer.path={tok_dir}", f"data.captions.shards=[{root / 'captions'}]",
            f"data.interleaved.shards=[{root / 'interleaved'}]", f"data.text.shards=[{root / 'text'}]",
            "train.tracker=none", "train.log_every=5"]


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process: enough to shard (over one rank) in a fast test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
