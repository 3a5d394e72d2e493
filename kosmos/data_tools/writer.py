"""Shard writing with chunk resume.

Resume unit: the chunk. Valid inputs, in their sorted order, are cut into consecutive chunks of
``samples_per_shard`` inputs; chunk ``i`` becomes ``shard-{i:06d}-000.tar`` (and ``-001`` ... when the bytes
limit splits it), written by ``convert_chunk`` (in a worker process) with deterministic tar members (mtime 0,
uid/gid 0, no user names, named by ``kosmos.data.format.member_name``) under a temporary name, renamed when
complete. When all of a chunk's shards have their final names a small state file
``.convert_state/chunk-{i:06d}.json`` records what it holds, with a digest of its inputs' keys and names
(``listing_digest``, which also covers their content: captions and texts as read, the size and modification
time of image files). A rerun skips every chunk whose state file exists, whose inputs are the same and whose
shards are all present (``chunk_done``), redoes the others and removes chunks past the last one
(``clean_chunks_from``), so an interrupted run, run again, ends with exactly the shards of an uninterrupted
one, also when files were added to, removed from or changed in the input in between.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from kosmos.data.format import member_name
from kosmos.data_tools.records import ConversionError, Handler, Item, Skip

STATE_DIR = ".convert_state"
MAX_EXAMPLES = 10  # input names kept per skip reason in the manifest
MAX_EXAMPLE_CHARS = 300
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")
_CHUNK_NAME = re.compile(r"(?:shard|chunk)-(\d+)[-.]")  # shard-000003-000.tar, chunk-000003.json
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # "<_io.BytesIO object at 0x7f...>" differs from run to run


def sanitize_key(raw: str) -> str:
    """A webdataset-safe key: no dots or slashes (they would split the key), ASCII only."""
    key = _KEY_BAD.sub("_", str(raw)).strip("_")
    return key or "_"


def example(source: str, detail: str = "") -> str:
    """A skip example for the manifest: the input's name, then what was tried (a path) or what went wrong."""
    if not detail:
        return source
    detail = _ADDRESS.sub("", str(detail))
    if len(detail) > MAX_EXAMPLE_CHARS:
        detail = detail[:MAX_EXAMPLE_CHARS] + "..."
    return f"{source}: {detail}"


def count_skip(counter: Counter, examples: dict[str, list[str]], reason: str, source: str,
               detail: str = "") -> None:
    """Count a skip under `reason` and keep its `example` among the first MAX_EXAMPLES of that reason."""
    counter[reason] += 1
    ex = examples.setdefault(reason, [])
    if len(ex) < MAX_EXAMPLES:
        ex.append(example(source, detail))


def listing_digest(items: list[Item]) -> str:
    """A digest of a chunk's inputs, in order: their keys, names and what the converter read of them (a
    caption, a document's text), plus the size and modification time of each image file they refer to. A
    rerun redoes a chunk whose inputs changed, also where a file kept its name but changed its content."""
    h = hashlib.sha1()
    stats: dict[str, str] = {}  # one stat per file (a tar of images is referred to many times)
    for item in items:
        h.update(f"{item.key}\0{item.source}\0".encode("utf-8", "surrogateescape"))
        _feed(h, item.payload, stats)
        h.update(b"\n")
    return h.hexdigest()


def _feed(h, obj: Any, stats: dict[str, str]) -> None:
    """Add a payload to the digest ``h``: plain values as they are, bytes by their own digest, an image
    file (``ImageRef``) by its path, byte range, size and modification time. Objects of other types add
    only their type's name (their repr may hold an address that differs between runs)."""
    from kosmos.data_tools.images import ImageRef

    if obj is None or isinstance(obj, bool | int | float | str):
        h.update(f"{type(obj).__name__}:{obj!r}\0".encode("utf-8", "surrogateescape"))
    elif isinstance(obj, bytes | bytearray | memoryview):
        h.update(b"bytes:" + hashlib.sha1(obj).digest())
    elif isinstance(obj, ImageRef):
        if obj.path not in stats:
            try:
                st = os.stat(obj.path)
                stats[obj.path] = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError as e:  # missing: the handler counts it; a rerun after it appears redoes the chunk
                stats[obj.path] = f"error:{e.errno}"
            except ValueError:  # a path the OS refuses (a NUL character): the handler counts it too
                stats[obj.path] = "error:bad_path"
        h.update(f"image:{obj.path}:{obj.offset}:{obj.size}:{stats[obj.path]}\0".encode(
            "utf-8", "surrogateescape"))
    elif isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            _feed(h, k, stats)
            _feed(h, v, stats)
        h.update(b"}")
    elif isinstance(obj, list | tuple):
        h.update(b"[")
        for v in obj:
            _feed(h, v, stats)
        h.update(b"]")
    else:
        h.update(f"<{type(obj).__qualname__}>".encode())


