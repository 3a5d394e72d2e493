"""Convert text corpora into webdataset shards: one document per sample.

Inputs (``--input``, a file or a folder, read in sorted order):

- ``.txt``: the whole file is one document; its key is its path relative to the input folder.
- ``.jsonl`` / ``.jsonl.gz``: one document per line, the text in ``--text-field`` (default ``text``).
- ``.parquet``: one document per row, the text in the ``--text-field`` column.

Each sample is ``KEY.txt`` (UTF-8) and ``KEY.json`` (metadata: ``source`` plus the row's other
fields). Rows get the key from ``--id-field`` when given, else ``FILE-ROW``.

``--format instructions``: language-only instruction data (the paper mixes Unnatural Instructions and FLANv2
into training), from ``.jsonl(.gz)``, ``.parquet`` and ``.json`` (one record, or a list of records) inputs.
Each record is recognised by its fields:

- Unnatural Instructions: ``{"instruction", "instances": [{"input", "output", ...}], "reformulations":
  [{"instruction", "input", "output", ...}]}`` (its ``core_data.jsonl``/``full_data.jsonl`` lines, or a file
  holding one such ``{"instances": [...]}`` object): one sample per instance (key ``FILE-ROW-iN``) and per
  reformulation (``FILE-ROW-rN``); an entry without its own ``instruction`` takes the record's. A literal
  ``{INPUT}`` in an instruction is replaced by the input. The ``constraints`` are not used.
- flat ``{"instruction", "input"?, "output"}`` records (Unnatural Instructions flattened, Alpaca style).
- FLAN style ``{"inputs", "targets"}``: the inputs are the instruction.
- plain ``{"prompt", "response"}``: the prompt is the instruction.

Every record becomes one text through one template, `INSTRUCTION_TEMPLATE`. ``KEY.txt`` holds that whole
text and ``KEY.json`` holds ``"prompt_chars"``, the length (in characters) of the prompt, everything before
the response, with ``"style"`` (``unnatural``, ``flat``, ``flan``, ``prompt_response``), ``source`` and the
record's other scalar fields. Training puts loss on the whole text by default, as the paper does, or on the
response only with ``data.text.loss: response`` (``kosmos.data.format``). Records of no known style, an empty
instruction or an empty response are skipped and counted.

    python -m kosmos.data_tools.text --input corpus/ --output shards/text --samples-per-shard 50000
    python -m kosmos.data_tools.text --format instructions --input unnatural/full_data.jsonl \
        --output shards/unnat
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from kosmos.data_tools import cli
from kosmos.data_tools.cli import add_common_args, run_cli
from kosmos.data_tools.conversion import Conversion, ShardOptions, options_dict, run_conversion
from kosmos.data_tools.records import ConversionError, Item, Sample, Skip, Skipped
from kosmos.data_tools.tables import (
    check_readable,
    decode_text,
    iter_table,
    list_files,
    table_failure,
    table_kind,
)
from kosmos.errors import command_name
from kosmos.untrusted import load_json

FORMATS = ("documents", "instructions")

INSTRUCTION_TEMPLATE = "Instruction: {instruction}\n{input}Output: {output}"
"""The one template of instruction samples. ``{input}`` is `INPUT_LINE` for a record with a non-empty input,
else empty; the prompt is everything before ``{output}``:

    Instruction: Translate to French.
    Input: Good morning
    Output: Bonjour
"""
INPUT_LINE = "Input: {input}\n"
"""What ``{input}`` of `INSTRUCTION_TEMPLATE` becomes for a record with an input."""


def render_instruction(instruction: str, input: str, output: str) -> tuple[str, int]:
    """The templated text and its prompt's length in characters (the text up to the response)."""
    text = INSTRUCTION_TEMPLATE.format(instruction=instruction, input=INPUT_LINE.format(input=input) if input
                                       else "", output=output)
    return text, len(text) - len(output)


def make_text_sample(item: Item, ctx: None = None) -> Sample:
    """One text sample from ``{"text": str, "meta": dict}``."""
    meta = dict(item.payload.get("meta") or {})
    meta["source"] = item.source
    meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)
    return Sample(files={"txt": item.payload["text"].encode("utf-8"), "json": meta_json.encode("utf-8")})


