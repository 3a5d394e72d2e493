"""Write the image URLs of interleaved documents (OBELICS, MMC4) as a URL list for img2dataset.

The documents are read as ``kosmos.data_tools.interleaved`` reads them (same files, same document keys, same
skip reasons), and every image the converter would look up by URL gives one row, once per URL however
many documents use it:

    url          the URL (surrounding whitespace stripped; the converter strips it too when looking up)
    url_sha256   sha256(url) hex: the file stem under which the converter also finds the image, for a
                 downloader other than img2dataset that names files by it (``KEY.jpg``)
    doc_key      the first document that uses the URL (its sample key in the converter's shards)
    image_index  the image's position in that document (0 = the document's first image)

img2dataset names its files by its own running number (``00000/000000007.jpg``, or ``000000007.jpg`` inside
``00000.tar``) and keeps the ``url`` column in the ``.json`` beside each image; the interleaved converter
indexes those ``.json`` files by ``url``, so its ``--images-root`` can be img2dataset's output folder as is.
``doc_key`` and ``image_index`` travel into those ``.json`` files with ``--save_additional_columns``
(img2dataset writes its own ``key`` there, hence no column of that name here):

    python -m kosmos.data_tools.urls --format obelics --input obelics/ --output urls.parquet
    img2dataset --url_list urls.parquet --input_format parquet --url_col url \\
        --save_additional_columns '["doc_key","image_index"]' --output_format webdataset \\
        --resize_mode keep_ratio --image_size 256 --resize_only_if_bigger True --output_folder downloads/
    python -m kosmos.data_tools.interleaved --format obelics --input obelics/ --images-root downloads/ \
        --output shards/obelics

Bad input is counted by reason and named (``file:row``, up to 10 per reason) in the closing lines and in
``NAME.stats.json`` beside the output: documents (``malformed_json``, ``non_utf8_text``,
``malformed_document``, a damaged file) and images (``no_url``, ``bad_url``: not ``scheme://...`` or with
spaces or control characters; MMC4: ``below_similarity_threshold`` with ``--sim-threshold``,
``bad_text_index``, ``malformed_image_info``), none of which the converter could use. The list is written
to a temporary file renamed at the end, so img2dataset never reads half a list. URLs are deduplicated
with a set of 16-byte digests: about 100 bytes of memory per unique URL.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from kosmos.data_tools.cli import OptionSpec, run_cli
from kosmos.data_tools.images import url_problem
from kosmos.data_tools.interleaved import FORMATS, DocOptions, _doc_files, _mmc4_records, _obelics_records
from kosmos.data_tools.records import ConversionError, Item, Skipped
from kosmos.data_tools.tables import check_readable
from kosmos.data_tools.writer import count_skip, sanitize_key, write_json_atomic
from kosmos.errors import command_name
from kosmos.progress import bar as progress_bar

OUTPUT_KINDS = {".parquet": "parquet", ".tsv": "tsv"}
COLUMNS = ("url", "url_sha256", "doc_key", "image_index")
"""A URL img2dataset can fetch: a scheme, ``://``, then no whitespace or control character (which would
also break a TSV row)."""
BATCH_ROWS = 65_536


@dataclass
class UrlOptions:
    """How the documents are read."""

    limit: int | None = None
    """Read only the first N documents (rows of the inputs, bad ones included)."""
    progress: bool = True
    """Show a progress bar on a terminal."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")


URL_OPTIONS = OptionSpec(UrlOptions, names={"progress": ("--no-progress",)})
SIM_OPTION = OptionSpec(DocOptions, exclude=tuple(f.name for f in fields(DocOptions)
                                                   if f.name != "sim_threshold"))
"""``--sim-threshold``, stated once in ``DocOptions``: images the converter would drop are not listed."""


class _UrlsOnly:
    """Stands in for the converter's ``ImageIndex``: every image "found" is its URL (None: no URL)."""

    def find(self, name: str | None = None, url: str | None = None) -> str | None:
        return url if isinstance(url, str) else None


