"""Tiny webdataset shards made in the test, in the formats of DESIGN.md."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

WORDS = "a red blue green small large circle square triangle on the left right top bottom of image".split()


def jpeg(seed: int, size: int = 40) -> bytes:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    ImageDraw.Draw(im).ellipse((5, 5, 25, 25), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """samples: {"__key__": key, ext: bytes, ...} each."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def text_shards(root: Path, n_shards: int, per_shard: int, words=(3, 30), seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        samples = [{"__key__": f"t{s:02d}_{i:03d}", "txt": sentence(rng, rng.randint(*words)).encode()}
                   for i in range(per_shard)]
        paths.append(str(write_tar(root / f"text-{s:06d}.tar", samples)))
    return paths


def caption_shards(root: Path, n_shards: int, per_shard: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        samples = [{"__key__": f"c{s:02d}_{i:03d}", "jpg": jpeg(s * 1000 + i),
                    "txt": sentence(rng, rng.randint(3, 12)).encode()} for i in range(per_shard)]
        paths.append(str(write_tar(root / f"cap-{s:06d}.tar", samples)))
    return paths


def interleaved_shards(root: Path, n_shards: int, per_shard: int, seed: int = 0, max_images: int = 3,
                       words=(5, 40)) -> list[str]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            sample: dict = {"__key__": f"d{s:02d}_{i:03d}"}
            segments = []
            for j in range(rng.randint(1, max_images)):
                segments.append({"text": sentence(rng, rng.randint(*words))})
                segments.append({"image": f"img{j}.jpg"})
                sample[f"img{j}.jpg"] = jpeg(rng.randrange(10**6))
            segments.append({"text": sentence(rng, rng.randint(*words))})
            sample["json"] = json.dumps({"segments": segments, "meta": {}}).encode()
            samples.append(sample)
        paths.append(str(write_tar(root / f"doc-{s:06d}.tar", samples)))
    return paths
