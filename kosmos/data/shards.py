"""Shard lists and shard reading.

Tar members are read and grouped into samples by `kosmos.data.format.iter_tar` (`KEY.ext` members with
the same KEY form one sample; `KEY.img0.jpg` gives the field `img0.jpg`). Which worker reads which shard,
in which order, and where it stands, is decided here and in `stream.py`, because that position must be
saved and restored exactly (webdataset's own shuffling and resampling cannot resume).

A sample's position is `(shard, offset)`: the index of its shard in the sorted shard list and its index
among the samples of that shard.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from kosmos.data.format import iter_tar


def expand_shards(patterns: list[str], allow_missing: bool = False,
                  missing: list[str] | None = None) -> list[str]:
    """Paths of the shards named by files, directories (their `*.tar`), globs and brace patterns;
    sorted, without duplicates. A pattern that matches nothing is an error naming it. So is a brace pattern
    naming shards of which some do not exist (`cap-{000000..000009}.tar` with 4 of the 10 there), naming
    them, unless `allow_missing`: then they are appended to `missing` (for a warning) and the rest is used."""
    from braceexpand import braceexpand

    out: list[str] = []
    for pattern in patterns:
        found: list[str] = []
        items = list(braceexpand(str(pattern)))
        gone = []
        for item in items:
            p = Path(item)
            if p.is_dir():
                got = sorted(str(x) for x in p.glob("*.tar"))
            elif any(ch in item for ch in "*?["):
                got = sorted(glob.glob(item))
            else:
                got = [str(p)] if p.is_file() else []
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
    return sorted(dict.fromkeys(os.path.normpath(p) for p in out))


def read_shard(path: str, skipped: Counter, max_offset: int | None = None) -> Iterator[tuple[int, dict]]:
    """(offset, raw sample) for each sample of the shard, in order: ``{"__key__", "__url__", field: bytes}``
    with members grouped by `kosmos.data.format.iter_tar`. A broken or truncated tar ends the shard early and
    is counted in `skipped`; the sample cut by the break comes out incomplete and is rejected (and counted)
    when decoded. A shard gone since the run started (`missing_shard`) or that cannot be opened
    (`unreadable_shard`) gives no sample and is counted. Stops after `max_offset` when given."""
    try:
        f = open(path, "rb")
    except OSError as e:
        skipped["missing_shard" if isinstance(e, FileNotFoundError) else "unreadable_shard"] += 1
        return
    with f:
        for offset, sample in enumerate(iter_tar(f, skipped)):
            yield offset, {"__key__": sample.key, "__url__": path, **sample.files}
            if max_offset is not None and offset >= max_offset:
                return


def read_positions(shards: list[str], positions: list[tuple[int, int]], skipped: Counter) -> dict:
    """The raw samples at `positions` ((shard, offset) pairs), read back from their shards; used to rebuild
    a shuffle buffer or a packer's unfinished document on resume. Reads each shard only as far as needed."""
    wanted: dict[int, set[int]] = {}
    for shard, offset in positions:
        wanted.setdefault(shard, set()).add(offset)
    found: dict[tuple[int, int], dict] = {}
    scratch: Counter = Counter()  # errors were already counted when these samples were first read
    for shard, offsets in wanted.items():
        for offset, sample in read_shard(shards[shard], scratch, max_offset=max(offsets)):
            if offset in offsets:
                found[(shard, offset)] = sample
    return found
