"""The conversion run and its manifest.

A converter describes its run as a ``Conversion`` (the inputs in a deterministic order, a handler that turns
one input into a sample) and ``run_conversion`` does the rest: locks the output folder, makes keys unique,
cuts the items into chunks, has worker processes write each chunk's shards (``kosmos.data_tools.writer``,
which also makes reruns resume), and writes ``manifest.json`` with every count and skip reason.
``ShardOptions`` says where and how big the shards are and how the run goes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from kosmos.data_tools.records import ConversionError, Handler, Item, Skipped
from kosmos.data_tools.writer import (
    MAX_EXAMPLES,
    STATE_DIR,
    chunk_done,
    clean_chunk,
    clean_chunks_from,
    convert_chunk,
    count_skip,
    listing_digest,
    output_error,
    sanitize_key,
    write_json_atomic,
)
from kosmos.procs import die_with_parent
from kosmos.progress import bar as progress_bar

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LOCK = ".convert.lock"
"""File in the output folder that a running conversion holds an exclusive lock on (``flock``)."""


@dataclass
class ShardOptions:
    """Where and how big the shards are."""

    output: Path
    """Folder for the shards and manifest.json (created). An earlier run there is resumed: its finished chunks
    are kept, those whose inputs changed are redone. One conversion at a time: a second one is refused."""
    samples_per_shard: int = 10_000
    """At most this many samples per shard (inputs are assigned to shards by this count)."""
    max_shard_bytes: int = 1_000_000_000
    """A shard is split into parts so that none exceeds this many bytes (a single larger sample stays
    whole); on the command line a size such as 500MB or 1G."""
    workers: int = 1
    """Worker processes; 1 converts in this process."""
    limit: int | None = None
    """Convert only the first N valid inputs."""
    progress: bool = True
    """Show a progress bar on a terminal."""
    overwrite: bool = False
    """Delete this tool's earlier output in the folder first instead of resuming it."""

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")


@dataclass
class Conversion:
    """A converter's description of one run, handed to ``run_conversion``."""

    tool: str
    """Module name, e.g. ``kosmos.data_tools.captions``."""
    kind: str
    """``captions``, ``interleaved`` or ``text`` (what the shards hold)."""
    args: dict
    """The tool's arguments, recorded in the manifest; those that change the output also guard resume."""
    records: Iterable[Item | Skipped]
    """The inputs in a deterministic order."""
    handler: Handler
    """Module-level function ``(item, ctx) -> Sample`` (picklable, runs in workers)."""
    ctx: Any = None
    """Small picklable context for the handler (options)."""


# Arguments that do not change the shards (so a rerun with another value still resumes).
RUN_ONLY_ARGS = {"workers", "progress", "no_progress", "overwrite", "dry_run", "output"}


def _fingerprint(args: dict) -> dict:
    return {k: v for k, v in sorted(args.items()) if k not in RUN_ONLY_ARGS}


