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


def test_inspect_packed_shows_what_training_sees(tmp_path, capsys, tiny_tokenizer):
    """`kosmos-inspect --packed CONFIG overrides`: the mixture plan as the training log prints it, then per
    source the first packed rows decoded (special tokens, image slots, document boundaries, text without loss)
    and the rows' images written to --out as the model gets them."""
    from PIL import Image

    from tests.helpers import TINY, caption_shards, instruction_shards, interleaved_shards

    caps = caption_shards(tmp_path / "cap", 1, 12)
    docs = interleaved_shards(tmp_path / "docs", 1, 6)
    inst = instruction_shards(tmp_path / "inst", 1, 12)
    overrides = [f"tokenizer.path={tiny_tokenizer.path}", f"data.captions.shards=[{caps[0]}]",
                 f"data.interleaved.shards=[{docs[0]}]", "data.text.tokens_per_step=0",
                 "data.sources.inst.kind=text", f"data.sources.inst.shards=[{inst[0]}]",
                 "data.sources.inst.tokens_per_step=1024", "data.sources.inst.loss=response",
                 *(f"data.{n}.workers=0" for n in ("captions", "interleaved", "sources.inst"))]
    out = tmp_path / "seen"
    assert shard_inspect.main(["--packed", str(TINY), *overrides, "-n", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("mixture per step: 1 process(es)")
    assert "== data.captions (captions): the first 2 packed row(s) of 256 tokens" in printed
    assert "== data.sources.inst (text)" in printed and "== data.interleaved (interleaved)" in printed
    assert printed.count("\nrow 0: ") == 3 and printed.count("\nrow 1: ") == 3
    assert "<s><image>[image 0: 8 slots -> " in printed and " || " in printed  # captions pack several
    assert "{no loss: " in printed  # the instructions' prompts
    images = sorted(out.rglob("*.png"))
    assert {p.parent.name for p in images} == {"captions", "interleaved"} and f"in {out}/" in printed
    assert all(f"-> {p.relative_to(out).as_posix()}]" in printed for p in images)
    with Image.open(out / "captions" / "row0-image0.png") as im:
        assert im.size == (64, 64)  # tiny.yaml's image_size
    # a bad override is one line
    assert shard_inspect.main(["--packed", str(TINY), "data.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown config key 'data.nope'" in err and err.count("\n") == 1
