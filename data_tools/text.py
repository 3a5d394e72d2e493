"""Convert text corpora into webdataset shards: one document per sample.

Inputs (``--input``, a file or a folder, read in sorted order):

- ``.txt``: the whole file is one document; its key is its path relative to the input folder.
- ``.jsonl`` / ``.jsonl.gz``: one document per line, the text in ``--text-field`` (default ``text``).
- ``.parquet``: one document per row, the text in the ``--text-field`` column.

Each sample is ``KEY.txt`` (UTF-8) and ``KEY.json`` (metadata: ``source`` plus the row's other
fields). Rows get the key from ``--id-field`` when given, else ``FILE-ROW``.

    python -m data_tools.text --input corpus/ --output shards/text --samples-per-shard 50000
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from data_tools import cli
from data_tools.cli import add_common_args, run_cli
from data_tools.conversion import Conversion, ShardOptions, options_dict, run_conversion
from data_tools.records import ConversionError, Item, Sample, Skip, Skipped
from data_tools.tables import check_readable, decode_text, iter_table, list_files, table_failure, table_kind


def make_text_sample(item: Item, ctx: None = None) -> Sample:
    """One text sample from ``{"text": str, "meta": dict}``."""
    meta = dict(item.payload.get("meta") or {})
    meta["source"] = item.source
    meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)
    return Sample(files={"txt": item.payload["text"].encode("utf-8"), "json": meta_json.encode("utf-8")})


def _is_input(p: Path) -> bool:
    return p.suffix.lower() == ".txt" or table_kind(p) in ("jsonl", "parquet")


def _text(value) -> str:
    if value is None:
        raise Skip("missing_text")
    text = decode_text(value)
    if not text.strip():
        raise Skip("empty_text")
    return text


def _records(input: Path, files: list[Path], text_field: str,
             id_field: str | None) -> Iterator[Item | Skipped]:
    base = input if input.is_dir() else input.parent
    for path in files:
        rel = path.relative_to(base).as_posix()
        if path.suffix.lower() == ".txt":
            try:
                text = _text(path.read_bytes())
            except Skip as s:
                yield Skipped(s.reason, rel)
                continue
            except OSError:
                yield Skipped("unreadable_file", rel)
                continue
            yield Item(rel.rsplit(".", 1)[0], rel, {"text": text, "meta": {}})
            continue
        stem = rel.split(".", 1)[0]
        try:
            for row, rec in iter_table(path):
                source = f"{rel}:{row}"
                if isinstance(rec, Skip):
                    yield Skipped(rec.reason, source)
                    continue
                try:
                    text = _text(rec.get(text_field))
                except Skip as s:
                    yield Skipped(s.reason, source)
                    continue
                key = f"{stem}-{row:08d}"
                if id_field is not None:
                    if rec.get(id_field) in (None, ""):
                        yield Skipped("missing_key", source)
                        continue
                    key = str(rec[id_field])
                meta = {k: v for k, v in rec.items() if k != text_field and not isinstance(v, bytes)}
                yield Item(key, source, {"text": text, "meta": meta})
        except (OSError, ValueError) as e:  # a table that cannot be read (any further): rows before are kept
            yield Skipped(table_failure(rel, e), rel)


def convert_text(
    input: str | Path,
    output: str | Path,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    shard_options: ShardOptions | None = None,
    dry_run: bool = False,
) -> dict:
    """Convert ``.txt``, ``.jsonl(.gz)`` and ``.parquet`` documents into text shards; returns the manifest.

    Raises ``ConversionError`` before writing anything when the input cannot be read or holds no
    supported file.
    """
    input = check_readable(Path(input))
    others: list[Path] = []  # FIFOs, sockets, devices and broken links with an input suffix
    files = list_files(input, _is_input, others)
    if not files or (input.is_file() and not _is_input(input)):
        raise ConversionError(f"no .txt, .jsonl, .jsonl.gz or .parquet input in {input}")
    sopts = shard_options or ShardOptions(output=Path(output))
    sopts.output = Path(output)
    args = {"input": str(input), "text_field": text_field, "id_field": id_field, **options_dict(sopts)}
    records = itertools.chain(_records(input, files, text_field, id_field),
                              (Skipped("not_a_regular_file", p.relative_to(input).as_posix())
                               for p in others))
    conv = Conversion("data_tools.text", "text", args, records, make_text_sample, None)
    return run_conversion(conv, sopts, dry_run=dry_run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_tools.text",
        description="Convert text documents (.txt files, .jsonl/.jsonl.gz lines, parquet rows) into "
        "webdataset shards of KEY.txt + KEY.json. Bad inputs (non-UTF-8, malformed JSON, empty text, "
        "duplicate keys) are "
        "skipped and counted in manifest.json; rerunning an interrupted conversion keeps finished shards.",
    )
    p.add_argument("--input", "-i", required=True, type=Path,
                   help="a file or a folder of .txt/.jsonl(.gz)/.parquet")
    p.add_argument("--text-field", default="text",
                   help="jsonl/parquet: field holding the text (default text)")
    p.add_argument("--id-field", default=None,
                   help="jsonl/parquet: field used as sample key (default FILE-ROW)")
    add_common_args(p, images=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a usage or input error)."""
    a = build_parser().parse_args(argv)
    return run_cli(lambda: convert_text(a.input, a.output, text_field=a.text_field, id_field=a.id_field,
                                        shard_options=cli.shard_options(a), dry_run=a.dry_run))


if __name__ == "__main__":
    sys.exit(main())
