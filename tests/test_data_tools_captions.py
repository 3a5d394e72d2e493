"""Caption converter: every input format, bad inputs counted, determinism, resume, errors."""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from kosmos.data_tools import conversion
from kosmos.data_tools.captions import convert_captions, main
from kosmos.data_tools.conversion import ShardOptions
from kosmos.data_tools.images import ImageOptions
from kosmos.data_tools.records import ConversionError
from kosmos.data_tools.verify import verify
from tests.helpers import (
    BAD_REASONS,
    bad_image,
    image_size,
    manifest,
    photo,
    read_tar,
    read_wds,
    shard_bytes,
    write,
)

CAPTIONS = ["a cat on a mat", "two dogs", "a red car", "snow on hills", "coffee cup", "a rocket"]


def _opts(out: Path, **kw) -> ShardOptions:
    kw.setdefault("progress", False)
    return ShardOptions(output=out, **kw)


def _check_read_back(out: Path, want: dict[str, str]) -> dict[str, dict[str, bytes]]:
    """Shards read with plain webdataset and with tarfile agree and hold exactly ``want`` (key -> caption)."""
    samples = read_wds(out)
    assert [s["__key__"] for s in samples] == list(want)
    assert {s["__key__"]: s["txt"].decode() for s in samples} == want
    tars = read_tar(out)
    assert {k: v["txt"].decode() for k, v in tars.items()} == want
    for s in samples:
        assert tars[s["__key__"]]["jpg"] == s["jpg"]
        assert json.loads(s["json"])["width"] == image_size(s["jpg"])[0]
    m = manifest(out)
    assert m["totals"]["samples"] == len(want) == sum(s["samples"] for s in m["shards"])
    assert verify(out, quiet=True)[0]
    return tars


def _folder(root: Path, n: int = 4) -> Path:
    for i in range(n):
        write(root / f"img{i}.jpg", photo(i))
        write(root / f"img{i}.txt", CAPTIONS[i] + "\n")
    return root


def test_coco(tmp_path):
    images = tmp_path / "train2017"
    for iid in (1, 2, 3):
        write(images / f"{iid:012d}.jpg", photo(iid))
    coco = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (3, 1, 2, 4)],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "second caption of one"},
            {"id": 10, "image_id": 1, "caption": "first caption of one"},
            {"id": 12, "image_id": 2, "caption": "only caption of two"},
            {"id": 13, "image_id": 3, "caption": "  "},
            {"id": 14, "image_id": 3, "caption": "three"},
        ],
    }
    ann = write(tmp_path / "annotations" / "captions.json", json.dumps(coco))
    out = tmp_path / "out"
    m = convert_captions("coco", ann, out, images_root=images, shard_options=_opts(out))
    tars = _check_read_back(out, {"000000000001": "first caption of one",
                                  "000000000002": "only caption of two", "000000000003": "three"})
    captions = json.loads(tars["000000000001"]["json"])["captions"]
    assert captions == ["first caption of one", "second caption of one"]
    assert m["skipped"] == {"missing_caption": 1}  # image 4 has no caption
    assert m["kind"] == "captions" and m["args"]["format"] == "coco"


def test_coco_official_layout_finds_the_split_folder_beside_annotations(tmp_path):
    """coco/annotations/captions_train2017.json with coco/train2017/ beside: no --images-root needed. Images
    found nowhere: the JSON's folder is the one tried, and each skip names the path tried."""
    for iid in (1, 2):
        write(tmp_path / "coco" / "train2017" / f"{iid:012d}.jpg", photo(iid))
    coco = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2)],
            "annotations": [{"id": 10 + i, "image_id": i, "caption": f"caption {i}"} for i in (1, 2)]}
    ann = write(tmp_path / "coco" / "annotations" / "captions_train2017.json", json.dumps(coco))
    out = tmp_path / "out"
    m = convert_captions("coco", ann, out, shard_options=_opts(out))
    assert m["totals"]["samples"] == 2 and m["args"]["images_root"] == str(tmp_path / "coco" / "train2017")
    val = write(tmp_path / "coco" / "annotations" / "captions_val2017.json", json.dumps(coco))  # no val2017/
    with pytest.raises(ConversionError, match=f"missing_image=2; e.g. .*{tmp_path / 'coco' / 'annotations'}"):
        convert_captions("coco", val, tmp_path / "out2", shard_options=_opts(tmp_path / "out2"))


