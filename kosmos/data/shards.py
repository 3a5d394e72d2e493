"""Shard lists and shard reading.

Tar members are read and grouped into samples by `kosmos.data.format.iter_tar` (`KEY.ext` members with
the same KEY form one sample; `KEY.img0.jpg` gives the field `img0.jpg`). Which worker reads which shard,
in which order, and where it stands, is decided here and in `streams.py`, because that position must be
saved and restored exactly (webdataset's own shuffling and resampling cannot resume).

A sample's position is `(shard, offset)`: the index of its shard in the sorted shard list and its index
among the samples of that shard.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator

from kosmos.data.format import iter_tar
from kosmos.data.remote import ReadOptions, is_remote, list_many, open_shard
from kosmos.errors import KosmosError


class DataError(KosmosError, RuntimeError):
    """A source that cannot go on: no sample at all, no readable shard left, samples to resume from that
    cannot be read back. Raised in the main process (a worker reports it), with a one-line message naming the
    source or the shard."""


def expand_shards(patterns: list[str], allow_missing: bool = False,
                  missing: list[str] | None = None) -> list[str]:
    """The shards named by files, directories (their `*.tar`), globs and brace patterns, local or remote
    (URLs and `pipe:COMMAND`, see `kosmos.data.remote`); sorted, without duplicates. A pattern that matches
    nothing is an error naming it. So is a brace pattern naming shards of which some do not exist
    (`cap-{000000..000009}.tar` with 4 of the 10 there), naming them, unless `allow_missing`: then they are
    appended to `missing` (for a warning) and the rest is used. HTTP URLs and pipes are not checked here (a
    request per shard); one that fails is skipped and counted when read. A directory or glob over HTTP, an
    unknown protocol or one whose package is missing (`s3://` without s3fs) raises ValueError."""
    from braceexpand import braceexpand

    out: list[str] = []
    for pattern in patterns:
        found: list[str] = []
        items = list(braceexpand(str(pattern)))
        gone = []
        for item, got in zip(items, list_many(items), strict=True):
            found += got
            if not got:
                gone.append(item)
        if not found:
            raise FileNotFoundError(f"no shards found for {pattern!r}")
        if gone and not allow_missing:
            names = ", ".join(gone[:3]) + (f" and {len(gone) - 3} more" if len(gone) > 3 else "")
            raise FileNotFoundError(f"{len(gone)} of the {len(items)} shards named by {pattern!r} do not "
                                    f"exist: {names} (data.allow_missing_shards=true trains on the others)")
        if missing is not None:
            missing += gone
        out += found
    return sorted(dict.fromkeys(p if is_remote(p) else os.path.normpath(p) for p in out))


def read_shard(path: str, skipped: Counter, max_offset: int | None = None, *,
               want: Callable[[int], bool] | None = None, options: ReadOptions | None = None,
               failed: dict[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """(offset, raw sample) for each sample of the shard, in order: ``{"__key__", "__url__", field: bytes}``
    with members grouped by `kosmos.data.format.iter_tar`. A broken or truncated tar ends the shard early and
    is counted in `skipped`. A sample that is not whole (the last one of such a tar, whose members after the
    break may be missing, or one with a member the reader cannot read, `unsupported_member`) is not given
    and counts `incomplete_sample`: a text sample cut before its metadata would otherwise train as if whole.
    A shard gone since the run started (`missing_shard`) or that cannot be opened
    (`unreadable_shard`) gives no sample and is counted. Stops after `max_offset` when given.

    `path` may be a URL or `pipe:COMMAND`, read as a stream with `options`' timeout and retries; a remote
    shard that fails for good counts its reason (`shard_not_found`, `shard_timeout`, ...; see
    `kosmos.data.remote`), and `failed` (when given) gets its spec -> reason and detail, for the log. Samples
    whose offset `want` rejects are not given and their members are not even read (resuming at offset k
    streams past the first k without holding their images)."""
    try:
        f = open_shard(path, options)
    except OSError as e:
        reason = "missing_shard" if isinstance(e, FileNotFoundError) else "unreadable_shard"
        skipped[reason] += 1
        if failed is not None:
            failed.pop(path, None)
            failed[path] = f"{reason}: {e}"
        return
    errors: list[str] = []
    counts: Counter = Counter()
    try:
        with f:
            for offset, sample in enumerate(iter_tar(f, counts, want=want, errors=errors)):
                if not sample.whole:
                    if want is None or want(offset):
                        counts["incomplete_sample"] += 1
                elif want is None or want(offset):
                    yield offset, {"__key__": sample.key, "__url__": path, **sample.files}
                if max_offset is not None and offset >= max_offset:
                    return
    finally:
        skipped.update(counts)
        err = getattr(f, "error", None)  # a remote shard's failure (kosmos.data.remote.ShardError)
        if failed is not None:
            failed.pop(path, None)  # a shard that fails again is the newest failure
        if failed is not None and err is not None:
            failed[path] = f"{err.reason}: {err.detail}"
        elif failed is not None and (bad := [r for r in counts if r in ("broken_shard", "truncated_shard")]):
            failed[path] = f"{bad[0]}: {errors[0] if errors else 'no end-of-archive blocks'}"


def read_positions(shards: list[str], positions: list[tuple[int, int]], skipped: Counter,
                   options: ReadOptions | None = None) -> dict:
    """The raw samples at `positions` ((shard, offset) pairs), read back from their shards; used to rebuild
    a shuffle buffer or a packer's unfinished document on resume. Reads each shard only as far as needed,
    and of it only the wanted samples' members. A shard that fails to read (after its retries) before all its
    wanted samples came is a `DataError` naming it and why (`shard_http_error: HTTP 500
    ...`, `missing_shard: ...`): the storage, not the shards, is then what changed since the checkpoint."""
    wanted: dict[int, set[int]] = {}
    for shard, offset in positions:
        wanted.setdefault(shard, set()).add(offset)
    found: dict[tuple[int, int], dict] = {}
    scratch: Counter = Counter()  # errors were already counted when these samples were first read
    failed: dict[str, str] = {}
    for shard, offsets in wanted.items():
        for offset, sample in read_shard(shards[shard], scratch, max_offset=max(offsets),
                                         want=offsets.__contains__, options=options, failed=failed):
            found[(shard, offset)] = sample
        lost = sorted((shard, o) for o in offsets if (shard, o) not in found)
        if lost and shards[shard] in failed:

            raise DataError(f"cannot resume: {len(lost)} sample(s) to read back from {shards[shard]} (e.g. "
                            f"{lost[:3]}) could not be read: {failed[shards[shard]]}; is the storage "
                            "reachable? The same checkpoint resumes once it is")
    return found
