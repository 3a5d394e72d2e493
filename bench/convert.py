"""Benchmark: images/s of the captions converter at 1 and 2 workers against a plain PIL loop.

The baseline decodes, resizes (shorter side 256, bicubic) and re-encodes (JPEG q90) the same files
in one process, the way a short script would. The converter does that and more (EXIF orientation,
filters, captions, tar writing, manifest); it decodes JPEGs at a reduced scale first (libjpeg DCT
scaling via ``Image.draft``, see ``ImageOptions.jpeg_draft_gap``), which is where its single-worker
speed comes from. The 2-worker figure includes starting the worker processes (spawn, ~0.3 s).
Both are measured in this run on the same files; the ratio is what to read.

    python bench/convert.py [--images 160]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = [(1024, 768), (800, 600), (768, 1024), (1280, 720), (640, 480)]


def make_inputs(folder: Path, n: int) -> list[Path]:
    """``n`` JPEGs (q90) at web-photo sizes made from assets/images, each with a caption sidecar."""
    from PIL import Image

    photos = sorted((ROOT / "assets" / "images").glob("*.jpg"))
    files = []
    for i in range(n):
        with Image.open(photos[i % len(photos)]) as im:
            img = im.convert("RGB").resize(SIZES[i % len(SIZES)], Image.Resampling.BILINEAR)
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        path.with_suffix(".txt").write_text(f"photo number {i}")
        files.append(path)
    return files


def plain_pil(files: list[Path], size: int = 256) -> float:
    """Seconds for a decode-resize-encode loop with plain PIL over ``files``."""
    from PIL import Image

    t0 = time.perf_counter()
    for path in files:
        with Image.open(path) as im:
            img = im.convert("RGB")
            w, h = img.size
            s = size / min(w, h)
            if s < 1:
                img = img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
    return time.perf_counter() - t0


def converter(src: Path, out: Path, workers: int, per_shard: int) -> float:
    """Seconds for ``convert_captions`` (folder format) over ``src``, worker start-up included."""
    from kosmos.data_tools.captions import convert_captions
    from kosmos.data_tools.conversion import ShardOptions

    t0 = time.perf_counter()
    m = convert_captions("folder", src, out, shard_options=ShardOptions(
        output=out, samples_per_shard=per_shard, workers=workers, progress=False))
    dt = time.perf_counter() - t0
    assert m["totals"]["skipped"] == 0, m["skipped"]
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=160, help="images to convert (default 160)")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs each (default 2)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        files = make_inputs(src, a.images)
        n = len(files)
        sizes = "/".join(f"{w}x{h}" for w, h in SIZES)
        print(f"bench/convert.py: {n} JPEG q90 photos {sizes} -> shorter side 256, "
              f"JPEG q90; {os.cpu_count()} CPUs")
        base = min(plain_pil(files) for _ in range(a.repeats))
        print(f"  plain PIL decode-resize-encode loop : {n / base:7.1f} images/s")
        for workers in (1, 2):
            times = []
            for r in range(a.repeats):
                with contextlib.redirect_stdout(io.StringIO()):
                    times.append(converter(src, tmp / f"out{workers}-{r}", workers, per_shard=max(1, n // 8)))
            t = min(times)
            label = f"captions converter, {workers} worker{'s' if workers > 1 else ' '}"
            print(f"  {label}     : {n / t:7.1f} images/s"
                  f"  ({base / t:.2f}x plain PIL)")


if __name__ == "__main__":
    main()