def _is_input(p: Path) -> bool:
    return p.suffix.lower() == ".txt" or table_kind(p) in ("jsonl", "parquet")


def _is_instruction_input(p: Path) -> bool:
    return p.suffix.lower() == ".json" or table_kind(p) in ("jsonl", "parquet")


def _text(value) -> str:
    if value is None:
        raise Skip("missing_text")
    text = decode_text(value)
    if not text.strip():
        raise Skip("empty_text")
    return text


def _row_key(rec: dict, id_field: str | None, stem: str, row: int) -> str | None:
    """A table row's key: its `id_field` value, else ``STEM-ROW``; None when `id_field` is given and the row
    has no value there (counted as missing_key)."""
    if id_field is None:
        return f"{stem}-{row:08d}"
    return None if rec.get(id_field) in (None, "") else str(rec[id_field])


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
                key = _row_key(rec, id_field, stem, row)
                if key is None:
                    yield Skipped("missing_key", source)
                    continue
                meta = {k: v for k, v in rec.items() if k != text_field and not isinstance(v, bytes)}
                yield Item(key, source, {"text": text, "meta": meta})
        except (OSError, ValueError) as e:  # a table that cannot be read (any further): rows before are kept
            yield Skipped(table_failure(rel, e), rel)


# ------------------------------------------------------------------------------------ instructions


def _field(rec: dict, name: str, reason: str, required: bool = True) -> str:
    value = rec.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise Skip(reason)
        return ""
    return decode_text(value)


def _instruction_items(rec: dict, key: str, source: str) -> Iterator[Item | Skipped]:
    """The samples of one instruction record (several for an Unnatural Instructions record)."""
    entries: list[tuple[str, str, dict, str]] = []  # (key, source, fields, style)
    if isinstance(rec.get("instances"), list) or isinstance(rec.get("reformulations"), list):
        for tag, name in (("i", "instances"), ("r", "reformulations")):
            for n, entry in enumerate(rec.get(name) or []):
                fields = {"instruction": rec.get("instruction"), **entry} if isinstance(entry, dict) else None
                entries.append((f"{key}-{tag}{n}", f"{source}:{name}[{n}]", fields, "unnatural"))
        if not entries:
            yield Skipped("no_instances", source)
    elif "inputs" in rec or "targets" in rec:
        fields = {"instruction": rec.get("inputs"), "output": rec.get("targets")}
        entries.append((key, source, fields, "flan"))
    elif "prompt" in rec or "response" in rec:
        entries.append((key, source, {"instruction": rec.get("prompt"), "output": rec.get("response")},
                        "prompt_response"))
    elif "instruction" in rec or "output" in rec:
        entries.append((key, source, rec, "flat"))
    else:
        yield Skipped("not_an_instruction_record", source, f"fields: {', '.join(sorted(map(str, rec)))}")
    used = {"instruction", "input", "output", "inputs", "targets", "prompt", "response", "instances",
            "reformulations", "constraints", "instruction_with_input"}
    meta = {k: v for k, v in rec.items() if k not in used and isinstance(v, str | int | float | bool)}
    for k, src, fields, style in entries:
        if fields is None:
            yield Skipped("malformed_record", src)
            continue
        try:
            instruction = _field(fields, "instruction", "empty_instruction").strip()
            inp = _field(fields, "input", "", required=False).strip()
            out = _field(fields, "output", "empty_response").strip()
            if not out:
                raise Skip("empty_response")
        except Skip as s:
            yield Skipped(s.reason, src)
            continue
        if "{INPUT}" in instruction:
            instruction, inp = instruction.replace("{INPUT}", inp), ""
        text, prompt_chars = render_instruction(instruction, inp, out)
        yield Item(k, src, {"text": text, "meta": {**meta, "style": style, "prompt_chars": prompt_chars}})