def test_folder(tmp_path):
    src = _folder(tmp_path / "src")
    write(src / "sub" / "deep.png", photo(5, fmt="PNG"))
    write(src / "sub" / "deep.txt", "deep caption")
    out = tmp_path / "out"
    convert_captions("folder", src, out, shard_options=_opts(out, samples_per_shard=2))
    want = {f"img{i}": CAPTIONS[i] for i in range(4)} | {"sub_deep": "deep caption"}
    _check_read_back(out, want)
    assert len(manifest(out)["shards"]) == 3


def _table(path: Path, fmt: str, rows: list[dict]) -> Path:
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_tables(tmp_path, fmt):
    for i in range(3):
        write(tmp_path / "imgs" / f"p{i}.jpg", photo(i))
    rows = [{"filepath": f"imgs/p{i}.jpg", "caption": f"caption, with comma\tand tab {i}".replace(
        "\t", " " if fmt == "tsv" else "\t"), "score": i} for i in range(3)]
    table = _table(tmp_path / f"data.{fmt}", fmt, rows)
    out = tmp_path / "out"
    convert_captions(fmt, table, out, shard_options=_opts(out))
    tars = _check_read_back(out, {f"imgs_p{i}": rows[i]["caption"] for i in range(3)})
    assert str(json.loads(tars["imgs_p2"]["json"])["score"]) == "2"


def test_tables_unknown_column_fails_before_writing(tmp_path):
    table = _table(tmp_path / "t.jsonl", "jsonl", [{"img": "a.jpg", "caption": "x"}])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="image column"):
        convert_captions("jsonl", table, out)
    assert not out.exists()
    with pytest.raises(ConversionError, match="no sample written"):  # named: read, but a.jpg is missing
        convert_captions("jsonl", table, out, image_column="img", shard_options=_opts(out))
    assert manifest(out)["skipped"] == {"missing_image": 1}


def _img2dataset_tar(path: Path, start: int, n: int) -> None:
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            files = {"jpg": photo(i), "txt": CAPTIONS[i % 6].encode(),
                     "json": json.dumps({"url": f"http://x/{i}.jpg", "key": key}).encode()}
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_img2dataset_checked_and_resharded(tmp_path):
    _img2dataset_tar(tmp_path / "in" / "00000.tar", 0, 3)
    _img2dataset_tar(tmp_path / "in" / "00001.tar", 3, 2)
    write(tmp_path / "in" / "00000_stats.json", "{}")
    out = tmp_path / "out"
    convert_captions("img2dataset", tmp_path / "in", out, shard_options=_opts(out, samples_per_shard=2))
    tars = _check_read_back(out, {f"{i:09d}": CAPTIONS[i % 6] for i in range(5)})
    assert json.loads(tars["000000004"]["json"])["url"] == "http://x/4.jpg"
    assert [s["samples"] for s in manifest(out)["shards"]] == [2, 2, 1]