class _Writer:
    """Rows to a ``.parquet`` (in row groups of ``BATCH_ROWS``) or a ``.tsv`` with a header line."""

    def __init__(self, path: Path, kind: str):
        self.kind = kind
        self.rows: list[tuple] = []
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("url", pa.string()), ("url_sha256", pa.string()),
                                     ("doc_key", pa.string()), ("image_index", pa.int32())])
            self.out = pq.ParquetWriter(path, self.schema)
        else:
            self.file = open(path, "w", encoding="utf-8", newline="")
            self.tsv = csv.writer(self.file, delimiter="\t", lineterminator="\n")  # quotes a '"' in a URL
            self.tsv.writerow(COLUMNS)

    def write(self, row: tuple) -> None:
        self.rows.append(row)
        if len(self.rows) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.kind == "parquet":
            if self.rows:
                import pyarrow as pa

                columns = list(zip(*self.rows, strict=True))
                self.out.write_table(pa.table(dict(zip(COLUMNS, columns, strict=True)), schema=self.schema))
        else:
            self.tsv.writerows(self.rows)
        self.rows = []

    def close(self) -> None:
        self.flush()
        (self.out if self.kind == "parquet" else self.file).close()


def _documents(format: str, input: Path, files: list[Path], sim_threshold: float | None,
               limit: int | None) -> Iterator[Item | Skipped]:
    """The converter's records, images given as URLs, for the first ``limit`` documents."""
    index = _UrlsOnly()
    records = (_obelics_records(input, files, index) if format == "obelics"  # type: ignore[arg-type]
               else _mmc4_records(input, files, index, sim_threshold))  # type: ignore[arg-type]
    for n, rec in enumerate(records):
        if limit is not None and n >= limit:
            return
        yield rec


