"""Convert image-caption datasets into webdataset shards.

Formats (``--format``):

- ``coco``: a COCO captions JSON (``--input annotations/captions_train2017.json``) plus its image
  folder (``--images-root train2017``; default: the JSON's folder, or in the official layout
  ``train2017/`` beside ``annotations/``, whichever holds its images). One sample per image; all its
  captions are kept: ``KEY.txt`` holds the first caption (by annotation id) and ``KEY.json`` holds
  ``"captions"``, the list of all of them. The key is the zero-padded image id.
- ``folder``: a folder of images, each with a ``.txt`` sidecar holding its caption (an optional
  ``.json`` sidecar is kept as metadata): img2dataset's "files" output is read this way.
- ``tsv``, ``csv``, ``jsonl``, ``parquet``: tables (a file or a folder of them) with an image-path
  column and a caption column; paths are relative to ``--images-root`` (default: the table's folder).
  Several captions per image are kept, as COCO's are (``KEY.txt`` the first, ``KEY.json`` ``"captions"``
  all of them): a caption cell holding a list (parquet ``list<string>``, a JSON array in jsonl), or
  consecutive rows with the same image and key (one row per caption, as Flickr30k-style tables are laid out;
  the first row's other columns are kept).
- ``img2dataset``: img2dataset's webdataset output (a folder of ``.tar`` files, or one tar), checked
  sample by sample (image decoded, caption present) and re-sharded. Its ``KEY.json`` is kept as is: a
  ``captions`` list saved there (img2dataset's ``--save_additional_columns '["captions"]'``) is used by
  training as COCO's is.

Every sample is ``KEY.jpg`` (re-encoded), ``KEY.txt`` (the caption, UTF-8) and ``KEY.json``
(metadata: ``source``, ``width``/``height`` stored, ``original_width``/``original_height``, and
what the input carried).

    python -m kosmos.data_tools.captions --format coco --input captions_train2017.json \\
        --images-root train2017 --output shards/coco --workers 8
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from kosmos.data.format import IMAGE_EXTS, IMAGE_FIELD, JSON_FIELD, TEXT_FIELD, TarSpan, iter_tar
from kosmos.data_tools import cli
from kosmos.data_tools.cli import add_common_args, run_cli
from kosmos.data_tools.conversion import Conversion, ShardOptions, options_dict, run_conversion
from kosmos.data_tools.images import IMAGE_SUFFIXES, ImageOptions, ImageRef, normalize_image
from kosmos.data_tools.records import ConversionError, Item, Sample, Skip, Skipped
from kosmos.data_tools.tables import (
    TableError,
    check_readable,
    decode_text,
    iter_table,
    list_files,
    open_regular,
    table_failure,
    table_kind,
)
from kosmos.errors import command_name
from kosmos.untrusted import load_json

FORMATS = ("coco", "folder", "tsv", "csv", "jsonl", "parquet", "img2dataset")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file_path", "file_name", "filename", "path", "jpg")
CAPTION_COLUMNS = ("caption", "text", "txt", "title", "alt")


def make_caption_sample(item: Item, opts: ImageOptions) -> Sample:
    """One caption sample from an item ``{"image": ImageRef | bytes, "caption": str, "meta": dict}``."""
    p = item.payload
    data = p["image"] if isinstance(p["image"], bytes) else p["image"].read()
    jpg, (w, h), (ow, oh) = normalize_image(data, opts)
    meta = dict(p.get("meta") or {})
    meta.update(source=item.source, width=w, height=h, original_width=ow, original_height=oh)
    return Sample(
        files={IMAGE_FIELD: jpg, TEXT_FIELD: p["caption"].encode("utf-8"),
               JSON_FIELD: json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")},
        images=1,
    )


def bad_path(name) -> bool:
    """Whether an image path read from a record can never name a file: not a string, or one holding a NUL
    character (valid JSON, ``"im2\\u0000.jpg"``; the OS refuses it). Such a record is skipped and counted
    (``bad_image_path``) instead of stopping the whole conversion."""
    return not isinstance(name, str) or "\0" in name


def _caption(value) -> str:
    if value is None:
        raise Skip("missing_caption")
    text = decode_text(value).strip()
    if not text:
        raise Skip("empty_caption")
    return text


def _captions(value) -> list[str]:
    """The captions of a table cell: one string, or a list of them (a parquet list, a JSON array). Bad
    entries of a list are dropped; ``Skip`` with the first one's reason when none is left."""
    if not isinstance(value, list | tuple):
        return [_caption(value)]
    good, reasons = [], []
    for v in value:
        try:
            c = _caption(v)
        except Skip as s:
            reasons.append(s.reason)
            continue
        if c not in good:
            good.append(c)
    if not good:
        raise Skip(reasons[0] if reasons else "missing_caption")
    return good


