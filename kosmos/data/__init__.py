"""The streaming data pipeline: webdataset shards of named sources (each of a kind: text, captions or
interleaved; `kosmos.config.DataConfig.named_sources`) -> packed, mixed micro-batches.

    format.py   the shard format (torch-free): source kinds, member names, tar members -> samples,
                a sample's files -> text and image segments; shared with kosmos.data_tools
    shards.py   shard lists (paths, dirs, globs, brace patterns) and tar reading
    remote.py   shards from URLs (HTTP, fsspec protocols) and pipe:COMMAND: streamed, timeouts, retries
    samples.py  raw sample -> token ids, image slots and images (per source kind); bad samples counted
    packing.py  samples -> fixed-length rows; rows -> micro-batches
    streams.py  logical streams (pure Python): which samples each reads, in which order; their positions
    retry.py    the rules that stop a source (reads that keep failing, passes that find nothing)
    workers.py  the DataLoader worker processes: forkserver, launch, signals, start and close
    stream.py   per source: logical streams over ranks and workers, shuffle, pack; exact and elastic resume
    mixture.py  token budget per source per step -> micro-batches per source

Importing this package imports no torch: the names below are loaded from `mixture.py` and `stream.py`
when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kosmos.data.mixture import Mixture, build_loader, build_mixture, plan
    from kosmos.data.stream import SourceDataset, SourceLoader
    from kosmos.data.workers import start_worker_server

_LAZY = {"Mixture": "mixture", "build_loader": "mixture", "build_mixture": "mixture", "plan": "mixture",
         "SourceDataset": "stream", "SourceLoader": "stream", "start_worker_server": "workers"}

__all__ = ["Mixture", "SourceDataset", "SourceLoader", "build_loader", "build_mixture", "plan",
           "start_worker_server"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"kosmos.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
