"""Helpers for the data_tools tests: tiny images, planted bad files, and reading shards back."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from functools import lru_cache
from pathlib import Path

from PIL import Image

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "images"
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
