"""Shared machinery of the shard converters (captions, interleaved, text).

One place for what the three converters have in common:

- ``normalize_image``: decode any image (EXIF orientation applied, every mode converted to RGB,
  transparency over white, 16-bit scaled), apply the paper's filters, resize so the shorter side
  is at most ``image_size`` (never upscaled) and encode as JPEG. Bad images raise ``Skip``.
- ``Item`` / ``Skip`` records that the converters' enumerators yield, and ``run_conversion``
  which de-duplicates keys, cuts the items into chunks, has worker processes turn each chunk
  into shard files, and writes ``manifest.json``.
- Shard writing with deterministic tar members (mtime 0, uid/gid 0, no user names) under a
  temporary name, renamed when complete.

Resume unit: the chunk. Valid inputs, in their sorted order, are cut into consecutive chunks of
``samples_per_shard`` inputs; chunk ``i`` becomes ``shard-{i:06d}-000.tar`` (and ``-001`` ...
when the bytes limit splits it). When all of a chunk's shards are renamed to their final names a
small state file ``.convert_state/chunk-{i:06d}.json`` records what it holds. A rerun skips every
chunk whose state file exists and whose shards are all present, and redoes the others, so an
interrupted run, run again, ends with exactly the shards of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kosmos.data.format import member_name

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
STATE_DIR = ".convert_state"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MAX_EXAMPLES = 10  # input names kept per skip reason in the manifest
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


class Skip(Exception):
    """An input (or one image of a document) that is dropped, with a short machine reason."""

    def __init__(self, reason: str, detail: str = "", image_skips: Counter | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.image_skips = image_skips or Counter()
        """Images of a dropped document that were skipped for their own reasons (still counted)."""


class ConversionError(Exception):
    """A problem with the command itself (unreadable input, unknown format, foreign output dir)."""


@dataclass
class Item:
    """One valid input of a converter: becomes one sample unless its handler raises ``Skip``.

    ``payload`` must be picklable: it travels to a worker process.
    """

    key: str
    source: str
    payload: Any


@dataclass
class Skipped:
    """An input rejected while enumerating (before any worker sees it)."""

    reason: str
    source: str


@dataclass
class ImageOptions:
    """How images are normalised and filtered."""

    image_size: int = 256
    """Resize so the shorter side is at most this (aspect kept, never upscaled); 0 keeps the size."""
    jpeg_quality: int = 90
    """JPEG quality of the re-encoded image."""
    min_image_size: int = 64
    """Drop images whose width or height is under this (the paper's 64x64 filter); 0 disables."""
    drop_single_colour: bool = True
    """Drop images of one single colour (the paper's filter)."""
    max_pixels: int = 89_478_485
    """Images with more pixels than this are decompression bombs and are skipped undecoded."""
    jpeg_draft_gap: float = 1.0
    """JPEGs are decoded at a reduced scale (libjpeg DCT scaling: 1/2, 1/4, 1/8) that leaves the shorter
    side at least ``jpeg_draft_gap * image_size``, then resized exactly. 1.0 is fastest (the DCT scaling is
    itself a proper low-pass); 2.0 is what ``Image.thumbnail`` does, a little closer to exact resampling at
    some cost in speed; 0 decodes at full size."""

    def __post_init__(self) -> None:
        if self.image_size < 0:
            raise ValueError(f"image_size must be >= 0, got {self.image_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.min_image_size < 0:
            raise ValueError(f"min_image_size must be >= 0, got {self.min_image_size}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0, got {self.max_pixels}")


@dataclass
class ShardOptions:
    """Where and how big the shards are."""

    output: Path
    samples_per_shard: int = 10_000
    """At most this many samples per shard (inputs are assigned to shards by this count)."""
    max_shard_bytes: int = 1_000_000_000
    """A shard is split into parts so that none exceeds this (a single larger sample stays whole)."""
    workers: int = 1
    """Worker processes; 1 converts in this process."""
    limit: int | None = None
    """Convert only the first N valid inputs."""
    progress: bool = True
    """Show a progress bar on a terminal."""
    overwrite: bool = False
    """Delete this tool's earlier output in the folder first instead of resuming it."""

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")


# --------------------------------------------------------------------------------------- keys


def sanitize_key(raw: str) -> str:
    """A webdataset-safe key: no dots or slashes (they would split the key), ASCII only."""
    key = _KEY_BAD.sub("_", str(raw)).strip("_")
    return key or "_"


def url_hashes(url: str) -> list[str]:
    """File stems under which an image downloaded from ``url`` may be stored (sha256, sha1, md5)."""
    b = url.encode("utf-8")
    return [hashlib.sha256(b).hexdigest(), hashlib.sha1(b).hexdigest(), hashlib.md5(b).hexdigest()]


# ------------------------------------------------------------------------------------- images


def _to_rgb(img):  # PIL.Image -> PIL.Image (RGB)
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        import numpy as np

        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 16-bit range -> 8-bit
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return img.convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
        mode = "RGBA"
    if mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "L" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX ...


def normalize_image(data: bytes, opts: ImageOptions) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Decode, filter, resize and re-encode one image.

    Returns ``(jpeg_bytes, (width, height) after resizing, (width, height) of the original)``.
    Raises ``Skip`` with reason ``empty_image``, ``corrupt_image``, ``truncated_image``,
    ``decompression_bomb``, ``image_too_small``, ``single_colour_image`` or ``unsupported_image``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise Skip("empty_image")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        width, height = img.size
        if width * height > opts.max_pixels:
            raise Skip("decompression_bomb", f"{width}x{height}")
        if opts.min_image_size and min(width, height) < opts.min_image_size:
            raise Skip("image_too_small", f"{width}x{height}")
        if opts.image_size and opts.jpeg_draft_gap and img.format == "JPEG":
            # Let libjpeg decode at a reduced scale that still leaves at least the target size
            # (times the gap): decoding and resizing get several times faster.
            scale = opts.jpeg_draft_gap * opts.image_size / min(width, height)
            if scale < 1:
                img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        img.load()
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the image
            pass
        img = _to_rgb(img)
    except Skip:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Skip("decompression_bomb", str(e)) from None
    except UnidentifiedImageError as e:
        raise Skip("corrupt_image", str(e)) from None
    except OSError as e:
        reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
        raise Skip(reason, str(e)) from None
    except (ValueError, TypeError, SyntaxError, IndexError, KeyError, EOFError) as e:
        raise Skip("unsupported_image", f"{type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a decoder bug must not stop a whole conversion
        raise Skip("corrupt_image", f"{type(e).__name__}: {e}") from None

    w, h = img.size
    if opts.image_size and min(w, h) > opts.image_size:
        s = opts.image_size / min(w, h)
        new = (max(opts.image_size, round(w * s)), opts.image_size) if w >= h else (
            opts.image_size, max(opts.image_size, round(h * s)))
        img = img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if opts.drop_single_colour:
        lo_hi = img.getextrema()
        if all(lo == hi for lo, hi in lo_hi):
            raise Skip("single_colour_image")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opts.jpeg_quality)
    return buf.getvalue(), img.size, (width, height)


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes are: a file, or a byte range of a tar member."""

    path: str
    offset: int = -1
    size: int = -1

    def read(self) -> bytes:
        """The image bytes; ``Skip('missing_image')`` when the file is gone or unreadable."""
        try:
            with open(self.path, "rb") as f:
                if self.offset < 0:
                    return f.read()
                f.seek(self.offset)
                return f.read(self.size)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise Skip("missing_image", self.path) from None
        except OSError as e:
            raise Skip("unreadable_image", f"{self.path}: {e}") from None


# --------------------------------------------------------------------------------- reading input


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict | Skip]]:
    """``(line number, record)`` for each line of a ``.jsonl``/``.jsonl.gz`` file.

    A line that is not UTF-8 or not a JSON object gives a ``Skip`` instead of the record.
    """
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield i, Skip("non_utf8_text")
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield i, Skip("malformed_json")
                continue
            yield i, rec if isinstance(rec, dict) else Skip("malformed_json")


def iter_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict | Skip]]:
    """``(row number, record)`` for each row of a CSV/TSV file with a header line."""
    import csv

    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for i, row in enumerate(reader):
            try:
                for v in row.values():
                    if isinstance(v, str):
                        v.encode("utf-8")
            except UnicodeEncodeError:
                yield i, Skip("non_utf8_text")
                continue
            if None in row:  # more fields than header columns
                yield i, Skip("malformed_row")
                continue
            yield i, row


def iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    """``(row number, record)`` for each row of a parquet file, read in batches."""
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            yield i, rec
            i += 1


TABLE_SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".parquet": "parquet",
                  ".csv": "csv", ".tsv": "tsv"}


def table_kind(path: Path) -> str | None:
    """``jsonl``, ``parquet``, ``csv`` or ``tsv`` from the file name, or None."""
    name = path.name.lower()
    for suffix, kind in TABLE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def iter_table(path: Path, kind: str | None = None) -> Iterator[tuple[int, dict | Skip]]:
    """Rows of a jsonl(.gz), parquet, csv or tsv file."""
    kind = kind or table_kind(path)
    if kind == "jsonl":
        return iter_jsonl(path)
    if kind == "parquet":
        return iter_parquet(path)
    if kind in ("csv", "tsv"):
        return iter_csv(path, "," if kind == "csv" else "\t")
    raise ConversionError(f"{path}: not a table (expected .jsonl, .jsonl.gz, .parquet, .csv or .tsv)")


def list_files(root: Path, accept: Callable[[Path], bool]) -> list[Path]:
    """Files under ``root`` (or ``root`` itself) that ``accept`` takes, sorted by relative path."""
    if root.is_file():
        return [root]
    out = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".") and accept(p)]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def check_readable(path: Path, what: str = "input", want_dir: bool | None = None) -> Path:
    """``path`` if it exists and is readable, else ``ConversionError`` (raised before any writing)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{what} {path} does not exist")
    if want_dir is True and not path.is_dir():
        raise ConversionError(f"{what} {path} is not a folder")
    if want_dir is False and not path.is_file():
        raise ConversionError(f"{what} {path} is not a file")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ConversionError(f"{what} {path} is not readable")
    return path


def decode_text(value: Any) -> str:
    """A str from a str/bytes field; ``Skip('non_utf8_text')`` for invalid UTF-8."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("non_utf8_text") from None
    if not isinstance(value, str):
        raise Skip("text_not_a_string", type(value).__name__)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Skip("non_utf8_text") from None
    return value


# --------------------------------------------------------------------------------- tar writing


def _tar_size(files: dict[str, bytes]) -> int:
    return sum(512 + (len(b) + 511) // 512 * 512 for b in files.values())


def _tar_file_size(members: int) -> int:
    """Size of a tar holding ``members`` bytes of headers+data: end blocks, padded to tarfile.RECORDSIZE."""
    return -(-(members + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@dataclass
class Sample:
    """What a handler makes of one item: the sample's files by extension, plus per-image counts."""

    files: dict[str, bytes]
    images: int = 0
    image_skips: Counter = field(default_factory=Counter)


Handler = Callable[[Item, Any], Sample]


def shard_name(chunk: int, part: int) -> str:
    return f"shard-{chunk:06d}-{part:03d}.tar"


def _chunk_state_path(output: Path, chunk: int) -> Path:
    return output / STATE_DIR / f"chunk-{chunk:06d}.json"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def convert_chunk(handler: Handler, ctx: Any, chunk: int, items: list[Item], output: str,
                  max_shard_bytes: int) -> dict:
    """Turn one chunk of items into its shard(s); runs in a worker process.

    Shards are written as ``NAME.tmp`` and renamed when complete; the chunk's state file is
    written last, so its presence means every shard of the chunk is final.
    """
    out = Path(output)
    skipped: Counter = Counter()
    image_skips: Counter = Counter()
    examples: dict[str, list[str]] = {}
    shards: list[dict] = []
    tar = None
    cur: dict = {}

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            tar = None
            cur["bytes"] = (out / (cur["name"] + ".tmp")).stat().st_size
            shards.append(dict(cur))

    for item in items:
        try:
            sample = handler(item, ctx)
        except Exception as e:  # noqa: BLE001 - one bad input never stops the run; it is counted
            reason = e.reason if isinstance(e, Skip) else f"unexpected_error_{type(e).__name__}"
            if isinstance(e, Skip):
                image_skips.update(e.image_skips)
            skipped[reason] += 1
            ex = examples.setdefault(reason, [])
            if len(ex) < MAX_EXAMPLES:
                ex.append(item.source if isinstance(e, Skip) else f"{item.source}: {e}")
            continue
        image_skips.update(sample.image_skips)
        files = {member_name(item.key, f): data for f, data in sorted(sample.files.items())}
        size = _tar_size(files)
        if tar is not None and cur["samples"] and _tar_file_size(cur["est"] + size) > max_shard_bytes:
            close()
        if tar is None:
            name = shard_name(chunk, len(shards))
            tar = tarfile.open(out / (name + ".tmp"), "w", format=tarfile.GNU_FORMAT)
            cur = {"name": name, "samples": 0, "images": 0, "est": 0}
        for name, data in files.items():
            _add_member(tar, name, data)
        cur["samples"] += 1
        cur["images"] += sample.images
        cur["est"] += size
    close()
    for s in shards:
        del s["est"]
        os.replace(out / (s["name"] + ".tmp"), out / s["name"])
    state = {"chunk": chunk, "inputs": len(items), "shards": shards, "skipped": dict(skipped),
             "examples": examples, "image_skips": dict(image_skips)}
    _write_json_atomic(_chunk_state_path(out, chunk), state)
    return state


def _chunk_done(output: Path, chunk: int) -> dict | None:
    path = _chunk_state_path(output, chunk)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for s in state.get("shards", []):
        p = output / s["name"]
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            return None
    return state


def _clean_chunk(output: Path, chunk: int) -> None:
    for p in output.glob(f"shard-{chunk:06d}-*.tar*"):
        p.unlink()
    _chunk_state_path(output, chunk).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- running


@dataclass
class Conversion:
    """A converter's description of one run, handed to ``run_conversion``."""

    tool: str
    """Module name, e.g. ``data_tools.captions``."""
    kind: str
    """``captions``, ``interleaved`` or ``text`` (what the shards hold)."""
    args: dict
    """The tool's arguments, recorded in the manifest; those that change the output also guard resume."""
    records: Iterable[Item | Skipped]
    """The inputs in a deterministic order."""
    handler: Handler
    """Module-level function ``(item, ctx) -> Sample`` (picklable, runs in workers)."""
    ctx: Any = None
    """Small picklable context for the handler (options)."""


# Arguments that do not change the shards (so a rerun with another value still resumes).
RUN_ONLY_ARGS = {"workers", "progress", "no_progress", "overwrite", "dry_run", "output"}


def _fingerprint(args: dict) -> dict:
    return {k: v for k, v in sorted(args.items()) if k not in RUN_ONLY_ARGS}


def _prepare_output(output: Path, fingerprint: dict, overwrite: bool) -> None:
    state_dir = output / STATE_DIR
    args_path = state_dir / "args.json"
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a folder")
    if overwrite and output.is_dir():
        for p in output.glob("shard-*.tar*"):
            p.unlink()
        (output / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    if output.is_dir() and any(output.glob("*.tar")) and not args_path.exists():
        raise ConversionError(f"output {output} already holds .tar files that this tool did not write; "
                              "choose an empty folder")
    if args_path.exists():
        old = json.loads(args_path.read_text(encoding="utf-8"))
        if old != json.loads(json.dumps(fingerprint, default=str)):
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise ConversionError(f"output {output} holds a conversion with other arguments "
                                  f"({', '.join(diff)}); "
                                  "use --overwrite to start again or choose another folder")
    state_dir.mkdir(parents=True, exist_ok=True)
    if not args_path.exists():
        _write_json_atomic(args_path, json.loads(json.dumps(fingerprint, default=str)))
    for p in output.glob("shard-*.tar.tmp"):  # left by an interrupted run
        p.unlink()


def _chunks(records: Iterable[Item | Skipped], size: int, limit: int | None, skipped: Counter,
            examples: dict[str, list[str]], counts: Counter) -> Iterator[list[Item]]:
    """Cut the valid, de-duplicated items into chunks; count the rejected ones."""
    seen: set[str] = set()
    chunk: list[Item] = []
    n_valid = 0
    for rec in records:
        if limit is not None and n_valid >= limit:
            break
        counts["inputs"] += 1
        if isinstance(rec, Item):
            rec.key = sanitize_key(rec.key)
            if rec.key in seen:
                rec = Skipped("duplicate_key", rec.source)
            else:
                seen.add(rec.key)
        if isinstance(rec, Skipped):
            skipped[rec.reason] += 1
            ex = examples.setdefault(rec.reason, [])
            if len(ex) < MAX_EXAMPLES:
                ex.append(rec.source)
            continue
        n_valid += 1
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _merge_examples(into: dict[str, list[str]], more: dict[str, list[str]]) -> None:
    for reason, ex in more.items():
        lst = into.setdefault(reason, [])
        lst.extend(ex[: MAX_EXAMPLES - len(lst)])


def run_conversion(conv: Conversion, shards: ShardOptions, dry_run: bool = False) -> dict:
    """Run a conversion end to end and return the manifest (also written to ``manifest.json``).

    With ``dry_run`` the inputs are only enumerated and counted; nothing is written.
    """
    from tqdm import tqdm

    output = shards.output
    fingerprint = _fingerprint(conv.args)
    if not dry_run:
        _prepare_output(output, fingerprint, shards.overwrite)
    enum_skipped: Counter = Counter()
    enum_examples: dict[str, list[str]] = {}
    counts: Counter = Counter()
    states: dict[int, dict] = {}
    reused = 0
    t0 = time.perf_counter()
    bar = tqdm(desc=conv.tool.rsplit(".", 1)[-1], unit=" inputs", disable=None if shards.progress else True,
               file=sys.stderr, dynamic_ncols=True)
    chunks = _chunks(conv.records, shards.samples_per_shard, shards.limit, enum_skipped, enum_examples,
                     counts)
    try:
        if dry_run:
            n_items = sum(len(c) for c in chunks)
            bar.close()
            summary = {"tool": conv.tool, "dry_run": True, "inputs": counts["inputs"],
                       "valid_inputs": n_items,
                       "shards": -(-n_items // shards.samples_per_shard), "skipped": dict(enum_skipped)}
            print(f"dry run: {counts['inputs']} inputs, {n_items} valid, would write about "
                  f"{summary['shards']} shards; rejected while reading: {_fmt_counts(enum_skipped)}")
            return summary
        args = (conv.handler, conv.ctx)
        pending: dict[int, Any] = {}
        todo: Iterator[tuple[int, list[Item]]] = enumerate(chunks)

        def schedule(pool) -> None:
            """Submit chunks (skipping finished ones) until enough are in flight."""
            nonlocal reused
            while len(pending) < 2 * shards.workers:
                nxt = next(todo, None)
                if nxt is None:
                    return
                i, items = nxt
                done = _chunk_done(output, i)
                if done is not None:
                    states[i] = done
                    reused += 1
                    bar.update(len(items))
                    continue
                _clean_chunk(output, i)
                if pool is None:
                    states[i] = convert_chunk(*args, i, items, str(output), shards.max_shard_bytes)
                    bar.update(len(items))
                else:
                    pending[i] = pool.submit(convert_chunk, *args, i, items, str(output),
                                             shards.max_shard_bytes)

        if shards.workers == 1:
            schedule(None)  # converts every chunk in this process
        else:
            import multiprocessing as mp
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            # spawn, not fork: the workers start clean (no inherited threads or locks).
            with ProcessPoolExecutor(shards.workers, mp_context=mp.get_context("spawn")) as pool:
                try:
                    schedule(pool)
                    while pending:
                        finished, _ = wait(pending.values(), return_when=FIRST_COMPLETED)
                        for i in [i for i, f in pending.items() if f in finished]:
                            states[i] = pending.pop(i).result()
                            bar.update(states[i]["inputs"])
                        schedule(pool)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # chunks already running still finish
                    raise
    finally:
        bar.close()

    manifest = _build_manifest(conv, output, states, enum_skipped, enum_examples, counts)
    _write_json_atomic(output / MANIFEST, manifest)
    print(_summary_line(manifest, output, reused, time.perf_counter() - t0))
    return manifest


def _summary_line(manifest: dict, output: Path, reused: int, seconds: float) -> str:
    """The closing line: what was written and every skip reason with its count."""
    t = manifest["totals"]
    line = (f"{manifest['tool']}: {t['samples']} samples ({t['images']} images) in {t['shards']} shards, "
            f"{t['bytes'] / 1e6:.1f} MB -> {output}; {t['inputs']} inputs, skipped {t['skipped']}")
    if t["skipped"]:
        line += f" ({_fmt_counts(manifest['skipped'])})"
    if manifest["skipped_images"]:
        line += f"; images skipped: {_fmt_counts(manifest['skipped_images'])}"
    if reused:
        line += f"; {reused} finished chunks reused"
    return line + f"; {seconds:.1f}s"


def _fmt_counts(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"


def _build_manifest(conv: Conversion, output: Path, states: dict[int, dict], enum_skipped: Counter,
                    enum_examples: dict[str, list[str]], counts: Counter) -> dict:
    skipped = Counter(enum_skipped)
    image_skips: Counter = Counter()
    examples = {k: list(v) for k, v in enum_examples.items()}
    shard_list: list[dict] = []
    for i in sorted(states):
        st = states[i]
        skipped.update(st["skipped"])
        image_skips.update(st["image_skips"])
        _merge_examples(examples, st["examples"])
        shard_list.extend(st["shards"])
    totals = {
        "inputs": counts["inputs"],
        "samples": sum(s["samples"] for s in shard_list),
        "images": sum(s["images"] for s in shard_list),
        "shards": len(shard_list),
        "bytes": sum(s["bytes"] for s in shard_list),
        "skipped": sum(skipped.values()),
        "skipped_images": sum(image_skips.values()),
    }
    assert totals["samples"] + totals["skipped"] == totals["inputs"], "an input was lost without a count"
    return {
        "version": MANIFEST_VERSION,
        "tool": conv.tool,
        "kind": conv.kind,
        "shards": shard_list,
        "totals": totals,
        "skipped": dict(sorted(skipped.items())),
        "skipped_images": dict(sorted(image_skips.items())),
        "skipped_examples": {k: examples[k] for k in sorted(examples)},
        "args": json.loads(json.dumps(conv.args, default=str)),
    }


# ----------------------------------------------------------------------------------------- CLI


def parse_size(text: str) -> int:
    """``"500MB"``, ``"1G"``, ``"1e9"`` or ``"4096"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 500MB, 1G or 1000000)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def add_common_args(p: argparse.ArgumentParser, images: bool = True) -> None:
    """The options every converter shares."""
    p.add_argument("--output", "-o", required=True, type=Path,
                   help="folder for the shards and manifest.json (created; an earlier run there is resumed)")
    g = p.add_argument_group("shards")
    g.add_argument("--samples-per-shard", type=int, default=10_000,
                   help="most samples per shard (default 10000)")
    g.add_argument("--max-shard-bytes", type=parse_size, default=10**9,
                   help="split shards so none exceeds this size, e.g. 500MB (default 1GB)")
    g.add_argument("--workers", "-j", type=int, default=1, help="worker processes (default 1)")
    g.add_argument("--limit", type=int, default=None, help="convert only the first N valid inputs")
    g.add_argument("--dry-run", action="store_true", help="read and count the inputs, write nothing")
    g.add_argument("--overwrite", action="store_true",
                   help="delete this tool's earlier output in --output instead of resuming it")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    if images:
        g = p.add_argument_group("images")
        g.add_argument("--image-size", type=int, default=256,
                       help="resize so the shorter side is at most this; never upscales; "
                       "0 keeps sizes (default 256)")
        g.add_argument("--jpeg-quality", type=int, default=90,
                       help="JPEG quality of stored images (default 90)")
        g.add_argument("--min-image-size", type=int, default=64,
                       help="drop images narrower or shorter than this, the paper's filter; "
                       "0 disables (default 64)")
        g.add_argument("--keep-single-colour", action="store_true",
                       help="keep single-colour images (dropped by default, the paper's filter)")
        g.add_argument("--max-pixels", type=int, default=89_478_485,
                       help="skip images with more pixels than this as decompression bombs "
                       "(default 89478485)")


def image_options(a: argparse.Namespace) -> ImageOptions:
    return ImageOptions(image_size=a.image_size, jpeg_quality=a.jpeg_quality, min_image_size=a.min_image_size,
                        drop_single_colour=not a.keep_single_colour, max_pixels=a.max_pixels)


def shard_options(a: argparse.Namespace) -> ShardOptions:
    return ShardOptions(output=a.output, samples_per_shard=a.samples_per_shard,
                        max_shard_bytes=a.max_shard_bytes, workers=a.workers, limit=a.limit,
                        progress=not a.no_progress, overwrite=a.overwrite)


def run_cli(fn: Callable[[], Any]) -> int:
    """Run a converter, turning ``ConversionError``/``ValueError`` into a one-line message and exit 2."""
    try:
        fn()
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def options_dict(*objs: Any) -> dict:
    """Dataclass options merged into one JSON-friendly dict (for the manifest args)."""
    out: dict = {}
    for o in objs:
        out.update({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()})
    return out
