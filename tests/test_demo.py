"""`make demo` learns: scripts/demo.py end to end on a fresh folder (tokenizer, shapes, the three converters,
`accelerate launch` training of configs/tiny.yaml, generation and the evaluation harness), and the trained
toy names the colour, shape and place of fresh shapes it has never seen.

The bounds are the goal set for the demo (44/48 exact) and sit below its figures: seed 0 on two threads
(what `make demo` and this test run) 48/48 exact; one thread, seeds 0-5: exact 48, 46, 47, 48, 48, 48
(shape 46 at least, place 47, colour 48; another machine's arithmetic is another draw). A change that stops
the tower from learning shapes or places fails here (without the document mask the demo gave 41 at seed 0
in 800 steps; tiny.yaml as it is, a frozen random tower, shape 30/48, chance 16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

AT_LEAST = {"exact": 44, "colour": 46, "shape": 44, "place": 44}  # of 48


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
    assert all(hits[k] >= least for k, least in AT_LEAST.items()), hits
    assert "python -m kosmos.serve" in r.stdout  # it ends with the command that serves its checkpoint