def _with_captions(payload: dict, captions: list[str]) -> dict:
    """``payload`` with ``captions``: the first as its caption, all of them in its metadata when several."""
    payload = {k: v for k, v in payload.items() if k != "captions"}
    payload["caption"] = captions[0]
    if len(captions) > 1:
        payload["meta"] = {**payload["meta"], "captions": captions}
    return payload


def _merge_consecutive(records: Iterator[Item | Skipped]) -> Iterator[Item | Skipped]:
    """Items that follow each other with the same key and image become one, with all their captions."""
    pending: Item | None = None
    caps: list[str] = []
    for rec in records:
        if not isinstance(rec, Item):
            yield rec
            continue
        more = rec.payload["captions"]
        if pending is not None and (rec.key, rec.payload["image"]) == (pending.key, pending.payload["image"]):
            caps += [c for c in more if c not in caps]
            continue
        if pending is not None:
            yield Item(pending.key, pending.source, _with_captions(pending.payload, caps))
        pending, caps = rec, list(more)
    if pending is not None:
        yield Item(pending.key, pending.source, _with_captions(pending.payload, caps))


# ------------------------------------------------------------------------------------ formats


def _coco_images_root(input: Path, coco: dict) -> Path:
    """Where a COCO JSON's images are when ``--images-root`` is not given: the JSON's own folder, or, in the
    official layout (``annotations/captions_train2017.json`` beside ``train2017/``), the folder named after
    its split beside ``annotations/``; the first of these that holds one of its first images. With none, the
    JSON's folder (the images are then counted as ``missing_image``, each with the path tried)."""
    tried = [input.parent]
    split = re.fullmatch(r"captions_(\w+)\.json", input.name)
    if split and input.parent.name == "annotations":
        tried.append(input.parent.parent / split[1])
    names = [im.get("file_name") for im in coco.get("images", [])[:8] if isinstance(im, dict)]
    names = [n for n in names if isinstance(n, str) and n and not bad_path(n)]
    for folder in tried:
        if any((folder / n).is_file() for n in names):
            return folder
    return tried[0]


def _coco_records(input: Path, images_root: Path, coco: dict) -> Iterator[Item | Skipped]:
    caps: dict = {}
    for ann in sorted(coco.get("annotations", []), key=lambda a: (str(a.get("image_id")), a.get("id", 0))):
        caps.setdefault(ann.get("image_id"), []).append(ann.get("caption"))
    images = sorted(coco.get("images", []), key=lambda im: (str(type(im.get("id"))), im.get("id")))
    for im in images:
        iid, fname = im.get("id"), im.get("file_name")
        source = f"{input.name}:image {iid}"
        if fname is None or iid is None:
            yield Skipped("malformed_record", source)
            continue
        good, reasons = [], []
        for c in caps.get(iid, []):
            try:
                good.append(_caption(c))
            except Skip as s:  # a bad caption is dropped; the image is kept if another caption is good
                reasons.append(s.reason)
        if not good:
            yield Skipped(reasons[0] if reasons else "missing_caption", source)
            continue
        if bad_path(fname):
            yield Skipped("bad_image_path", source, repr(fname))
            continue
        key = f"{iid:012d}" if isinstance(iid, int) else str(iid)
        meta = {"image_id": iid, "file_name": fname, "captions": good}
        payload = {"image": ImageRef(str(images_root / fname)), "caption": good[0], "meta": meta}
        yield Item(key, source, payload)


def _folder_records(root: Path) -> Iterator[Item | Skipped]:
    others: list[Path] = []  # FIFOs, sockets, devices and broken links with an image suffix
    for path in list_files(root, lambda p: p.suffix.lower() in IMAGE_SUFFIXES, others):
        rel = path.relative_to(root).with_suffix("").as_posix() if path != root else path.stem
        source = path.relative_to(root).as_posix() if path != root else path.name
        txt = path.with_suffix(".txt")
        try:
            with open_regular(txt) as f:  # a FIFO sidecar is skipped, not waited on
                caption = _caption(f.read())
        except FileNotFoundError:
            yield Skipped("missing_caption", source, txt.name)
            continue
        except OSError as e:
            yield Skipped("unreadable_caption", source, f"{txt.name}: {e.strerror or e}")
            continue
        except Skip as s:
            yield Skipped(s.reason, source, txt.name if s.reason == "not_a_regular_file" else "")
            continue
        meta: dict = {}
        side = path.with_suffix(".json")
        if side.is_file():
            try:
                loaded = load_json(side.read_bytes().decode("utf-8"))
                meta = loaded if isinstance(loaded, dict) else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                meta = {}
        yield Item(rel, source, {"image": ImageRef(str(path)), "caption": caption, "meta": meta})
    for path in others:
        yield Skipped("not_a_regular_file", path.relative_to(root).as_posix())


