"""The shard format module: member grouping with its error accounting, parse_sample per kind, no torch."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from kosmos.data.format import (
    BadSample,
    ImageSegment,
    TarSpan,
    image_field,
    iter_tar,
    member_name,
    parse_sample,
    split_member,
)

ROOT = Path(__file__).resolve().parents[1]


def _tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w", dirs: tuple[str, ...] = ()) -> Path:
    with tarfile.open(path, mode) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _samples(path, **kw) -> tuple[list[tuple[str, dict, bool]], Counter]:
    skipped: Counter = Counter()
    out = [(s.key, s.files, s.cut) for s in iter_tar(path, skipped, **kw)]
    return out, skipped


def test_member_names_round_trip():
    assert member_name("k1", "img0.jpg") == "k1.img0.jpg" and image_field(3) == "img3.jpg"
    assert split_member("dir/k1.img0.JPG") == ("dir/k1", "img0.jpg")
    assert split_member("a.b/c") is None and split_member("__index__.json") is None
    # webdataset drops only __NAME__ metadata; other names starting with __ are samples
    assert split_member("__meta__/x.txt") is None and split_member("__foo.txt") == ("__foo", "txt")
    assert split_member("__foo/bar.txt") == ("__foo/bar", "txt")
    assert split_member("dir/__x__.txt") == ("dir/__x__", "txt")
    assert split_member(member_name("x-1_y", image_field(0))) == ("x-1_y", "img0.jpg")


def test_iter_tar_groups_consecutive_members(tmp_path):
    path = _tar(tmp_path / "s.tar", [("a.txt", b"A"), ("a.json", b"{}"), ("sub/b.TXT", b"B"),
                                     ("sub/b.img0.jpg", b"I"), ("sub/b.txt", b"again"), ("c.txt", b"C")],
                dirs=("sub",))
    samples, skipped = _samples(path)
    assert samples == [("a", {"txt": b"A", "json": b"{}"}, False),
                       ("sub/b", {"txt": b"B", "img0.jpg": b"I"}, False), ("c", {"txt": b"C"}, False)]
    assert skipped == {"duplicate_member": 1}  # the directory member is no sample and no error


def test_iter_tar_ignores_non_regular_members(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.txt", b"A"), ("b.txt", b"B")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo(name.replace(".txt", ".jpg"))
            link.type, link.linkname = tarfile.SYMTYPE, "elsewhere.jpg"
            tar.addfile(link)
    samples, skipped = _samples(path)
    assert samples == [("a", {"txt": b"A"}, False), ("b", {"txt": b"B"}, False)] and not skipped


def test_iter_tar_counts_cut_and_broken_tars(tmp_path):
    members = [(f"k{i}.{ext}", bytes([65 + i]) * 700) for i in range(3) for ext in ("txt", "json")]
    full = _tar(tmp_path / "full.tar", members).read_bytes()
    header = 512 + 1024  # one member: header + 700 bytes padded to 1024
    cases = {
        # cut at a member boundary: no end blocks; k0 may have had more members, so it is cut too
        2 * header: ("truncated_shard", 1, False),
        2 * header + 600: ("broken_shard", 2, True),  # cut inside k1.txt: k1 comes out cut (and empty)
        3 * header + 512 + 100: ("broken_shard", 2, True),  # cut inside k1.json: k1 has its txt only
        # cut inside k1.json's header: the parser stops quietly, k1 (its txt only) comes out cut
        3 * header + 100: ("truncated_shard", 2, False),
    }
    for cut, (reason, n, with_error) in cases.items():
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(full[:cut])
        errors: list[str] = []
        samples, skipped = _samples(path, errors=errors)
        assert skipped == {reason: 1}, cut
        assert len(samples) == n and samples[0][:2] == ("k0", {"txt": b"A" * 700, "json": b"A" * 700})
        assert [s[2] for s in samples] == [False] * (n - 1) + [True], cut  # the last sample is never whole
        assert bool(errors) is with_error
    (tmp_path / "junk.tar").write_bytes(b"\x07" * 5000)
    assert _samples(tmp_path / "junk.tar") == ([], Counter(broken_shard=1))
    samples, skipped = _samples(tmp_path / "full.tar")
    assert len(samples) == 3 and not skipped


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_iter_tar_reads_what_tarfile_reads(tmp_path, fmt):
    """The reader parses plain tar headers itself (tarfile's parsing was most of a loader worker's time):
    long names (GNU, pax, ustar prefix), non-ASCII names, directories and links, an empty member and a
    member of exactly one block, as tarfile reads them, from a file and from a stream that cannot seek."""
    long_dir = "d" * 90 + "/" + "e" * 60 + "/"  # ustar splits it into prefix + name
    members = [(long_dir + "k0.jpg", b"J" * 1000), (long_dir + "k0.txt", b"T"), ("日本/k1.txt", b""),
               ("k2.txt", b"x" * 512), ("k2.json", b"{}")]
    if fmt != tarfile.USTAR_FORMAT:
        members += [("x" * 150 + ".txt", b"long")]  # a name ustar cannot store
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            link = tarfile.TarInfo(name + "-link/")
            link.type, link.linkname = tarfile.SYMTYPE, "l" * (120 if fmt != tarfile.USTAR_FORMAT else 50)
            tar.addfile(link)
        d = tarfile.TarInfo("dir/")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    with tarfile.open(path) as tar:
        want = [(m.name, tar.extractfile(m).read(), m.offset_data) for m in tar if m.isreg()]
    assert [(n, d) for n, d, _ in want] == members
    samples, skipped = _samples(path)
    assert not skipped
    assert [(key + "." + f, data) for key, files, _ in samples for f, data in files.items()] == members
    samples, _ = _samples(path, read=lambda f: False)  # spans: tarfile's data offsets
    assert [(s.offset, s.size) for _, files, _ in samples for s in files.values()] == [
        (off, len(d)) for _, d, off in want]

    class Stream(io.RawIOBase):
        def __init__(self, data):
            self.f = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self.f.readinto(b)

    streamed, skipped = _samples(Stream(path.read_bytes()))
    assert not skipped and streamed == _samples(path)[0]


def test_iter_tar_counts_a_damaged_header(tmp_path):
    """A member header whose checksum does not match, or a malformed pax record: tarfile ends there
    quietly (or renames the member) and the rest of the shard was lost uncounted; now it counts as a broken
    shard, after the samples before it."""
    members = [(f"k{i}.txt", bytes([65 + i]) * 10) for i in range(3)]
    full = bytearray(_tar(tmp_path / "full.tar", members).read_bytes())
    full[1024 + 100] ^= 0x20  # k1.txt's header (mode field)
    (tmp_path / "bad.tar").write_bytes(full)
    errors: list[str] = []
    samples, skipped = _samples(tmp_path / "bad.tar", errors=errors)
    assert [s[0] for s in samples] == ["k0"] and skipped == {"broken_shard": 1}
    assert "checksum" in errors[0] and "1024" in errors[0]
    pax = bytearray(_tar(tmp_path / "pax.tar", [("k" * 120 + ".txt", b"A"), ("b.txt", b"B")]).read_bytes())
    assert pax[156:157] == b"x" and pax[512:516] == b"134 "  # "134 path=kkk...\n": the record's length
    pax[512:515] = b"135"
    (tmp_path / "pax.tar").write_bytes(pax)
    assert _samples(tmp_path / "pax.tar") == ([], Counter(broken_shard=1))


def _gnu_tar() -> str | None:
    tar = shutil.which("tar")
    if tar is None or b"GNU tar" not in subprocess.run([tar, "--version"], capture_output=True).stdout:
        return None
    return tar


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix:0.0", "posix:0.1", "posix:1.0"])
def test_iter_tar_reads_sparse_members(tmp_path, fmt, monkeypatch):
    """`tar --sparse` of a file with holes, in each GNU sparse format: the member was dropped uncounted
    (GNU), given as its stored bytes only (pax 0.0), or given as a sample ./GNUSparseFile.PID/k holding the
    sparse map and the data (pax 0.1, 1.0). Now it is the file, under its name; cut anywhere, no wrong
    byte and the loss counted; too large (`MAX_SPARSE`), counted as unsupported_member and withheld."""
    tar = _gnu_tar()
    if tar is None:
        pytest.skip("needs GNU tar")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "k.bin", "wb") as f:  # 8 data runs: the GNU header's sparse map needs an extension block
        for i in range(8):
            f.seek(i * 20000)
            f.write(bytes([65 + i]) * 3000)
        f.truncate(200_000)
    (src / "h.bin").write_bytes(b"")
    with open(src / "h.bin", "wb") as f:  # all hole
        f.truncate(50_000)
    (src / "k.txt").write_bytes(b"caption")
    (src / "z.txt").write_bytes(b"last")
    fmt, _, version = fmt.partition(":")
    opts = [f"--sparse-version={version}"] if version else []
    path = tmp_path / "s.tar"
    subprocess.run([tar, f"--format={fmt}", "--sparse", *opts, "-cf", str(path), "-C", str(src), "k.bin",
                    "k.txt", "h.bin", "z.txt"], check=True)
    want = {"k": {"bin": (src / "k.bin").read_bytes(), "txt": b"caption"}, "h": {"bin": bytes(50_000)},
            "z": {"txt": b"last"}}
    samples, skipped = _samples(path)
    assert samples == [(k, files, False) for k, files in want.items()] and not skipped
    full = path.read_bytes()
    for cut in [*range(0, len(full), 512), *range(100, len(full), 1000)]:
        skipped = Counter()
        got = list(iter_tar(io.BytesIO(full[:cut]), skipped))
        for s in got:
            assert all(want[s.key][f] == v for f, v in s.files.items()), cut
            assert not s.whole or s.files == want[s.key], cut
        lost = 3 - len([s for s in got if s.whole])
        assert not lost or set(skipped) & {"broken_shard", "truncated_shard"}, cut
    monkeypatch.setattr("kosmos.data.format.MAX_SPARSE", 100_000)
    samples, skipped = _samples(path)
    assert [(k, files) for k, files, _ in samples] == [("k", {"txt": b"caption"}), *list(want.items())[1:]]
    assert skipped == {"unsupported_member": 1}
    from kosmos.data.shards import read_shard

    skipped = Counter()
    assert [s["__key__"] for _, s in read_shard(str(path), skipped)] == ["h", "z"]
    assert skipped == {"unsupported_member": 1, "incomplete_sample": 1}


def test_read_shard_withholds_the_last_sample_of_a_cut_tar(tmp_path):
    """A tar cut at a member boundary inside a sample: the sample came out without its later members and
    unflagged (a text sample without its json, trained as if whole); now it is not given, and counted."""
    from kosmos.data.shards import read_shard

    members = [(f"k{i}.{ext}", bytes([65 + i]) * 700) for i in range(3) for ext in ("txt", "json")]
    full = _tar(tmp_path / "full.tar", members).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(full[:5 * (512 + 1024)])  # after k2.txt: k2.json is gone
    skipped: Counter = Counter()
    got = [(offset, s["__key__"], sorted(s)) for offset, s in read_shard(str(cut), skipped)]
    whole = ["__key__", "__url__", "json", "txt"]
    assert got == [(0, "k0", whole), (1, "k1", whole)]
    assert skipped == {"truncated_shard": 1, "incomplete_sample": 1}


def test_iter_tar_spans_and_compressed(tmp_path):
    members = [("k0.jpg", b"J" * 1000), ("k0.txt", b"T"), ("k1.jpg", b"K" * 10), ("k1.txt", b"U")]
    plain = _tar(tmp_path / "s.tar", members)
    samples, _ = _samples(plain, read=lambda f: f != "jpg")
    span = samples[0][1]["jpg"]
    assert isinstance(span, TarSpan) and samples[0][1]["txt"] == b"T"
    with open(plain, "rb") as f:
        f.seek(span.offset)
        assert f.read(span.size) == b"J" * 1000
    gz = _tar(tmp_path / "s.tar.gz", members, mode="w:gz")
    samples, skipped = _samples(gz, read=lambda f: f != "jpg")  # compressed: read whole
    assert [s[1] for s in samples] == [{"jpg": b"J" * 1000, "txt": b"T"}, {"jpg": b"K" * 10, "txt": b"U"}]
    assert not skipped
    gz.write_bytes(gz.read_bytes()[:-30])
    assert _samples(gz)[1] == {"broken_shard": 1}


def _doc(segments) -> bytes:
    return json.dumps({"segments": segments, "meta": {}}).encode()


@pytest.mark.parametrize("kind, files, want", [
    ("text", {"txt": b" doc \n", "json": b"{}"}, [" doc \n"]),
    ("captions", {"png": b"P", "txt": b" a cat \n"}, [ImageSegment("png", b"P"), "a cat"]),
    ("captions", {"webp": b"W", "jpg": b"J", "txt": b"x"}, [ImageSegment("jpg", b"J"), "x"]),
    ("interleaved", {"json": _doc([{"text": "a"}, {"image": "img0.jpg"}, {"other": 1}, {"text": "b"}]),
                     "img0.jpg": b"I"}, ["a", ImageSegment("img0.jpg", b"I"), "b"]),
])
def test_parse_sample(kind, files, want):
    assert parse_sample(kind, {"__key__": "k", "__url__": "u.tar", **files}) == want


@pytest.mark.parametrize("kind, files, reason", [
    ("text", {"json": b"{}"}, "missing_text"),
    ("text", {"txt": b" \n "}, "empty_text"),
    ("text", {"txt": b"\xff\xfe"}, "not_utf8"),
    ("captions", {"txt": b"a cat"}, "missing_image"),
    ("captions", {"jpg": b"J"}, "missing_caption"),
    ("captions", {"jpg": b"J", "txt": b"  "}, "empty_caption"),
    ("captions", {"jpg": b"J", "txt": b"\xff"}, "not_utf8"),
    ("interleaved", {"txt": b"x"}, "missing_json"),
    ("interleaved", {"json": b"{not json"}, "bad_json"),
    ("interleaved", {"json": b'{"segments": "no list"}'}, "bad_json"),
    ("interleaved", {"json": _doc(["a string"])}, "bad_json"),
    ("interleaved", {"json": _doc([{"text": "a"}, {"image": "img1.jpg"}]), "img0.jpg": b"I"},
     "missing_image"),
    ("interleaved", {"json": _doc([{"text": ""}, {"other": 1}])}, "empty_document"),
])
def test_parse_sample_rejects(kind, files, reason):
    with pytest.raises(BadSample) as e:
        parse_sample(kind, files)
    assert e.value.reason == reason == str(e.value)


def test_parse_sample_unknown_kind():
    with pytest.raises(ValueError, match="unknown source kind"):
        parse_sample("audio", {})


def test_uppercase_image_names_found_alike_by_reader_and_verify(tmp_path, tiny_tokenizer):
    """Interleaved image names are case-insensitive the same way for training and for verify."""
    from kosmos.data.samples import encode_sample
    from kosmos.data.shards import read_shard
    from kosmos.data_tools.verify import verify_shard
    from kosmos.sequence import SequenceEncoder
    from tests.helpers import jpeg

    doc = _doc([{"text": "a red circle"}, {"image": "IMG0.JPG"}, {"text": "and"}, {"image": "Img1.jpg"}])
    path = _tar(tmp_path / "doc-000000.tar", [("Doc1.json", doc), ("Doc1.IMG0.JPG", jpeg(1)),
                                               ("Doc1.img1.jpg", jpeg(2))])
    raw = next(read_shard(str(path), Counter()))[1]
    assert raw["__key__"] == "Doc1" and set(raw) == {"__key__", "__url__", "json", "img0.jpg", "img1.jpg"}
    enc = encode_sample("interleaved", raw, (0, 0), SequenceEncoder(tiny_tokenizer, 4, 32))
    assert len(enc.images) == 2
    rep = verify_shard(path, "interleaved")
    assert rep.samples == 1 and rep.images == 2 and rep.problems == []
    # one name that neither finds: both reject it
    bad = _tar(tmp_path / "doc-000001.tar", [("d.json", _doc([{"text": "a"}, {"image": "img2.jpg"}])),
                                              ("d.img0.jpg", jpeg(1))])
    with pytest.raises(BadSample, match="missing_image"):
        encode_sample("interleaved", next(read_shard(str(bad), Counter()))[1], (0, 0),
                      SequenceEncoder(tiny_tokenizer, 4, 32))
    assert any("missing_image" in p and "img2.jpg" in p for p in verify_shard(bad, "interleaved").problems)


def test_format_imports_no_torch():
    code = ("import sys; import kosmos.data.format, kosmos.data.shards, kosmos.data; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_lazy_package_names_still_import():
    from kosmos.data import Mixture, SourceDataset, SourceLoader, build_loader, build_mixture, plan

    assert callable(plan) and callable(build_mixture) and callable(build_loader)
    assert Mixture.__name__ == "Mixture" and SourceDataset and SourceLoader
    with pytest.raises(AttributeError):
        import kosmos.data

        kosmos.data.nothing_like_this  # noqa: B018
