"""Hostile and unlucky inputs (issue 11), the input readers: each case ends skipped and counted, in a
one-line error naming the file or key (exit 2, no traceback), or in a documented recovery. The converter
runs' cases are in tests/test_hostile_convert.py."""

from __future__ import annotations

import gzip
import io
import json
import random
import zlib
from pathlib import Path

import pytest

from kosmos.config import ConfigError, load_config
from kosmos.data import SourceLoader
from kosmos.data.samples import encode_sample
from kosmos.data_tools import inspect as inspect_tool
from kosmos.data_tools import verify as verify_tool
from kosmos.data_tools.captions import convert_captions
from kosmos.data_tools.captions import main as captions_main
from kosmos.data_tools.conversion import ShardOptions
from kosmos.data_tools.images import JPEG_MAX_SIDE, ImageOptions, normalize_image, url_hashes
from kosmos.data_tools.interleaved import DocOptions, convert_interleaved
from kosmos.data_tools.records import Skip
from kosmos.data_tools.text import convert_text
from kosmos.data_tools.text import main as text_main
from kosmos.sequence import SequenceEncoder
from kosmos.tokenizer.build import BuildError, sample_lines
from tests.helpers import (
    TINY,
    WORDS,
    jpeg,
    manifest,
    photo,
    read_tar,
    sentence,
    source_dataset,
    write,
    write_tar,
)

KEEP_ALL = DocOptions(max_images=0, single_image_drop=0.0)


def _opts(out: Path, **kw) -> ShardOptions:
    return ShardOptions(output=out, progress=False, **kw)


