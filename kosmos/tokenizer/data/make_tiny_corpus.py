"""Regenerate ``tiny_corpus.txt``: the small corpus the tests and the demo build a tokenizer from.

    python kosmos/tokenizer/data/make_tiny_corpus.py

The corpus is ``multilingual.txt`` (hand-written sentences in many scripts, emoji, code, numbers)
followed by English captions about coloured shapes (the demo trains on such captions) and simple
English sentences, generated from templates with a fixed seed so the output is byte-identical on
every run. No network, no external data.
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
N_CAPTIONS = 2200
N_SENTENCES = 1200

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey"]
SHAPES = ["circle", "square", "triangle", "star", "rectangle", "hexagon", "ellipse", "diamond", "cross"]
PLURAL = {"cross": "crosses"}
SIZES = ["", "", "small ", "large ", "tiny ", "big "]
POSITIONS = [
    "on the left", "on the right", "at the top", "at the bottom", "in the middle", "in the centre",
    "at the top left", "at the top right", "at the bottom left", "at the bottom right",
    "near the edge", "in the corner",
]
RELATIONS = ["above", "below", "next to", "to the left of", "to the right of", "inside", "behind", "beside"]
BACKGROUNDS = ["a white background", "a black background", "a grey background", "a blue background"]
NUMBERS = ["two", "three", "four", "five", "six"]

SUBJECTS = [
    "The cat", "A dog", "My friend", "The teacher", "Our neighbour", "The child", "A bird", "The farmer",
]
VERBS = ["walked to", "looked at", "painted", "found", "cleaned", "visited", "opened", "carried"]
OBJECTS = [
    "the old house", "a wooden box", "the blue door", "the garden", "a small boat", "the red car",
    "the library", "a basket of apples", "the window", "the bridge over the river",
]
TIMES = ["yesterday", "this morning", "on Monday", "after lunch", "in the evening", "last summer", "at noon"]


def shape(rng: random.Random) -> str:
    """One shape with an article, e.g. "a small red circle"."""
    size = rng.choice(SIZES)
    colour = rng.choice(COLOURS)
    article = "an" if (size or colour)[0] in "aeiou" else "a"
    return f"{article} {size}{colour} {rng.choice(SHAPES)}"


def shapes(rng: random.Random) -> str:
    """Several shapes of one kind, e.g. "three green triangles"."""
    name = rng.choice(SHAPES)
    return f"{rng.choice(NUMBERS)} {rng.choice(SIZES)}{rng.choice(COLOURS)} {PLURAL.get(name, name + 's')}"


def caption(rng: random.Random) -> str:
    """A short caption of a synthetic image of shapes."""
    kind = rng.randrange(6)
    if kind == 0:
        return f"{shape(rng)} {rng.choice(POSITIONS)}"
    if kind == 1:
        return f"{shape(rng)} {rng.choice(RELATIONS)} {shape(rng)}"
    if kind == 2:
        return f"{shapes(rng)} {rng.choice(POSITIONS)}"
    if kind == 3:
        return f"{shape(rng)} {rng.choice(POSITIONS)} on {rng.choice(BACKGROUNDS)}"
    if kind == 4:
        return f"there is {shape(rng)} {rng.choice(POSITIONS)} and {shape(rng)} {rng.choice(POSITIONS)}"
    text = f"{shape(rng)} {rng.choice(POSITIONS)}"
    return text[0].upper() + text[1:] + "."


def sentence(rng: random.Random) -> str:
    """A simple English sentence."""
    text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TIMES)}"
    if rng.random() < 0.3:
        text += f", and then {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    return text + rng.choice([".", ".", ".", "!", "?"])


def make_corpus() -> str:
    """The whole corpus as one string (ends with a newline)."""
    rng = random.Random(SEED)
    lines = (HERE / "multilingual.txt").read_text(encoding="utf-8").splitlines()
    lines += [caption(rng) for _ in range(N_CAPTIONS)]
    lines += [sentence(rng) for _ in range(N_SENTENCES)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    out = HERE / "tiny_corpus.txt"
    out.write_text(make_corpus(), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")
