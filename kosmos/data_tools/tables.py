"""Reading the converters' inputs: tables (jsonl(.gz), parquet, csv, tsv) row by row, files under a folder,
text fields. A row or a field that cannot be used gives a ``Skip`` with its reason instead of stopping the
run; an input that cannot be read at all raises ``ConversionError`` before anything is written. A table
that breaks part way (a truncated or corrupt ``.gz``, a damaged parquet) raises ``TableError`` after the rows
before the damage: the converters keep those rows and count the file under the error's reason.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from kosmos.data_tools.records import ConversionError, Skip
from kosmos.untrusted import load_json


class TableError(OSError):
    """A table that cannot be read (any further), raised after the rows read before the damage.

    ``reason`` is the skip reason it is counted under: ``truncated_file`` (the data ends early, e.g. a cut
    ``.gz``) or ``corrupt_file`` (not decodable: bad compressed data, not a parquet file, ...).
    """

    def __init__(self, path: Path, rows: int, error: BaseException):
        self.reason = "truncated_file" if isinstance(error, EOFError) else "corrupt_file"
        what = "truncated" if self.reason == "truncated_file" else "corrupt"
        where = f"after {rows} rows" if rows else "before its first row"
        super().__init__(f"{path}: {what} {where} ({type(error).__name__}: {error})")


def table_failure(name: str, error: Exception) -> str:
    """Warn that table ``name`` could not be read (further) and return the skip reason to count it under:
    the ``TableError``'s, or ``unreadable_file``."""
    if isinstance(error, TableError):
        print(f"warning: {error}; the rows before are kept", file=sys.stderr)
        return error.reason
    print(f"warning: {name}: {error}", file=sys.stderr)
    return "unreadable_file"


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict | Skip]]:
    """``(line number, record)`` for each line of a ``.jsonl``/``.jsonl.gz`` file.

    A line that is not UTF-8 or not a JSON object gives a ``Skip`` instead of the record; a ``.gz`` that is
    cut short or corrupt raises ``TableError`` after the lines before the damage.
    """
    import gzip
    import zlib

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        rows = 0
        try:
            for i, raw in enumerate(f):
                rows = i + 1
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield i, Skip("non_utf8_text")
                    continue
                try:
                    rec = load_json(line)
                except json.JSONDecodeError:
                    yield i, Skip("malformed_json")
                    continue
                yield i, rec if isinstance(rec, dict) else Skip("malformed_json")
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise TableError(path, rows, e) from None


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
    """``(row number, record)`` for each row of a parquet file, read in batches; a file that is not parquet
    or is damaged raises ``TableError`` (after the rows read before the damage)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield i, rec
                i += 1
    except PermissionError:
        raise
    except (OSError, ValueError, pa.ArrowException) as e:
        raise TableError(path, i, e) from None


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


def list_files(root: Path, accept: Callable[[Path], bool], others: list[Path] | None = None) -> list[Path]:
    """Files under ``root`` (or ``root`` itself) that ``accept`` takes, sorted by relative path.

    Entries that ``accept`` takes but that are neither regular files nor folders (FIFOs, sockets, devices,
    broken links) are left out, and appended to ``others`` when it is given, so that they can be counted.
    """
    if root.is_file():
        return [root]
    out = []
    for p in root.rglob("*"):
        if p.is_file():
            if not p.name.startswith(".") and accept(p):
                out.append(p)
        elif others is not None and not p.is_dir() and not p.name.startswith(".") and accept(p):
            others.append(p)
    if others is not None:
        others.sort(key=lambda p: p.relative_to(root).as_posix())
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def open_regular(path: str | Path) -> IO[bytes]:
    """``open(path, "rb")`` for a regular file; ``Skip('not_a_regular_file')`` for a FIFO, socket or device.

    Checked on the opened descriptor, opened without blocking: a plain ``open`` of a FIFO waits for a
    writer forever. A folder raises ``IsADirectoryError`` as ``open`` does.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise Skip("not_a_regular_file", str(path))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


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
