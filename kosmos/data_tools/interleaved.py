"""Convert interleaved image-text documents (OBELICS, MMC4) into webdataset shards.

Each document becomes one sample: ``KEY.json`` = ``{"segments": [{"text": "..."}, {"image":
"img0.jpg"}, ...], "meta": {...}}`` and its images as members ``KEY.img0.jpg``, ``KEY.img1.jpg``...
Adjacent text pieces are merged into one text segment (OBELICS paragraphs joined by a blank line,
MMC4 sentences by a space), so segments alternate text and image.

- ``obelics``: rows (parquet or jsonl, a file or a folder) with parallel ``texts``/``images`` lists;
  at each position one of them is set. Images are URLs resolved through ``--images-root``: a folder
  of files named by the URL's hash (``sha256(url).hexdigest()`` + any image extension; sha1 and md5
  are accepted too), or an img2dataset output (its numbered folders or tars, files named by
  img2dataset's own running key) whose ``.json`` beside each image holds the ``url``.
- ``mmc4``: documents (jsonl(.gz) or parquet) with ``text_list`` and ``image_info`` entries
  (``image_name``, ``matched_text_index``, ``matched_sim``, ``raw_url``); each image is placed
  before its matched sentence, images under ``--sim-threshold`` are dropped. Images are found in
  ``--images-root`` by ``image_name`` (relative path or file name), else by ``raw_url`` as above.

``--images-root`` may name several folders (repeat the option, or give several folders after it): an image is
looked up in each folder in the order given and taken from the first that has it. ``kosmos.data_tools.urls``
writes the image URLs of a document dump for img2dataset, whose output folder is then an images root:

    python -m kosmos.data_tools.urls --format obelics --input obelics/ --output urls.parquet
    img2dataset --url_list urls.parquet --input_format parquet --url_col url --output_format webdataset \
        --output_folder downloads/
    python -m kosmos.data_tools.interleaved --format obelics --input obelics/ --images-root downloads/ \
        --output shards/obelics

The paper's document filters are on by default: at most ``--max-images`` (5) images per document
(the first ones kept, the rest dropped and counted), documents left without an image dropped, and
half of the single-image documents dropped (``--single-image-drop 0.5``), chosen by a RNG seeded
with ``--seed`` and the document key, so the choice does not depend on order or workers.

Skipped images are counted by reason in the manifest's ``skipped_images`` and the first few of each named
(document, then the image's URL or name) in ``skipped_image_examples``: ``missing_image`` (a usable
reference not found under the images roots), ``bad_url``/``no_url`` (no name, and a URL that is not
``scheme://...`` or has spaces or control characters, or none: the names ``kosmos.data_tools.urls`` gives
the images it leaves out of the list), ``over_max_images``, the image checks' reasons, and MMC4's.

    python -m kosmos.data_tools.interleaved --format mmc4 --input docs/ --images-root images/ \
        --output shards/mmc4
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kosmos.data.format import JSON_FIELD, TarSpan, image_field, iter_tar
from kosmos.data_tools import cli
from kosmos.data_tools.cli import OptionSpec, add_common_args, run_cli
from kosmos.data_tools.conversion import Conversion, ShardOptions, options_dict, run_conversion
from kosmos.data_tools.images import (
    IMAGE_SUFFIXES,
    ImageOptions,
    ImageRef,
    normalize_image,
    url_hashes,
    url_problem,
)
from kosmos.data_tools.records import ConversionError, Item, Sample, Skip, Skipped
from kosmos.data_tools.tables import (
    check_readable,
    decode_text,
    iter_table,
    list_files,
    table_failure,
    table_kind,
)
from kosmos.data_tools.writer import MAX_EXAMPLES
from kosmos.errors import command_name
from kosmos.untrusted import load_json

FORMATS = ("obelics", "mmc4")
JOINERS = {"obelics": "\n\n", "mmc4": " "}


@dataclass
class DocOptions:
    """Document-level filters (the paper's) and image options."""

    image: ImageOptions = field(default_factory=ImageOptions)
    max_images: int = 5
    """Keep at most this many images per document (the first ones), the paper's filter; 0 keeps all."""
    single_image_drop: float = 0.5
    """Fraction of the documents with exactly one image that are dropped, the paper's filter; 0 keeps
    them all."""
    seed: int = 0
    """Seed of the single-image drop (combined with the document key)."""
    sim_threshold: float | None = None
    """MMC4: drop images whose ``matched_sim`` is under this (unset: all are kept)."""
    joiner: str = "\n\n"
    """How adjacent text pieces are merged."""

    def __post_init__(self) -> None:
        if self.max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {self.max_images}")
        if not 0.0 <= self.single_image_drop <= 1.0:
            raise ValueError(f"single_image_drop must be in [0, 1], got {self.single_image_drop}")


DOC_OPTIONS = OptionSpec(DocOptions, exclude=("image", "joiner"))
"""The document options on the command line (``joiner`` follows ``--format``)."""


@dataclass
class ImageRoots:
    """Where the documents' images are."""

    images_root: list[Path]
    """Folder holding the documents' images: files named by URL hash, img2dataset output, or (mmc4) files
    named by image_name. Several folders (repeat the option, or give several after it) are searched in the
    order given; an image is taken from the first that has it."""


IMAGE_ROOTS = OptionSpec(ImageRoots)


# ------------------------------------------------------------------------------- image lookup


class ImageIndex:
    """Finds a document's images under one or more images roots by relative path, file name, URL hash or
    URL; with several roots, each is searched in the order given and the first that has the image wins."""

    def __init__(self, roots: Path | list[Path]):
        self.roots = [roots] if isinstance(roots, Path) else list(roots)
        self.images = 0
        self.indexes: list[dict[str, ImageRef]] = [self._index(root) for root in self.roots]
        """One lookup table per root, in order: ``name:``/``base:``/``stem:``/``url:`` + value -> image."""

    def _index(self, root: Path) -> dict[str, ImageRef]:
        refs: dict[str, ImageRef] = {}
        wanted = IMAGE_SUFFIXES + (".json", ".tar")
        for p in list_files(root, lambda p: p.suffix.lower() in wanted or not p.suffix):
            suffix = p.suffix.lower()
            if suffix == ".tar":
                self._add_tar(p, refs)
            elif suffix == ".json":
                self._add_sidecar(p, refs)
            else:
                ref = ImageRef(str(p))
                self.images += 1
                refs.setdefault("name:" + p.relative_to(root).as_posix(), ref)
                refs.setdefault("base:" + p.name, ref)
                refs.setdefault("stem:" + p.stem, ref)
        return refs

    @staticmethod
    def _add_sidecar(p: Path, refs: dict[str, ImageRef]) -> None:
        url = _json_url(p.read_bytes())
        if url is None:
            return
        for ext in IMAGE_SUFFIXES:
            img = p.with_suffix(ext)
            if img.is_file():
                refs.setdefault("url:" + url, ImageRef(str(img)))
                return

    def _add_tar(self, p: Path, refs: dict[str, ImageRef]) -> None:
        broken: Counter = Counter()
        errors: list[str] = []
        for sample in iter_tar(p, broken, read=lambda f: f == JSON_FIELD, errors=errors):
            if sample.cut:  # its image may be cut short
                continue
            meta = sample.files.get(JSON_FIELD)
            url = _json_url(meta) if isinstance(meta, bytes) else None
            span = next((v for f, v in reversed(sample.files.items())
                         if isinstance(v, TarSpan) and "." + f in IMAGE_SUFFIXES), None)
            if url and span is not None:
                self.images += 1
                refs.setdefault("url:" + url, ImageRef(str(p), span.offset, span.size))
        if broken["broken_shard"] or broken["truncated_shard"]:
            why = "; ".join(errors) or "no end-of-archive blocks"
            print(f"warning: images tar {p} is broken ({why}); using what was read", file=sys.stderr)

    def find(self, name: str | None = None, url: str | None = None) -> ImageRef | None:
        """The image named ``name`` (relative path, file name or stem), else the one downloaded from
        ``url``, from the first root that has either; None when no root has it."""
        for refs in self.indexes:
            ref = _by_name(refs, name) or _by_url(refs, url)
            if ref is not None:
                return ref
        return None


def _by_url(refs: dict[str, ImageRef], url: str | None) -> ImageRef | None:
    if not url or not url.strip():
        return None
    ref = refs.get("url:" + url.strip())  # data_tools.urls writes URLs stripped; so does _json_url read them
    if ref is None:
        for h in url_hashes(url) + url_hashes(url.strip()):
            ref = refs.get("stem:" + h)
            if ref is not None:
                break
    return ref


def _by_name(refs: dict[str, ImageRef], name: str | None) -> ImageRef | None:
    if not name:
        return None
    return (refs.get("name:" + name) or refs.get("base:" + name.rsplit("/", 1)[-1])
            or refs.get("stem:" + Path(name).stem))


def _json_url(raw: bytes) -> str | None:
    try:
        obj = load_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    url = obj.get("url") if isinstance(obj, dict) else None
    return (url.strip() or None) if isinstance(url, str) else None


# ------------------------------------------------------------------------------------ handler


def make_document_sample(item: Item, opts: DocOptions) -> Sample:
    """One interleaved sample from ``{"segments": [("text", str) | ("image", ImageRef | None) |
    ("skip", reason)], "meta": dict}``: images decoded and filtered, the document filters applied."""
    segments: list[dict] = []
    files: dict[str, bytes] = {}
    skips: Counter = Counter()
    examples: dict[str, list[str]] = {}

    def skip(reason: str, seg: tuple, detail: str = "") -> None:  # counted, the first few named
        skips[reason] += 1
        what = " ".join(p for p in (seg[2] if len(seg) > 2 else "", detail) if p)
        ex = examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(what)

    n = 0
    for seg in item.payload["segments"]:
        kind = seg[0]
        if kind == "text":
            text = seg[1].strip()
            if not text:
                continue
            if segments and "text" in segments[-1]:
                segments[-1]["text"] += opts.joiner + text
            else:
                segments.append({"text": text})
        elif kind == "skip":
            skip(seg[1], seg)
        elif opts.max_images and n >= opts.max_images:
            skip("over_max_images", seg)
        elif seg[1] is None:
            skip("missing_image", seg)
        else:
            try:
                jpg, _, _ = normalize_image(seg[1].read(), opts.image)
            except Skip as s:
                skip(s.reason, seg, f"({s.detail})" if s.detail else "")
                continue
            name = image_field(n)
            files[name] = jpg
            segments.append({"image": name})
            n += 1
    def dropped(reason: str, detail: str = "") -> Skip:
        e = Skip(reason, detail, image_skips=skips)
        e.image_examples = examples
        return e

    if not any("text" in s for s in segments):
        raise dropped("empty_text")
    if n == 0:
        raise dropped("no_images", ", ".join(f"{k}={v}" for k, v in sorted(skips.items())))
    if n == 1 and opts.single_image_drop > 0:
        if random.Random(f"{opts.seed}:{item.key}").random() < opts.single_image_drop:
            raise dropped("single_image_dropped")
    doc = {"segments": segments, "meta": item.payload.get("meta") or {}}
    files[JSON_FIELD] = json.dumps(doc, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return Sample(files=files, images=n, image_skips=skips, image_examples=examples)


# ------------------------------------------------------------------------------------ formats


def _doc_files(input: Path) -> list[Path]:
    files = list_files(input, lambda p: table_kind(p) in ("jsonl", "parquet"))
    if not files:
        raise ConversionError(f"no .jsonl, .jsonl.gz or .parquet files in {input}")
    return files


def _rows(input: Path, files: list[Path]) -> Iterator[tuple[str, str, dict | Skip]]:
    """``(default key, source, record)`` over all rows of all files."""
    base = input if input.is_dir() else input.parent
    for path in files:
        rel = path.relative_to(base).as_posix()
        stem = rel.split(".", 1)[0]
        try:
            for row, rec in iter_table(path):
                yield f"{stem}-{row:08d}", f"{rel}:{row}", rec
        except (OSError, ValueError) as e:  # a table that cannot be read (any further): rows before are kept
            yield "", rel, Skip(table_failure(rel, e))


def _key(rec: dict, default: str) -> str:
    for k in ("key", "id", "doc_id"):
        if rec.get(k) not in (None, ""):
            return str(rec[k])
    return default


def _ref(what: object) -> str:
    """An image's reference as a skip example shows it (its URL or name)."""
    return repr(what) if isinstance(what, str) else ""


def _image_segment(ref: ImageRef | None, url: str | None, name: str | None = None) -> tuple:
    """A document's image: ``("image", ref)``; not found under the images roots, ``("image", None, what)``
    (counted as ``missing_image``), or ``("skip", "bad_url" | "no_url", what)`` when it has no name and no
    usable URL either (``url_problem``: the names ``data_tools.urls`` gives it). ``what``: its name or URL
    as a skip example shows it."""
    if ref is not None:  # found: as before (a rerun of a conversion made before keeps its chunks' digests)
        return ("image", ref)
    what = _ref(name or url)
    if not name and (problem := url_problem((url or "").strip())):
        return ("skip", problem, what)
    return ("image", None, what)


def _obelics_records(input: Path, files: list[Path], index: ImageIndex) -> Iterator[Item | Skipped]:
    for default_key, source, rec in _rows(input, files):
        if isinstance(rec, Skip):
            yield Skipped(rec.reason, source)
            continue
        texts, images = rec.get("texts"), rec.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            yield Skipped("malformed_document", source)
            continue
        segments: list[tuple] = []
        try:
            for text, url in zip(texts, images, strict=True):
                if url is not None:
                    url = decode_text(url)
                    segments.append(_image_segment(index.find(url=url), url))
                elif text is not None:
                    segments.append(("text", decode_text(text)))
        except Skip as s:
            yield Skipped(s.reason, source)
            continue
        meta: dict = {"source": source}
        gm = rec.get("general_metadata")
        if isinstance(gm, str):
            url = _json_url(gm.encode("utf-8"))
            if url:
                meta["url"] = url
        elif isinstance(gm, dict) and isinstance(gm.get("url"), str):
            meta["url"] = gm["url"]
        yield Item(_key(rec, default_key), source, {"segments": segments, "meta": meta})


def _mmc4_records(input: Path, files: list[Path], index: ImageIndex,
                  sim_threshold: float | None) -> Iterator[Item | Skipped]:
    for default_key, source, rec in _rows(input, files):
        if isinstance(rec, Skip):
            yield Skipped(rec.reason, source)
            continue
        text_list, info = rec.get("text_list"), rec.get("image_info") or []
        if not isinstance(text_list, list) or not isinstance(info, list):
            yield Skipped("malformed_document", source)
            continue
        try:
            sentences = [decode_text(t) if t is not None else "" for t in text_list]
        except Skip as s:
            yield Skipped(s.reason, source)
            continue
        before: dict[int, list[tuple]] = {}
        skipped: list[tuple] = []
        for im in info:
            if not isinstance(im, dict):
                skipped.append(("skip", "malformed_image_info"))
                continue
            idx, sim = im.get("matched_text_index"), im.get("matched_sim")
            if not isinstance(idx, int) or not 0 <= idx < len(sentences):
                skipped.append(("skip", "bad_text_index"))
                continue
            if sim_threshold is not None and (not isinstance(sim, int | float) or sim < sim_threshold):
                what = _ref(im.get("image_name") or im.get("raw_url"))
                skipped.append(("skip", "below_similarity_threshold", what))
                continue
            name, url = im.get("image_name"), im.get("raw_url")
            name, url = (name if isinstance(name, str) else None), (url if isinstance(url, str) else None)
            ref = index.find(name, url)
            before.setdefault(idx, []).append(_image_segment(ref, url, name))
        segments: list[tuple] = []
        for i, sentence in enumerate(sentences):
            segments.extend(before.get(i, []))
            segments.append(("text", sentence))
        segments.extend(skipped)
        meta: dict = {"source": source}
        if isinstance(rec.get("url"), str):
            meta["url"] = rec["url"]
        yield Item(_key(rec, default_key), source, {"segments": segments, "meta": meta})


# ------------------------------------------------------------------------------------ entry


def convert_interleaved(
    format: str,
    input: str | Path,
    images_root: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    doc_options: DocOptions | None = None,
    shard_options: ShardOptions | None = None,
    dry_run: bool = False,
) -> dict:
    """Convert OBELICS or MMC4 documents into interleaved shards in ``output``; returns the manifest.

    ``images_root`` is one folder or several, searched in order (see ``ImageIndex``). Raises
    ``ConversionError`` before writing anything when an input cannot be read or the format is unknown.
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    input = check_readable(Path(input))
    given = [images_root] if isinstance(images_root, str | Path) else list(images_root)
    if not given:
        raise ConversionError("no images root given")
    roots = [check_readable(Path(r), "images root", want_dir=True) for r in given]
    dopts = doc_options or DocOptions()
    dopts.joiner = JOINERS[format]
    sopts = shard_options or ShardOptions(output=Path(output))
    sopts.output = Path(output)
    files = _doc_files(input)
    index = ImageIndex(roots)
    print(f"{index.images} images indexed under {', '.join(map(str, roots))}", file=sys.stderr)
    # one root is recorded as a string, as before several could be given: reruns of older outputs resume
    recorded = str(roots[0]) if len(roots) == 1 else [str(r) for r in roots]
    args = {"format": format, "input": str(input), "images_root": recorded, **options_dict(dopts, sopts)}
    if format == "obelics":
        records = _obelics_records(input, files, index)
    else:
        records = _mmc4_records(input, files, index, dopts.sim_threshold)
    conv = Conversion("kosmos.data_tools.interleaved", "interleaved", args, records, make_document_sample,
                      dopts)
    return run_conversion(conv, sopts, dry_run=dry_run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_name("kosmos.data_tools.interleaved"),
        description="Convert interleaved image-text documents (OBELICS rows, MMC4 documents) into webdataset "
        "shards: one document per sample, KEY.json with text/image segments and KEY.img0.jpg... Bad inputs "
        "are skipped and counted in manifest.json; rerunning an interrupted conversion keeps finished "
        "shards.",
        epilog="images are looked up under --images-root by URL hash (sha256/sha1/md5 hex file names), "
        "by the url in img2dataset .json files or tars, or (mmc4) by image_name; with several roots, in "
        "each root in the order given. python -m kosmos.data_tools.urls writes the documents' image URLs for "
        "img2dataset, whose output folder is then an --images-root.",
    )
    p.add_argument("--format", "-f", required=True, choices=FORMATS, help="input format")
    p.add_argument("--input", "-i", required=True, type=Path,
                   help="a .jsonl(.gz)/.parquet file or a folder of them")
    IMAGE_ROOTS.add_to(p)
    DOC_OPTIONS.add_to(p.add_argument_group("documents"))
    add_common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a usage or input error)."""
    a = build_parser().parse_args(argv)

    def run() -> None:
        dopts = DOC_OPTIONS.from_args(a, image=cli.image_options(a))
        roots = IMAGE_ROOTS.from_args(a).images_root
        convert_interleaved(a.format, a.input, roots, a.output, doc_options=dopts,
                            shard_options=cli.shard_options(a), dry_run=a.dry_run)

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
