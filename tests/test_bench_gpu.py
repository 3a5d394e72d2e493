"""bench/gpu.py, the prepared GPU check: `--tiny` runs every section on the CPU (so the GPU run cannot rot), a
section that fails says so in its rows while the others still run, and without CUDA the full run declines in
one line. No timings are asserted: speed is what the script reports."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

ALLOWED_ON_CPU = (
    "no dense peak known for cpu",  # MFU: no bf16 peak for a CPU
    "skipped: --tiny (inductor",  # decoder.compile: minutes of compiling on 2 cores
)
"""The reasons a --tiny row may give instead of a number."""


def _run(tmp_path, *args: str):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "bench.gpu", "--tiny", "--out", str(out), *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text()) if out.is_file() else None
    return res, report


@pytest.mark.slow
def test_tiny_measures_every_section(tmp_path):
    """Every row is a finite positive number, or skipped for a reason allowed on a CPU; the table is printed
    and the JSON says where it ran."""
    res, report = _run(tmp_path)
    log = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 0, log
    assert report is not None, log
    assert {"device", "torch", "cuda", "config", "date", "rows", "elapsed_s"} <= set(report)
    assert report["config"].endswith("tiny.yaml") and report["tiny"]
    rows = report["rows"]
    assert {r["what"] for r in rows} == {
        "train step", "train MFU", "train peak memory", "planned peak memory", "optimizer step",
        "vision tower forward", "generation, KV cache", "generation, ms per token", "evaluation", "loader"}
    for r in rows:
        if r["status"] == "ok":
            assert math.isfinite(r["value"]) and r["value"] > 0, r
        else:
            assert r["status"] == "skipped" and r["note"].startswith(ALLOWED_ON_CPU), r
    measured = {(r["what"], r["setting"]) for r in rows if r["status"] == "ok"}
    compiled = {(r["what"], r["setting"]) for r in rows if "compile on" in r["setting"]}
    mfu = {(r["what"], r["setting"]) for r in rows if r["what"] == "train MFU"}
    assert measured == {(r["what"], r["setting"]) for r in rows} - compiled - mfu  # every other row measured
    # the planner's peak is beside each measured one
    for r in rows:
        if r["what"] == "train peak memory" and r["status"] == "ok":
            assert "planner" in r["note"] and "measured / planned" in r["note"], r
    assert "| what | setting | value | unit | note |" in res.stdout
    assert all(f"| {r['what']} | {r['setting']} |" in res.stdout for r in rows)


@pytest.mark.slow
def test_the_compiled_train_step_runs_on_the_cpu(tmp_path):
    """decoder.compile=true (inductor's C++ on the CPU; Triton on a GPU) with activation checkpointing off
    and on, the 8-bit optimizer and the planner beside: both configurations measured."""
    res, report = _run(tmp_path, "--compile", "--sections", "compiled")
    log = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 0, log
    rows = [r for r in report["rows"] if "compile on" in r["setting"] and r["what"] != "train MFU"]
    assert len(rows) == 4 and all(r["status"] == "ok" and r["value"] > 0 for r in rows), rows


@pytest.mark.slow
def test_a_failing_section_says_so_and_the_others_still_run(tmp_path):
    """A fault planted in the vision section: its row holds the error, the loader after it is measured,
    the sections not selected say so, and the exit status is 1."""
    res, report = _run(tmp_path, "--sections", "vision,loader", "--fault", "vision")
    log = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 1, log
    rows = {(r["what"], r["setting"]): r for r in report["rows"]}
    vision = rows[("vision tower forward", "frozen, inference")]
    assert vision["status"] == "error" and "a fault planted in vision" in vision["note"], vision
    loaders = [r for r in report["rows"] if r["what"] == "loader"]
    assert loaders and all(r["status"] == "ok" and r["value"] > 0 for r in loaders), loaders
    others = [r for r in report["rows"] if r["what"] not in ("loader", "vision tower forward")]
    assert others and all(r["status"] == "skipped" and r["note"].startswith("skipped: not selected")
                          for r in others), others
    assert "error: RuntimeError: a fault planted in vision" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check itself")
def test_without_cuda_the_full_check_declines_in_one_line(capsys):
    """`make bench` on a CPU machine runs every bench/ script: the full-size check says it needs a GPU and
    how to run --tiny, and exits 0."""
    from bench.gpu import main

    assert main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "needs one GPU" in out[0] and "--tiny" in out[0]


@pytest.mark.slow
def test_a_section_out_of_its_time_is_stopped_and_the_next_runs(tmp_path):
    """A hang planted in the vision section: it is stopped when its share of the budget is over (SIGALRM), its
    row says so, and the loader after it is measured in the time left."""
    res, report = _run(tmp_path, "--budget-s", "60", "--sections", "vision,loader", "--stall", "vision")
    log = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 0, log
    rows = {(r["what"], r["setting"]): r for r in report["rows"]}
    vision = rows[("vision tower forward", "frozen, inference")]
    assert vision["status"] == "skipped" and vision["note"].startswith("skipped: budget") \
        and "ran out" in vision["note"], vision
    loaders = [r for r in report["rows"] if r["what"] == "loader"]
    assert loaders and all(r["status"] == "ok" and r["value"] > 0 for r in loaders), loaders