def _tar_size(files: dict[str, bytes]) -> int:
    return sum(512 + (len(b) + 511) // 512 * 512 for b in files.values())


def _tar_file_size(members: int) -> int:
    """Size of a tar holding ``members`` bytes of headers+data: end blocks, padded to tarfile.RECORDSIZE."""
    return -(-(members + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def shard_name(chunk: int, part: int) -> str:
    """File name of part ``part`` of chunk ``chunk``'s shard."""
    return f"shard-{chunk:06d}-{part:03d}.tar"


def _chunk_state_path(output: Path, chunk: int) -> Path:
    return output / STATE_DIR / f"chunk-{chunk:06d}.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to a temporary file and rename it to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def convert_chunk(handler: Handler, ctx: Any, chunk: int, items: list[Item], output: str,
                  max_shard_bytes: int, listing: str) -> dict:
    """Turn one chunk of items into its shard(s); runs in a worker process. `listing`: the items'
    `listing_digest`, which the scheduler has already computed to see whether the chunk was done.

    Shards are written as ``NAME.tmp`` and renamed when complete; the chunk's state file is
    written last, so its presence means every shard of the chunk is final.
    """
    out = Path(output)
    written: list[Path] = []  # this chunk's shard files, removed when writing fails
    try:
        return _convert_chunk(handler, ctx, chunk, items, out, max_shard_bytes, listing, written)
    except OSError as e:  # the output, not an input (a handler's errors are counted): disk full, ...
        for p in written:
            p.unlink(missing_ok=True)  # frees the space a rerun needs
        raise output_error(out, e) from None


def output_error(output: Path, e: OSError) -> ConversionError:
    """A write to the output that failed (disk full, quota, I/O error) as one line naming the output and the
    file; a rerun once the cause is fixed resumes, keeping the finished chunks."""
    where = f": {e.filename}" if e.filename else ""
    return ConversionError(f"output {output} cannot be written ({e.strerror or e}{where}); fix that and run "
                           "the same command again: finished chunks are kept")


def _convert_chunk(handler: Handler, ctx: Any, chunk: int, items: list[Item], out: Path, max_shard_bytes: int,
                   listing: str, written: list[Path]) -> dict:
    skipped: Counter = Counter()
    image_skips: Counter = Counter()
    examples: dict[str, list[str]] = {}
    image_examples: dict[str, list[str]] = {}
    shards: list[dict] = []

    def count_images(counts: Counter, named: dict[str, list[str]], source: str) -> None:
        image_skips.update(counts)
        for reason, details in named.items():
            ex = image_examples.setdefault(reason, [])
            ex.extend(example(source, d) for d in details[: MAX_EXAMPLES - len(ex)])

    tar = None
    cur: dict = {}

    def close() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            tar = None
            cur["bytes"] = (out / (cur["name"] + ".tmp")).stat().st_size
            shards.append(dict(cur))

    try:
        for item in items:
            try:
                sample = handler(item, ctx)
            except Exception as e:  # noqa: BLE001 - one bad input never stops the run; it is counted
                reason = e.reason if isinstance(e, Skip) else f"unexpected_error_{type(e).__name__}"
                if isinstance(e, Skip):
                    count_images(e.image_skips, e.image_examples, item.source)
                detail = e.detail if isinstance(e, Skip) else str(e)
                count_skip(skipped, examples, reason, item.source, detail)
                continue
            count_images(sample.image_skips, sample.image_examples, item.source)
            files = {member_name(item.key, f): data for f, data in sorted(sample.files.items())}
            size = _tar_size(files)
            if tar is not None and cur["samples"] and _tar_file_size(cur["est"] + size) > max_shard_bytes:
                close()
            if tar is None:
                name = shard_name(chunk, len(shards))
                written.append(out / (name + ".tmp"))
                tar = tarfile.open(written[-1], "w", format=tarfile.GNU_FORMAT)
                cur = {"name": name, "samples": 0, "images": 0, "est": 0}
            for name, data in files.items():
                _add_member(tar, name, data)
            cur["samples"] += 1
            cur["images"] += sample.images
            cur["est"] += size
        close()
    except OSError as e:
        if tar is not None:  # the shard being written: the file a write (a tar's end blocks too) failed on
            e.filename = e.filename or str(written[-1])
            try:
                tar.close()
            except OSError:
                pass
        raise
    for s in shards:
        del s["est"]
        os.replace(out / (s["name"] + ".tmp"), out / s["name"])
        written.append(out / s["name"])
    state = {"chunk": chunk, "inputs": len(items), "listing": listing, "shards": shards,
             "skipped": dict(skipped), "examples": examples, "image_skips": dict(image_skips),
             "image_examples": image_examples}
    write_json_atomic(_chunk_state_path(out, chunk), state)
    return state


def chunk_done(output: Path, chunk: int, listing: str) -> dict | None:
    """The state of a finished chunk (its state file, made from the inputs whose ``listing_digest`` is
    ``listing``, and every shard it lists, at the right size), or None."""
    path = _chunk_state_path(output, chunk)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if state.get("listing") != listing:  # the input changed since (or a state file of an older version)
        return None
    for s in state.get("shards", []):
        p = output / s["name"]
        if not p.is_file() or p.stat().st_size != s["bytes"]:
            return None
    return state


def clean_chunk(output: Path, chunk: int) -> bool:
    """Remove what an unfinished run left of a chunk (its shards, finished or not, and its state file);
    True when the chunk had been finished (its state file existed)."""
    for p in output.glob(f"shard-{chunk:06d}-*.tar*"):
        p.unlink()
    state = _chunk_state_path(output, chunk)
    finished = state.exists()
    state.unlink(missing_ok=True)
    return finished


def clean_chunks_from(output: Path, first: int) -> int:
    """Remove the shards and state files of chunks ``first`` and after (left by a run over an input that had
    more files); returns how many chunks were removed."""
    chunks = set()
    for p in [*output.glob("shard-*.tar*"), *(output / STATE_DIR).glob("chunk-*.json")]:
        m = _CHUNK_NAME.match(p.name)
        if m and int(m.group(1)) >= first:
            chunks.add(int(m.group(1)))
    for chunk in chunks:
        clean_chunk(output, chunk)
    return len(chunks)
