"""Check shards: decode every member of every sample of every shard.

    python -m kosmos.data_tools.verify shards/coco

Prints one line per shard (samples, problems) and a closing summary. Images must decode, ``.txt``
must be UTF-8, ``.json`` must parse, every sample must be one the training reader accepts (the shard
format of ``kosmos.data.format``: interleaved samples hold the images their segments name, caption
samples have an image and a non-empty caption, ...), the tar must be complete and the counts must
match ``manifest.json``.
img2dataset's own output (no ``manifest.json``; a ``NAME_stats.json`` beside each ``NAME.tar``), which
training reads directly, is verified as caption shards, each against the ``successes`` of its stats file.
Exits 1 when any shard is corrupt or disagrees with the manifest, 2 when the folder cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kosmos.data.format import JSON_FIELD, KINDS, BadSample, is_image_field, iter_tar, parse_sample
from kosmos.data.remote import ReadOptions, is_remote, is_url, open_shard, shard_name
from kosmos.data.shards import expand_shards
from kosmos.errors import command_name
from kosmos.untrusted import ImageError, image_errors, load_json, open_image


@dataclass
class ShardReport:
    """What ``verify_shard`` found in one shard."""

    name: str
    samples: int = 0
    images: int = 0
    problems: list[str] = field(default_factory=list)


def _check_image(data: bytes) -> str | None:
    """What is wrong with an image member (a decompression bomb refused from its header), or None."""
    try:
        with open_image(data) as img, image_errors():
            img.load()
    except ImageError as e:
        return str(e)
    return None


def check_sample(key: str, files: dict[str, bytes], kind: str | None) -> tuple[list[str], int]:
    """Problems of one sample, and its number of images: every member must decode, and the sample must be
    one the training reader accepts (`kosmos.data.format.parse_sample`)."""
    problems: list[str] = []
    images = 0
    for ext, data in sorted(files.items()):
        last = ext.rsplit(".", 1)[-1]
        if is_image_field(ext):
            images += 1
            err = _check_image(data)
            if err:
                problems.append(f"{key}.{ext}: image does not decode ({err})")
        elif last == "txt":
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"{key}.{ext}: not UTF-8")
        elif last == "json":
            try:
                load_json(data.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append(f"{key}.{ext}: bad JSON ({e})")
    if kind in KINDS:
        try:
            parse_sample(kind, files)
        except BadSample as e:
            detail = f" {e.detail}" if e.detail else ""
            problems.append(f"{key}: the reader rejects this {kind} sample: {e.reason}{detail}")
    if kind == "interleaved" and JSON_FIELD in files:
        try:
            segs = load_json(files[JSON_FIELD].decode("utf-8")).get("segments")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            segs = None
        for s in segs if isinstance(segs, list) else []:
            if isinstance(s, dict) and not ({"text", "image"} & set(s)):
                problems.append(f"{key}: bad segment {s!r}")
    return problems, images


def verify_shard(path: str | Path, kind: str | None = None,
                 options: ReadOptions | None = None) -> ShardReport:
    """Decode every sample of one shard (members grouped by `kosmos.data.format.iter_tar`); `path` may be a
    URL or `pipe:COMMAND` (`kosmos.data.remote`), streamed."""
    rep = ShardReport(shard_name(str(path)))
    seen: set[str] = set()
    skipped: Counter = Counter()
    errors: list[str] = []
    try:
        f = open_shard(str(path), options)
    except OSError as e:
        rep.problems.append(f"cannot be opened ({type(e).__name__}: {e})")
        return rep
    with f:
        for sample in iter_tar(f, skipped, errors=errors):
            if sample.cut:  # the tar broke inside this sample: reported below
                continue
            if sample.unsupported:  # the training reader skips the sample (incomplete_sample)
                rep.problems.append(f"{sample.key}: members the reader cannot read: "
                                    f"{', '.join(sample.unsupported)}; write them as plain files")
                continue
            key, files = sample.key, sample.files
            rep.samples += 1
            if key in seen:
                rep.problems.append(f"{key}: duplicate key")
            seen.add(key)
            problems, images = check_sample(key, files, kind)
            rep.images += images
            rep.problems.extend(problems)
    if failed := [r for r in skipped if r.startswith("shard_")]:
        rep.problems.append(f"cannot be read to its end ({failed[0]}) after {rep.samples} samples: "
                            f"{'; '.join(errors)}")
    if skipped["broken_shard"]:
        rep.problems.append(f"corrupt tar after {rep.samples} samples: {'; '.join(errors)}")
    if skipped["truncated_shard"]:
        rep.problems.append(f"truncated tar after {rep.samples} samples: it ends without the end-of-archive "
                            "blocks")
    if skipped["duplicate_member"]:
        rep.problems.append(f"{skipped['duplicate_member']} duplicate members (a sample with a field twice)")
    return rep


def verify(folder: str | Path, quiet: bool = False, kind: str | None = None,
           options: ReadOptions | None = None) -> tuple[bool, list[ShardReport]]:
    """Verify every shard in ``folder`` against its ``manifest.json``; returns (ok, reports). ``folder`` may
    also be remote (`verify_remote`)."""
    spec = str(folder)
    pattern = any(c in spec for c in "{*?[")
    if not Path(spec).is_dir() and (is_remote(spec) or Path(spec).is_file() or pattern):
        return verify_remote(spec, quiet, kind, options)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    manifest = None
    general: list[str] = []
    if (folder / "manifest.json").is_file():
        try:
            manifest = load_json((folder / "manifest.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            general.append(f"manifest.json does not parse ({e})")
    elif any(folder.glob("*_stats.json")):
        manifest = _img2dataset_manifest(folder)
        if not quiet:
            print(f"note: no manifest.json; {folder} is img2dataset output: verified as caption shards "
                  "against its _stats.json files")
    else:
        general.append("no manifest.json")
    kind = manifest.get("kind") if isinstance(manifest, dict) else None
    listed = {s["name"]: s for s in manifest.get("shards", [])} if isinstance(manifest, dict) else {}
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        general.append("no .tar shards")
    for name in sorted(set(listed) - {p.name for p in shards}):
        general.append(f"{name}: in manifest.json but missing")
    for tmp in sorted(folder.glob("*.tar.tmp")):
        print(f"note: {tmp.name} is an unfinished shard of an interrupted run (rerun the converter)")
    return _verify_all([(p.name, str(p)) for p in shards], listed, kind, general, quiet, options)


def verify_remote(target: str, quiet: bool = False, kind: str | None = None,
                  options: ReadOptions | None = None) -> tuple[bool, list[ShardReport]]:
    """Verify remote shards, streamed (`kosmos.data.remote`): a folder URL (ending in ``/``) against its
    ``manifest.json``, whose list of shards is what is verified over HTTP (which cannot list a folder; other
    protocols list its ``*.tar`` too); or shards named by a URL, brace pattern, glob or ``pipe:COMMAND``,
    without a manifest (``kind`` then says which reader to check the samples against)."""
    general: list[str] = []
    listed: dict = {}
    if not (target.endswith("/") and is_url(target)):
        shards = expand_shards([target])
        return _verify_all([(shard_name(s), s) for s in shards], {}, kind, general, quiet, options)
    with open_shard(target + "manifest.json", options) as f:
        raw = f.read()
    manifest = None
    if f.error is not None and f.error.reason != "shard_not_found":
        raise FileNotFoundError(f"{target}manifest.json: {f.error.detail}")
    if f.error is None:
        try:
            manifest = load_json(raw.decode("utf-8"))
            listed = {s["name"]: s for s in manifest.get("shards", [])}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
            general.append(f"manifest.json does not parse ({e})")
    else:
        general.append("no manifest.json")
    kind = manifest.get("kind") if isinstance(manifest, dict) else kind
    names = set(listed)
    if target.split("://", 1)[0].lower() not in ("http", "https"):  # a protocol that lists: as a local folder
        try:
            names = {shard_name(s) for s in expand_shards([target])}
        except FileNotFoundError:
            names = set()
            general.append("no .tar shards")
        for name in sorted(set(listed) - names):
            general.append(f"{name}: in manifest.json but missing")
    elif not listed:
        raise FileNotFoundError(f"{target}: HTTP cannot list a folder, and it has no readable manifest.json "
                                "listing its shards; name the shards (a brace pattern: "
                                ".../cap-{000000..000099}.tar)")
    return _verify_all([(n, target + n) for n in sorted(names)], listed, kind, general, quiet, options)


def _verify_all(shards: list[tuple[str, str]], listed: dict, kind: str | None, general: list[str],
                quiet: bool, options: ReadOptions | None) -> tuple[bool, list[ShardReport]]:
    """Verify (name, spec) shards, each against its manifest entry in ``listed``; print and sum up."""
    reports = []
    for name, spec in shards:
        rep = verify_shard(spec, kind, options)
        if listed:
            want = listed.get(name)
            if want is None:
                rep.problems.append("not listed in manifest.json")
            elif "samples" in want and want["samples"] != rep.samples:
                rep.problems.append(f"{want.get('listed_in', 'manifest.json')} says "
                                    f"{want['samples']} samples, "
                                    f"found {rep.samples}")
        reports.append(rep)
        if not quiet:
            status = "ok" if not rep.problems else f"{len(rep.problems)} problems"
            print(f"{rep.name}: {rep.samples} samples, {rep.images} images, {status}")
            for p in rep.problems[:20]:
                print(f"  {p}")
            if len(rep.problems) > 20:
                print(f"  ... {len(rep.problems) - 20} more")
    bad = [r for r in reports if r.problems]
    ok = not bad and not general
    if not quiet:
        for g in general:
            print(f"problem: {g}")
        n_samples = sum(r.samples for r in reports)
        print(f"{'OK' if ok else 'FAILED'}: {len(reports)} shards, {n_samples} samples, "
              f"{sum(r.images for r in reports)} images; {len(bad)} shards with problems")
    return ok, reports


def _img2dataset_manifest(folder: Path) -> dict:
    """A manifest for img2dataset's output (captions): each ``NAME.tar`` with the ``successes`` that its
    ``NAME_stats.json`` reports (samples written to the tar; a tar without a readable stats file is listed
    without a count)."""
    shards = []
    for tar in sorted(folder.glob("*.tar")):
        entry: dict = {"name": tar.name, "listed_in": f"{tar.stem}_stats.json"}
        try:
            stats = load_json((folder / entry["listed_in"]).read_text(encoding="utf-8"))
            if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
                entry["samples"] = stats["successes"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        shards.append(entry)
    return {"kind": "captions", "shards": shards}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 when every shard is sound, 1 when not, 2 when the folder cannot be read."""
    p = argparse.ArgumentParser(prog=command_name("kosmos.data_tools.verify"),
                                description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="folder holding the .tar shards and manifest.json (or img2dataset output: "
                   ".tar with _stats.json); or a folder URL ending in / (https://host/shards/: its "
                   "manifest.json lists the shards), or shards by URL, brace pattern, glob or pipe:COMMAND")
    p.add_argument("--kind", choices=KINDS, help="the source kind of shards named without a manifest.json "
                   "(their samples are then also checked against that reader)")
    a = p.parse_args(argv)
    try:
        ok, _ = verify(a.folder, kind=a.kind)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
