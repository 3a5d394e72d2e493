"""Hostile inputs and faults (issue 11): each case planted, each ending skipped and counted, in a one-line
error naming the file or key (exit 2, no traceback), or in a documented recovery.

Converters: non-regular files (2), killed workers and leftovers (3), an input changed between runs (4), two
converters on one output (10), an unwritable output (11), keys that sanitise alike (14), a conversion that
writes nothing (19).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kosmos.data_tools import captions, conversion, text
from kosmos.data_tools.captions import convert_captions
from kosmos.data_tools.conversion import Conversion, ShardOptions, run_conversion
from kosmos.data_tools.records import ConversionError, Item
from kosmos.data_tools.text import make_text_sample
from tests.helpers import MARKER, ROOT, alive_with_marker, manifest, photo, read_tar, shard_bytes, write


def _opts(out: Path, **kw) -> ShardOptions:
    kw.setdefault("progress", False)
    return ShardOptions(output=out, **kw)


def _folder(root: Path, names) -> Path:
    for i, name in enumerate(names):
        write(root / f"{name}.jpg", photo(i))
        write(root / f"{name}.txt", f"caption of {name}")
    return root


@pytest.fixture
def no_hang():
    """Fail (instead of waiting forever) when the test blocks for 30 s, e.g. opening a FIFO."""

    def hung(*_):
        raise TimeoutError("blocked for 30 s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _one_line_error(capsys, *parts: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and all(p in err for p in parts), err
    return err


# ------------------------------------------------------------------ 2. FIFOs and other non-regular files


def test_fifo_sidecar_and_fifo_images_are_skipped_and_counted(tmp_path, no_hang):
    src = _folder(tmp_path / "src", ["a", "b", "c"])
    (src / "b.txt").unlink()
    os.mkfifo(src / "b.txt")      # a caption sidecar that is a FIFO: reading it would wait for a writer
    os.mkfifo(src / "d.jpg")      # an image that is a FIFO
    os.symlink(src / "gone.jpg", src / "e.jpg")  # a broken link
    out = tmp_path / "out"
    m = convert_captions("folder", src, out, shard_options=_opts(out))
    assert m["skipped"] == {"not_a_regular_file": 3} and m["totals"]["samples"] == 2
    assert m["skipped_examples"]["not_a_regular_file"] == ["b.jpg: b.txt", "d.jpg", "e.jpg"]
    assert sorted(read_tar(out)) == ["a", "c"]

    # an image path in a table that names a FIFO: skipped in the handler, the path in the example
    rows = [{"image": "a.jpg", "caption": "fine"}, {"image": "d.jpg", "caption": "fifo"}]
    table = write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    out2 = tmp_path / "out2"
    m2 = convert_captions("jsonl", table, out2, images_root=src, shard_options=_opts(out2))
    assert m2["skipped"] == {"not_a_regular_file": 1} and m2["totals"]["samples"] == 1
    assert m2["skipped_examples"]["not_a_regular_file"] == [f"t.jsonl:1: {src / 'd.jpg'}"]

    # the text converter counts a FIFO .txt instead of leaving it out without a word
    corpus = tmp_path / "corpus"
    write(corpus / "doc.txt", "a document")
    os.mkfifo(corpus / "pipe.txt")
    out3 = tmp_path / "out3"
    m3 = text.convert_text(corpus, out3, shard_options=_opts(out3))
    assert m3["skipped"] == {"not_a_regular_file": 1} and m3["totals"]["samples"] == 1


# ------------------------------------------------------------------ 3 and 10. killed converters, two at once


_SLEEPY = """
import sys
import time
from pathlib import Path

from kosmos.data_tools.cli import run_cli
from kosmos.data_tools.conversion import Conversion, ShardOptions, run_conversion
from kosmos.data_tools.records import Item
from kosmos.data_tools.text import make_text_sample


