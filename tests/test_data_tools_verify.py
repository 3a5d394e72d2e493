"""verify and inspect: sound shards pass, corrupt ones fail with a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

from kosmos.data_tools import inspect as shard_inspect
from kosmos.data_tools import verify as shard_verify
from kosmos.data_tools.captions import convert_captions
from kosmos.data_tools.conversion import ShardOptions
from tests.helpers import photo, write


def _shards(tmp_path: Path, n: int = 4, per_shard: int = 2) -> Path:
    src = tmp_path / "src"
    for i in range(n):
        write(src / f"im{i}.jpg", photo(i))
        write(src / f"im{i}.txt", f"caption {i}")
    out = tmp_path / "out"
    convert_captions("folder", src, out, shard_options=ShardOptions(output=out, samples_per_shard=per_shard,
                                                                    progress=False))
    return out


def test_verify_ok(tmp_path, capsys):
    out = _shards(tmp_path)
    assert shard_verify.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "shard-000000-000.tar: 2 samples, 2 images, ok" in text and text.strip().endswith("with problems")
    assert "OK: 2 shards, 4 samples" in text


def test_verify_fails_on_corrupt_image(tmp_path, capsys):
    out = _shards(tmp_path)
    shard = out / "shard-000001-000.tar"
    data = bytearray(shard.read_bytes())
    start = data.index(b"\xff\xd8\xff")  # first JPEG in the shard: its magic bytes overwritten
    data[start : start + 4] = b"JUNK"
    shard.write_bytes(bytes(data))
    assert shard_verify.main([str(out)]) == 1
    text = capsys.readouterr().out
    assert "shard-000001-000.tar: 2 samples, 2 images, 1 problems" in text and "FAILED" in text


def test_verify_fails_on_truncated_tar_and_manifest_mismatch(tmp_path, capsys):
    out = _shards(tmp_path)
    shard = out / "shard-000000-000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    assert shard_verify.main([str(out)]) == 1
    assert "shard-000000-000.tar" in capsys.readouterr().out
    out2 = _shards(tmp_path / "again")
    m = json.loads((out2 / "manifest.json").read_text())
    m["shards"][0]["samples"] = 5
    (out2 / "manifest.json").write_text(json.dumps(m))
    assert shard_verify.main([str(out2)]) == 1
    assert "manifest.json says 5 samples, found 2" in capsys.readouterr().out


def test_verify_missing_folder(tmp_path):
    assert shard_verify.main([str(tmp_path / "nope")]) == 2


def test_inspect_shows_samples(tmp_path, capsys):
    out = _shards(tmp_path)
    assert shard_inspect.main([str(out), "-n", "3"]) == 0
    text = capsys.readouterr().out
    assert text.count("== im") == 3 and "caption 2" in text and "JPEG 120x96 RGB" in text