def _json_rows(path: Path) -> Iterator[tuple[int, dict | Skip]]:
    """The records of a ``.json`` file: the object itself (row 0), or each element of a list."""
    try:
        data = load_json(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        yield 0, Skip("non_utf8_text")
        return
    except json.JSONDecodeError:
        yield 0, Skip("malformed_json")
        return
    rows = data if isinstance(data, list) else [data]
    for i, rec in enumerate(rows):
        yield i, rec if isinstance(rec, dict) else Skip("malformed_json")


def _instruction_records(input: Path, files: list[Path], id_field: str | None) -> Iterator[Item | Skipped]:
    base = input if input.is_dir() else input.parent
    for path in files:
        rel = path.relative_to(base).as_posix()
        stem = rel.split(".", 1)[0]
        rows = _json_rows(path) if path.suffix.lower() == ".json" else iter_table(path)
        try:
            for row, rec in rows:
                source = f"{rel}:{row}"
                if isinstance(rec, Skip):
                    yield Skipped(rec.reason, source)
                    continue
                key = _row_key(rec, id_field, stem, row)
                if key is None:
                    yield Skipped("missing_key", source)
                    continue
                yield from _instruction_items(rec, key, source)
        except (OSError, ValueError) as e:  # a table that cannot be read (any further): rows before are kept
            yield Skipped(table_failure(rel, e), rel)


# ------------------------------------------------------------------------------------ entry


def convert_text(
    input: str | Path,
    output: str | Path,
    *,
    format: str = "documents",
    text_field: str = "text",
    id_field: str | None = None,
    shard_options: ShardOptions | None = None,
    dry_run: bool = False,
) -> dict:
    """Convert ``.txt``, ``.jsonl(.gz)`` and ``.parquet`` documents into text shards; returns the manifest.
    With ``format="instructions"``, instruction records (``.jsonl(.gz)``, ``.parquet``, ``.json``; see the
    module docstring) instead.

    Raises ``ConversionError`` before writing anything when the input cannot be read or holds no
    supported file.
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    input = check_readable(Path(input))
    others: list[Path] = []  # FIFOs, sockets, devices and broken links with an input suffix
    accept = _is_input if format == "documents" else _is_instruction_input
    files = list_files(input, accept, others)
    if not files or (input.is_file() and not accept(input)):
        what = (".txt, .jsonl, .jsonl.gz or .parquet" if format == "documents"
                else ".jsonl, .jsonl.gz, .json or .parquet")
        raise ConversionError(f"no {what} input in {input}")
    sopts = shard_options or ShardOptions(output=Path(output))
    sopts.output = Path(output)
    args = {"input": str(input), "text_field": text_field, "id_field": id_field, **options_dict(sopts)}
    if format != "documents":  # the manifest of a documents conversion stays as it was
        args["format"] = format
    found = (_records(input, files, text_field, id_field) if format == "documents"
             else _instruction_records(input, files, id_field))
    records = itertools.chain(found,
                              (Skipped("not_a_regular_file", p.relative_to(input).as_posix())
                               for p in others))
    conv = Conversion("kosmos.data_tools.text", "text", args, records, make_text_sample, None)
    return run_conversion(conv, sopts, dry_run=dry_run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=command_name("kosmos.data_tools.text"),
        description="Convert text documents (.txt files, .jsonl/.jsonl.gz lines, parquet rows) into "
        "webdataset shards of KEY.txt + KEY.json. Bad inputs (non-UTF-8, malformed JSON, empty text, "
        "duplicate keys) are "
        "skipped and counted in manifest.json; rerunning an interrupted conversion keeps finished shards.",
    )
    p.add_argument("--format", "-f", choices=FORMATS, default="documents",
                   help="documents (default): one document per file or row; instructions: Unnatural "
                   "Instructions, FLAN (inputs/targets) or prompt/response records, templated, the prompt's "
                   "length kept in KEY.json")
    p.add_argument("--input", "-i", required=True, type=Path,
                   help="a file or a folder of .txt/.jsonl(.gz)/.parquet (instructions: "
                   ".jsonl(.gz)/.json/.parquet)")
    p.add_argument("--text-field", default="text",
                   help="jsonl/parquet: field holding the text (default text)")
    p.add_argument("--id-field", default=None,
                   help="jsonl/parquet: field used as sample key (default FILE-ROW)")
    add_common_args(p, images=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for a usage or input error)."""
    a = build_parser().parse_args(argv)
    return run_cli(lambda: convert_text(a.input, a.output, format=a.format, text_field=a.text_field,
                                        id_field=a.id_field, shard_options=cli.shard_options(a),
                                        dry_run=a.dry_run))


if __name__ == "__main__":
    sys.exit(main())
