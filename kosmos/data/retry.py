"""When a source's worker gives up: the rules that stop a source, per worker, over all the streams it reads
(`kosmos.data.streams`). Pure Python.

A shard that vanishes or breaks is skipped and counted (`kosmos.data.shards`); so is a remote one (a URL or
pipe:, see `kosmos.data.remote`) that keeps failing after its retries. Two rules stop the run with a
`DataError`, each naming the source:

* Remote reads that keep failing one after the other (storage down: each costs its timeouts and retries) stop
  it once they have taken `data.read_give_up` seconds, over all the worker's streams, without a sample in
  between (`FailingReads`).
* A worker none of whose streams finds a sample in a whole pass although it found some before (its shards
  deleted or unmounted mid-run) waits and tries again (`RETRY_WAITS`), each stream re-reading the same pass,
  then stops it; so does a worker that never found any sample (`EmptyPasses`).
"""

from __future__ import annotations

import time

from kosmos.data.shards import DataError

RETRY_WAITS = (1.0, 2.0, 4.0)
"""Seconds a worker waits before each new pass when a whole pass of all its streams found no sample (shards
gone mid-run, or a file system that comes back); after the last, a DataError stops the run."""


class FailingReads:
    """What a worker's streams share about their reads: the seconds spent in shard reads that failed since
    the worker's last sample (checked against `data.read_give_up`), and the newest failure."""

    def __init__(self):
        self.failing = 0.0
        self.last_failure = ""

    def sample(self) -> None:
        """A sample was read: the failures before it no longer count."""
        self.failing = 0.0

    def failed(self, seconds: float, spec: str, why: str, *, give_up: float, name: str, worker: str,
               skipped: dict) -> None:
        """A shard read that gave no sample and failed (`spec`: reason and detail `why`) took `seconds`: a
        DataError once the failures since the last sample took more than `give_up` seconds."""
        self.failing += seconds
        self.last_failure = f"; last: {spec}: {why}"
        if self.failing > give_up:
            raise DataError(
                f"{name}: no sample for {self.failing:.0f}s: {worker}'s shard reads keep failing (skipped: "
                f"{skipped}{self.last_failure}); is the storage reachable? Fix it and resume with --resume "
                f"latest (data.read_give_up={give_up:g})")


class EmptyPasses:
    """A worker's retries after whole passes of all its streams that found no sample: a wait of `waits[i]`
    seconds before the i-th new pass, then a DataError; at once a DataError when the worker never found a
    sample at all. A sample in between starts the count over (`sample`)."""

    def __init__(self, waits: tuple[float, ...] | None = None, worker: str = "the worker", name: str = ""):
        self.waits = RETRY_WAITS if waits is None else waits
        self.worker, self.name = worker, name
        self.retries = 0

    def sample(self) -> None:
        self.retries = 0

    def retry(self, *, samples: int, n_streams: int, shards: list[str], skipped: dict, last: str) -> None:
        """After a whole pass of every one of the worker's `n_streams` streams (over `shards`) found nothing,
        `samples` found by them before: wait before the next pass, or raise DataError (`skipped` and `last`,
        the counts and the newest failure, for the message)."""
        if samples == 0:
            raise DataError(
                f"{self.name}: {self.worker} found no samples in a whole pass of its {n_streams} "
                f"stream(s) over {len(shards)} shard(s) (skipped: {skipped}{last}); use fewer workers or "
                "check the shards with `python -m kosmos.data_tools.verify` "
                "(streams: kosmos/data/streams.py)")
        if self.retries == len(self.waits):  # it found samples before: its shards went away
            raise DataError(
                f"{self.name}: no readable shard left: {self.retries + 1} passes over the {len(shards)} "
                f"shard(s) of {self.worker}'s {n_streams} stream(s) ({shards[0]}, ...) found no "
                f"sample within {sum(self.waits):.0f}s (skipped: {skipped}{last}); were they deleted or "
                "moved? Put them back and resume with --resume latest")
        time.sleep(self.waits[self.retries])
        self.retries += 1
