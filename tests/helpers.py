"""Helpers shared by the tests: tiny models, tiny shards made in the test, planted bad inputs.

    tiny models     configs/tiny.yaml with overrides, randomly initialised, CPU, fp32
    tiny shards     webdataset shards of the three source kinds, in the training format
    converter I/O   real photos from assets/images, planted bad files, reading converter output back

Imported as `from tests.helpers import ...` (the repository root is on pytest's path).
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from kosmos.config import Config, load_config
from kosmos.model import Kosmos

# ----------------------------------------------------------------------------- tiny models

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def free_port() -> str:
    """A free TCP port on loopback (a rendezvous, a local server), as a string."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def tiny_config(*overrides: str) -> Config:
    return load_config(TINY, list(overrides))


def tiny_model(*overrides: str, seed: int = 0) -> Kosmos:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "randomly initialised" is expected here
        return Kosmos(tiny_config(*overrides))


def random_images(model: Kosmos, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = model.vision.image_size
    return torch.randint(0, 256, (n, 3, s, s), generator=g, dtype=torch.uint8)  # the model normalises pixels


def make_row(model: Kosmos, text_before: int, n_images: int, text_after: int, seed: int = 0,
             image_id: int = 4, image_end_id: int = 5, pad_id: int = 0):
    """ids and image mask for `<s> text <image> slots </image> ... text`: a single row (1, L)."""
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.decoder.vocab_size
    n = model.num_latents

    def text(k):
        return torch.randint(10, V, (k,), generator=g).tolist()

    ids, mask = [2] + text(text_before), [False] * (1 + text_before)
    for _ in range(n_images):
        ids += [image_id] + [pad_id] * n + [image_end_id]
        mask += [False] + [True] * n + [False]
    ids += text(text_after)
    mask += [False] * text_after
    return torch.tensor([ids]), torch.tensor([mask])


def checkpoint_dir(run: Path, tokenizer_dir: Path, model: Kosmos, step: int = 7) -> Path:
    """A checkpoint as the trainer writes it, for inference: weights, the resolved config, the tokenizer."""
    import shutil

    from safetensors.torch import save_model

    from kosmos.config import save_config

    ckpt = run / "checkpoints" / f"step_{step:08d}"
    (ckpt / "tokenizer").mkdir(parents=True)
    save_model(model, str(ckpt / "model.safetensors"))
    save_config(model.cfg, ckpt / "config.yaml")
    (ckpt / "trainer_state.json").write_text("{}")
    for f in Path(tokenizer_dir).iterdir():
        shutil.copy(f, ckpt / "tokenizer" / f.name)
    return ckpt


# ----------------------------------------------------------------------------- tiny shards

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


def _make_shards(root: Path, name: str, n_shards: int, per_shard: int, seed: int, sample) -> list[str]:
    """`n_shards` tars `root/NAME-000000.tar`, ... of `per_shard` samples each, sample i of shard s being
    `sample(rng, s, i)` (one RNG seeded with `seed`, drawn in that order)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    return [str(write_tar(root / f"{name}-{s:06d}.tar", [sample(rng, s, i) for i in range(per_shard)]))
            for s in range(n_shards)]


def text_shards(root: Path, n_shards: int, per_shard: int, words=(3, 30), seed: int = 0) -> list[str]:
    def sample(rng, s, i):
        return {"__key__": f"t{s:02d}_{i:03d}", "txt": sentence(rng, rng.randint(*words)).encode()}

    return _make_shards(root, "text", n_shards, per_shard, seed, sample)


def instruction_shards(root, n_shards: int, per_shard: int, seed: int = 0) -> list[str]:
    """Text shards as `data_tools.text --format instructions` writes them: the templated text in KEY.txt,
    the prompt's length in KEY.json."""
    from data_tools.text import render_instruction

    def sample(rng, s, i):
        text, n = render_instruction(sentence(rng, rng.randint(2, 8)), sentence(rng, rng.randint(0, 4)),
                                     sentence(rng, rng.randint(1, 6)))
        return {"__key__": f"i{s:02d}_{i:03d}", "txt": text.encode(),
                "json": json.dumps({"prompt_chars": n, "style": "flat"}).encode()}

    return _make_shards(root, "inst", n_shards, per_shard, seed, sample)


def easy_text_shards(root: Path, n_shards: int, per_shard: int) -> list[str]:
    """Text that a model learns at once: one word, repeated."""
    root.mkdir(parents=True, exist_ok=True)
    doc = b" ".join([b"yes"] * 40)
    return [str(write_tar(root / f"easy-{s:06d}.tar", [{"__key__": f"e{s}_{i}", "txt": doc}
                                                        for i in range(per_shard)])) for s in range(n_shards)]


def caption_shards(root: Path, n_shards: int, per_shard: int, seed: int = 0,
                   captions: int = 1) -> list[str]:
    """Caption shards; with ``captions`` > 1, sample i has 1 + i % captions distinct captions, COCO-style:
    the first in KEY.txt, all of them in KEY.json's "captions"."""
    def sample(rng, s, i):
        caps = [sentence(rng, rng.randint(3, 12)) + (f" {j}" if captions > 1 else "")
                for j in range(1 + i % captions)]
        out = {"__key__": f"c{s:02d}_{i:03d}", "jpg": jpeg(s * 1000 + i), "txt": caps[0].encode()}
        if captions > 1:
            out["json"] = json.dumps({"captions": caps}).encode()
        return out

    return _make_shards(root, "cap", n_shards, per_shard, seed, sample)


def interleaved_shards(root: Path, n_shards: int, per_shard: int, seed: int = 0, max_images: int = 3,
                       words=(5, 40)) -> list[str]:
    def sample(rng, s, i):
        out: dict = {"__key__": f"d{s:02d}_{i:03d}"}
        segments = []
        for j in range(rng.randint(1, max_images)):
            segments.append({"text": sentence(rng, rng.randint(*words))})
            segments.append({"image": f"img{j}.jpg"})
            out[f"img{j}.jpg"] = jpeg(rng.randrange(10**6))
        segments.append({"text": sentence(rng, rng.randint(*words))})
        out["json"] = json.dumps({"segments": segments, "meta": {}}).encode()
        return out

    return _make_shards(root, "doc", n_shards, per_shard, seed, sample)


# ----------------------------------------------------------------------------- converter inputs and outputs

ASSETS = ROOT / "assets" / "images"
PHOTOS = sorted(ASSETS.glob("*.jpg"))


@lru_cache(maxsize=64)
def photo(i: int, size: tuple[int, int] = (120, 96), fmt: str = "JPEG") -> bytes:
    """A real photo from assets/images (index ``i`` modulo 16) resized to ``size``, encoded as ``fmt``."""
    with Image.open(PHOTOS[i % len(PHOTOS)]) as im:
        im = im.convert("RGB").resize(size)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def single_colour(size: tuple[int, int] = (100, 100)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


BAD_REASONS = ("corrupt_image", "empty_image", "decompression_bomb", "truncated_image", "image_too_small",
               "single_colour_image")


def bad_image(reason: str) -> bytes:
    """Bytes that ``normalize_image`` rejects with ``reason``."""
    if reason == "corrupt_image":
        return b"this is not an image at all" * 10
    if reason == "empty_image":
        return b""
    if reason == "decompression_bomb":
        return bomb_png()
    if reason == "truncated_image":
        data = photo(3, (200, 160))
        return data[: len(data) // 2]
    if reason == "image_too_small":
        return photo(4, (40, 30))
    if reason == "single_colour_image":
        return single_colour()
    raise KeyError(reason)


def shard_paths(folder: Path) -> list[str]:
    return [str(p) for p in sorted(Path(folder).glob("*.tar"))]


def read_wds(folder: Path) -> list[dict]:
    """All samples via plain ``webdataset.WebDataset`` (no shuffling), in shard order."""
    import webdataset as wds

    return list(wds.WebDataset(shard_paths(folder), shardshuffle=False, empty_check=False))


def read_tar(folder: Path) -> dict[str, dict[str, bytes]]:
    """All samples via ``tarfile``: {key: {ext: bytes}}; asserts deterministic member headers."""
    out: dict[str, dict[str, bytes]] = {}
    for p in shard_paths(folder):
        with tarfile.open(p) as tar:
            for m in tar:
                assert m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.isfile(), m
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {Path(p).name: Path(p).read_bytes() for p in shard_paths(folder)}


def image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


# ----------------------------------------------------------------------------- a loopback HTTP server


class ShardServer:
    """A loopback HTTP server over a folder, started in a thread by a test (`with ShardServer(root) as s`);
    `s.url("ok/x.tar")`. The first part of the path says how it answers:

        ok/NAME        the file, with HTTP range requests
        norange/NAME   the file, ignoring range requests (always 200 and the whole body)
        missing/NAME   404
        stall/NAME     headers and the first 100 bytes, then nothing until the server stops
        cut/NAME       the full Content-Length, but only the first half of the body, then the connection
                       closes
        flaky/NAME     the first request of each file like cut/, the next ones like ok/

    `requests` lists (path, Range header or None) of every request."""

    def __init__(self, root: Path):
        import http.server
        import threading

        self.root, self.requests, self.stop = Path(root), [], threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                mode, _, name = self.path.lstrip("/").partition("/")
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                path = server.root / name
                if mode == "missing" or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if mode == "flaky":
                    mode = "cut" if sum(p == self.path for p, _ in server.requests) == 1 else "ok"
                start = int(rng.split("=")[1].split("-")[0]) if rng and mode == "ok" else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Connection", "close")
                self.end_headers()
                if mode == "stall":
                    self.wfile.write(data[:100])
                    self.wfile.flush()
                    server.stop.wait(30)
                    return
                self.wfile.write(data[start:] if mode != "cut" else data[: len(data) // 2])
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
