"""Text converter: .txt, .jsonl(.gz), parquet; bad inputs counted; workers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_tools.conversion import ShardOptions
from data_tools.records import ConversionError
from data_tools.text import convert_text, main
from data_tools.verify import verify
from tests.helpers import manifest, read_tar, read_wds, shard_bytes, write


def _opts(out: Path, **kw) -> ShardOptions:
    return ShardOptions(output=out, progress=False, **kw)


def _read_back(out: Path) -> dict[str, str]:
    samples = read_wds(out)
    tars = read_tar(out)
    got = {s["__key__"]: s["txt"].decode("utf-8") for s in samples}
    assert got == {k: v["txt"].decode("utf-8") for k, v in tars.items()}
    assert all(json.loads(s["json"])["source"] for s in samples)
    assert verify(out, quiet=True)[0]
    return got


def test_txt_jsonl_gz_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "corpus"
    write(src / "a" / "one.txt", "First document.\nWith two lines. ünïcödé")
    rows = [json.dumps({"text": f"line doc {i}", "lang": "en"}) + "\n" for i in range(3)]
    write(src / "b.jsonl", "".join(rows))
    with gzip.open(src / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gzipped doc"}) + "\n")
    table = pa.Table.from_pylist([{"text": "parquet doc 0"}, {"text": "parquet doc 1"}])
    pq.write_table(table, src / "d.parquet")
    write(src / "ignored.md", "not an input")
    out = tmp_path / "out"
    m = convert_text(src, out, shard_options=_opts(out, samples_per_shard=3))
    got = _read_back(out)
    assert got == {"a_one": "First document.\nWith two lines. ünïcödé", "b-00000000": "line doc 0",
                   "b-00000001": "line doc 1", "b-00000002": "line doc 2", "c-00000000": "gzipped doc",
                   "d-00000000": "parquet doc 0", "d-00000001": "parquet doc 1"}
    assert [s["samples"] for s in m["shards"]] == [3, 3, 1]
    assert m["kind"] == "text" and m["totals"]["images"] == 0
    assert json.loads(read_tar(out)["b-00000001"]["json"])["lang"] == "en"


def test_bad_text_inputs_are_counted(tmp_path):
    src = tmp_path / "corpus"
    write(src / "good.txt", "fine")
    write(src / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(src / "empty.txt", "   \n")
    write(src / "zero.txt", b"")
    lines = [json.dumps({"id": "x1", "text": "ok 1"}).encode(), b'{"id": "x2", "text": "broken',
             json.dumps({"id": "x3", "text": "caf\\u00e9"}).encode().replace(b"\\u00e9", b"\xe9"),
             json.dumps({"id": "x4", "body": "no text field"}).encode(),
             json.dumps({"id": "x1", "text": "duplicate id"}).encode(),
             json.dumps({"text": "no id"}).encode(), b"[1, 2]"]
    write(src / "rows.jsonl", b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    assert main(["-i", str(src), "-o", str(out), "--id-field", "id", "--no-progress"]) == 0
    m = manifest(out)
    assert m["skipped"] == {"non_utf8_text": 2, "empty_text": 2, "malformed_json": 2, "missing_text": 1,
                            "duplicate_key": 1, "missing_key": 1}
    assert _read_back(out) == {"good": "fine", "x1": "ok 1"}
    assert m["totals"]["inputs"] == 11


def test_errors_before_writing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="does not exist"):
        convert_text(tmp_path / "nope", out)
    write(tmp_path / "only.md", "x")
    with pytest.raises(ConversionError, match="no .txt"):
        convert_text(tmp_path / "only.md", out)
    assert not out.exists()


@pytest.mark.slow
def test_workers_and_resume_give_the_same_shards(tmp_path):
    src = tmp_path / "corpus"
    rows = [json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(50)]
    write(src / "rows.jsonl", "".join(rows))
    a, b = tmp_path / "a", tmp_path / "b"
    convert_text(src, a, shard_options=_opts(a, samples_per_shard=7))
    convert_text(src, b, shard_options=_opts(b, samples_per_shard=7, workers=2))
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) == 8
    (b / "shard-000003-000.tar").unlink()  # a lost shard is rewritten on rerun
    convert_text(src, b, shard_options=_opts(b, samples_per_shard=7, workers=2))
    assert shard_bytes(a) == shard_bytes(b)