def sleepy_text_sample(item, seconds):  # module level: it runs in the spawned workers
    time.sleep(seconds)
    return make_text_sample(item)


def items():
    return [Item(f"d{i:03d}", f"doc {i}", {"text": f"document {i}", "meta": {}}) for i in range(40)]


if __name__ == "__main__":
    out, seconds = Path(sys.argv[1]), float(sys.argv[2])
    conv = Conversion("kosmos.data_tools.text", "text", {"docs": 40}, items(), sleepy_text_sample, seconds)
    opts = ShardOptions(output=out, samples_per_shard=2, workers=2, progress=False)
    sys.exit(run_cli(lambda: run_conversion(conv, opts)))
"""


def _converter(script: Path, out: Path, seconds: float, marker: str = "") -> subprocess.Popen:
    """A converter of 40 documents that takes ``seconds`` per document, in 2 workers (a script of its own:
    the workers it spawns import it, and importing this test module would cost them torch). ``marker``:
    its processes carry it (helpers.alive_with_marker)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{script.parent}", MARKER: marker}
    return subprocess.Popen([sys.executable, str(script), str(out), str(seconds)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_converter_takes_its_workers_along_and_a_rerun_copes(tmp_path):
    import psutil

    script = write(tmp_path / "sleepy" / "sleepy.py", _SLEEPY)
    out = tmp_path / "out"
    marker = f"hostile-convert-{os.getpid()}-{time.monotonic_ns()}"
    first = _converter(script, out, 0.5, marker)  # 40 documents, 2 per chunk, 2 workers: about 10 s
    _wait_for(lambda: any((out / ".convert_state").glob("chunk-*.json")))
    workers = psutil.Process(first.pid).children()
    assert workers

    # 10: a second identical converter is refused while the first runs, naming the folder and the holder
    second = _converter(script, out, 0.0)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert err.strip().splitlines() == [f"error: output {out} is being written by another conversion "
                                        f"(pid {first.pid}); wait for it to end or choose another folder"]

    # 3: SIGKILL the main process: its workers die with it and write nothing more
    first.kill()
    first.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    for p in alive:  # (only when the test fails) no orphan outlives it
        p.kill()
    assert not alive, alive
    files = {p.name: p.stat().st_size for p in out.rglob("*")}
    write(out / "shard-000019-000.tar.tmp", b"half a shard")  # as a killed worker leaves it
    _wait_for(lambda: not alive_with_marker(marker))  # every process of the first run has ended
    assert {p.name: p.stat().st_size for p in out.rglob("*")} == files | {"shard-000019-000.tar.tmp": 12}

    # an immediate rerun finishes the conversion, equal to an uninterrupted one
    rerun = _converter(script, out, 0.0)
    said, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "finished chunks reused" in said
    full = tmp_path / "full"
    items = [Item(f"d{i:03d}", f"doc {i}", {"text": f"document {i}", "meta": {}}) for i in range(40)]
    run_conversion(Conversion("kosmos.data_tools.text", "text", {"docs": 40}, items, make_text_sample),
                   _opts(full, samples_per_shard=2))
    assert shard_bytes(out) == shard_bytes(full) and len(shard_bytes(full)) == 20
    assert not list(out.glob("*.tmp"))
    assert manifest(out)["shards"] == manifest(full)["shards"]


def test_a_locked_output_is_refused_and_leftovers_are_cleaned(tmp_path, capsys):
    src = _folder(tmp_path / "src", ["a", "b", "c"])
    out = tmp_path / "out"
    argv = ["-f", "folder", "-i", str(src), "-o", str(out), "--no-progress", "--samples-per-shard", "2"]
    lock = conversion._lock_output(out)  # another conversion holds the folder
    try:
        with pytest.raises(ConversionError, match=f"pid {os.getpid()}"):
            convert_captions("folder", src, out, shard_options=_opts(out))
        assert captions.main(argv) == 2
        _one_line_error(capsys, f"output {out} is being written by another conversion")
        assert sorted(p.name for p in out.iterdir()) == [conversion.LOCK]  # nothing else touched
    finally:
        lock.close()
    # what a killed run leaves (temporary files, a lock file naming a dead process) is no obstacle
    write(out / conversion.LOCK, "999999999\n")
    write(out / "shard-000000-000.tar.tmp", b"half a shard")
    write(out / "shard-000001-000.tar.tmp", b"")
    write(out / ".convert_state" / "chunk-000001.json.tmp", b"{")
    write(out / "manifest.json.tmp", b"")
    assert captions.main(argv) == 0
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000-000.tar", "shard-000001-000.tar"]
    assert sorted(read_tar(out)) == ["a", "b", "c"]
    assert not list(out.rglob("*.tmp"))


# ------------------------------------------------------------------ 4. the input changed between runs


def test_rerun_after_the_input_changed_converts_the_new_input(tmp_path, monkeypatch, capsys):
    src = _folder(tmp_path / "src", [f"img{i}" for i in range(6)])
    out = tmp_path / "out"
    convert_captions("folder", src, out, shard_options=_opts(out, samples_per_shard=2))

    def same_as_fresh(tag: str) -> None:
        fresh = tmp_path / f"fresh-{tag}"
        convert_captions("folder", src, fresh, shard_options=_opts(fresh, samples_per_shard=2))
        assert shard_bytes(out) == shard_bytes(fresh)
        mo, mf = manifest(out), manifest(fresh)
        assert {k: v for k, v in mo.items() if k != "args"} == {k: v for k, v in mf.items() if k != "args"}

    real = conversion.convert_chunk
    calls: list[int] = []
    monkeypatch.setattr(conversion, "convert_chunk", lambda *a: calls.append(a[2]) or real(*a))

    # files added in the middle and at the end: the chunks from the first new file on are redone
    _folder(src, ["img2a", "img9"])
    capsys.readouterr()
    convert_captions("folder", src, out, shard_options=_opts(out, samples_per_shard=2))
    assert calls == [1, 2, 3]
    assert "1 finished chunks reused; 2 finished chunks redone" in capsys.readouterr().out
    assert sorted(read_tar(out)) == sorted(f"img{i}" for i in [0, 1, 2, "2a", 3, 4, 5, 9])
    same_as_fresh("added")

    # files removed: fewer chunks, the last ones' shards and state removed
    for name in ("img0", "img2a", "img9"):
        (src / f"{name}.jpg").unlink()
    calls.clear()
    convert_captions("folder", src, out, shard_options=_opts(out, samples_per_shard=2))
    assert calls == [0, 1, 2]
    assert sorted(read_tar(out)) == [f"img{i}" for i in range(1, 6)]
    assert len(list((out / ".convert_state").glob("chunk-*.json"))) == 3
    same_as_fresh("removed")

    # unchanged: nothing is redone
    calls.clear()
    convert_captions("folder", src, out, shard_options=_opts(out, samples_per_shard=2))
    assert calls == []

    # same names, other content: a caption rewritten (chunk 0), an image replaced (chunk 2)
    write(src / "img1.txt", "a new caption of img1")
    old = (src / "img5.jpg").read_bytes()
    write(src / "img5.jpg", photo(7))
    assert (src / "img5.jpg").read_bytes() != old
    convert_captions("folder", src, out, shard_options=_opts(out, samples_per_shard=2))
    assert calls == [0, 2]
    assert read_tar(out)["img1"]["txt"] == b"a new caption of img1"
    same_as_fresh("changed")


# ---------------------------------------------------------------- 11. an output folder that cannot be written


def test_unwritable_output_is_a_one_line_error(tmp_path, capsys):
    src = _folder(tmp_path / "src", ["a"])
    blocker = write(tmp_path / "a_file", "not a folder")
    for out in (blocker / "out", blocker):
        assert captions.main(["-f", "folder", "-i", str(src), "-o", str(out), "--no-progress"]) == 2
        _one_line_error(capsys, f"output {out} ")
    out = tmp_path / "out"
    write(out / ".convert_state", "a file where the state folder goes")
    assert captions.main(["-f", "folder", "-i", str(src), "-o", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, f"output {out} cannot be written (File exists: {out / '.convert_state'})")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_output_folder_is_a_one_line_error(tmp_path, capsys):
    src = _folder(tmp_path / "src", ["a"])
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert captions.main(["-f", "folder", "-i", str(src), "-o", str(out), "--no-progress"]) == 2
        _one_line_error(capsys, f"output {out} cannot be written (Permission denied)")
    finally:
        out.chmod(0o755)


# ------------------------------------------------------------------ 14. keys that sanitise to the same name


def test_keys_that_sanitise_alike_are_all_kept(tmp_path):
    names = ["a b", "a_b", "a.b", "日本", "中国"]
    src = _folder(tmp_path / "src", names)
    out = tmp_path / "out"
    m = convert_captions("folder", src, out, shard_options=_opts(out))
    assert m["skipped"] == {} and m["totals"]["samples"] == 5
    got = {k: v["txt"].decode() for k, v in read_tar(out).items()}
    assert sorted(got.values()) == sorted(f"caption of {n}" for n in names)

    def h(raw: str) -> str:
        return hashlib.sha1(raw.encode()).hexdigest()[:8]

    # sorted order a b, a.b, a_b, 中国, 日本: the first keeps the sanitised name, the others add a hash
    assert got == {"a_b": "caption of a b", f"a_b-{h('a.b')}": "caption of a.b",
                   f"a_b-{h('a_b')}": "caption of a_b", "_": "caption of 中国",
                   f"_-{h('日本')}": "caption of 日本"}


def test_unique_key():
    seen: dict[str, str] = {}
    assert conversion._unique_key("x", seen) == "x"
    assert conversion._unique_key("x", seen) is None  # the same input key twice: a duplicate
    assert conversion._unique_key("x y", seen) == "x_y"
    assert conversion._unique_key("x_y", seen) == "x_y-" + hashlib.sha1(b"x_y").hexdigest()[:8]
    assert conversion._unique_key("x_y", seen) is None
    assert conversion._unique_key("x y", seen) is None


# ------------------------------------------------------------------ 19. a conversion that writes nothing


def test_a_conversion_that_writes_nothing_exits_2_showing_the_paths_tried(tmp_path, capsys):
    train = tmp_path / "train2017"
    coco = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (1, 2, 3)],
            "annotations": [{"id": 10 + i, "image_id": i, "caption": f"caption {i}"} for i in (1, 2, 3)]}
    for i in (1, 2, 3):
        write(train / f"{i:012d}.jpg", photo(i))
    ann = write(tmp_path / "annotations" / "captions.json", json.dumps(coco))
    out = tmp_path / "out"
    wrong = tmp_path / "annotations"  # the default images root, the JSON's folder: not where the images are
    assert captions.main(["-f", "coco", "-i", str(ann), "-o", str(out), "--no-progress"]) == 2
    tried = wrong / "000000000001.jpg"
    _one_line_error(capsys, f"no sample written to {out}: 3 inputs", "missing_image=3",
                    f"captions.json:image 1: {tried}", str(out / "manifest.json"))
    m = manifest(out)
    assert m["skipped_examples"]["missing_image"] == [f"captions.json:image {i}: {wrong / f'{i:012d}.jpg'}"
                                                      for i in (1, 2, 3)]
    # with the right folder (another output: the first one holds a conversion with other arguments)
    assert captions.main(["-f", "coco", "-i", str(ann), "--images-root", str(train),
                          "-o", str(tmp_path / "ok"),
                          "--no-progress"]) == 0
    assert manifest(tmp_path / "ok")["totals"]["samples"] == 3


def test_an_interleaved_conversion_that_writes_nothing_says_why_its_documents_had_no_image(tmp_path):
    from kosmos.data_tools.interleaved import DocOptions, convert_interleaved

    docs = [{"id": f"doc{i}", "texts": ["some text", None], "images": [None, f"https://x.org/{i}.jpg"]}
            for i in range(2)]
    table = write(tmp_path / "docs.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "empty").mkdir()  # a wrong --images-root: no image is found
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"no_images=2; e\.g\. docs\.jsonl:0: missing_image=1 "):
        convert_interleaved("obelics", table, tmp_path / "empty", out, shard_options=_opts(out),
                            doc_options=DocOptions(single_image_drop=0.0))
    assert manifest(out)["skipped_images"] == {"missing_image": 2}


# ----------------------------------------------------------- issue 22, item 12: a full disk, a NUL in a path


def test_a_full_disk_is_a_one_line_error_naming_the_output_and_a_rerun_with_room_finishes(tmp_path, capsys):
    """A caption conversion on a disk that fills up (a 20 KB tmpfs where this may mount one, else a 20 KB file
    size limit: EFBIG) ended with an OSError traceback. Now: one line naming the output and the file, exit 2,
    the unfinished shard removed (its space given back); run again once there is room, it ends with the
    shards of a conversion that never failed."""
    from tests.helpers import SmallDisk

    src = _folder(tmp_path / "src", [f"im{i:02d}" for i in range(12)])
    fresh = tmp_path / "fresh"
    opts = ["--no-progress", "--samples-per-shard", "4"]
    assert captions.main(["-f", "folder", "-i", str(src), "-o", str(fresh), *opts]) == 0
    assert all(len(b) > 20_000 for b in shard_bytes(fresh).values())
    capsys.readouterr()
    with SmallDisk(tmp_path / "disk", 20_000) as disk:
        out = disk.folder / "out"
        args = ["-f", "folder", "-i", str(src), "-o", str(out), *opts]
        assert captions.main(args) == 2
        err = _one_line_error(capsys, f"output {out} cannot be written (", "shard-000000-000.tar.tmp); ",
                              "run the same command again")
        assert ("No space left on device" if disk.kind == "tmpfs" else "File too large") in err
        assert not list(out.glob("shard-*")), "the unfinished shard is removed"
        disk.room()
        assert captions.main(args) == 0
        assert shard_bytes(out) == shard_bytes(fresh)
        assert manifest(out)["totals"]["samples"] == 12


@pytest.mark.parametrize("fmt", ["jsonl", "coco"])
def test_an_image_path_with_a_nul_character_is_skipped_and_counted(tmp_path, fmt, capsys):
    """`"im2\\u0000.jpg"` is valid JSON; it stopped the whole conversion with `error: embedded null byte`,
    naming neither file nor row."""
    for i in (0, 1):
        write(tmp_path / f"im{i}.jpg", photo(i))
    names = ["im0.jpg", "im2\u0000.jpg", "im1.jpg"]
    if fmt == "jsonl":
        rows = [{"image": n, "caption": f"caption {i}"} for i, n in enumerate(names)]
        data = write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        where = "t.jsonl:1: 'im2\\x00.jpg'"
    else:
        coco = {"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                "annotations": [{"id": i, "image_id": i, "caption": f"caption {i}"} for i in range(3)]}
        data = write(tmp_path / "c.json", json.dumps(coco))
        where = "c.json:image 1: 'im2\\x00.jpg'"
    out = tmp_path / "out"
    assert captions.main(["-f", fmt, "-i", str(data), "-o", str(out), "--no-progress"]) == 0
    m = manifest(out)
    assert m["totals"]["samples"] == 2 and m["skipped"] == {"bad_image_path": 1}
    assert m["skipped_examples"]["bad_image_path"] == [where]
    assert "skipped 1 (bad_image_path=1)" in capsys.readouterr().out
