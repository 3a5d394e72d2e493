"""One error type (`kosmos.errors.KosmosError`): what a user can fix is one `error:` line and exit 2, from
every command; `--debug` (or KOSMOS_DEBUG=1) shows the traceback instead.

Each case below used to end in a traceback: a checkpoint whose weights do not fit the config (ValueError), a
sharded checkpoint given to generation or evaluation (FileNotFoundError), `vision.pretrained=openai` on a
machine without network (106 lines ending in open_clip's FileNotFoundError) and `kosmos-summary` with a
missing config (ConfigError outside the trainer).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kosmos.errors import KosmosError, MissingFileError, run_cli
from tests.helpers import ROOT, TINY, checkpoint_dir, tiny_model


def _one_line(capsys, code: int, *phrases: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, err)
    return lines[0]


def test_the_project_errors_are_kosmos_errors_with_their_old_bases():
    from kosmos.config import ConfigError
    from kosmos.data.shards import DataError
    from kosmos.data.state import DataStateError
    from kosmos.eval.datasets import EvalDataError
    from kosmos.weights import CheckpointError, CheckpointNotFound

    for cls, base in [(ConfigError, ValueError), (CheckpointError, ValueError), (DataError, RuntimeError),
                      (DataStateError, ValueError), (EvalDataError, ValueError),
                      (CheckpointNotFound, FileNotFoundError), (MissingFileError, FileNotFoundError)]:
        assert issubclass(cls, KosmosError) and issubclass(cls, base), cls
    assert KosmosError("x").exit_code == 2


def test_run_cli_prints_one_line_or_the_traceback_with_debug(capsys, monkeypatch):
    def main(argv=None):
        if argv and argv[0] == "bug":
            raise RuntimeError("a bug keeps its traceback")
        raise KosmosError("config key 'x': fix it")

    _one_line(capsys, run_cli(main, ["a"]), "config key 'x'")
    with pytest.raises(KosmosError):
        run_cli(main, ["a", "--debug"])
    monkeypatch.setenv("KOSMOS_DEBUG", "1")
    with pytest.raises(KosmosError):
        run_cli(main, ["a"])
    monkeypatch.delenv("KOSMOS_DEBUG")
    with pytest.raises(RuntimeError):
        run_cli(main, ["bug"])
    assert run_cli(lambda argv: {"data": 1}, []) == 0 and run_cli(lambda argv: 3, []) == 3


def test_summary_with_a_missing_config_is_one_line(capsys, tmp_path):
    from kosmos.summary import main

    _one_line(capsys, run_cli(main, [str(tmp_path / "nope.yaml")]), "nope.yaml")


def test_weights_that_do_not_fit_are_one_line(capsys, tmp_path, tiny_tokenizer):
    from kosmos.generate import main

    ckpt = checkpoint_dir(tmp_path, tiny_tokenizer.path, tiny_model())
    line = _one_line(capsys, run_cli(main, ["--checkpoint", str(ckpt), "decoder.layers=3"]),
                     "model.safetensors", "do not fit")
    assert "decoder.layers.2" in line  # the missing layer is named


def test_a_damaged_sharded_checkpoint_for_inference_is_one_line_naming_the_file(capsys, tmp_path):
    """A sharded checkpoint is read shard by shard for inference (kosmos.weights.load_sharded_weights); one
    whose metadata is damaged is one line naming it, from generation and evaluation alike."""
    import kosmos.eval
    from kosmos.generate import main

    ckpt = tmp_path / "step_00000010"
    (ckpt / "sharded").mkdir(parents=True)
    (ckpt / "sharded" / ".metadata").write_bytes(b"")
    (ckpt / "config.yaml").write_text(TINY.read_text())
    _one_line(capsys, run_cli(main, ["--checkpoint", str(ckpt)]), "sharded/.metadata: unreadable")
    _one_line(capsys, kosmos.eval.main(["loss", "--checkpoint", str(ckpt)]), "sharded/.metadata: unreadable")


@pytest.mark.slow
def test_offline_clip_weights_are_one_line_from_the_commands(tmp_path, tiny_run):
    """No network (HF_HUB_OFFLINE=1, nothing cached): `vision.pretrained=openai` fails as one line in
    generation and in training, where it used to end a 106-line traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    # ViT-B-32's own tower: weights that fit
    clip = ["vision.pretrained=openai", "vision.model_name=ViT-B-32", "vision.width=null",
            "vision.layers=null", "vision.patch_size=null", "vision.head_width=null"]
    for cmd in ([sys.executable, "-m", "kosmos.generate", "--config", str(TINY), *clip],
                [sys.executable, str(ROOT / "train_kosmos.py"), "--config", str(TINY), "--no-progress",
                 *tiny_run, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", *clip]):
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, p.stderr[-3000:]
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "vision.pretrained='openai'" in errors[0] and "local file" in errors[0], \
            p.stderr[-3000:]


def test_usage_lines_name_the_command_that_was_run(monkeypatch, capsys):
    from kosmos.errors import command_name
    from kosmos.generate import main

    monkeypatch.setattr(sys, "argv", ["/venv/bin/kosmos-eval", "run"])
    assert command_name("kosmos.eval", "run") == "kosmos-eval run"
    monkeypatch.setattr(sys, "argv", ["/src/kosmos/generate.py", "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m kosmos.generate ")  # not `generate.py`


@pytest.mark.parametrize("script, main, usage", [
    ("kosmos-tokenizer", "kosmos.tokenizer.build:main", "kosmos-tokenizer "),
    ("kosmos-convert-captions", "kosmos.data_tools.captions:main", "kosmos-convert-captions "),
    ("kosmos-convert-interleaved", "kosmos.data_tools.interleaved:main", "kosmos-convert-interleaved "),
    ("kosmos-convert-text", "kosmos.data_tools.text:main", "kosmos-convert-text "),
    ("kosmos-urls", "kosmos.data_tools.urls:main", "kosmos-urls "),
    ("kosmos-verify", "kosmos.data_tools.verify:main", "kosmos-verify "),
    ("kosmos-inspect", "kosmos.data_tools.inspect:main", "kosmos-inspect "),
    ("kosmos-consolidate", "kosmos.cli:consolidate", "kosmos-consolidate [-h]"),  # not `... consolidate`
    ("kosmos-eval", "kosmos.eval:main", "kosmos-eval score "),
])
def test_every_console_script_names_itself_in_its_usage_line(script, main, usage, monkeypatch, capsys):
    """Each console script of pyproject.toml, run with --help, names itself (some said `python -m ...`)."""
    import importlib

    module, func = main.split(":")
    argv = ["score", "--help"] if script == "kosmos-eval" else ["--help"]
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}", *argv])
    with pytest.raises(SystemExit) as e:
        getattr(importlib.import_module(module), func)(argv)
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {usage}")
