"""Interleaved converter: OBELICS (hash-named files, img2dataset tars), MMC4 placement, filters, bad input."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from kosmos.data_tools.conversion import ShardOptions
from kosmos.data_tools.images import ImageOptions, url_hashes
from kosmos.data_tools.interleaved import DocOptions, convert_interleaved, main
from kosmos.data_tools.records import ConversionError
from kosmos.data_tools.verify import verify
from tests.helpers import bad_image, image_size, photo, read_tar, read_wds, write

KEEP_ALL = DocOptions(max_images=0, single_image_drop=0.0)


def _opts(out: Path, **kw) -> ShardOptions:
    return ShardOptions(output=out, progress=False, **kw)


def _url(i: int) -> str:
    return f"https://example.com/img/{i}.jpg"


def _hash_folder(root: Path, ids) -> Path:
    for i in ids:
        write(root / f"{url_hashes(_url(i))[0]}.jpg", photo(i))
    return root


def _docs_by_key(out: Path) -> dict[str, dict]:
    """{key: {"doc": json, "images": {name: bytes}}} read with webdataset, cross-checked with tarfile."""
    tars = read_tar(out)
    docs = {}
    for s in read_wds(out):
        doc = json.loads(s["json"])
        images = {k: v for k, v in s.items() if k.startswith("img")}
        assert {k: v for k, v in tars[s["__key__"]].items() if k != "json"} == images
        assert sorted(images) == sorted(seg["image"] for seg in doc["segments"] if "image" in seg)
        docs[s["__key__"]] = {"doc": doc, "images": images}
    assert verify(out, quiet=True)[0]
    return docs


def _obelics_rows() -> list[dict]:
    return [
        {"texts": ["Intro paragraph.", None, "After the image.", None],
         "images": [None, _url(0), None, _url(1)],
         "general_metadata": json.dumps({"url": "https://doc/0"})},
        {"texts": [None, "Only one image here."], "images": [_url(2), None], "general_metadata": "{}"},
        {"texts": ["Text", None, "more", None], "images": [None, _url(99), None, _url(3)],
         "general_metadata": None},
    ]


def test_obelics_parquet_with_hash_named_images(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _hash_folder(tmp_path / "images", range(4))
    pq.write_table(pa.Table.from_pylist(_obelics_rows()), tmp_path / "obelics.parquet")
    out = tmp_path / "out"
    m = convert_interleaved("obelics", tmp_path / "obelics.parquet", root, out, doc_options=KEEP_ALL,
                            shard_options=_opts(out))
    docs = _docs_by_key(out)
    assert list(docs) == ["obelics-00000000", "obelics-00000001", "obelics-00000002"]
    d0 = docs["obelics-00000000"]["doc"]
    assert d0["segments"] == [{"text": "Intro paragraph."}, {"image": "img0.jpg"},
                              {"text": "After the image."}, {"image": "img1.jpg"}]
    assert d0["meta"]["url"] == "https://doc/0"
    assert image_size(docs["obelics-00000000"]["images"]["img0.jpg"]) == (120, 96)
    d2 = docs["obelics-00000002"]["doc"]  # the unresolvable URL is dropped, the texts around it merged
    assert d2["segments"] == [{"text": "Text\n\nmore"}, {"image": "img0.jpg"}]
    assert m["skipped_images"] == {"missing_image": 1}
    assert m["totals"]["images"] == 4 and m["kind"] == "interleaved"


def _images_tar(path: Path, ids) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for n, i in enumerate(ids):
            meta = json.dumps({"url": _url(i), "key": f"{n:09d}"}).encode()
            for ext, data in (("jpg", photo(i)), ("json", meta)):
                info = tarfile.TarInfo(f"{n:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_obelics_jsonl_with_img2dataset_images(tmp_path):
    _images_tar(tmp_path / "dl" / "00000.tar", [0, 1])
    write(tmp_path / "dl" / "00001" / "000000007.jpg", photo(2))  # img2dataset "files" layout
    write(tmp_path / "dl" / "00001" / "000000007.json", json.dumps({"url": _url(2)}))
    rows = _obelics_rows()[:2]
    write(tmp_path / "docs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    main(["-f", "obelics", "-i", str(tmp_path / "docs.jsonl"), "--images-root", str(tmp_path / "dl"),
          "-o", str(out), "--max-images", "0", "--single-image-drop", "0", "--no-progress"])
    docs = _docs_by_key(out)
    assert [len(d["images"]) for d in docs.values()] == [2, 1]
    segments = docs["docs-00000001"]["doc"]["segments"]
    assert segments == [{"image": "img0.jpg"}, {"text": "Only one image here."}]


def _mmc4_doc(i: int, names: list[str], matches: list[tuple[int, float]], **extra) -> dict:
    return {"url": f"https://doc/{i}", "text_list": [f"Sentence {i}.{j}." for j in range(3)],
            "image_info": [{"image_name": n, "matched_text_index": t, "matched_sim": s, "raw_url": f"u/{n}"}
                           for n, (t, s) in zip(names, matches, strict=True)], **extra}


def test_mmc4_images_before_matched_sentence_with_threshold(tmp_path):
    for n in range(4):
        write(tmp_path / "images" / f"{n:04d}.jpg", photo(n))
    docs = [_mmc4_doc(0, ["0000.jpg", "0001.jpg", "0002.jpg"], [(2, 0.30), (0, 0.28), (1, 0.10)]),
            _mmc4_doc(1, ["0003.jpg", "gone.jpg"], [(1, 0.40), (0, 0.40)])]
    write(tmp_path / "mmc4.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    m = convert_interleaved("mmc4", tmp_path / "mmc4.jsonl", tmp_path / "images", out,
                            doc_options=DocOptions(max_images=0, single_image_drop=0.0, sim_threshold=0.2),
                            shard_options=_opts(out))
    got = _docs_by_key(out)
    seg0 = got["mmc4-00000000"]["doc"]["segments"]
    assert seg0 == [{"image": "img0.jpg"}, {"text": "Sentence 0.0. Sentence 0.1."}, {"image": "img1.jpg"},
                    {"text": "Sentence 0.2."}]
    assert got["mmc4-00000000"]["images"]["img0.jpg"] == read_tar(out)["mmc4-00000000"]["img0.jpg"]
    assert got["mmc4-00000001"]["doc"]["segments"][:2] == [{"text": "Sentence 1.0."}, {"image": "img0.jpg"}]
    assert m["skipped_images"] == {"below_similarity_threshold": 1, "missing_image": 1}


def test_paper_filters_max_images_and_single_image_drop(tmp_path):
    for n in range(6):
        write(tmp_path / "images" / f"{n}.jpg", photo(n, (80, 70)))
    docs = [_mmc4_doc(0, [f"{n}.jpg" for n in range(6)], [(n % 3, 0.3) for n in range(6)], key="many")]
    docs += [_mmc4_doc(i, [f"{i % 6}.jpg"], [(0, 0.3)], key=f"one{i:02d}") for i in range(1, 21)]
    write(tmp_path / "mmc4.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    m = convert_interleaved("mmc4", tmp_path / "mmc4.jsonl", tmp_path / "images", out,
                            doc_options=DocOptions(max_images=5, single_image_drop=0.5, seed=7),
                            shard_options=_opts(out, samples_per_shard=8))
    got = _docs_by_key(out)
    assert len(got["many"]["images"]) == 5
    assert m["skipped_images"] == {"over_max_images": 1}
    dropped = {f"one{i:02d}" for i in range(1, 21) if random.Random(f"7:one{i:02d}").random() < 0.5}
    assert 3 < len(dropped) < 17  # about half
    assert set(got) == {"many"} | {f"one{i:02d}" for i in range(1, 21)} - dropped
    assert m["skipped"] == {"single_image_dropped": len(dropped)}


def test_bad_documents_are_counted(tmp_path):
    root = _hash_folder(tmp_path / "images", range(3))
    write(root / f"{url_hashes(_url(50))[0]}.jpg", bad_image("truncated_image"))
    write(root / f"{url_hashes(_url(51))[0]}.jpg", bad_image("corrupt_image"))
    good = {"texts": ["a", None, "b", None], "images": [None, _url(0), None, _url(1)]}
    lines = [
        json.dumps(good | {"id": "good"}),
        json.dumps(good | {"id": "good"}),                                        # duplicate key
        '{"texts": ["unterminated',                                               # malformed JSON
        json.dumps({"id": "latin", "texts": ["x", None], "images": [None, _url(2)]}).replace("x", "\udcff"),
        json.dumps({"id": "mismatch", "texts": ["a"], "images": [None, _url(0)]}),  # lists of other lengths
        json.dumps({"id": "noimg", "texts": ["t", None], "images": [None, _url(50)]}),  # its image is bad
        json.dumps({"id": "notext", "texts": [None, None], "images": [_url(0), _url(1)]}),
        json.dumps({"id": "partly", "texts": ["t", None, None], "images": [None, _url(51), _url(2)]}),
    ]
    raw = "\n".join(lines).encode("utf-8", "surrogateescape").replace(b"\\udcff", b"\xff") + b"\n"
    write(tmp_path / "docs.jsonl", raw)
    out = tmp_path / "out"
    m = convert_interleaved("obelics", tmp_path / "docs.jsonl", root, out, doc_options=KEEP_ALL,
                            shard_options=_opts(out))
    assert m["skipped"] == {"duplicate_key": 1, "malformed_json": 1, "non_utf8_text": 1,
                            "malformed_document": 1, "no_images": 1, "empty_text": 1}
    assert m["skipped_images"] == {"truncated_image": 1, "corrupt_image": 1}
    assert m["totals"]["inputs"] == 8 and m["totals"]["samples"] == 2
    assert set(_docs_by_key(out)) == {"good", "partly"}


def test_errors_before_writing(tmp_path):
    write(tmp_path / "d.jsonl", "{}\n")
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="images root"):
        convert_interleaved("obelics", tmp_path / "d.jsonl", tmp_path / "nope", out)
    with pytest.raises(ConversionError, match="unknown format"):
        convert_interleaved("laion", tmp_path / "d.jsonl", tmp_path, out)
    no_docs = write(tmp_path / "x" / "a.txt", "x").parent
    with pytest.raises(ConversionError, match="no .jsonl"):
        convert_interleaved("mmc4", no_docs, tmp_path, out)
    assert not out.exists()


def test_images_resized_with_options(tmp_path):
    root = tmp_path / "images"
    write(root / f"{url_hashes(_url(0))[0]}.png", photo(0, (400, 300), fmt="PNG"))
    write(tmp_path / "d.jsonl", json.dumps({"texts": ["t", None], "images": [None, _url(0)]}) + "\n")
    out = tmp_path / "out"
    convert_interleaved("obelics", tmp_path / "d.jsonl", root, out,
                        doc_options=DocOptions(image=ImageOptions(image_size=64), max_images=0,
                                               single_image_drop=0.0), shard_options=_opts(out))
    (doc,) = _docs_by_key(out).values()
    assert image_size(doc["images"]["img0.jpg"]) == (85, 64)


def test_several_images_roots_searched_in_order(tmp_path):
    """An image is taken from the first root that has it; the option repeats or takes several folders."""
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    write(first / f"{url_hashes(_url(0))[0]}.jpg", photo(0, (100, 80)))
    write(second / f"{url_hashes(_url(0))[0]}.jpg", photo(0, (200, 160)))  # also in `first`: not used
    write(second / f"{url_hashes(_url(1))[0]}.jpg", photo(1, (90, 90)))
    _images_tar(third / "00000.tar", [2])  # img2dataset output as the third root
    rows = [{"id": "both", "texts": ["a", None, "b", None], "images": [None, _url(0), None, _url(1)]},
            {"id": "third", "texts": ["c", None], "images": [None, _url(2)]}]
    write(tmp_path / "docs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    common = ["-f", "obelics", "-i", str(tmp_path / "docs.jsonl"), "--max-images", "0",
              "--single-image-drop", "0", "--no-progress"]
    for n, roots in enumerate([["--images-root", str(first), "--images-root", str(second),
                                "--images-root", str(third)],
                               ["--images-root", str(first), str(second), str(third)]]):
        out = tmp_path / f"out{n}"
        assert main([*common, *roots, "-o", str(out)]) == 0
        docs = _docs_by_key(out)
        assert image_size(docs["both"]["images"]["img0.jpg"]) == (100, 80)  # from `first`
        assert image_size(docs["both"]["images"]["img1.jpg"]) == (90, 90)
        assert len(docs["third"]["images"]) == 1
        m = json.loads((out / "manifest.json").read_text())
        assert m["args"]["images_root"] == [str(first), str(second), str(third)]
        assert m["skipped_images"] == {}
    # one root is recorded as before (a string), so that reruns of earlier conversions still resume
    out = tmp_path / "one"
    m = convert_interleaved("obelics", tmp_path / "docs.jsonl", first, out, doc_options=KEEP_ALL,
                            shard_options=_opts(out))
    assert m["args"]["images_root"] == str(first) and m["skipped_images"] == {"missing_image": 2}
    with pytest.raises(ConversionError, match="images root .*nope"):
        convert_interleaved("obelics", tmp_path / "docs.jsonl", [first, tmp_path / "nope"], tmp_path / "o2")


def test_skipped_images_are_named_and_a_reference_that_is_no_url_is_bad_url_as_data_tools_urls_says(tmp_path):
    """Each skipped image is counted with the first few named (document: URL) in skipped_image_examples; an
    image reference that is not scheme://... is `bad_url` (the name data_tools.urls gives it), one whose URL
    is fine but whose image was not found `missing_image`."""
    from kosmos.data_tools.urls import url_problem

    root = _hash_folder(tmp_path / "images", range(2))
    rows = [{"texts": ["Text", None, None, None], "images": [None, _url(0), _url(99), "not a url"]},
            {"texts": ["Other", None, None], "images": [None, _url(1), "also not"]}]
    table = tmp_path / "docs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    m = convert_interleaved("obelics", table, root, out, doc_options=KEEP_ALL, shard_options=_opts(out))
    assert url_problem("not a url") == "bad_url"
    assert m["skipped_images"] == {"bad_url": 2, "missing_image": 1}
    assert m["skipped_image_examples"] == {
        "bad_url": ["docs.jsonl:0: 'not a url'", "docs.jsonl:1: 'also not'"],
        "missing_image": [f"docs.jsonl:0: {_url(99)!r}"]}
