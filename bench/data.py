"""Data pipeline throughput against plain JPEG decoding of the same shards, and padding on captions.

    python bench/data.py [--images 1000] [--max-len 2048] [--latents 64] [--sides 256,224]

Makes caption shards of square JPEGs of each side in `--sides` (random crops of the shipped photos,
captions of 5-25 words): 256 px as the converters store by default (the loader resizes them), and
pre-sized to the tower's 224 (`--image-size 224 --crop center` at conversion: the loader only decodes).
Then, per side, in one process (= one DataLoader worker), alternately `--repeats` times (fastest of each):
  baseline  read the tars and decode every JPEG with PIL (no resize, no tokenizer, no packing)
  pipeline  the training path: read, decode, CLIP resize/crop, tokenize, pack into rows of max_len
and prints packed rows/s, images/s, their ratio to the baseline, and the padding fraction (goal < 5%).
Also the pipeline in one DataLoader worker process, its micro-batches handed to this process as training
gets them (shared memory): what a worker delivers, IPC included (on 2 cores the two processes compete).
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("a an the red green blue yellow small large round square cat dog person street car tree sky "
         "building window table cup plate of on in with next to near under over standing sitting").split()


def shipped_photos() -> list:
    """The photos in assets/images, as RGB PIL images."""
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted((ROOT / "assets" / "images").glob("*.jpg"))]


def photo_crop(rng: random.Random, photos: list, side: int):
    """A random square crop of one of `photos` (at least half its shorter side), resized to `side` px."""
    im = rng.choice(photos)
    w, h = im.size
    c = rng.randint(min(w, h) // 2, min(w, h))
    x, y = rng.randint(0, w - c), rng.randint(0, h - c)
    return im.crop((x, y, x + c, y + c)).resize((side, side))


def make_shards(out: Path, n_images: int, per_shard: int = 100, seed: int = 0, side: int = 256) -> list[str]:
    rng = random.Random(seed)
    photos = shipped_photos()
    paths = []
    for s in range(0, n_images, per_shard):
        path = out / f"cap{side}-{s // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(s + per_shard, n_images)):
                buf = io.BytesIO()
                photo_crop(rng, photos, side).save(buf, format="JPEG", quality=90)
                cap = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))).encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", cap)):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def baseline(paths: list[str]) -> tuple[int, float]:
    from PIL import Image

    n, t0 = 0, time.perf_counter()
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                        im.convert("RGB").load()
                    n += 1
    return n, time.perf_counter() - t0


def pipeline(paths, tok, max_len, latents, size) -> tuple[int, int, int, float]:
    from kosmos.config import DataConfig, SourceConfig
    from kosmos.data import SourceDataset  # imported before the clock starts
    from kosmos.sequence import SequenceEncoder

    source = SourceConfig(kind="captions", micro_batch_size=4, workers=0, shuffle_buffer=0,
                          max_tokens=DataConfig().captions.max_tokens)  # the training default
    ds = SourceDataset(source, paths, SequenceEncoder(tok, latents, size), max_len=max_len, infinite=False)
    rows = images = full_rows = full_real = 0
    t0 = time.perf_counter()
    batches = [b for b in ds if not b.get("empty")]
    elapsed = time.perf_counter() - t0
    for i, b in enumerate(batches):
        rows += b["input_ids"].shape[0]
        images += b["images"].shape[0]
        if i < len(batches) - 1:  # the last row of a finite pass is cut short; training never ends one
            full_rows += b["input_ids"].shape[0]
            full_real += int(b["n_real"])
    return rows, images, full_rows, full_real, elapsed


def through_worker(paths, tok, max_len, latents, size) -> float:
    """Images/s of the same pipeline in one DataLoader worker process, handed to this one as training gets
    them (shared memory), the first micro-batch (worker start-up) not counted."""
    return through_workers(paths, tok, max_len, latents, size)


def through_workers(paths, tok, max_len, latents, size, workers: int = 1,
                    seconds: float | None = None) -> float:
    """Images/s of the pipeline in `workers` DataLoader worker processes, handed to this one as training gets
    them (shared memory). Without `seconds`: one pass over the shards, the first micro-batch (worker
    start-up) not counted. With `seconds`: the shards read without end (as training reads them), the first
    micro-batch of every worker not counted, then the images delivered in a window of that many seconds."""
    from kosmos.config import SourceConfig
    from kosmos.data.stream import SourceDataset, SourceLoader
    from kosmos.sequence import SequenceEncoder

    source = SourceConfig(kind="captions", micro_batch_size=4, workers=workers, shuffle_buffer=0)
    ds = SourceDataset(source, paths, SequenceEncoder(tok, latents, size), max_len=max_len,
                       infinite=seconds is not None)
    loader = SourceLoader(ds)
    try:
        batches = iter(loader)
        for _ in range(workers if seconds is not None else 1):  # the workers' start-up
            next(batches)
        images, t0 = 0, time.perf_counter()
        for b in batches:
            images += b["images"].shape[0]
            if seconds is not None and time.perf_counter() - t0 >= seconds:
                break
        return images / (time.perf_counter() - t0)
    finally:
        loader.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--latents", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--sides", default="256,224", help="JPEG sides of the shards, one measurement each")
    ap.add_argument("--repeats", type=int, default=3, help="baseline and pipeline alternately, best of each")
    args = ap.parse_args(argv)
    sides = [int(x) for x in args.sides.split(",")]

    import torch

    import kosmos.data  # noqa: F401  (import cost kept out of the timings)
    from kosmos.image import decode_image

    decode_image((ROOT / "assets" / "images" / "chelsea.jpg").read_bytes())  # torchvision's import too

    torch.set_num_threads(1)  # as in a DataLoader worker
    from kosmos.tokenizer import TINY_CORPUS
    from kosmos.tokenizer.build import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_tokenizer([TINY_CORPUS], tmp / "tok", 1000, character_coverage=0.995, quiet=True)
        results = []
        for side in sides:
            paths = make_shards(tmp, args.images, side=side)
            baseline(paths)  # warm the page cache
            t_base = t_pipe = float("inf")
            for _ in range(args.repeats):  # alternating, fastest of each: less noise on a shared machine
                n_base, t = baseline(paths)
                t_base = min(t_base, t)
                rows, images, full_rows, real, t = pipeline(paths, tok, args.max_len, args.latents,
                                                            args.image_size)
                t_pipe = min(t_pipe, t)
            worker = max(through_worker(paths, tok, args.max_len, args.latents, args.image_size)
                         for _ in range(args.repeats))
            results.append((side, n_base / t_base, images / t_pipe, rows / t_pipe, worker))
    pad = 1 - real / (full_rows * args.max_len)
    print(f"data bench: {args.images} caption samples per side, rows of {args.max_len}, "
          f"{args.latents} slots/image, {args.image_size} px tower, one worker")
    for side, base_ips, ips, rps, worker in results:
        what = "pre-sized: decode only" if side == args.image_size else f"{side} px: resized"
        print(f"  {side} px JPEG shards ({what})")
        print(f"    baseline  plain JPEG decode        {base_ips:8.1f} images/s")
        print(f"    pipeline  decode+resize+tok+pack   {ips:8.1f} images/s   {rps:6.2f} rows/s")
        print(f"    ratio pipeline/baseline images/s   {ips / base_ips:8.2f}")
        print(f"    in a DataLoader worker             {worker:8.1f} images/s   "
              f"ratio {worker / base_ips:.2f} (hand-off to the main process included)")
    print(f"  padding fraction                     {pad:8.2%}   (goal < 5%; full micro-batches only)")
    # What training needs: the paper's mixture gives captions 5/12 of the tokens; a 1.6B model at 45% MFU
    # on one H100 trains about 50k tokens/s.
    need = 50_000 * 5 / 12 / (real / full_rows * rows / images)  # tokens/s / tokens per caption sample
    print(f"  one H100 at ~50k tok/s consumes      {need:8.1f} images/s of captions "
          f"(one worker gives {results[0][2]:.0f} at {results[0][0]} px)")


if __name__ == "__main__":
    main()
