"""Paths in a config: which keys hold local paths, and reading the relative ones against a folder.

The keys are marked in the schema (field metadata `PATH`, and `WEIGHTS` for `vision.pretrained`, a file or
an open_clip tag; `train.eval_tasks` entries carry theirs in `EvalTaskConfig`); `path_keys()` lists them. A
relative path in a config file is read against the file's folder, one given on the command line against the
working directory, and `save_config` writes them absolute, so that a run's config.yaml works from anywhere
(`kosmos.config.loading`). What is not a local relative path is kept as it is: absolute paths, URLs
(`https://`, `s3://`, ...) and `pipe:COMMAND`; `~/...` is read in the home folder. A relative glob or brace
pattern is a local path: the folder goes in front of it.

Also here, below the data layer that reads shards, the one test of what is remote (`kosmos.data.remote`)
and of what names a weights file (`kosmos.vision`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Any

from kosmos.config.schema import Config, SourceConfig

PIPE = "pipe:"
"""A shard spec `pipe:COMMAND`: the command's standard output is the shard (kosmos/data/remote.py)."""
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
"""The suffixes of a weights file in `vision.pretrained` (anything else without a folder is a tag)."""


def is_url(spec: str) -> bool:
    """Whether `spec` is a URL (`scheme://...`) rather than a local path; `file://` counts as a URL."""
    return bool(_URL.match(str(spec)))


def is_remote(spec: str) -> bool:
    """Whether `spec` is read through kosmos.data.remote (a URL or `pipe:COMMAND`)."""
    return str(spec).startswith(PIPE) or is_url(spec)


def names_weights_file(spec: str) -> bool:
    """Whether `vision.pretrained` names a file by its form (a weights suffix or a folder in it)."""
    return spec.endswith(WEIGHT_SUFFIXES) or "/" in spec or os.sep in spec


def is_local_relative(spec: Any) -> bool:
    """Whether `spec` is a local relative path (glob and brace patterns included): not empty, not absolute,
    not a URL, not a `pipe:` command, not `~/...`."""
    return (isinstance(spec, str) and bool(spec.strip()) and not is_remote(spec)
            and not os.path.isabs(spec) and not spec.startswith("~"))


def absolute(spec: str, base: str | Path) -> str:
    """`spec` read against the folder `base` when it is a local relative path (normalised: `a/../b` is
    `b`), `~/...` in the home folder, else `spec` as it is."""
    if isinstance(spec, str) and spec.startswith("~"):
        return os.path.expanduser(spec)
    if not is_local_relative(spec):
        return spec
    return os.path.normpath(os.path.join(os.path.abspath(base), spec))


def _resolve_value(value: Any, kind: str, is_list: bool, base: str | Path) -> Any:
    """One path key's value read against `base`; a value of the wrong form (a string where a list is due)
    is kept for the schema to refuse as written."""
    if kind == "weights" and not (isinstance(value, str) and names_weights_file(value)):
        return value  # an open_clip tag
    if is_list:
        return [absolute(v, base) for v in value] if isinstance(value, list) else value
    return absolute(value, base)


def _walk(cls: type, data: Any, base: str | Path) -> Any:
    """The nested dict `data` (a section of class `cls`) with its path keys read against `base`: a copy where
    a path changes, else `data` itself (a YAML alias stays shared: `_check_size` names where one grew). What
    is not a dict, or not a known key, is kept as it is (the schema checks it later)."""
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, value in data.items():
        f = fields.get(name)
        if f is None:
            continue
        tp = hints[name]
        if "path" in f.metadata:
            new = _resolve_value(value, f.metadata["path"], typing.get_origin(tp) is list, base)
        elif "entries" in f.metadata and isinstance(value, list):  # train.eval_tasks
            new = [_walk(f.metadata["entries"], v, base) for v in value]
        elif dataclasses.is_dataclass(tp):
            new = _walk(tp, value, base)
        elif typing.get_origin(tp) is dict and isinstance(value, dict):  # data.sources.<name>
            new = {k: _walk(typing.get_args(tp)[1], v, base) for k, v in value.items()}
        else:
            continue
        if "path" in f.metadata and new != value or "path" not in f.metadata and _replaced(new, value):
            out[name] = new
    return {**data, **out} if out else data


def _replaced(new: Any, old: Any) -> bool:
    """Whether `_walk` replaced a section `old` (or anything in a list or dict of sections), compared by
    identity: the values are not compared (an alias bomb's would be expanded)."""
    if isinstance(old, dict) and isinstance(new, dict) and new is not old:  # data.sources: a new dict
        return any(new[k] is not old[k] for k in old)
    if isinstance(old, list):
        return any(a is not b for a, b in zip(new, old, strict=True))
    return new is not old


def resolve_paths(data: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """The nested config dict `data` (a file's, a saved one, `Config.to_dict()`) with every local relative
    path of its path keys (`path_keys`) read against the folder `base`; `data` itself is left as it is."""
    return _walk(Config, data, base)


def resolve_config_paths(cfg: Any, base: str | Path) -> None:
    """Read the relative paths of a built config (a `Config` or one of its sections), defaults included,
    against the folder `base`, in place."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, tp = getattr(cfg, f.name), hints[f.name]
        if "path" in f.metadata:
            is_list = typing.get_origin(tp) is list
            setattr(cfg, f.name, _resolve_value(value, f.metadata["path"], is_list, base))
        elif "entries" in f.metadata:
            setattr(cfg, f.name, [_walk(f.metadata["entries"], v, base) for v in value])
        elif dataclasses.is_dataclass(value):
            resolve_config_paths(value, base)
        elif isinstance(value, dict):
            for v in value.values():
                if dataclasses.is_dataclass(v):
                    resolve_config_paths(v, base)


def path_keys() -> list[str]:
    """The dotted keys that hold paths, for help texts, docs and tests (`<source>`: any source's name)."""
    out = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "path" in f.metadata:
                out.append(prefix + f.name)
            elif "entries" in f.metadata:
                walk(f.metadata["entries"], f"{prefix}{f.name}[].")
            elif dataclasses.is_dataclass(hints[f.name]) and hints[f.name] is not SourceConfig:
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(Config, "")
    out += [f"data.<source>.{f.name}" for f in dataclasses.fields(SourceConfig) if "path" in f.metadata]
    return out
