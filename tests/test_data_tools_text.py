"""Text converter: .txt, .jsonl(.gz), parquet; bad inputs counted; workers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kosmos.data_tools.conversion import ShardOptions
from kosmos.data_tools.records import ConversionError
from kosmos.data_tools.text import convert_text, main
from kosmos.data_tools.verify import verify
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


# ------------------------------------------------------------------------------------ instructions


def _prompt_and_response(out: Path) -> dict[str, tuple[str, str]]:
    """key -> (prompt, response), split where KEY.json's prompt_chars says."""
    got = {}
    for key, files in read_tar(out).items():
        text, meta = files["txt"].decode("utf-8"), json.loads(files["json"])
        got[key] = (text[: meta["prompt_chars"]], text[meta["prompt_chars"] :])
    return got


def test_instructions_unnatural_flan_and_prompt_response(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kosmos.data_tools.text import INSTRUCTION_TEMPLATE, render_instruction

    src = tmp_path / "inst"
    # Unnatural Instructions: core_data.jsonl lines, one instruction with its instances (and reformulations)
    core = {"instruction": "Say whether the number is even.",
            "instances": [{"instruction_with_input": "Say whether the number is even.\n4", "input": "4",
                           "constraints": "Yes or No.", "output": "Yes"},
                          {"input": "7", "constraints": "Yes or No.", "output": "No"}],
            "reformulations": [{"instruction": "Is {INPUT} even?", "instruction_with_input": "Is 10 even?",
                                "input": "10", "output": "Yes"}]}
    write(src / "unnatural.jsonl", json.dumps(core) + "\n")
    # ... and a file holding one {"instances": [...]} object
    write(src / "task.json", json.dumps({"instruction": "Reverse the word.",
                                         "instances": [{"input": "abc", "output": "cba"}]}))
    flan = [{"inputs": "Premise: it rains. Does it follow that the ground is wet?", "targets": "yes",
             "task_name": "rte"}]
    pq.write_table(pa.Table.from_pylist(flan), src / "flan.parquet")
    write(src / "chat.jsonl", json.dumps({"prompt": "Name a colour.", "response": "Blue."}) + "\n"
          + json.dumps({"instruction": "Add one.", "input": "1", "output": "2"}) + "\n")
    out = tmp_path / "out"
    assert main(["--format", "instructions", "-i", str(src), "-o", str(out), "--no-progress"]) == 0
    got = _prompt_and_response(out)
    assert got == {
        "unnatural-00000000-i0": ("Instruction: Say whether the number is even.\nInput: 4\nOutput: ", "Yes"),
        "unnatural-00000000-i1": ("Instruction: Say whether the number is even.\nInput: 7\nOutput: ", "No"),
        "unnatural-00000000-r0": ("Instruction: Is 10 even?\nOutput: ", "Yes"),  # {INPUT} filled in
        "task-00000000-i0": ("Instruction: Reverse the word.\nInput: abc\nOutput: ", "cba"),
        "flan-00000000": ("Instruction: Premise: it rains. Does it follow that the ground is wet?\nOutput: ",
                          "yes"),
        "chat-00000000": ("Instruction: Name a colour.\nOutput: ", "Blue."),
        "chat-00000001": ("Instruction: Add one.\nInput: 1\nOutput: ", "2"),
    }
    tars = read_tar(out)
    meta = {k: json.loads(v["json"]) for k, v in tars.items()}
    assert meta["flan-00000000"]["style"] == "flan" and meta["flan-00000000"]["task_name"] == "rte"
    assert [meta[k]["style"] for k in ("unnatural-00000000-i0", "chat-00000000", "chat-00000001")] == [
        "unnatural", "prompt_response", "flat"]
    # the one template, stated in one place
    assert INSTRUCTION_TEMPLATE.format(instruction="I", input="", output="O") == "Instruction: I\nOutput: O"
    # prompt: 32 chars
    assert render_instruction("I", "x", "O") == ("Instruction: I\nInput: x\nOutput: O", 32)
    assert verify(out, quiet=True)[0]


def test_bad_instruction_records_are_counted(tmp_path):
    src = tmp_path / "inst"
    rows = [{"prompt": "ok", "response": "fine"}, {"prompt": "no answer", "response": "  "},
            {"inputs": "", "targets": "x"}, {"text": "a document, not an instruction"},
            {"instruction": "x", "instances": [{"input": "1", "output": "2"}, "not an object"]},
            {"instruction": "x", "instances": []}]
    write(src / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    out = tmp_path / "out"
    m = convert_text(src, out, format="instructions", shard_options=_opts(out))
    assert m["skipped"] == {"empty_response": 1, "empty_instruction": 1, "not_an_instruction_record": 1,
                            "malformed_record": 1, "no_instances": 1, "malformed_json": 1}
    assert sorted(read_tar(out)) == ["rows-00000000", "rows-00000004-i0"]
    with pytest.raises(ConversionError, match="unknown format"):
        convert_text(src, out, format="chat")
    write(tmp_path / "only.txt", "x")
    assert main(["--format", "instructions", "-i", str(tmp_path / "only.txt"), "-o", str(tmp_path / "o2"),
                 "--no-progress"]) == 2
