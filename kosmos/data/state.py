"""The schema of a saved data position (a checkpoint's `data_rank{R}.json`), checked before anything of it is
used: a hand-edited or damaged file is one error naming the file and the field, never a traceback deep in a
worker nor a run that quietly goes on from a wrong place.

A rank's file holds, per source name, the SourceLoader's state (kosmos.data.stream: `kind`, the layout it
was saved with, `turns`, `next_worker` and per logical stream its cursor, shuffle-buffer positions, RNG,
unfinished document, counters and part), and under `_mixture` the mixture's step counter and plan.
"""

from __future__ import annotations

from typing import Any

from kosmos.errors import KosmosError

MIXTURE_KEY = "_mixture"
"""The data state's entry for the mixture itself (kosmos.data.mixture.Mixture.STATE_KEY)."""


def shard_digest(shards: list[str]) -> str:
    """A short digest of a source's shard list (the sorted names it reads), saved with its data position so
    that a resume over a changed folder is noticed."""
    import hashlib

    return hashlib.sha1("\n".join(map(str, shards)).encode()).hexdigest()[:16]


class DataStateError(KosmosError, ValueError):
    """A saved data position that does not have the shape it must have: the message names the file and the
    field."""


def _int(v: Any, lo: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)


def _ints(v: Any, n: tuple[int, ...], lo: int = 0) -> bool:
    return isinstance(v, list) and len(v) in n and all(_int(x, lo) for x in v)


def _counts(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _int(x, 0) for k, x in v.items())


def check_stream(st: Any, where: str, n_shards: int | None = None) -> None:
    """One logical stream's saved state (LogicalStream.state)."""
    def bad(field: str, what: str) -> DataStateError:
        return DataStateError(f"{where}.{field}: {what}")

    if not isinstance(st, dict):
        raise DataStateError(f"{where}: expected an object, got {type(st).__name__}")
    for field in ("epoch", "k", "offset", "rng", "buffer", "carry", "skipped", "samples"):
        if field not in st:
            raise bad(field, "missing")
    for field, lo in (("epoch", 0), ("k", 0), ("offset", -1), ("samples", 0)):
        if not _int(st[field], lo):
            raise bad(field, f"expected an integer >= {lo}, got {st[field]!r}")
    for field in ("sub", "truncated"):
        if field in st and not _int(st[field], 0):
            raise bad(field, f"expected an integer >= 0, got {st[field]!r}")
    if n_shards is not None and st["k"] > n_shards:
        raise bad("k", f"{st['k']} is past the source's {n_shards} shard(s)")
    for i, pos in enumerate(st["buffer"] if isinstance(st["buffer"], list) else [None]):
        if not _ints(pos, (2, 3)) or (n_shards is not None and pos[0] >= n_shards):
            raise bad(f"buffer[{i}]", "expected a sample position [shard, offset(, caption)] of the source's "
                      f"{n_shards if n_shards is not None else ''} shards, got {pos!r}".replace("  ", " "))
    carry = st["carry"]
    if carry is not None and (not _ints(carry, (3, 4)) or (n_shards is not None and carry[0] >= n_shards)):
        raise bad("carry", f"expected null or [shard, offset(, caption), tokens done], got {carry!r}")
    rng = st["rng"]
    if not (isinstance(rng, list) and len(rng) == 3 and _int(rng[0]) and _ints(rng[1], (625,))
            and (rng[2] is None or isinstance(rng[2], (int, float)))):
        raise bad("rng", "expected a Python random.Random state [version, [625 integers], gauss]")
    if not _counts(st["skipped"]):
        raise bad("skipped", "expected an object of reason: count")
    if "failed" in st and not (isinstance(st["failed"], dict)
                               and all(isinstance(v, str) for v in st["failed"].values())):
        raise bad("failed", "expected an object of shard: reason")
    if "wait" in st and not (isinstance(st["wait"], dict) and all(_int(v, 0) for v in st["wait"].values())):
        raise bad("wait", "expected an object of stream: epoch")
    if "order" in st and not (isinstance(st["order"], dict) and _int(st["order"].get("epoch"), 0)
                              and isinstance(st["order"].get("shards"), list)
                              and all(_int(i, 0) for i in st["order"]["shards"])):
        raise bad("order", "expected {epoch, shards: [shard indices]}")
    if "part" in st:
        p = st["part"]
        if not (_ints(p, (4,)) and p[0] < p[1] and p[2] < p[3]):
            raise bad("part", f"expected [a, A, b, B] with a < A and b < B, got {p!r}")


