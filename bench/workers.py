"""DataLoader worker start-up: the time from asking a source for its first micro-batch to having it.

    python bench/workers.py [--start forkserver,fork] [--repeats 5] [--ballast-mb 0]

Makes the shards of configs/tiny.yaml's three sources (generated shapes with captions, MMC4-style documents
about them, short text documents: as tests/conftest.py's tiny_run) and a tiny tokenizer, then per start
method (`kosmos.data.workers.START_METHOD`), each in a fresh Python process:
  source    a text source with 2 workers: `next(loader)` on a new SourceLoader, then `close()`; the first
            loader of the process (cold: for forkserver the server's start and preload included) and the
            best and median of the next `--repeats` (warm)
  tiny      the mixture of configs/tiny.yaml (captions, text, interleaved; 1 worker each): one micro-batch
            of every source, one source after the other as a training step asks for them; cold and warm
Shuffle buffers are off (`data.<source>.shuffle_buffer=0`): filling them costs the same under either start
method (captions: 200 decoded images, seconds) and would hide the start-up.
Each of the four is measured in a process of its own, which first imports kosmos.training, as a training
process has (torch, torchvision). With `--ballast-mb N` the process then fills N MiB (a model's weights and
optimizer state, say): a fork copies the page tables of all of it, a forkserver's fork does not. With
`--lead S` the forkserver is started S seconds before the first loader, as training starts it before it
builds the model (kosmos.training): the cold start-up then shows what is left of the server's imports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_data(root: Path) -> list[str]:
    """Shards and tokenizer for configs/tiny.yaml; the config overrides that point at them."""
    import io
    import random

    from kosmos.data_tools.shapes import toy_shards
    from kosmos.tokenizer import TINY_CORPUS
    from kosmos.tokenizer.build import build_tokenizer

    build_tokenizer([TINY_CORPUS], root / "tok", 1000, character_coverage=0.995, quiet=True)
    toy_shards(root)  # shapes, converted into caption and interleaved shards
    words = TINY_CORPUS.read_text(encoding="utf-8").split()
    rng = random.Random(0)
    (root / "text").mkdir()
    for s in range(4):
        with tarfile.open(root / "text" / f"text-{s:06d}.tar", "w") as tar:
            for i in range(200):
                data = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30))).encode()
                info = tarfile.TarInfo(f"{s:03d}{i:05d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return [*(f"data.{s}.shuffle_buffer=0" for s in ("captions", "text", "interleaved")),
            f"tokenizer.path={root / 'tok'}", f"data.captions.shards=[{root / 'captions'}]",
            f"data.interleaved.shards=[{root / 'interleaved'}]", f"data.text.shards=[{root / 'text'}]"]


def measure(start: str, what: str, overrides: list[str], repeats: int, ballast_mb: int, lead: float) -> dict:
    """In this process: the cold and warm start-up times of `what`, "source" or "tiny"."""
    import torch

    import kosmos.training  # noqa: F401  (what a training process has imported: torch, torchvision, ...)
    from kosmos.config import load_config
    from kosmos.data import workers
    from kosmos.data.mixture import build_loader, build_mixture
    from kosmos.sequence import SequenceEncoder

    workers.START_METHOD = start
    ballast = torch.ones(ballast_mb * 2**18) if ballast_mb else None  # float32: 4 bytes, touched
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*overrides, "data.text.workers=2"])
    encoder = SequenceEncoder.from_config(cfg)

    def source() -> float:
        loader = build_loader(cfg, "text", encoder)
        t0 = time.perf_counter()
        next(loader)
        t = time.perf_counter() - t0
        loader.close()
        return t

    def tiny() -> float:
        mixture = build_mixture(load_config(ROOT / "configs" / "tiny.yaml", overrides), encoder)
        t0 = time.perf_counter()
        for loader in mixture.loaders.values():
            next(loader)
        t = time.perf_counter() - t0
        mixture.close()
        return t

    run = source if what == "source" else tiny
    if lead:
        workers.start_worker_server()
        time.sleep(lead)
    out = {"cold": run(), "warm": [run() for _ in range(repeats)]}
    del ballast
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", default="forkserver,fork", help="start methods to compare, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ballast-mb", type=int, default=0, help="MiB the measuring process holds (a model)")
    ap.add_argument("--lead", type=float, default=0, help="seconds the forkserver starts before the loaders")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # START:WHAT: measure in this process, print JSON
    ap.add_argument("--overrides", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        start, what = args.child.split(":")
        print(json.dumps(measure(start, what, json.loads(args.overrides), args.repeats, args.ballast_mb,
                                 args.lead)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        overrides = make_data(Path(tmp))
        results = {}
        for what in ("source", "tiny"):
            for start in args.start.split(","):
                res = subprocess.run([sys.executable, __file__, "--child", f"{start}:{what}", "--overrides",
                                      json.dumps(overrides), "--repeats", str(args.repeats),
                                      "--ballast-mb", str(args.ballast_mb), "--lead", str(args.lead)],
                                     capture_output=True, text=True, check=True, cwd=ROOT)
                results[start, what] = json.loads(res.stdout.strip().splitlines()[-1])
    held = f"; each process holding {args.ballast_mb} MiB" if args.ballast_mb else ""
    held += f"; forkserver started {args.lead:g} s before" if args.lead else ""
    print(f"worker start-up, time to the first micro-batch (cold: the first loader of the process; "
          f"warm: best and median of the {args.repeats} after it){held}")
    labels = {"source": "text source, 2 workers", "tiny": "configs/tiny.yaml, 3 sources x 1"}
    for (start, what), r in results.items():
        print(f"  {labels[what]:34s} {start:10s} cold {r['cold']:6.2f} s   warm best {min(r['warm']):6.2f} s"
              f"   median {statistics.median(r['warm']):6.2f} s")


if __name__ == "__main__":
    main()