def _table_files(input: Path, fmt: str) -> list[Path]:
    kind = {"tsv": "tsv", "csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}[fmt]
    files = list_files(input, lambda p: table_kind(p) == kind)
    if not files:
        raise ConversionError(f"no .{fmt} files in {input}")
    return files


def _pick_column(columns: dict, given: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if given is not None:
        if given not in columns:
            raise ConversionError(f"{where}: no column {given!r} (columns: {', '.join(map(str, columns))})")
        return given
    for c in candidates:
        if c in columns:
            return c
    raise ConversionError(f"{where}: no {what} column found among {', '.join(map(str, columns))}; "
                          f"name it with --{what}-column")


COLUMN_SCAN_ROWS = 1000
"""Rows read (from the first tables) to find the image and caption columns."""


def _resolve_columns(files: list[Path], fmt: str, image_column: str | None,
                     caption_column: str | None) -> tuple[str, str]:
    """Pick the columns from the first ``COLUMN_SCAN_ROWS`` rows, so that a wrong name fails before anything
    is written. A column counts when any of those rows has it; a row that lacks it is skipped and counted
    later (``missing_caption``, ``missing_image_path``). A table that cannot be read is counted later too; it
    is named here only when no table has a readable row."""
    columns: dict = {}
    rows = 0
    scanned: list[Path] = []
    failures: list[str] = []
    for path in files:
        scanned.append(path)
        try:
            for _, rec in iter_table(path, fmt):
                if isinstance(rec, dict):
                    columns.update(dict.fromkeys(rec))
                    rows += 1
                    if rows >= COLUMN_SCAN_ROWS:
                        break
        except (OSError, ValueError) as e:
            failures.append(str(e) if isinstance(e, TableError) else f"{path}: {e}")
        if rows >= COLUMN_SCAN_ROWS:
            break
    if not rows:
        why = f" ({'; '.join(failures)})" if failures else ""
        raise ConversionError(f"no readable rows in {', '.join(map(str, files))}{why}")
    where = str(scanned[0]) + (f" and {len(scanned) - 1} more tables" if len(scanned) > 1 else "")
    where += f" (first {rows} rows)"
    return (_pick_column(columns, image_column, IMAGE_COLUMNS, "image", where),
            _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", where))


def _table_records(input: Path, fmt: str, files: list[Path], images_root: Path | None, image_col: str,
                   caption_col: str, key_col: str | None) -> Iterator[Item | Skipped]:
    base = input if input.is_dir() else input.parent
    for path in files:
        name = path.relative_to(base).as_posix()
        root = images_root or path.parent
        try:
            for row, rec in iter_table(path, fmt):
                source = f"{name}:{row}"
                if isinstance(rec, Skip):
                    yield Skipped(rec.reason, source)
                    continue
                img = rec.get(image_col)
                if img is None or (isinstance(img, str) and not img.strip()):
                    yield Skipped("missing_image_path", source)
                    continue
                try:
                    captions = _captions(rec.get(caption_col))
                    img = decode_text(img).strip()
                except Skip as s:
                    yield Skipped(s.reason, source)
                    continue
                if bad_path(img):
                    yield Skipped("bad_image_path", source, repr(img))
                    continue
                key = rec.get(key_col) if key_col else str(Path(img).with_suffix(""))
                if key is None or key == "":
                    yield Skipped("missing_key", source)
                    continue
                meta = {k: v for k, v in rec.items()
                        if k not in (image_col, caption_col) and not isinstance(v, bytes)}
                payload = {"image": ImageRef(str(root / img)), "caption": captions[0], "captions": captions,
                           "meta": meta}
                yield Item(str(key), source, payload)
        except (OSError, ValueError) as e:  # a table that cannot be read (any further): rows before are kept
            yield Skipped(table_failure(name, e), name)


def _img2dataset_sample(name: str, key: str, group: dict) -> Item | Skipped:
    """The item (or the reason to skip) of one img2dataset sample ``{field: bytes or ImageRef}``."""
    source = f"{name}:{key}"
    img_ext = next((e for e in IMAGE_EXTS if e in group), None)
    if img_ext is None:
        return Skipped("missing_image", source)
    try:
        caption = _caption(group.get(TEXT_FIELD))
    except Skip as s:
        return Skipped(s.reason, source)
    meta: dict = {}
    if JSON_FIELD in group:
        try:
            loaded = load_json(group[JSON_FIELD].decode("utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}
    return Item(key, source, {"image": group[img_ext], "caption": caption, "meta": meta})


def _img2dataset_records(input: Path) -> Iterator[Item | Skipped]:
    """img2dataset's webdataset output: members grouped into samples as the training reader does
    (``kosmos.data.format.iter_tar``); images of plain tars are passed to workers as byte ranges of the
    tar, not copied. A sample cut by a broken tar is dropped; the tar is counted as ``broken_tar``."""
    tars = list_files(input, lambda p: p.name.endswith((".tar", ".tar.gz", ".tgz")))
    base = input if input.is_dir() else input.parent
    for tpath in tars:
        name = tpath.relative_to(base).as_posix()
        broken: Counter = Counter()
        errors: list[str] = []
        for sample in iter_tar(tpath, broken, read=lambda f: f not in IMAGE_EXTS, errors=errors):
            if sample.cut:
                continue
            group = {f: ImageRef(str(tpath), v.offset, v.size) if isinstance(v, TarSpan) else v
                     for f, v in sample.files.items()}
            yield _img2dataset_sample(name, sample.key, group)
        if broken["broken_shard"] or broken["truncated_shard"]:
            why = "; ".join(errors) or "it ends without the end-of-archive blocks"
            print(f"warning: {name}: broken tar ({why}); its remaining samples are skipped", file=sys.stderr)
            yield Skipped("broken_tar", name)


# ------------------------------------------------------------------------------------ entry


def convert_captions(
    format: str,
    input: str | Path,
    output: str | Path,
    *,
    images_root: str | Path | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    key_column: str | None = None,
    image_options: ImageOptions | None = None,
    shard_options: ShardOptions | None = None,
    dry_run: bool = False,
) -> dict:
    """Convert an image-caption dataset into shards in ``output``; returns the manifest.

    Raises ``ConversionError`` before writing anything when the input cannot be read, the format
    is unknown or a named column does not exist.
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    input = check_readable(Path(input))
    iopts = image_options or ImageOptions()
    sopts = shard_options or ShardOptions(output=Path(output))
    sopts.output = Path(output)
    root = check_readable(Path(images_root), "images root", want_dir=True) if images_root else None
    args = {"format": format, "input": str(input), "images_root": str(root) if root else None,
            "image_column": image_column, "caption_column": caption_column, "key_column": key_column,
            **options_dict(iopts, sopts)}

    if format == "coco":
        if not input.is_file():
            raise ConversionError(f"coco input {input} must be the captions JSON file")
        try:
            coco = load_json(input.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{input}: not a COCO captions JSON ({e})") from None
        if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
            raise ConversionError(f"{input}: a COCO captions JSON needs 'images' and 'annotations'")
        if root is None:
            root = _coco_images_root(input, coco)
            args["images_root"] = str(root)
        records = _coco_records(input, root, coco)
    elif format == "folder":
        check_readable(input, want_dir=True)
        records = _folder_records(input)
    elif format == "img2dataset":
        records = _img2dataset_records(input)
    else:
        files = _table_files(input, format)
        image_col, caption_col = _resolve_columns(files, format, image_column, caption_column)
        args.update(image_column=image_col, caption_column=caption_col)
        records = _merge_consecutive(_table_records(input, format, files, root, image_col, caption_col,
                                                    key_column))
    conv = Conversion("kosmos.data_tools.captions", "captions", args, records, make_caption_sample, iopts)
    return run_conversion(conv, sopts, dry_run=dry_run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_name("kosmos.data_tools.captions"),
        description=__doc__.split("\n\n")[0] + " Images are re-encoded as JPEG (shorter side at most "
        "--image-size), bad inputs are skipped and counted in manifest.json; rerunning an interrupted "
        "conversion keeps its finished shards.",
        epilog="formats: coco (captions JSON + --images-root), folder (images with .txt sidecars), "
        "tsv/csv/jsonl/parquet (image-path and caption columns), img2dataset (its .tar output)",
    )
    p.add_argument("--format", "-f", required=True, choices=FORMATS, help="input format")
    p.add_argument("--input", "-i", required=True, type=Path, help="input file or folder")
    p.add_argument("--images-root", type=Path, default=None,
                   help="folder that image paths are relative to (coco: default the JSON's folder, or "
                   "train2017/ beside annotations/ for annotations/captions_train2017.json; "
                   "tables: default the table's folder)")
    p.add_argument("--image-column", default=None, help=f"tables: image path column (default: first of "
                   f"{', '.join(IMAGE_COLUMNS)})")
    p.add_argument("--caption-column", default=None, help=f"tables: caption column (default: first of "
                   f"{', '.join(CAPTION_COLUMNS)})")
    p.add_argument("--key-column", default=None,
                   help="tables: column used as sample key (default: the image path)")
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a usage or input error)."""
    a = build_parser().parse_args(argv)
    return run_cli(lambda: convert_captions(
        a.format, a.input, a.output, images_root=a.images_root, image_column=a.image_column,
        caption_column=a.caption_column, key_column=a.key_column, image_options=cli.image_options(a),
        shard_options=cli.shard_options(a), dry_run=a.dry_run))


if __name__ == "__main__":
    sys.exit(main())
