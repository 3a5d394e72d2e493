"""URL lists for img2dataset from OBELICS/MMC4 documents, and the path urls -> img2dataset -> interleaved
converter (img2dataset's output faked in the test, laid out and named as img2dataset does; no network)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import pytest

from kosmos.data_tools.conversion import ShardOptions
from kosmos.data_tools.interleaved import DocOptions, convert_interleaved
from kosmos.data_tools.urls import UrlOptions, main, write_urls
from tests.helpers import image_size, photo, read_wds, write

KEEP_ALL = DocOptions(max_images=0, single_image_drop=0.0)


def _url(i: int) -> str:
    return f"https://example.com/img/{i}.jpg"


def _sha(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def _jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _read_parquet(path: Path) -> list[tuple]:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    assert t.column_names == ["url", "url_sha256", "doc_key", "image_index"]
    return list(zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True))


OBELICS = [
    {"id": "a", "texts": ["t", None, None, "u", None, None],
     "images": [None, _url(0), _url(1), None, _url(0), f"  {_url(2)} "]},     # a URL twice, one padded
    {"id": "b", "texts": [None, None, None, None, "v"],
     "images": [_url(1), _url(3), "", "not a url", None]},                      # _url(1) seen in "a"
    '{"id": "broken", "texts": [',                                               # malformed JSON
    {"id": "c", "texts": ["x"], "images": [None, _url(4)]},                     # lists of other lengths
    {"id": "d", "texts": ["only text"], "images": [None]},
    {"id": "e", "texts": [None], "images": ["http://example.com/a b.jpg"]},     # a space inside
]


def test_obelics_jsonl_to_parquet_deduplicated_with_bad_rows_named(tmp_path, capsys):
    docs = _jsonl(tmp_path / "docs.jsonl", OBELICS)
    stats = write_urls("obelics", docs, tmp_path / "urls.parquet")
    assert _read_parquet(tmp_path / "urls.parquet") == [
        (_url(0), _sha(_url(0)), "a", 0), (_url(1), _sha(_url(1)), "a", 1), (_url(2), _sha(_url(2)), "a", 3),
        (_url(3), _sha(_url(3)), "b", 1)]
    assert (stats["documents"], stats["documents_with_images"],
            stats["documents_without_images"]) == (6, 3, 1)
    assert (stats["image_urls"], stats["unique_urls"]) == (6, 4)
    assert stats["skipped"] == {"malformed_json": 1, "malformed_document": 1}
    assert stats["skipped_images"] == {"no_url": 1, "bad_url": 2}
    ex = stats["skipped_examples"]
    assert ex["malformed_json"] == ["docs.jsonl:2"] and ex["malformed_document"] == ["docs.jsonl:3"]
    assert ex["no_url"] == ["docs.jsonl:1: image 2: ''"]
    assert ex["bad_url"] == ["docs.jsonl:1: image 3: 'not a url'",
                             "docs.jsonl:5: image 0: 'http://example.com/a b.jpg'"]
    assert json.loads((tmp_path / "urls.stats.json").read_text()) == stats
    out = capsys.readouterr().out
    assert "4 unique URLs (6 image URLs in 3 documents)" in out
    assert "malformed_json: e.g. docs.jsonl:2" in out and "bad_url: e.g. docs.jsonl:1: image 3" in out
    assert not list(tmp_path.glob(".*.tmp"))
    limited = write_urls("obelics", docs, tmp_path / "first2.parquet",
                         options=UrlOptions(limit=2, progress=False))
    assert (limited["documents"], limited["unique_urls"]) == (2, 4) and limited["skipped"] == {}


def _mmc4_doc(i: int, images: list[tuple[str | None, int, float]]) -> dict:
    info = [{"image_name": f"{i}-{n}.jpg", "matched_text_index": t, "matched_sim": s,
             **({"raw_url": u} if u is not None else {})} for n, (u, t, s) in enumerate(images)]
    return {"url": f"https://doc/{i}", "text_list": ["s0", "s1", "s2"], "image_info": info}


def test_mmc4_jsonl_to_tsv_in_placement_order_with_threshold(tmp_path):
    import pyarrow.csv as pacsv

    quoted = 'https://example.com/q"uote.jpg'
    docs = [_mmc4_doc(0, [(_url(0), 2, 0.3), (_url(1), 0, 0.3), (_url(2), 1, 0.1), (quoted, 1, 0.5)]),
            _mmc4_doc(1, [(None, 0, 0.4), (_url(3), 7, 0.4), (_url(1), 2, 0.9)])]
    _jsonl(tmp_path / "mmc4.jsonl", docs)
    assert main(["-f", "mmc4", "-i", str(tmp_path / "mmc4.jsonl"), "-o", str(tmp_path / "urls.tsv"),
                 "--sim-threshold", "0.2", "--no-progress"]) == 0
    # read as img2dataset reads --input_format tsv (pyarrow's CSV reader, tab-delimited)
    t = pacsv.read_csv(tmp_path / "urls.tsv", parse_options=pacsv.ParseOptions(delimiter="\t"))
    rows = list(zip(*(t.column(c).to_pylist() for c in ("url", "doc_key", "image_index")), strict=True))
    # images are numbered as the converter places them: before their matched sentence
    assert rows == [(_url(1), "mmc4-00000000", 0), (quoted, "mmc4-00000000", 1),
                    (_url(0), "mmc4-00000000", 2)]
    assert t.column("url_sha256").to_pylist() == [_sha(u) for u, _, _ in rows]
    stats = json.loads((tmp_path / "urls.stats.json").read_text())
    assert stats["skipped_images"] == {"below_similarity_threshold": 1, "bad_text_index": 1, "no_url": 1}
    assert stats["skipped_examples"]["no_url"] == ["mmc4.jsonl:1: image 0: None"]


def _fake_img2dataset(urls: Path, out: Path, per_shard: int, failed: set[str],
                      sizes: dict[str, tuple]) -> None:
    """What ``img2dataset --url_list urls.parquet --input_format parquet --url_col url
    --save_additional_columns '["doc_key","image_index"]'`` leaves in ``out``: shards of ``per_shard`` rows,
    keys ``compute_key`` (shard * 10**ceil(log10(per_shard)) + row, zero-padded), even shards as webdataset
    tars (``00000.tar``), odd ones in the "files" layout (``00001/KEY.jpg`` + ``KEY.json``), each with its
    metadata ``.parquet`` and ``_stats.json``; ``failed`` URLs are only in the metadata, as img2dataset
    does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(urls, columns=["url", "doc_key", "image_index"])
    rows = table.to_pylist()
    oom_sample, oom_shard = math.ceil(math.log10(per_shard)), 5
    for shard in range(math.ceil(len(rows) / per_shard)):
        name = f"{shard:0{oom_shard}d}"
        metas, members = [], []
        for n, row in enumerate(rows[shard * per_shard:(shard + 1) * per_shard]):
            key = f"{10 ** oom_sample * shard + n:0{oom_sample + oom_shard}d}"
            ok = row["url"] not in failed
            meta = {**row, "key": key, "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "HTTP Error 404", "width": 1, "height": 1}
            metas.append(meta)
            if ok:
                members += [(f"{key}.jpg", photo(7, sizes[row["url"]])),
                            (f"{key}.json", json.dumps(meta, indent=4).encode())]
        if shard % 2 == 0:
            out.mkdir(parents=True, exist_ok=True)
            with tarfile.open(out / f"{name}.tar", "w") as tar:
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        else:
            for member, data in members:
                write(out / name / member, data)
        pq.write_table(pa.Table.from_pylist(metas), out / f"{name}.parquet")
        write(out / f"{name}_stats.json", json.dumps({"count": len(metas), "successes": len(members) // 2}))


def test_urls_then_img2dataset_output_then_interleaved_converter_finds_every_image(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"doc{d}", "texts": ["intro", None, "middle", None, "end"],
             "images": [None, _url(d), None, _url(d + 1), None]}  # URLs shared by neighbours
            for d in range(6)]
    docs = tmp_path / "obelics"
    docs.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), docs / "part-0.parquet")
    urls = docs / "urls.parquet"  # beside the documents: a rerun must not read it as documents
    for _ in range(2):
        stats = write_urls("obelics", docs, urls)
        assert (stats["documents"], stats["unique_urls"], stats["skipped"]) == (6, 7, {})
    listed = _read_parquet(urls)
    assert [u for u, *_ in listed] == [_url(i) for i in range(7)]
    assert listed[3][2:] == ("doc2", 1)  # _url(3) is first used by doc2 (its image 1)

    sizes = {_url(i): (100 + 10 * i, 80) for i in range(7)}  # tells the images apart after conversion
    _fake_img2dataset(urls, tmp_path / "downloads", per_shard=3, failed={_url(5)}, sizes=sizes)
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001", "00001.parquet", "00001_stats.json",
        "00002.parquet", "00002.tar", "00002_stats.json"]
    assert sorted(p.name for p in (tmp_path / "downloads" / "00001").iterdir()) == [
        "000010.jpg", "000010.json", "000011.jpg", "000011.json"]  # rows 3, 4; row 5 (_url(5)) failed

    out = tmp_path / "shards"
    m = convert_interleaved("obelics", docs / "part-0.parquet", tmp_path / "downloads", out,
                            doc_options=KEEP_ALL, shard_options=ShardOptions(output=out, progress=False))
    assert m["skipped_images"] == {"missing_image": 2}  # _url(5), in doc4 and doc5: it failed to download
    got = {s["__key__"]: s for s in read_wds(out)}
    for d in range(6):
        want = [sizes[_url(i)] for i in (d, d + 1) if i != 5]
        assert [image_size(got[f"doc{d}"][f"img{n}.jpg"]) for n in range(len(want))] == want, d


