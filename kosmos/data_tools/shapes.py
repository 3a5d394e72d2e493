"""A generated dataset whose captions depend on the image: a coloured shape at a position.

    python -m kosmos.data_tools.shapes --output shapes/ -n 500 [--size 96] [--seed 0] [--docs 100]

writes `shapes/images/NNNNN.png` with a `.txt` sidecar ("a red circle on the left") for
`python -m kosmos.data_tools.captions --format folder`, and with `--docs N` also `shapes/mmc4.jsonl`,
MMC4-style documents about several of those images, for
`python -m kosmos.data_tools.interleaved --format mmc4`.
Used by the demo and by the test that the image pathway learns: nothing in the caption can be guessed
without looking at the image.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
POSITIONS = tuple(PLACES)


def draw(colour: str, shape: str, position: str, size: int = 96, rng: random.Random | None = None):
    """A PIL image: a grey background and one shape of that colour in that half of the image."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    grey = rng.randint(90, 160)
    im = Image.new("RGB", (size, size), (grey, grey, grey))
    r = size // 6 + rng.randint(-2, 2)
    q = size // 4
    cx, cy = {"left": (q, 2 * q), "right": (3 * q, 2 * q),
              "top": (2 * q, q), "bottom": (2 * q, 3 * q)}[position]
    cx += rng.randint(-3, 3)
    cy += rng.randint(-3, 3)
    fill = COLOURS[colour]
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def caption(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} {PLACES[position]}"


def make_shapes(output: str | Path, n: int, size: int = 96, seed: int = 0, docs: int = 0) -> list[dict]:
    """Write n images with caption sidecars (and `docs` MMC4 documents); returns the (file, caption) list."""
    out = Path(output)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    items = []
    for i in range(n):
        c, s, p = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS)
        name = f"{i:05d}.png"
        draw(c, s, p, size, rng).save(img_dir / name)
        text = caption(c, s, p)
        (img_dir / f"{i:05d}.txt").write_text(text + "\n")
        items.append({"file": name, "caption": text})
    if docs:
        with open(out / "mmc4.jsonl", "w") as f:
            for d in range(docs):
                picks = rng.sample(items, k=rng.randint(1, 3))
                text_list, image_info = ["Here are some pictures of shapes."], []
                for item in picks:
                    image_info.append({"image_name": item["file"], "matched_text_index": len(text_list),
                                       "matched_sim": 0.3})
                    text_list.append(f"This one shows {item['caption']}.")
                text_list.append("That is all.")
                f.write(json.dumps({"text_list": text_list, "image_info": image_info,
                                    "url": f"doc{d}"}) + "\n")
    return items


def toy_shards(root: str | Path, n: int = 400, size: int = 64, docs: int = 60) -> None:
    """The tests' and benchmarks' small set: `n` shapes (`make_shapes`, seed 0) under root/shapes, converted
    into caption shards (root/captions) and MMC4-style interleaved shards (root/interleaved) of 100 samples
    each at `size` pixels, through the real converters."""
    from kosmos.data_tools import captions, interleaved

    root = Path(root)
    make_shapes(root / "shapes", n, size=size, seed=0, docs=docs)
    common = ["--no-progress", "--samples-per-shard", "100", "--image-size", str(size)]
    captions.main(["--format", "folder", "--input", str(root / "shapes" / "images"),
                   "--output", str(root / "captions"), *common])
    interleaved.main(["--format", "mmc4", "--input", str(root / "shapes" / "mmc4.jsonl"), "--images-root",
                      str(root / "shapes" / "images"), "--output", str(root / "interleaved"), *common])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", "-o", required=True, help="folder to write images/ (and mmc4.jsonl) into")
    ap.add_argument("-n", type=int, default=500, help="number of images (default 500)")
    ap.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs", type=int, default=0, help="also write this many MMC4-style documents")
    args = ap.parse_args(argv)
    items = make_shapes(args.output, args.n, args.size, args.seed, args.docs)
    print(f"wrote {len(items)} images to {Path(args.output) / 'images'}"
          + (f" and {args.docs} documents to {Path(args.output) / 'mmc4.jsonl'}" if args.docs else ""))


if __name__ == "__main__":
    main()
