"""A saved data position from elsewhere (hand-edited, damaged, another run's) is checked against its schema
and this run's sources before anything of it is used (kosmos.data.state): one error naming the file and the
field, or a warning for what may be absent."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import train_kosmos
from kosmos import checkpoint as ck

pytestmark = pytest.mark.slow  # trains a tiny run, then resumes from hand-edited copies of its checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def saved(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("state") / "run"
    args = ["--config", TINY, "--no-progress", *tiny_run, f"train.output_dir={out}", "train.max_steps=2",
            "data.text.shuffle_buffer=4"]
    train_kosmos.main(args)
    return out, args, ck.list_checkpoints(out)[-1]


def _stream(sd: dict, source: str = "text") -> dict:
    return next(iter(sd[source]["streams"].values()))


CASES = {  # edit of data_rank0.json -> words of the error
    "a string epoch": (lambda sd: _stream(sd).update(epoch="3"), "epoch: expected an integer >= 0, got '3'"),
    "a negative offset": (lambda sd: _stream(sd).update(offset=-5), "offset: expected an integer >= -1"),
    "a bad buffer position": (lambda sd: _stream(sd).update(buffer=[[-1, 2]]),
                              "buffer[0]: expected a sample"),
    "a missing RNG": (lambda sd: _stream(sd).pop("rng"), "rng: missing"),
    "a garbage RNG": (lambda sd: _stream(sd).update(rng=[3, [1, 2], None]), "rng: expected a Python random"),
    "a list for the streams": (lambda sd: sd["text"].update(streams=[1]), "streams: expected an object"),
    "stream 99": (lambda sd: sd["text"]["streams"].update({"99": _stream(sd)}), "stream '99' is not one of"),
    "a string mixture step": (lambda sd: sd["_mixture"].update(steps="2"),
                              "_mixture.steps: expected an integer"),
    "k 99": (lambda sd: _stream(sd).update(k=99), "k: 99 is past the source's"),
    "a changed kind": (lambda sd: sd["text"].update(kind="captions"), "kind: saved for a captions source"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_data_position_is_one_error_naming_file_and_field(saved, tmp_path, case, capsys):
    """Before: tracebacks (a string epoch or step, a bad buffer position, a missing or garbage RNG, a list for
    an object, a string mixture step) or silently accepted (stream 99, a negative offset, k 99, a changed
    kind)."""
    out, args, ckpt = saved
    bad = tmp_path / "step_bad"
    import shutil

    shutil.copytree(ckpt, bad)
    sd = json.loads((bad / "data_rank0.json").read_text())
    edit, words = CASES[case]
    edit(sd)
    (bad / "data_rank0.json").write_text(json.dumps(sd))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_kosmos.main([*args, f"train.output_dir={run}", "train.max_steps=3", "--resume", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert str(bad / "data_rank0.json") in err[0] and words in err[0], err[0]


def test_a_negative_step_is_refused_and_a_missing_source_is_named(saved, tmp_path, capsys):
    out, args, ckpt = saved
    import shutil

    bad = tmp_path / "step_negative"
    shutil.copytree(ckpt, bad)
    state = json.loads((bad / "trainer_state.json").read_text())
    (bad / "trainer_state.json").write_text(json.dumps({**state, "step": -3}))
    with pytest.raises(SystemExit) as e:
        train_kosmos.main([*args, f"train.output_dir={tmp_path / 'r1'}", "--resume", str(bad)])
    assert e.value.code == 2 and "trainer_state.json.step: expected an integer >= 0, got -3" in \
        capsys.readouterr().err

    gone = tmp_path / "step_gone"  # a source whose position is absent: legitimately new, said in the log
    shutil.copytree(ckpt, gone)
    sd = json.loads((gone / "data_rank0.json").read_text())
    (gone / "data_rank0.json").write_text(json.dumps({k: v for k, v in sd.items() if k != "interleaved"}))
    run = tmp_path / "r2"
    assert train_kosmos.main([*args, f"train.output_dir={run}", "train.max_steps=3", "--resume", str(gone)]
                             )["step"] == 3
    log = (run / "train.log").read_text()
    assert "no data position for source interleaved: its data starts at the beginning" in log


def test_the_schema_accepts_what_the_trainer_writes(saved):
    from kosmos.data.state import check_data_state

    _, _, ckpt = saved
    sd = json.loads((ckpt / "data_rank0.json").read_text())
    assert check_data_state(copy.deepcopy(sd), "x", {n: (n, sd[n]["shards"]) for n in
                                                      ("text", "captions", "interleaved")}) == []
