"""Saved configs of older code, brought up to today's keys behind one format version.

A config written by `save_config` (a run's and each checkpoint's `config.yaml`) starts with a top-level
`config_format: N` key, `CONFIG_FORMAT` today. It is no config key (not a field of `Config`, not in
`to_dict()`): `load_config` reads it, checks it and drops it. A file without it is

* a checkpoint's config written before the key existed, when loaded as one (`legacy=True`:
  `Config.from_checkpoint`): format 1, brought to today's format by `MIGRATIONS`;
* anything else (a config written by hand, `configs/*.yaml`): today's format, left as it is.

A saved config lists every key its code knew, so a key it lacks means older code, and the weights were
trained with the behaviour of that code: filling in today's default instead would silently change what they
compute. A change of a default that saved weights depend on is therefore a new format: raise
`CONFIG_FORMAT` and add `MIGRATIONS[old]`, the function that brings a config of format `old` to `old + 1`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from kosmos.config.clip import open_clip_architecture
from kosmos.config.schema import ConfigError, VisionConfig

CONFIG_FORMAT = 3
"""The format `save_config` writes (the top-level `config_format` key of a saved config). 1: saved configs
from before the key (no `config_format`); 2: relative paths read against the working directory; 3: against
the config file's folder, and saved absolute (`paths_absolute`)."""

FORMAT_KEY = "config_format"
"""The top-level key of a saved config that holds its format."""


def fill_legacy_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: a checkpoint's saved config (nested dict) with every key it predates set to the
    behaviour it was trained with, where that differs from the key's default today. A checkpoint's
    config.yaml lists every key its code knew, so a missing key means older code: filling in today's
    default instead would silently change what the weights compute. Applied to checkpoints only
    (`Config.from_checkpoint`, and the check in `kosmos.weights.check_checkpoint_fits`), never to configs
    written by hand.

    * `vision.quick_gelu`: older code took the architecture's activation whatever the tag, so GELU for
      `ViT-L-14` with `openai` weights (QuickGELU only for `-quickgelu` model names).
    * `decoder.scale_embedding`: older code did not scale token embeddings (false)."""
    data = copy.deepcopy(data)
    vision = data.setdefault("vision", {})
    if isinstance(vision, dict) and "quick_gelu" not in vision:
        name = vision.get("model_name", VisionConfig.model_name)
        vision["quick_gelu"] = bool(open_clip_architecture(name).get("quick_gelu", False))
    decoder = data.setdefault("decoder", {})
    if isinstance(decoder, dict) and "scale_embedding" not in decoder:
        decoder["scale_embedding"] = False
    return data


def paths_absolute(data: dict[str, Any]) -> dict[str, Any]:
    """Format 2 -> 3: no key changes. From format 3 on, a relative path in a config file is read against the
    file's folder and `save_config` writes paths absolute; a saved config of format 1 or 2 holds them as
    they were given, relative to the working directory of its run, and `load_config` reads them against
    the working directory, as the code that saved it did (`kosmos.config.paths`)."""
    return copy.deepcopy(data)


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: fill_legacy_keys, 2: paths_absolute}
"""Format N -> the function that brings a saved config (nested dict) of format N to format N + 1."""


def config_format(data: dict[str, Any], legacy: bool = False) -> int:
    """The format of the saved config `data` (its `config_format` key); without the key, 1 for a
    checkpoint's config (`legacy`), else `CONFIG_FORMAT` (a config written by hand is today's)."""
    if FORMAT_KEY not in data:
        return 1 if legacy else CONFIG_FORMAT
    version = data[FORMAT_KEY]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"config key '{FORMAT_KEY}': must be a whole number >= 1 (the format the config "
                          f"was saved in), got {version!r}")
    if version > CONFIG_FORMAT:
        raise ConfigError(f"config key '{FORMAT_KEY}': the config was saved in format {version} by newer "
                          f"code; this code reads up to format {CONFIG_FORMAT}: update kosmos")
    return version


def migrate(data: dict[str, Any], legacy: bool = False) -> dict[str, Any]:
    """The saved config `data` (nested dict) in today's format, without its `config_format` key: the
    migrations from its format (`config_format`) on. `data` itself is left as it is."""
    version = config_format(data, legacy)
    data = {k: v for k, v in data.items() if k != FORMAT_KEY}
    for old in range(version, CONFIG_FORMAT):
        data = MIGRATIONS[old](data)
    return data