def check_source(sd: Any, where: str, kind: str | None = None, shards: list[str] | None = None) -> None:
    """One source's saved state (SourceLoader.state_dict); `kind` and `shards`: this run's, when known. The
    saved positions index the shard list the state was saved with: its own (`shards`, rank 0's file), or
    this run's when the digest says it is the same."""
    if not isinstance(sd, dict):
        raise DataStateError(f"{where}: expected an object, got {type(sd).__name__}")
    if not isinstance(sd.get("kind"), str):
        raise DataStateError(f"{where}.kind: missing or not a string")
    if "shards" in sd and not (isinstance(sd["shards"], list)
                               and all(isinstance(x, str) for x in sd["shards"])):
        raise DataStateError(f"{where}.shards: expected a list of shard names")
    n_shards = len(sd["shards"]) if "shards" in sd else None
    if n_shards is None and shards is not None and sd.get("shards_digest") in (None, shard_digest(shards)):
        n_shards = len(shards)
    if kind is not None and sd["kind"] != kind:
        raise DataStateError(f"{where}.kind: saved for a {sd['kind']} source, this run's is {kind}: the "
                             "position cannot be used (start its data over with --reset-data)")
    for field, lo in (("world_size", 1), ("num_workers", 0)):
        if not _int(sd.get(field), lo):
            raise DataStateError(f"{where}.{field}: expected an integer >= {lo}, got {sd.get(field)!r}")
    if "streams" not in sd:  # a position saved before logical streams: checked by its upgrade
        return
    S = sd.get("n_streams")
    if not _int(S, 1):
        raise DataStateError(f"{where}.n_streams: expected an integer >= 1, got {S!r}")
    if not _int(sd.get("next_worker", 0), 0):
        raise DataStateError(f"{where}.next_worker: expected an integer >= 0, got {sd.get('next_worker')!r}")
    turns = sd.get("turns", {})
    if not (isinstance(turns, dict)
            and all(str(k).isdigit() and _int(v, 0) and v < S for k, v in turns.items())):
        raise DataStateError(f"{where}.turns: expected an object of worker: stream (< {S})")
    streams = sd["streams"]
    if not isinstance(streams, dict):
        raise DataStateError(f"{where}.streams: expected an object of stream: state")
    for s, st in streams.items():
        if not (str(s).isdigit() and int(s) < S):
            raise DataStateError(f"{where}.streams: stream {s!r} is not one of the {S} logical streams")
        check_stream(st, f"{where}.streams.{s}", n_shards)


def check_data_state(sd: Any, where: str,
                     sources: dict[str, tuple[str, list[str]]] | None = None) -> list[str]:
    """A rank's whole data state. `sources`: this run's sources, name -> (kind, shard list). Raises
    DataStateError; returns warnings for what may legitimately be absent (a source this run has that the file
    does not: its data starts at the beginning)."""
    if not isinstance(sd, dict):
        raise DataStateError(f"{where}: expected an object, got {type(sd).__name__}")
    for name, v in sd.items():
        if name == MIXTURE_KEY:
            if not (isinstance(v, dict) and _int(v.get("steps"), 0)):
                raise DataStateError(f"{where}.{MIXTURE_KEY}.steps: expected an integer >= 0, got "
                                     f"{v.get('steps') if isinstance(v, dict) else v!r}")
            if not _counts(v.get("micro_batches", {})):
                raise DataStateError(
                    f"{where}.{MIXTURE_KEY}.micro_batches: expected an object of source: count")
            continue
        kind, shards = (sources or {}).get(name, (None, None))
        check_source(v, f"{where}.{name}", kind, shards)
    return [f"{where}: no data position for source {name}: its data starts at the beginning"
            for name in (sources or {}) if name not in sd]


def check_trainer_state(state: dict, where: str) -> None:
    """The counters of trainer_state.json."""
    for field in ("step", "tokens", "samples", "bad_steps", "world_size"):
        if field in state and not _int(state[field], 1 if field == "world_size" else 0):
            raise DataStateError(f"{where}.{field}: expected an integer >= "
                                 f"{1 if field == 'world_size' else 0}, got {state[field]!r}")
