"""Hostile and unlucky cases on the training side (issue 11): each is planted here and must end in a clear
one-line error naming the file or key (exit 2, no traceback), a counted skip, or a documented recovery."""

import sys

import pytest

import train_kosmos
from tests.helpers import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")


def _exit_2(capsys, args) -> str:
    """Run train_kosmos.main(args), which must exit 2 with a one-line error; returns that line."""
    with pytest.raises(SystemExit) as e:
        train_kosmos.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    return err.splitlines()[-1]


# ----------------------------------------------------------------------------- refused at start


def test_vocab_smaller_than_the_tokenizer_is_a_one_line_error(tiny_tokenizer, capsys):
    err = _exit_2(capsys, ["--config", TINY, f"tokenizer.path={tiny_tokenizer.path}", "decoder.vocab_size=500",
                           "train.tracker=none"])
    assert "'decoder.vocab_size': 500 is smaller than the tokenizer's 1000 ids" in err


def test_tracker_not_installed_is_refused_with_the_install_hint(tiny_tokenizer, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib finds no wandb, installed or not
    err = _exit_2(capsys, ["--config", TINY, f"tokenizer.path={tiny_tokenizer.path}", "train.tracker=wandb"])
    assert "'train.tracker': wandb is not installed (`pip install wandb`" in err


def test_brace_pattern_naming_missing_shards_is_refused_or_allowed_with_a_count(tiny_tokenizer, tmp_path, capsys):
    from types import SimpleNamespace

    from kosmos.config import load_config
    from kosmos.data import build_mixture
    from kosmos.sequence import SequenceEncoder
    from kosmos.training import check_config, describe_mixture
    from tests.helpers import text_shards

    text_shards(tmp_path, 4, 3)  # text-000000.tar .. text-000003.tar
    args = [f"tokenizer.path={tiny_tokenizer.path}", "train.tracker=none", "data.captions.tokens_per_step=0",
            "data.interleaved.tokens_per_step=0", f"data.text.shards=['{tmp_path}/text-{{000000..000009}}.tar']"]
    err = _exit_2(capsys, ["--config", TINY, *args])
    assert "config key 'data.text.shards': 6 of the 10 shards named by" in err
    assert f"{tmp_path}/text-000004.tar, {tmp_path}/text-000005.tar, {tmp_path}/text-000006.tar and 3 more" in err
    assert "data.allow_missing_shards=true" in err

    cfg = load_config(TINY, [*args, "data.allow_missing_shards=true"])
    check_config(cfg)
    mixture = build_mixture(cfg, SequenceEncoder.from_config(cfg))
    assert len(mixture.loaders["text"].dataset.shards) == 4
    block = describe_mixture(SimpleNamespace(mixed_precision="no"), cfg, mixture)
    assert (f"WARNING: 6 shard(s) named in data.text.shards do not exist, training on the 4 found (allowed by "
            f"data.allow_missing_shards): {tmp_path}/text-000004.tar") in block