def test_planted_bad_inputs_are_counted(tmp_path):
    src = _folder(tmp_path / "src", 3)
    for reason in BAD_REASONS:
        write(src / f"bad_{reason}.png", bad_image(reason))
        write(src / f"bad_{reason}.txt", "caption of a bad image")
    write(src / "nocap.jpg", photo(7))                       # missing caption
    write(src / "emptycap.jpg", photo(8))
    write(src / "emptycap.txt", "  \n")                      # empty caption
    write(src / "latin1.jpg", photo(9))
    write(src / "latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8
    for name in ("x y", "x_y"):                              # both sanitise to x_y: both are kept
        write(src / f"{name}.jpg", photo(10))
        write(src / f"{name}.txt", name)
    write(src / "dup.jpg", photo(11))                        # dup.jpg and dup.png: the same key, dup
    write(src / "dup.png", photo(12, fmt="PNG"))
    write(src / "dup.txt", "dup")
    out = tmp_path / "out"
    m = convert_captions("folder", src, out, shard_options=_opts(out, samples_per_shard=4))
    want = {r: 1 for r in BAD_REASONS} | {"missing_caption": 1, "empty_caption": 1, "non_utf8_text": 1,
                                          "duplicate_key": 1}
    assert m["skipped"] == want
    assert m["totals"] == m["totals"] | {"samples": 6, "skipped": sum(want.values()),
                                         "inputs": 6 + sum(want.values())}
    assert m["skipped_examples"]["duplicate_key"] == ["dup.png"]
    assert m["skipped_examples"]["missing_caption"] == ["nocap.jpg: nocap.txt"]  # the sidecar tried
    x_y = "x_y-" + hashlib.sha1(b"x_y").hexdigest()[:8]  # the second input that sanitises to x_y
    _check_read_back(out, {"dup": "dup"} | {f"img{i}": CAPTIONS[i] for i in range(3)}
                     | {"x_y": "x y", x_y: "x_y"})

    # the same planted table rows: missing file, malformed JSON line, non-UTF-8 line
    lines = [json.dumps({"image": str(src / "img1.jpg"), "caption": "ok"}).encode(),
             json.dumps({"image": str(src / "gone.jpg"), "caption": "missing file"}).encode(),
             b'{"image": "broken',
             json.dumps({"image": str(src / "img2.jpg"), "caption": "x"}).encode().replace(b"x", b"\xff"),
             json.dumps({"image": str(src / "img2.jpg"), "caption": None}).encode()]
    table = write(tmp_path / "t.jsonl", b"\n".join(lines) + b"\n")
    out2 = tmp_path / "out2"
    m2 = convert_captions("jsonl", table, out2, shard_options=_opts(out2))
    assert m2["skipped"] == {"missing_image": 1, "malformed_json": 1, "non_utf8_text": 1,
                             "missing_caption": 1}
    assert m2["totals"]["samples"] == 1


def test_summary_line_names_reasons(tmp_path, capsys):
    src = _folder(tmp_path / "src", 2)
    write(src / "bad.jpg", b"")
    write(src / "bad.txt", "x")
    argv = ["--format", "folder", "--input", str(src), "--output", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "2 samples" in line and "skipped 1" in line and "empty_image=1" in line


def test_errors_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="does not exist"):
        convert_captions("folder", tmp_path / "nope", out)
    with pytest.raises(ConversionError, match="unknown format"):
        convert_captions("flickr", tmp_path, out)
    assert main(["--format", "folder", "--input", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--format", "flickr", "--input", str(tmp_path), "--output", str(out)])
    bad_json = write(tmp_path / "c.json", "{not json")
    with pytest.raises(ConversionError, match="COCO"):
        convert_captions("coco", bad_json, out)
    assert not out.exists()


def test_foreign_output_folder_is_refused(tmp_path):
    src = _folder(tmp_path / "src", 2)
    out = tmp_path / "out"
    write(out / "theirs.tar", b"")
    with pytest.raises(ConversionError, match="did not write"):
        convert_captions("folder", src, out, shard_options=_opts(out))


def test_dry_run_and_limit(tmp_path):
    src = _folder(tmp_path / "src", 4)
    out = tmp_path / "out"
    summary = convert_captions("folder", src, out, shard_options=_opts(out), dry_run=True)
    assert summary["valid_inputs"] == 4 and not out.exists()
    assert main(["-f", "folder", "-i", str(src), "-o", str(out), "--limit", "2", "--no-progress"]) == 0
    assert [s["__key__"] for s in read_wds(out)] == ["img0", "img1"]


def test_bytes_limit_splits_shards(tmp_path):
    src = _folder(tmp_path / "src", 4)
    out = tmp_path / "out"
    m = convert_captions("folder", src, out, shard_options=_opts(out, max_shard_bytes=14_000))
    assert len(m["shards"]) >= 3
    assert all(Path(out / s["name"]).stat().st_size <= 14_000 or s["samples"] == 1 for s in m["shards"])
    _check_read_back(out, {f"img{i}": CAPTIONS[i] for i in range(4)})


def test_output_is_deterministic(tmp_path):
    src = _folder(tmp_path / "src", 5)
    a, b = tmp_path / "a", tmp_path / "b"
    convert_captions("folder", src, a, shard_options=_opts(a, samples_per_shard=2))
    convert_captions("folder", src, b, shard_options=_opts(b, samples_per_shard=2))
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) == 3


@pytest.mark.slow
def test_workers_give_the_same_shards(tmp_path):
    src = _folder(tmp_path / "src", 5)
    a, b = tmp_path / "a", tmp_path / "b"
    convert_captions("folder", src, a, shard_options=_opts(a, samples_per_shard=2))
    convert_captions("folder", src, b, shard_options=_opts(b, samples_per_shard=2, workers=2))
    assert shard_bytes(a) == shard_bytes(b)
    assert {k: v for k, v in manifest(a).items() if k != "args"} == {
        k: v for k, v in manifest(b).items() if k != "args"}


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    src = _folder(tmp_path / "src", 4)
    for i in range(4, 7):
        write(src / f"img{i}.jpg", photo(i))
        write(src / f"img{i}.txt", f"caption {i}")
    write(src / "bad.jpg", b"junk")
    write(src / "bad.txt", "x")
    full, part = tmp_path / "full", tmp_path / "part"
    convert_captions("folder", src, full, shard_options=_opts(full, samples_per_shard=2))

    class Killed(Exception):
        pass

    real = conversion.convert_chunk
    calls: list[int] = []
    resumed = False

    def dies_on_third_chunk(handler, ctx, chunk, items, output, max_bytes, listing):
        nonlocal resumed
        calls.append(chunk)
        if chunk == 2 and not resumed:  # killed while writing: a temporary shard is left behind
            write(Path(output) / f"shard-{chunk:06d}-000.tar.tmp", b"half a shard")
            write(Path(output) / f"shard-{chunk:06d}-001.tar", b"renamed, but the chunk never finished")
            raise Killed
        return real(handler, ctx, chunk, items, output, max_bytes, listing)

    monkeypatch.setattr(conversion, "convert_chunk", dies_on_third_chunk)
    with pytest.raises(Killed):
        convert_captions("folder", src, part, shard_options=_opts(part, samples_per_shard=2))
    assert not (part / "manifest.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in part.glob("*.tar")}
    assert sorted(finished) == ["shard-000000-000.tar", "shard-000001-000.tar", "shard-000002-001.tar"]
    del finished["shard-000002-001.tar"]

    calls.clear()
    resumed = True
    convert_captions("folder", src, part, shard_options=_opts(part, samples_per_shard=2))
    assert calls == [2, 3]  # finished chunks were kept, not redone
    assert {p.name: p.stat().st_mtime_ns for p in part.glob("shard-00000[01]-000.tar")} == finished
    assert not list(part.glob("*.tmp"))
    assert shard_bytes(part) == shard_bytes(full)
    mf, mp = manifest(full), manifest(part)
    assert {k: v for k, v in mf.items() if k != "args"} == {k: v for k, v in mp.items() if k != "args"}
    assert mp["skipped"] == {"corrupt_image": 1} and mp["totals"]["samples"] == 7
    assert [s["__key__"] for s in read_wds(part)] == [s["__key__"] for s in read_wds(full)]

    # a rerun of a finished conversion writes nothing new; other arguments are refused
    calls.clear()
    convert_captions("folder", src, part, shard_options=_opts(part, samples_per_shard=2))
    assert calls == []
    with pytest.raises(ConversionError, match="samples_per_shard"):
        convert_captions("folder", src, part, shard_options=_opts(part, samples_per_shard=3))
    convert_captions("folder", src, part, shard_options=_opts(part, samples_per_shard=3, overwrite=True),
                     image_options=ImageOptions())
    assert [s["samples"] for s in manifest(part)["shards"]] == [2, 3, 2]  # bad.jpg sorts first


def test_img2dataset_broken_and_truncated_tars_are_counted(tmp_path):
    _img2dataset_tar(tmp_path / "in" / "00000.tar", 0, 3)
    _img2dataset_tar(tmp_path / "full.tar", 3, 2)
    data = (tmp_path / "full.tar").read_bytes()
    last_jpg = data.rindex(b"\xff\xd8\xff")
    write(tmp_path / "in" / "00001.tar", data[: last_jpg + 1000])  # cut inside the last image
    write(tmp_path / "in" / "00002.tar", b"\x07" * 5000)  # not a tar at all
    out = tmp_path / "out"
    m = convert_captions("img2dataset", tmp_path / "in", out, shard_options=_opts(out))
    assert m["skipped"] == {"broken_tar": 2}  # the cut tar keeps its complete first sample
    assert m["totals"]["samples"] == 4 and m["totals"]["inputs"] == 6
    _check_read_back(out, {f"{i:09d}": CAPTIONS[i % 6] for i in range(4)})


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_tables_keep_every_caption_of_an_image(tmp_path, fmt):
    from collections import Counter

    from kosmos.data.format import captions
    from kosmos.data.shards import read_shard

    for i in range(3):
        write(tmp_path / "imgs" / f"p{i}.jpg", photo(i))
    if fmt == "csv":  # one row per caption, rows of an image together
        rows = [{"filepath": f"imgs/p{i}.jpg", "caption": c} for i, c in
                [(0, "a dog"), (0, "a puppy"), (0, "a dog"), (1, "a cat"), (2, "a bird"), (2, "a crow")]]
    else:  # a list of captions in one cell
        rows = [{"filepath": "imgs/p0.jpg", "caption": ["a dog", " ", "a puppy", "a dog"]},
                {"filepath": "imgs/p1.jpg", "caption": ["a cat"]},
                {"filepath": "imgs/p2.jpg", "caption": ["a bird", "a crow"]}]
    table = _table(tmp_path / f"data.{fmt}", fmt, rows)
    out = tmp_path / "out"
    m = convert_captions(fmt, table, out, shard_options=_opts(out))
    tars = _check_read_back(out, {"imgs_p0": "a dog", "imgs_p1": "a cat", "imgs_p2": "a bird"})
    assert json.loads(tars["imgs_p0"]["json"])["captions"] == ["a dog", "a puppy"]
    assert "captions" not in json.loads(tars["imgs_p1"]["json"])  # one caption: as before
    assert m["skipped"] == {}
    # what training reads: every caption of the image (kosmos.data.format.captions)
    got = {raw["__key__"]: captions(raw)
           for p in sorted(out.glob("*.tar")) for _, raw in read_shard(str(p), Counter())}
    assert got == {"imgs_p0": ["a dog", "a puppy"], "imgs_p1": ["a cat"], "imgs_p2": ["a bird", "a crow"]}
    # an image's rows apart are not merged: the later one is a duplicate, as before
    if fmt == "csv":
        table = _table(tmp_path / "apart.csv", fmt, [rows[0], rows[3], rows[1]])
        m = convert_captions(fmt, table, tmp_path / "o2", shard_options=_opts(tmp_path / "o2"))
        assert m["skipped"] == {"duplicate_key": 1}


def test_img2dataset_captions_list_reaches_training(tmp_path):
    from collections import Counter

    from kosmos.data.format import captions
    from kosmos.data.shards import read_shard

    _img2dataset_tar(tmp_path / "in" / "00000.tar", 0, 1)
    with tarfile.open(tmp_path / "in" / "00000.tar") as t:
        files = {m.name.split(".", 1)[1]: t.extractfile(m).read() for m in t.getmembers()}
    meta = {**json.loads(files["json"]), "captions": [CAPTIONS[0], "another caption", 7]}
    files["json"] = json.dumps(meta).encode()
    import io

    with tarfile.open(tmp_path / "in" / "00000.tar", "w") as tar:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"000000000.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    convert_captions("img2dataset", tmp_path / "in", out, shard_options=_opts(out))
    (raw,) = [r for p in sorted(out.glob("*.tar")) for _, r in read_shard(str(p), Counter())]
    assert captions(raw) == [CAPTIONS[0], "another caption"]  # a non-string entry is ignored
