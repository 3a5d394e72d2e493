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
