"""`make demo` learns: scripts/demo.py end to end on a fresh folder (tokenizer, shapes, the three converters,
`accelerate launch` training of configs/tiny.yaml, generation and the evaluation harness), and the trained
toy names the colour, shape and place of fresh shapes it has never seen.

The bound is below the demo's own figure with a margin measured over seeds (README, "Quick start"; the
figures per seed are in scripts/demo.py's docstring): a change that stops the image pathway from learning
(the shape, the hard part, is at chance, 16/48, without it) fails here, a seed's noise does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXACT_AT_LEAST = 40  # of 48
EACH_AT_LEAST = 44  # colour, shape and place, each of 48


@pytest.mark.slow
def test_the_demo_names_colour_shape_and_place_of_fresh_shapes(tmp_path):
    out, figures = tmp_path / "demo_out", tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "scripts/demo.py", "--out", str(out), "--json", str(figures)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    hits = json.loads(figures.read_text())
    print("\n" + ", ".join(f"{k} {hits[k]}/{hits['of']}" for k in ("exact", "colour", "shape", "place")))
    assert hits["of"] == 48
    assert hits["exact"] >= EXACT_AT_LEAST, hits
    assert all(hits[k] >= EACH_AT_LEAST for k in ("colour", "shape", "place")), hits
    assert "python -m kosmos.serve" in r.stdout  # it ends with the command that serves its checkpoint