def write_urls(format: str, input: str | Path, output: str | Path, *, sim_threshold: float | None = None,
               options: UrlOptions | None = None) -> dict:
    """Write the unique image URLs of OBELICS or MMC4 documents to ``output`` (``.parquet`` or ``.tsv``);
    returns the counts (also written to ``NAME.stats.json`` beside it).

    Raises ``ConversionError`` before writing anything when the input cannot be read, the format is unknown
    or the output name has another suffix, and, after writing the counts, when no URL was found.
    """
    opts = options or UrlOptions()
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    output = Path(output)
    kind = OUTPUT_KINDS.get(output.suffix.lower())
    if kind is None:
        raise ConversionError(f"output {output} must end in .parquet or .tsv (what img2dataset reads)")
    if output.is_dir():
        raise ConversionError(f"output {output} is a folder; name the URL list, e.g. {output}/urls.parquet")
    input = check_readable(Path(input))
    stats_path = output.with_suffix(".stats.json")
    tmp = output.with_name(f".{output.name}.tmp")
    mine = {p.resolve() for p in (output, tmp)}
    files = [f for f in _doc_files(input) if f.resolve() not in mine]  # a rerun must not read its own list
    if not files:
        raise ConversionError(f"no document files in {input} besides the output {output}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        writer = _Writer(tmp, kind)
    except OSError as e:
        raise ConversionError(f"output {output} cannot be written ({e.strerror or e})") from None

    counts: Counter = Counter()
    skipped: Counter = Counter()
    skipped_images: Counter = Counter()
    examples: dict[str, list[str]] = {}
    seen: set[bytes] = set()

    def skip(counter: Counter, reason: str, source: str, detail: str = "") -> None:
        count_skip(counter, examples, reason, source, detail)

    bar = progress_bar(desc="urls", unit=" docs", enabled=opts.progress)
    try:
        for rec in _documents(format, input, files, sim_threshold, opts.limit):
            bar.update(1)
            counts["documents"] += 1
            if isinstance(rec, Skipped):
                skip(skipped, rec.reason, rec.source, rec.detail)
                continue
            n_images = 0
            for seg in rec.payload["segments"]:
                if seg[0] == "skip":
                    skip(skipped_images, seg[1], rec.source)
                    continue
                if seg[0] != "image":
                    continue
                position = n_images
                n_images += 1
                url = (seg[1] or "").strip()
                problem = url_problem(url)
                if problem:
                    skip(skipped_images, problem, rec.source, f"image {position}: {seg[1]!r}")
                    continue
                counts["image_urls"] += 1
                digest = hashlib.blake2b(url.encode("utf-8", "surrogateescape"), digest_size=16).digest()
                if digest in seen:
                    continue
                seen.add(digest)
                sha = hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()
                writer.write((url, sha, sanitize_key(str(rec.key)), position))
            counts["documents_with_images" if n_images else "documents_without_images"] += 1
    except BaseException:
        try:
            writer.close()
        finally:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    writer.close()

    counts["unique_urls"] = len(seen)
    totals = ("documents", "documents_with_images", "documents_without_images", "image_urls", "unique_urls")
    stats = {"tool": "kosmos.data_tools.urls", "format": format, "input": str(input), "output": str(output),
             "sim_threshold": sim_threshold, "limit": opts.limit, **{k: counts[k] for k in totals},
             "skipped": dict(sorted(skipped.items())), "skipped_images": dict(sorted(skipped_images.items())),
             "skipped_examples": {k: examples[k] for k in sorted(examples)}}
    write_json_atomic(stats_path, stats)
    if not seen:
        tmp.unlink(missing_ok=True)
        first = next(iter(stats["skipped_examples"].values()), [])
        raise ConversionError(
            f"no image URL in {counts['documents']} documents of {input}; skipped documents: "
            f"{_fmt(skipped)}; skipped images: {_fmt(skipped_images)}"
            + (f"; e.g. {first[0]}" if first else "") + f" (all in {stats_path})")
    os.replace(tmp, output)
    print(_summary(stats, output, stats_path))
    return stats


def _fmt(c: Counter | dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"


def _summary(stats: dict, output: Path, stats_path: Path) -> str:
    """The closing lines: what was written, then each skip reason with its count and first example."""
    lines = [f"data_tools.urls: {stats['unique_urls']} unique URLs ({stats['image_urls']} image URLs in "
             f"{stats['documents_with_images']} documents) -> {output}; {stats['documents']} documents read, "
             f"{stats['documents_without_images']} without images; "
             f"skipped documents: {_fmt(stats['skipped'])}; skipped images: {_fmt(stats['skipped_images'])}"]
    for reason, ex in stats["skipped_examples"].items():
        lines.append(f"  {reason}: e.g. {ex[0]}" + (f" (+{len(ex) - 1} more in {stats_path})" if len(ex) > 1
                                                    else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_name("kosmos.data_tools.urls"),
        description="Write the image URLs of interleaved documents (OBELICS rows, MMC4 documents) as a URL "
        "list for img2dataset: one row per unique URL with columns url, url_sha256, doc_key (the first "
        "document that uses it) and image_index (its position there). Documents are read as "
        "kosmos.data_tools.interleaved reads them; bad documents and URLs are counted by reason and named "
        "(file:row) "
        "on the console and in NAME.stats.json beside the output.",
        epilog="then: img2dataset --url_list urls.parquet --input_format parquet --url_col url "
        "--save_additional_columns '[\"doc_key\",\"image_index\"]' --output_format webdataset "
        "--resize_mode keep_ratio --image_size 256 --resize_only_if_bigger True --output_folder downloads/ "
        "(files works too; not parquet or tfrecord), and python -m kosmos.data_tools.interleaved ... "
        "--images-root downloads/: the converter finds each image by the url that img2dataset keeps in the "
        ".json beside it.",
    )
    p.add_argument("--format", "-f", required=True, choices=FORMATS, help="input format")
    p.add_argument("--input", "-i", required=True, type=Path,
                   help="a .jsonl(.gz)/.parquet file or a folder of them (as for the interleaved converter)")
    p.add_argument("--output", "-o", required=True, type=Path,
                   help="the URL list: NAME.parquet (img2dataset --input_format parquet) or NAME.tsv "
                   "(--input_format tsv); overwritten. NAME.stats.json gets the counts.")
    SIM_OPTION.add_to(p)
    URL_OPTIONS.add_to(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a usage or input error)."""
    a = build_parser().parse_args(argv)
    return run_cli(lambda: write_urls(a.format, a.input, a.output, sim_threshold=a.sim_threshold,
                                      options=URL_OPTIONS.from_args(a)))


if __name__ == "__main__":
    sys.exit(main())