def _lock_output(output: Path) -> IO:
    """Create ``output`` and lock it for this run: the open lock file (the lock goes with it, also when the
    process is killed). ``ConversionError`` when another conversion holds the lock or the folder cannot be
    written."""
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        f = open(output / LOCK, "a+", encoding="utf-8")
    except OSError as e:
        raise ConversionError(f"output {output} cannot be written ({e.strerror or e})") from None
    try:
        import fcntl
    except ImportError:  # not POSIX: runs are not locked
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise ConversionError(f"output {output} is being written by another conversion"
                              f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to end or "
                              "choose another folder") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _prepare_output(output: Path, fingerprint: dict, overwrite: bool) -> None:
    state_dir = output / STATE_DIR
    args_path = state_dir / "args.json"
    if overwrite and output.is_dir():
        for p in output.glob("shard-*.tar*"):
            p.unlink()
        (output / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(state_dir, ignore_errors=True)
    if output.is_dir() and any(output.glob("*.tar")) and not args_path.exists():
        raise ConversionError(f"output {output} already holds .tar files that this tool did not write; "
                              "choose an empty folder")
    if args_path.exists():
        old = json.loads(args_path.read_text(encoding="utf-8"))
        if old != json.loads(json.dumps(fingerprint, default=str)):
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise ConversionError(f"output {output} holds a conversion with other arguments "
                                  f"({', '.join(diff)}); "
                                  "use --overwrite to start again or choose another folder")
    state_dir.mkdir(parents=True, exist_ok=True)
    if not args_path.exists():
        write_json_atomic(args_path, json.loads(json.dumps(fingerprint, default=str)))
    for p in [*output.glob("shard-*.tar.tmp"), *state_dir.glob("*.tmp"), output / (MANIFEST + ".tmp")]:
        p.unlink(missing_ok=True)  # left by an interrupted run


def _unique_key(raw: str, seen: dict[str, str]) -> str | None:
    """The sample key of an input key: ``sanitize_key(raw)``, or, when an earlier input's key sanitised to
    the same name (``a b`` and ``a_b``, ``日本`` and ``中国``), that name with a short hash of ``raw``
    appended; None when ``raw`` itself was seen before (a duplicate). ``seen`` maps the keys given so far to
    their input keys ("" where the two are the same)."""
    key = sanitize_key(raw)
    other = seen.get(key)
    if other is None:
        seen[key] = "" if key == raw else raw
        return key
    if (other or key) == raw:
        return None
    key = f"{key}-{hashlib.sha1(raw.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    if key in seen:  # raw seen before, or (most unlikely) a hash collision
        return None
    seen[key] = raw
    return key


def _chunks(records: Iterable[Item | Skipped], size: int, limit: int | None, skipped: Counter,
            examples: dict[str, list[str]], counts: Counter) -> Iterator[list[Item]]:
    """Cut the valid items, with unique keys, into chunks; count the rejected ones."""
    seen: dict[str, str] = {}
    chunk: list[Item] = []
    n_valid = 0
    for rec in records:
        if limit is not None and n_valid >= limit:
            break
        counts["inputs"] += 1
        if isinstance(rec, Item):
            key = _unique_key(str(rec.key), seen)
            if key is None:
                rec = Skipped("duplicate_key", rec.source)
            else:
                rec.key = key
        if isinstance(rec, Skipped):
            count_skip(skipped, examples, rec.reason, rec.source, rec.detail)
            continue
        n_valid += 1
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _merge_examples(into: dict[str, list[str]], more: dict[str, list[str]]) -> None:
    for reason, ex in more.items():
        lst = into.setdefault(reason, [])
        lst.extend(ex[: MAX_EXAMPLES - len(lst)])


def run_conversion(conv: Conversion, shards: ShardOptions, dry_run: bool = False) -> dict:
    """Run a conversion end to end and return the manifest (also written to ``manifest.json``).

    With ``dry_run`` the inputs are only enumerated and counted; nothing is written. Raises
    ``ConversionError`` when another conversion is writing to the output folder, when it cannot be written,
    and, after writing the manifest, when no sample was written.
    """
    if dry_run:
        return _run(conv, shards, dry_run=True)
    lock = _lock_output(shards.output)
    try:
        try:
            _prepare_output(shards.output, _fingerprint(conv.args), shards.overwrite)
        except OSError as e:  # e.g. a .convert_state folder of another user
            why = f"{e.strerror or e}: {e.filename}" if e.filename else f"{e.strerror or e}"
            raise ConversionError(f"output {shards.output} cannot be written ({why})") from None
        manifest = _run(conv, shards)
    finally:
        lock.close()
    if manifest["totals"]["samples"] == 0:
        first = next(iter(manifest["skipped_examples"].values()), [])
        raise ConversionError(
            f"no sample written to {shards.output}: {manifest['totals']['inputs']} inputs, "
            f"skipped: {_fmt_counts(manifest['skipped'])}"
            + (f"; e.g. {first[0]}" if first else "") + f" (all in {shards.output / MANIFEST})")
    return manifest


def _run(conv: Conversion, shards: ShardOptions, dry_run: bool = False) -> dict:
    output = shards.output
    enum_skipped: Counter = Counter()
    enum_examples: dict[str, list[str]] = {}
    counts: Counter = Counter()
    states: dict[int, dict] = {}
    reused = redone = n_chunks = 0
    t0 = time.perf_counter()
    bar = progress_bar(desc=conv.tool.rsplit(".", 1)[-1], unit=" inputs", enabled=shards.progress)
    chunks = _chunks(conv.records, shards.samples_per_shard, shards.limit, enum_skipped, enum_examples,
                     counts)
    try:
        if dry_run:
            n_items = sum(len(c) for c in chunks)
            bar.close()
            summary = {"tool": conv.tool, "dry_run": True, "inputs": counts["inputs"],
                       "valid_inputs": n_items,
                       "shards": -(-n_items // shards.samples_per_shard), "skipped": dict(enum_skipped)}
            print(f"dry run: {counts['inputs']} inputs, {n_items} valid, would write about "
                  f"{summary['shards']} shards; rejected while reading: {_fmt_counts(enum_skipped)}")
            return summary
        args = (conv.handler, conv.ctx)
        pending: dict[int, Any] = {}
        todo: Iterator[tuple[int, list[Item]]] = enumerate(chunks)

        def schedule(pool) -> None:
            """Submit chunks (skipping finished ones) until enough are in flight."""
            nonlocal reused, redone, n_chunks
            while len(pending) < 2 * shards.workers:
                nxt = next(todo, None)
                if nxt is None:
                    return
                i, items = nxt
                n_chunks = i + 1
                listing = listing_digest(items)
                done = chunk_done(output, i, listing)
                if done is not None:
                    states[i] = done
                    reused += 1
                    bar.update(len(items))
                    continue
                redone += clean_chunk(output, i)
                if pool is None:
                    states[i] = convert_chunk(*args, i, items, str(output), shards.max_shard_bytes, listing)
                    bar.update(len(items))
                else:
                    pending[i] = pool.submit(convert_chunk, *args, i, items, str(output),
                                             shards.max_shard_bytes, listing)

        if shards.workers == 1:
            schedule(None)  # converts every chunk in this process
        else:
            import multiprocessing as mp
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            # spawn, not fork: the workers start clean (no inherited threads or locks).
            with ProcessPoolExecutor(shards.workers, mp_context=mp.get_context("spawn"),
                                     initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                try:
                    schedule(pool)
                    while pending:
                        finished, _ = wait(pending.values(), return_when=FIRST_COMPLETED)
                        for i in [i for i, f in pending.items() if f in finished]:
                            states[i] = pending.pop(i).result()
                            bar.update(states[i]["inputs"])
                        schedule(pool)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # chunks already running still finish
                    raise
    finally:
        bar.close()

    removed = clean_chunks_from(output, n_chunks)  # chunks of a longer input converted here before
    manifest = _build_manifest(conv, output, states, enum_skipped, enum_examples, counts)
    try:
        write_json_atomic(output / MANIFEST, manifest)
    except OSError as e:
        e.filename = e.filename or str(output / (MANIFEST + ".tmp"))
        raise output_error(output, e) from None
    print(_summary_line(manifest, output, reused, time.perf_counter() - t0, redone + removed))
    return manifest


def _summary_line(manifest: dict, output: Path, reused: int, seconds: float, changed: int = 0) -> str:
    """The closing line: what was written and every skip reason with its count."""
    t = manifest["totals"]
    line = (f"{manifest['tool']}: {t['samples']} samples ({t['images']} images) in {t['shards']} shards, "
            f"{t['bytes'] / 1e6:.1f} MB -> {output}; {t['inputs']} inputs, skipped {t['skipped']}")
    if t["skipped"]:
        line += f" ({_fmt_counts(manifest['skipped'])})"
    if manifest["skipped_images"]:
        line += f"; images skipped: {_fmt_counts(manifest['skipped_images'])}"
    if reused:
        line += f"; {reused} finished chunks reused"
    if changed:
        line += f"; {changed} finished chunks redone or removed (their inputs changed or shards were gone)"
    return line + f"; {seconds:.1f}s"


def _fmt_counts(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "none"


def _build_manifest(conv: Conversion, output: Path, states: dict[int, dict], enum_skipped: Counter,
                    enum_examples: dict[str, list[str]], counts: Counter) -> dict:
    skipped = Counter(enum_skipped)
    image_skips: Counter = Counter()
    examples = {k: list(v) for k, v in enum_examples.items()}
    image_examples: dict[str, list[str]] = {}
    shard_list: list[dict] = []
    for i in sorted(states):
        st = states[i]
        skipped.update(st["skipped"])
        image_skips.update(st["image_skips"])
        _merge_examples(examples, st["examples"])
        _merge_examples(image_examples, st.get("image_examples", {}))  # a chunk state of before: none
        shard_list.extend(st["shards"])
    totals = {
        "inputs": counts["inputs"],
        "samples": sum(s["samples"] for s in shard_list),
        "images": sum(s["images"] for s in shard_list),
        "shards": len(shard_list),
        "bytes": sum(s["bytes"] for s in shard_list),
        "skipped": sum(skipped.values()),
        "skipped_images": sum(image_skips.values()),
    }
    assert totals["samples"] + totals["skipped"] == totals["inputs"], "an input was lost without a count"
    return {
        "version": MANIFEST_VERSION,
        "tool": conv.tool,
        "kind": conv.kind,
        "shards": shard_list,
        "totals": totals,
        "skipped": dict(sorted(skipped.items())),
        "skipped_images": dict(sorted(image_skips.items())),
        "skipped_examples": {k: examples[k] for k in sorted(examples)},
        "skipped_image_examples": {k: image_examples[k] for k in sorted(image_examples)},
        "args": json.loads(json.dumps(conv.args, default=str)),
    }


def options_dict(*objs: Any) -> dict:
    """Dataclass options merged into one JSON-friendly dict (for the manifest args)."""
    out: dict = {}
    for o in objs:
        out.update({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()})
    return out