def _rows_text(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _readable_lines(gz: bytes) -> int:
    """Complete lines that can be decompressed from the start of a cut gzip stream."""
    return zlib.decompressobj(wbits=31).decompress(gz).count(b"\n")


BAD_MEMBER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\x06" + bytes(range(64))
"""A gzip member whose deflate data is invalid from its first block (block type 3): zlib.error."""


def _damaged_gz(path: Path, rows: list[dict], how: str) -> int:
    """Write ``rows`` as a damaged .jsonl.gz; returns how many rows can still be read. ``truncated``: the
    first 60% of the bytes; ``corrupt``: a broken gzip member after the first 60% of the rows."""
    if how == "truncated":
        data = gzip.compress(_rows_text(rows), mtime=0)
        bad = data[: len(data) * 6 // 10]
        n = _readable_lines(bad)
    else:
        n = len(rows) * 6 // 10
        bad = gzip.compress(_rows_text(rows[:n]), mtime=0) + BAD_MEMBER + gzip.compress(_rows_text(rows[n:]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bad)
    assert 0 < n < len(rows), n
    return n


def _check_kept(out: Path, m: dict, n_rows: int, readable: int, how: str, first_key) -> None:
    """The rows before the damage became samples, the file is counted once, nothing else was lost."""
    assert m["skipped"] == {f"{how}_file": 1}, m["skipped"]
    assert m["totals"]["samples"] == readable and m["totals"]["inputs"] == readable + 1
    assert sorted(read_tar(out)) == sorted(first_key(i) for i in range(readable))
    assert n_rows > readable


# ------------------------------------------------------------------ item 6: truncated / corrupt .jsonl.gz


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_jsonl_gz_text_keeps_the_rows_before_the_damage(tmp_path, how, capsys):
    rng = random.Random(0)
    rows = [{"id": f"doc{i:04d}", "text": sentence(rng, 12)} for i in range(400)]
    readable = _damaged_gz(tmp_path / "in" / "corpus.jsonl.gz", rows, how)
    out = tmp_path / "out"
    m = convert_text(tmp_path / "in", out, id_field="id", shard_options=_opts(out, samples_per_shard=100))
    _check_kept(out, m, len(rows), readable, how, lambda i: f"doc{i:04d}")
    assert f"corpus.jsonl.gz: {how} after {readable} rows" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_jsonl_gz_captions_keeps_the_rows_before_the_damage(tmp_path, how):
    rng = random.Random(0)
    write(tmp_path / "in" / "a.jpg", photo(0))
    rows = [{"key": f"k{i:04d}", "image": "a.jpg", "caption": sentence(rng, 10)} for i in range(300)]
    readable = _damaged_gz(tmp_path / "in" / "pairs.jsonl.gz", rows, how)
    out = tmp_path / "out"
    m = convert_captions("jsonl", tmp_path / "in", out, key_column="key", shard_options=_opts(out))
    _check_kept(out, m, len(rows), readable, how, lambda i: f"k{i:04d}")


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_jsonl_gz_interleaved_keeps_the_documents_before_the_damage(tmp_path, how):
    rng = random.Random(0)
    write(tmp_path / "images" / "a.jpg", photo(0))
    docs = [{"key": f"d{i:04d}", "text_list": [sentence(rng, 10), sentence(rng, 10)],
             "image_info": [{"image_name": "a.jpg", "matched_text_index": 1, "matched_sim": 0.3}]}
            for i in range(200)]
    readable = _damaged_gz(tmp_path / "docs" / "docs.jsonl.gz", docs, how)
    out = tmp_path / "out"
    m = convert_interleaved("mmc4", tmp_path / "docs", tmp_path / "images", out, doc_options=KEEP_ALL,
                            shard_options=_opts(out))
    _check_kept(out, m, len(docs), readable, how, lambda i: f"d{i:04d}")


@pytest.mark.parametrize("how", ["truncated", "corrupt"])
def test_damaged_jsonl_gz_tokenizer_keeps_the_documents_before_the_damage(tmp_path, how):
    rng = random.Random(0)
    rows = [{"text": sentence(rng, 12)} for i in range(400)]
    readable = _damaged_gz(tmp_path / "corpus.jsonl.gz", rows, how)
    lines, stats = sample_lines([tmp_path / "corpus.jsonl.gz"], 10_000, quiet=True)
    assert stats[0].documents == readable == len(lines)
    assert stats[0].skipped == {f"{how} file": 1}
    assert f"{how} file after {readable} documents" in stats[0].errors[0]


# ---------------------------------------------------------------- item 11: garbage inputs to inspect, parquet


@pytest.mark.parametrize("content", [b"", b"\x13garbage, not a tar" * 100], ids=["0-byte", "garbage"])
def test_inspect_of_a_broken_tar_is_one_line_naming_it(tmp_path, capsys, content):
    path = write(tmp_path / "x.tar", content)
    assert inspect_tool.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and "\n" not in err and "Traceback" not in err
    # the same in a folder
    assert inspect_tool.main([str(tmp_path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_inspect_still_shows_a_good_tar(tmp_path, capsys):
    path = write_tar(tmp_path / "good.tar", [{"__key__": "a", "txt": b"hello"}])
    assert inspect_tool.main([str(path)]) == 0
    assert "hello" in capsys.readouterr().out


def test_garbage_parquet_error_names_the_file(tmp_path, capsys):
    bad = write(tmp_path / "in" / "cc.parquet", b"hello world, not parquet")
    assert captions_main(["-f", "parquet", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                          "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and f"{bad}: corrupt before its first row" in err


def test_garbage_parquet_among_good_tables_is_skipped_and_counted(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist([{"text": f"document {i}"} for i in range(5)]),
                   tmp_path / "in" / "a.parquet")
    bad = write(tmp_path / "in" / "b.parquet", b"PAR1 garbage")
    out = tmp_path / "out"
    assert text_main(["-i", str(tmp_path / "in"), "-o", str(out), "--no-progress"]) == 0
    m = manifest(out)
    assert m["totals"]["samples"] == 5 and m["skipped"] == {"corrupt_file": 1}
    assert m["skipped_examples"]["corrupt_file"] == ["b.parquet"]
    assert str(bad) in capsys.readouterr().err


# -------------------------------------------------------------- item 12: columns over more than the first row


def test_caption_column_found_beyond_the_first_row_and_missing_rows_counted(tmp_path):
    for i in range(3):
        write(tmp_path / f"{i}.jpg", photo(i))
    rows = [{"image": "0.jpg", "alt_text": None}, {"image": "0.jpg"}, {"image": "1.jpg", "desc": "a cat"},
            {"image": "2.jpg", "desc": "two dogs"}]
    write(tmp_path / "t.jsonl", _rows_text(rows))
    out = tmp_path / "out"
    m = convert_captions("jsonl", tmp_path / "t.jsonl", out, caption_column="desc", shard_options=_opts(out))
    assert m["totals"]["samples"] == 2 and m["skipped"] == {"missing_caption": 2}
    # found without naming it too: "caption" appears only in row 3
    rows = [{"image": "0.jpg"}, {"image": "1.jpg", "caption": "a cat"}, {"image": "2.jpg", "caption": "dogs"}]
    write(tmp_path / "u.jsonl", _rows_text(rows))
    out = tmp_path / "out2"
    m = convert_captions("jsonl", tmp_path / "u.jsonl", out, shard_options=_opts(out))
    assert m["totals"]["samples"] == 2 and m["skipped"] == {"missing_caption": 1}
    assert m["args"]["caption_column"] == "caption"


def test_a_column_that_no_row_has_still_fails_before_writing(tmp_path, capsys):
    write(tmp_path / "t.jsonl", _rows_text([{"image": "0.jpg", "caption": "x"}] * 3))
    assert captions_main(["-f", "jsonl", "-i", str(tmp_path / "t.jsonl"), "-o", str(tmp_path / "out"),
                          "--caption-column", "desc", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no column 'desc'" in err and "t.jsonl" in err and "first 3 rows" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ item 13: an image too wide for JPEG


def _banner(width: int = 70_000, height: int = 80) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (20, 40, 60))
    ImageDraw.Draw(im).rectangle((0, 10, width // 3, 50), fill=(200, 100, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_image_too_wide_for_jpeg_has_its_own_reason():
    with pytest.raises(Skip) as e:
        normalize_image(_banner(), ImageOptions())
    assert e.value.reason == "too_large_for_jpeg" and "70000x80" in e.value.detail
    assert normalize_image(_banner(JPEG_MAX_SIDE, 80), ImageOptions())[1] == (JPEG_MAX_SIDE, 80)


def test_image_too_wide_for_jpeg_drops_only_that_image_of_an_obelics_document(tmp_path):
    url = "https://example.com/{}.png".format
    write(tmp_path / "images" / f"{url_hashes(url(0))[0]}.png", _banner())
    write(tmp_path / "images" / f"{url_hashes(url(1))[0]}.jpg", photo(1))
    rows = [{"texts": ["Intro.", None, "Middle.", None, "End."],
             "images": [None, url(0), None, url(1), None]}]
    write(tmp_path / "docs.jsonl", _rows_text(rows))
    out = tmp_path / "out"
    m = convert_interleaved("obelics", tmp_path / "docs.jsonl", tmp_path / "images", out,
                            doc_options=KEEP_ALL, shard_options=_opts(out))
    assert m["totals"]["samples"] == 1 and m["totals"]["images"] == 1 and m["skipped"] == {}
    assert m["skipped_images"] == {"too_large_for_jpeg": 1}
    (doc,) = read_tar(out).values()
    assert [list(s) for s in json.loads(doc["json"])["segments"]] == [["text"], ["image"], ["text"]]


# ------------------------------------------------------------------ item 15: caption / document length cap


NL = 4


def _encoder(tok) -> SequenceEncoder:
    return SequenceEncoder(tok, NL, 32)


def test_a_huge_caption_is_cut_to_max_tokens(tiny_tokenizer):
    enc = _encoder(tiny_tokenizer)
    caption = (" ".join(WORDS) + " ").encode() * 12_000  # ~1 MB
    raw = {"jpg": jpeg(0), "txt": caption}
    item = encode_sample("captions", raw, (0, 0), enc, max_tokens=64)
    assert item.truncated and len(item.ids) == 64 and len(item.images) == 1
    assert item.ids[:2] == [tiny_tokenizer.bos_id, tiny_tokenizer.image_id]
    short = encode_sample("captions", {"jpg": jpeg(0), "txt": b"a red circle"}, (0, 1), enc, max_tokens=64)
    assert not short.truncated and short.ids == encode_sample("captions",
                                                              {"jpg": jpeg(0), "txt": b"a red circle"},
                                                              (0, 1), enc).ids


def test_the_cap_never_splits_an_image_span(tiny_tokenizer):
    enc = _encoder(tiny_tokenizer)
    segments = [{"text": "a red circle on the left"}, {"image": "img0.jpg"}, {"text": "blue " * 50},
                {"image": "img1.jpg"}, {"text": "green"}]
    raw = {"json": json.dumps({"segments": segments}).encode(), "img0.jpg": jpeg(0), "img1.jpg": jpeg(1)}
    full = encode_sample("interleaved", raw, (0, 0), enc)
    second = full.image_starts[1]
    item = encode_sample("interleaved", raw, (0, 0), enc, max_tokens=second + 2)  # would cut inside image 2
    assert item.truncated and len(item.ids) == second and item.image_starts == full.image_starts[:1]
    assert len(item.images) == 1 and item.ids == full.ids[:second]


def test_truncated_samples_are_counted_by_the_loader(tmp_path, tiny_tokenizer):
    long = " ".join(["red"] * 500).encode()
    samples = [{"__key__": f"c{i}", "jpg": jpeg(i), "txt": long if i % 2 else b"a red circle"}
               for i in range(6)]
    path = write_tar(tmp_path / "cap.tar", samples)
    ds = source_dataset("captions", [str(path)], _encoder(tiny_tokenizer), max_len=64, micro_batch_size=2,
                        shuffle_buffer=0, infinite=False, max_tokens=32)
    loader = SourceLoader(ds)
    rows = [b for b in loader]
    assert loader.truncated() == 3 and not loader.skipped()
    assert sum(b["n_real"].item() for b in rows) <= 6 * 32
    with pytest.raises(ValueError, match="data.captions.max_tokens"):
        source_dataset("captions", [str(path)], _encoder(tiny_tokenizer), max_len=64, micro_batch_size=2,
                       max_tokens=NL + 3)


def test_truncated_counts_reach_the_tracker_without_another_collective():
    from types import SimpleNamespace

    import torch

    from kosmos.metrics import Meter
    from kosmos.training import StepResult

    calls = []
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=2,
                          reduce=lambda t, reduction: calls.append(reduction) or t)
    model = SimpleNamespace(cfg=SimpleNamespace(flops_per_token=lambda: 1.0, flops_per_image=lambda: 1.0))
    meter = Meter(acc, model, peak_flops=None, names=["captions", "text"])
    meter.add(StepResult(True, 1.0, {"captions": torch.tensor([2.0, 1.0])}, rows=4, real=3, images=1))
    m = meter.report(1, lr=1e-4, gnorm=1.0, bad_steps=0, skipped={},
                     truncated={"captions": 2, "text": 0}).metrics
    assert m["train/truncated/captions"] == 2 and m["train/truncated/text"] == 0
    assert len(calls) == 1  # the one packed reduction of the window, truncation included


def test_max_tokens_config_defaults_and_check():
    cfg = load_config(TINY)
    assert cfg.data.captions.max_tokens == 512 and cfg.data.text.max_tokens == 0
    assert cfg.data.interleaved.max_tokens == 0
    cfg = load_config(TINY, ["data.captions.max_tokens=100", "data.text.max_tokens=4096"])
    assert (cfg.data.captions.max_tokens, cfg.data.text.max_tokens) == (100, 4096)
    with pytest.raises(ConfigError, match="data.text.max_tokens"):
        load_config(TINY, ["data.text.max_tokens=-1"])


# ----------------------------------------------------------- item 20: img2dataset verify, tokenizer on shards


def _img2dataset_folder(root: Path, successes: int | None = None) -> Path:
    samples = [{"__key__": f"{i:09d}", "jpg": jpeg(i), "txt": f"caption {i}".encode(),
                "json": json.dumps({"url": f"https://x/{i}.jpg"}).encode()} for i in range(4)]
    root.mkdir(parents=True)
    write_tar(root / "00000.tar", samples)
    stats = {"count": 5, "successes": 4 if successes is None else successes, "failed_to_download": 1}
    write(root / "00000_stats.json", json.dumps(stats))
    write(root / "00000.parquet", b"PAR1")
    return root


def test_verify_reads_raw_img2dataset_output_as_caption_shards(tmp_path, capsys):
    folder = _img2dataset_folder(tmp_path / "laion")
    assert verify_tool.main([str(folder)]) == 0
    out = capsys.readouterr().out
    assert "img2dataset output" in out and "OK: 1 shards, 4 samples, 4 images" in out
    # checked as what it is: against the stats, and as captions the reader accepts
    folder = _img2dataset_folder(tmp_path / "laion2", successes=5)
    assert verify_tool.main([str(folder)]) == 1
    assert "00000.tar: 4 samples, 4 images, 1 problems\n  00000_stats.json says 5 samples, found 4" in (
        capsys.readouterr().out)
    # a folder of tars without a manifest and without img2dataset stats still fails
    (tmp_path / "plain").mkdir()
    write_tar(tmp_path / "plain" / "a.tar", [{"__key__": "a", "txt": b"x"}])
    assert verify_tool.main([str(tmp_path / "plain")]) == 1
    assert "no manifest.json" in capsys.readouterr().out


def test_tokenizer_build_reads_the_text_of_interleaved_shards(tmp_path):
    segments = [{"text": "first paragraph"}, {"image": "img0.jpg"}, {"text": "second\n\nthird"}]
    samples = [{"__key__": f"d{i}", "json": json.dumps({"segments": segments, "meta": {}}).encode(),
                "img0.jpg": jpeg(i)} for i in range(3)]
    path = write_tar(tmp_path / "doc.tar", samples)
    lines, stats = sample_lines([path], 100, quiet=True)
    assert stats[0].documents == 3 and not stats[0].skipped
    assert sorted(set(lines)) == ["first paragraph", "second", "third"]


def test_tokenizer_build_refuses_shards_without_text_naming_them(tmp_path):
    path = write_tar(tmp_path / "img.tar", [{"__key__": f"i{i}", "jpg": jpeg(i)} for i in range(2)])
    with pytest.raises(BuildError, match=r"no text in the inputs: .*img.tar \(2 no text member\)"):
        sample_lines([path], 100, quiet=True)


# ------------------------------------------------------- issue 22 item 8: JSON nested 100,000 levels deep

DEEP = "[" * 100_000 + "]" * 100_000
"""A 200 KB JSON value 100,000 levels deep: Python's parser raises RecursionError (not a ValueError)."""


def test_load_json_refuses_a_deep_value_as_malformed_json():
    from kosmos.untrusted import MAX_JSON_DEPTH, load_json

    for text in (DEEP, '{"a": ' + DEEP + "}", ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))):
        for form in (text, text.encode()):
            with pytest.raises(json.JSONDecodeError, match=f"nested deeper than {MAX_JSON_DEPTH} levels"):
                load_json(form)
    edge = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert load_json(edge) == json.loads(edge)
    many = {"segments": [{"text": "[" * 300, "n": [1, [2]]}] * 500}  # wide, brackets inside strings: fine
    assert load_json(json.dumps(many)) == many
    assert load_json('["\\"[[[", {"x": "]]]\\\\"}]') == ['"[[[', {"x": "]]]\\"}]


def _deep_rows(path: Path, good: list[dict], at: int = 1) -> Path:
    lines = [json.dumps(r) for r in good]
    lines.insert(at, DEEP)
    return write(path, "\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", ["documents", "instructions"])
def test_a_deeply_nested_text_record_is_skipped_as_malformed_json(tmp_path, fmt, capsys):
    good = ([{"text": f"document number {i}"} for i in range(3)] if fmt == "documents"
            else [{"prompt": f"Name a colour {i}.", "response": "Blue."} for i in range(3)])
    _deep_rows(tmp_path / "in" / "a.jsonl", good)
    bad = 1
    if fmt == "instructions":  # a .json file holding one task
        write(tmp_path / "in" / "b.json", '{"instruction": ' + DEEP + "}")
        bad += 1
    out = tmp_path / "out"
    assert text_main(["--format", fmt, "-i", str(tmp_path / "in"), "-o", str(out), "--no-progress"]) == 0
    m = manifest(out)
    assert m["totals"]["samples"] == 3 and m["skipped"] == {"malformed_json": bad}, m


@pytest.mark.parametrize("fmt", ["obelics", "mmc4"])
def test_a_deeply_nested_document_is_skipped_by_the_interleaved_converter_and_urls(tmp_path, fmt):
    from kosmos.data_tools.urls import write_urls

    write(tmp_path / "images" / "a.jpg", photo(0))
    if fmt == "mmc4":
        docs = [{"key": f"d{i}", "text_list": ["one sentence", "another one"],
                 "image_info": [{"image_name": "a.jpg", "matched_text_index": 1, "matched_sim": 0.3,
                                 "raw_url": f"https://example.com/{i}.jpg"}]} for i in range(3)]
    else:
        docs = [{"id": f"d{i}", "texts": ["one sentence", None],
                 "images": [None, f"https://example.com/{i}.jpg"]} for i in range(3)]
    _deep_rows(tmp_path / "docs" / "docs.jsonl", docs)
    stats = write_urls(fmt, tmp_path / "docs", tmp_path / "urls.parquet")
    assert stats["unique_urls"] == 3 and stats["skipped"] == {"malformed_json": 1}
    if fmt == "mmc4":
        out = tmp_path / "out"
        m = convert_interleaved("mmc4", tmp_path / "docs", tmp_path / "images", out, doc_options=KEEP_ALL,
                                shard_options=_opts(out))
        assert m["totals"]["samples"] == 3 and m["skipped"] == {"malformed_json": 1}, m


def test_tokenizer_build_skips_a_deeply_nested_line_and_shard_document(tmp_path):
    _deep_rows(tmp_path / "corpus.jsonl", [{"text": f"line {i}"} for i in range(3)])
    segments = json.dumps({"segments": [{"text": "a paragraph"}]}).encode()
    write_tar(tmp_path / "doc.tar", [{"__key__": "d0", "json": segments},
                                     {"__key__": "d1", "json": b'{"segments": ' + DEEP.encode() + b"}"}])
    lines, stats = sample_lines([tmp_path / "corpus.jsonl", tmp_path / "doc.tar"], 100, quiet=True)
    assert sorted(lines) == ["a paragraph", "line 0", "line 1", "line 2"]
    assert stats[0].skipped == {"not json": 1} and stats[1].skipped == {"no text member": 1}


def test_a_deeply_nested_key_json_is_skipped_or_ignored_by_the_training_reader(tmp_path, tiny_tokenizer):
    from kosmos.data.format import BadSample, captions, parse_sample, prompt_chars

    deep = b'{"prompt_chars": 3, "captions": ' + DEEP.encode() + b"}"
    # metadata that cannot be read is ignored, as malformed metadata always was: the sample is kept
    assert prompt_chars({"txt": b"hello", "json": deep}, "hello") == 0
    assert captions({"txt": b"a cat", "json": deep, "jpg": jpeg(0)}) == ["a cat"]
    with pytest.raises(BadSample, match="bad_json"):
        parse_sample("interleaved", {"json": b'{"segments": ' + DEEP.encode() + b"}"})
    # and through the loader: every sample is kept, its unreadable metadata ignored
    samples = [{"__key__": f"t{i}", "txt": f"sample number {i}".encode(),
                **({"json": deep} if i == 1 else {})} for i in range(4)]
    path = write_tar(tmp_path / "t.tar", samples)
    loader = SourceLoader(source_dataset("text", [str(path)], _encoder(tiny_tokenizer), max_len=64,
                                         micro_batch_size=2, shuffle_buffer=0, infinite=False))
    assert sum(len(b["sample_positions"]) for b in loader) == 4 and not loader.skipped()


# ------------------------------------------------------- issue 22 item 7: decompression bombs, every reader


BOMBS = {"30000x30000": (30_000, 30_000), "10000x10000": (10_000, 10_000)}
"""Over twice PIL's limit (DecompressionBombError at open), and between once and twice it (PIL only warns,
then decodes 100 M pixels)."""


def test_a_decompression_bomb_is_skipped_and_counted_by_the_training_loader(tmp_path, tiny_tokenizer):
    from tests.helpers import bomb_png

    samples = [{"__key__": f"c{i}", "jpg": jpeg(i), "txt": b"a red circle"} for i in range(3)]
    samples[1:1] = [{"__key__": f"b{k}", "png": bomb_png(*wh), "txt": b"a bomb"} for k, wh in BOMBS.items()]
    path = write_tar(tmp_path / "cap.tar", samples)
    loader = SourceLoader(source_dataset("captions", [str(path)], _encoder(tiny_tokenizer), max_len=64,
                                         micro_batch_size=2, shuffle_buffer=0, infinite=False))
    assert sum(len(b["sample_positions"]) for b in loader) == 3
    assert dict(loader.skipped()) == {"image_too_large": 2}


@pytest.mark.parametrize("size", list(BOMBS))
def test_a_decompression_bomb_is_skipped_by_every_converter_and_checker(tmp_path, size, capsys):
    from tests.helpers import bomb_png

    bomb = bomb_png(*BOMBS[size])
    with pytest.raises(Skip, match="decompression_bomb"):
        normalize_image(bomb, ImageOptions())
    # captions from a folder
    for i in range(2):
        write(tmp_path / "in" / f"p{i}.jpg", photo(i))
        write(tmp_path / "in" / f"p{i}.txt", f"photo {i}")
    write(tmp_path / "in" / "bomb.png", bomb)
    write(tmp_path / "in" / "bomb.txt", "a bomb")
    out = tmp_path / "out"
    assert captions_main(["-f", "folder", "-i", str(tmp_path / "in"), "-o", str(out), "--no-progress"]) == 0
    m = manifest(out)
    assert m["totals"]["samples"] == 2 and m["skipped"] == {"decompression_bomb": 1}, m
    # verify and inspect of a shard holding it: reported, not decoded, not a traceback
    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "x.tar", [{"__key__": "k", "png": bomb, "txt": b"a bomb"}])
    verify_tool.main([str(tmp_path / "s" / "x.tar")])
    assert "k.png: image does not decode (decompression_bomb" in capsys.readouterr().out
    inspect_tool.main([str(tmp_path / "s" / "x.tar")])
    assert "undecodable (decompression_bomb)" in capsys.readouterr().out
