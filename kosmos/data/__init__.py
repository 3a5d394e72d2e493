"""The streaming data pipeline: webdataset shards of three sources -> packed, mixed micro-batches.

    shards.py   shard lists (paths, dirs, globs, brace patterns) and tar reading
    samples.py  raw sample -> token ids, image slots and images (per source kind); bad samples counted
    packing.py  samples -> fixed-length rows; rows -> micro-batches
    stream.py   per source: split by rank and worker, shuffle, pack; exact resume
    mixture.py  token budget per source per step -> micro-batches per source
"""

from kosmos.data.mixture import Mixture, build_loader, build_mixture, plan
from kosmos.data.stream import SourceDataset, SourceLoader

__all__ = ["Mixture", "SourceDataset", "SourceLoader", "build_loader", "build_mixture", "plan"]