def test_mmc4_urls_found_by_raw_url_in_img2dataset_output(tmp_path):
    docs = [_mmc4_doc(0, [(_url(0), 1, 0.3), (_url(1), 0, 0.3)]), _mmc4_doc(1, [(_url(1), 2, 0.3)])]
    _jsonl(tmp_path / "mmc4.jsonl", docs)
    write_urls("mmc4", tmp_path / "mmc4.jsonl", tmp_path / "urls.parquet")
    sizes = {_url(0): (100, 80), _url(1): (130, 90)}
    _fake_img2dataset(tmp_path / "urls.parquet", tmp_path / "dl", per_shard=10, failed=set(), sizes=sizes)
    out = tmp_path / "shards"
    m = convert_interleaved("mmc4", tmp_path / "mmc4.jsonl", tmp_path / "dl", out, doc_options=KEEP_ALL,
                            shard_options=ShardOptions(output=out, progress=False))
    assert m["skipped_images"] == {} and m["totals"]["images"] == 3
    got = {s["__key__"]: s for s in read_wds(out)}
    assert [image_size(got["mmc4-00000000"][f"img{n}.jpg"]) for n in (0, 1)] == [(130, 90), (100, 80)]


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    docs = _jsonl(tmp_path / "docs.jsonl", [{"texts": ["t"], "images": [None]}, "{bad"])
    cases = [(["-f", "obelics", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "u.parquet")],
              "does not exist"),
             (["-f", "obelics", "-i", str(docs), "-o", str(tmp_path / "u.csv")],
              "must end in .parquet or .tsv"),
             (["-f", "obelics", "-i", str(docs), "-o", str(tmp_path / "u.parquet")],
              "no image URL in 2 documents")]
    for argv, message in cases:
        assert main([*argv, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert "malformed_json=1" in err and "docs.jsonl:1" in err
    assert not (tmp_path / "u.parquet").exists()  # nothing for img2dataset to read
    assert json.loads((tmp_path / "u.stats.json").read_text())["skipped"] == {"malformed_json": 1}
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "img2dataset --url_list urls.parquet" in help_text and "--images-root downloads/" in help_text
