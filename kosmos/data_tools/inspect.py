"""Show the first samples of a shard folder (or one shard).

    python -m kosmos.data_tools.inspect shards/coco -n 3
    python -m kosmos.data_tools.inspect 'https://host/shards/cap-{000000..000009}.tar' -n 3

Remote shards (URLs, `pipe:COMMAND`; see `kosmos.data.remote`) are streamed, and only as far as shown.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from kosmos.data.format import is_image_field, iter_tar
from kosmos.data.remote import is_remote, open_shard, shard_name
from kosmos.data.shards import expand_shards
from kosmos.errors import command_name
from kosmos.untrusted import ImageError, load_json, open_image


def _image_desc(data: bytes) -> str:
    try:
        with open_image(data) as img:  # the header only
            return f"{img.format} {img.width}x{img.height} {img.mode}, {len(data)} bytes"
    except ImageError as e:
        return f"undecodable ({e.reason})"


def _short(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(key: str, files: dict[str, bytes], width: int = 100) -> str:
    """A few readable lines about one sample."""
    lines = [f"== {key}"]
    doc = None
    for ext, data in sorted(files.items()):
        last = ext.rsplit(".", 1)[-1]
        if is_image_field(ext):
            lines.append(f"  .{ext}: {_image_desc(data)}")
        elif last == "txt":
            lines.append(f"  .{ext}: {_short(data.decode('utf-8', 'replace'), width)}")
        elif last == "json":
            try:
                obj = load_json(data)
            except (UnicodeDecodeError, json.JSONDecodeError):
                lines.append(f"  .{ext}: bad JSON, {len(data)} bytes")
                continue
            if isinstance(obj, dict) and "segments" in obj:
                doc = obj
                meta = json.dumps(obj.get("meta", {}), ensure_ascii=False)
                lines.append(f"  .{ext}: meta {_short(meta, width)}")
            else:
                lines.append(f"  .{ext}: {_short(json.dumps(obj, ensure_ascii=False), width)}")
        else:
            lines.append(f"  .{ext}: {len(data)} bytes")
    if doc is not None:
        for seg in doc.get("segments", []):
            if "image" in seg:
                lines.append(f"    [image {seg['image']}]")
            else:
                lines.append(f"    {_short(str(seg.get('text', '')), width)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog=command_name("kosmos.data_tools.inspect"),
                                description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a shard folder or one .tar; or shards by URL (https://, s3://, ...), brace "
                   "pattern, glob or pipe:COMMAND, streamed")
    p.add_argument("-n", type=int, default=3, help="samples to show (default 3)")
    p.add_argument("--width", type=int, default=100, help="characters of text shown per line (default 100)")
    a = p.parse_args(argv)
    path = Path(a.path)
    if path.is_file() or path.is_dir() or not (is_remote(a.path) or any(c in a.path for c in "{*?[")):
        shards: list = [path] if path.is_file() else sorted(path.glob("*.tar"))
    else:
        try:
            shards = expand_shards([a.path])
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not shards:
        print(f"error: no .tar shards at {a.path}", file=sys.stderr)
        return 2
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest is not None and manifest.is_file():
        try:
            m = load_json(manifest.read_text(encoding="utf-8"))
            print(f"{m.get('tool')} ({m.get('kind')}): {json.dumps(m.get('totals'))}")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            print(f"warning: {manifest} does not parse ({e})", file=sys.stderr)
    shown = 0
    for shard in shards:
        broken: Counter = Counter()
        errors: list[str] = []
        read = 0
        try:
            f = open_shard(str(shard))
        except OSError as e:
            print(f"error: {shard}: {e}", file=sys.stderr)
            return 2
        with f:
            for sample in iter_tar(f, broken, errors=errors):
                if shown >= a.n:
                    return 0
                print(f"{shard_name(str(shard))}: " + describe(sample.key, sample.files, a.width))
                shown += 1
                read += 1
        if failed := [r for r in broken if r.startswith("shard_")]:
            print(f"error: {shard}: cannot be read ({failed[0]}) after {read} samples: {'; '.join(errors)}",
                  file=sys.stderr)
            return 2
        if broken["broken_shard"] or (broken["truncated_shard"] and not read):
            print(f"error: {_broken_desc(shard, read, errors)}", file=sys.stderr)
            return 2
    return 0


def _broken_desc(shard: str | Path, read: int, errors: list[str]) -> str:
    """One line on a tar that could not be read (to its end)."""
    if not is_remote(str(shard)) and Path(shard).stat().st_size == 0:
        return f"{shard}: an empty file (0 bytes), not a tar"
    why = "; ".join(errors) or "it ends without the end-of-archive blocks"
    if not read:
        return f"{shard}: not a readable tar ({why})"
    return (f"{shard}: the tar breaks after {read} samples ({why}); "
            "check it with python -m kosmos.data_tools.verify")


if __name__ == "__main__":
    sys.exit(main())
