"""Loading a config: YAML files and dotted `key=value` overrides, checked against the dataclasses of
`kosmos.config.schema` (the annotation of each field gives its type), and saving one.

Unknown keys and values of the wrong type fail here with the dotted key in the message; the values
themselves are checked by the dataclasses' `__post_init__`. A saved config carries its format
(`config_format`, `kosmos.config.migrations`); a checkpoint's is brought to today's keys when loaded
(`legacy=True`, `config_from_checkpoint`). PyYAML is imported when a config is read, not on import.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any

from kosmos.config.migrations import CONFIG_FORMAT, FORMAT_KEY, config_format, migrate
from kosmos.config.paths import resolve_config_paths, resolve_paths
from kosmos.config.schema import Config, ConfigError, DataConfig


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


# A number in any spelling Python reads as a float: `1e-4`, `2E3`, `+1.5e-3`, `1_000.5`. PyYAML follows YAML
# 1.1, whose floats need a dot (`1.0e-4`), so `lr: 2e-3` and `optim.lr=1e-4` arrive as strings; float fields
# accept them. Words (`nan`, `inf`) are not numbers here: YAML's `.nan` and `.inf` are.
_FLOAT_RE = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, bool, str, X | None, list[X], dict)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, "
                          f"got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        if dataclasses.is_dataclass(item):  # named entries (data.sources.<name>), each a section
            defaults = getattr(item, "kind_defaults", lambda given: {})
            return {k: _coerce({**defaults(v), **v} if isinstance(v, dict) else v, item, f"{key}.{k}")
                    for k, v in value.items()}
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value.strip().replace("_", ""))  # `1e-4`: PyYAML (YAML 1.1) reads it as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, f"{key}.")
    else:
        return value
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys fail with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            close = difflib.get_close_matches(k, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            valid = ", ".join(f"{prefix}{n}" for n in fields)
            raise ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {valid}")
        f = fields[k]
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict) and f.default_factory is not MISSING:
            # A partly given section keeps the defaults of the section it replaces (e.g. data.text's budget).
            v = {**dataclasses.asdict(f.default_factory()), **v}
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive: dataclass signature mismatch
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}': {e}") from e


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `key.sub=value` strings; values are read as YAML scalars (`4`, `1e-4`, `true`, `null`)."""
    import yaml

    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. decoder.layers=4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = _load_yaml(raw, f"override {item!r}", key) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None,
                     base: str | Path | None = None) -> Config:
    """Build a :class:`Config` from a nested dict plus dotted overrides. A `config_format` key (a saved
    config's) is checked and dropped; the dict is taken as it is, not migrated (`load_config`'s `legacy`).
    Relative paths (`kosmos.config.paths`) of `data` are read against the folder `base` (None: the working
    directory), those of the overrides against the working directory; the config holds them absolute."""
    data = migrate(data or {})
    _check_size(data)  # before paths are read: that copies sections, which would hide where a cycle is
    if base is not None:
        data = resolve_paths(data, base)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    _check_size(data)
    filled = data
    if isinstance(data.get("data"), dict):  # a named source's defaults come from the config's own sources
        filled = {**data, "data": DataConfig.fill_defaults(data["data"])}
    cfg = _build(Config, filled)
    resolve_config_paths(cfg, os.getcwd())  # the overrides' and the defaults' (without `base`, all)
    # Which keys the user set, for warnings about defaults that matter (Config.given); not a field, so it
    # is neither saved nor compared.
    object.__setattr__(cfg, "_given", frozenset(_dotted_keys(data)))
    return cfg


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of the leaves of a nested dict (`{"data": {"text": {"shards": [...]}}}` gives
    `data.text.shards`)."""
    out = []
    for k, v in data.items():
        if isinstance(v, dict):
            out += _dotted_keys(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


MAX_CONFIG_SIZE = 8_000_000
"""The most a config may hold, counted as the characters of its keys and strings plus one per value, once
YAML aliases are expanded: a config is saved in full (config.yaml, and in trainer_state.json with every
checkpoint), so a small file whose aliases expand to 100 MB (an alias bomb) is refused when loaded, naming
where it grew."""


def _check_size(data: Any) -> None:
    """Refuse a config (a nested dict, overrides applied) larger than MAX_CONFIG_SIZE once expanded, naming
    the deepest key that alone is too large, or one that contains itself (`&a [*a]`). The expanded size is
    computed over the shared values (what an alias refers to is one object), each once: an alias bomb costs
    no more than the file that holds it."""
    sizes: dict[int, int | None] = {}  # id -> expanded size; None while its values are being added up

    def items(node: Any) -> list[tuple[str, Any]]:
        if isinstance(node, dict):
            return [(str(k), v) for k, v in node.items()]
        return [(f"[{i}]", v) for i, v in enumerate(node)] if isinstance(node, list) else []

    def size(node: Any) -> int:
        if isinstance(node, dict | list):
            return sizes[id(node)] or 0
        return 1 + (len(node) if isinstance(node, str | bytes) else 0)

    def name(key: str, part: str) -> str:
        return key + part if part.startswith("[") or not key else f"{key}.{part}"

    stack: list[tuple[Any, bool, str]] = [(data, False, "")]
    while stack:
        node, done, key = stack.pop()
        if done:
            sizes[id(node)] = 1 + sum(len(k) + size(v) for k, v in items(node))
            continue
        if id(node) in sizes:
            continue
        sizes[id(node)] = None
        stack.append((node, True, key))
        for part, value in items(node):
            if isinstance(value, dict | list):
                if id(value) in sizes and sizes[id(value)] is None:
                    raise ConfigError(f"config key '{name(key, part)}': contains itself (a YAML alias to the "
                                      "value it is in)")
                stack.append((value, False, name(key, part)))
    if size(data) <= MAX_CONFIG_SIZE:
        return
    key, node = "", data
    while (big := next(((p, v) for p, v in items(node) if size(v) > MAX_CONFIG_SIZE), None)) is not None:
        key, node = name(key, big[0]), big[1]
    raise ConfigError(f"config key '{key or 'root'}': the config is larger than {MAX_CONFIG_SIZE:,} "
                      "characters once its YAML aliases (&anchor, *alias) are expanded; it is saved with "
                      "every checkpoint: write it out plainly")


def _load_yaml(text: str, path: Path | str, key: str = "") -> Any:
    """The YAML document `text` (of the file `path`, or the value of the override of config key `key`), like
    yaml.safe_load, but a key given twice in one mapping is a ConfigError naming it and both lines (PyYAML
    would silently keep the last)."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, path, key)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicate_keys(root: Any, path: Path | str, key: str = "") -> None:
    """Walk the composed YAML node graph (each node once: aliases share nodes) and refuse a mapping that gives
    a key twice, naming its dotted config key and the two lines."""
    import yaml

    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(root, key)]
    while stack:
        node, key = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for k, v in node.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                dotted = f"{key}.{name}" if key else name
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    line = k.start_mark.line + 1
                    if name in lines:
                        raise ConfigError(f"{path}: config key '{dotted}' is given twice (lines "
                                          f"{lines[name]} and {line}); only one may be given")
                    lines[name] = line
                stack.append((v, dotted))
        elif isinstance(node, yaml.SequenceNode):
            stack += [(v, f"{key}[{i}]") for i, v in enumerate(node.value)]


PRESETS = Path(__file__).resolve().parents[1] / "configs"
"""The shipped configs: kosmos/configs, package data in an installed package; in a checkout a link to its
configs/, the one copy. Its top-level `NAME.yaml` files are the presets (`--config NAME`)."""


def presets() -> list[str]:
    """The names of the shipped configs (`tiny`, `kosmos1`, ...), for `--config NAME`."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(config: str | Path) -> Path:
    """The file a `--config` value names: a preset's (`tiny`, `kosmos1`: a name without a folder and without
    .yaml that is not a file here) or the path as given. A bare name that is neither is a ConfigError listing
    the presets."""
    path = Path(config)
    name = str(config)
    if isinstance(config, Path) or "/" in name or os.sep in name or name.endswith((".yaml", ".yml")):
        return path
    if (PRESETS / f"{name}.yaml").is_file():
        return PRESETS / f"{name}.yaml"
    if path.is_file():
        return path
    raise ConfigError(f"config {name!r}: no such file, and no preset of that name; presets: "
                      f"{', '.join(presets())} (or give a path to a YAML file)")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The nested dict of a YAML config file, not yet checked."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _load_yaml(path.read_text(), path) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None, legacy: bool = False) -> Config:
    """Load a YAML config (a file, a preset's name: `preset_path`; or the defaults when `path` is None) and
    apply `key=value` overrides. Relative paths in the file are read against its folder, in the overrides
    against the working directory (`kosmos.config.paths`). `legacy`:
    the file is a checkpoint's saved config, whose missing keys mean the behaviour it was trained with, not
    today's defaults: without a `config_format` key it is of format 1 and migrated
    (`kosmos.config.migrations`). A file with the key is migrated from its format whatever `legacy` says."""
    path = preset_path(path) if path is not None else None
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    try:
        # Relative paths: against the folder the file is in (links followed: a preset is read as the
        # checkout's configs/ file it links to); in a saved config of format 1 or 2 (older code saved them
        # as given), against the working directory, as that code read them.
        base = path.resolve().parent if path is not None and config_format(data, legacy) >= 3 else None
        return config_from_dict(migrate(data, legacy), overrides, base)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML to `path`, every key given, after a top-level `config_format: CONFIG_FORMAT`
    (the format its keys are in, so that later code can migrate them; `load_config` reads and drops it).
    Its relative paths are written absolute (read against the working directory), so that the file works
    from any folder."""
    import yaml

    data = resolve_paths(cfg.to_dict(), os.getcwd())
    Path(path).write_text(yaml.safe_dump({FORMAT_KEY: CONFIG_FORMAT, **data}, sort_keys=False))


def config_from_checkpoint(ckpt: str | Path, overrides: list[str] | None = None) -> Config:
    """The config a checkpoint directory was trained with (`Config.from_checkpoint`): its `config.yaml` (or,
    in checkpoints from before that file existed, the copy in `trainer_state.json`), with the tokenizer path
    pointed at the checkpoint's own copy of the tokenizer when it has one. Keys the saved config predates take
    the behaviour the checkpoint was trained with, not today's default (`kosmos.config.migrations`)."""
    from kosmos.untrusted import load_json

    ckpt = Path(ckpt)
    state = ckpt / "trainer_state.json"
    old = load_json(state.read_text()).get("config") if state.is_file() else None
    if (ckpt / "config.yaml").is_file():
        cfg = load_config(ckpt / "config.yaml", overrides, legacy=True)
    elif isinstance(old, dict):
        cfg = config_from_dict(migrate(old, legacy=True), overrides)
    else:
        raise ConfigError(f"{ckpt}: no config.yaml in the checkpoint; pass the config it was trained with")
    if (ckpt / "tokenizer" / "tokenizer.model").is_file():
        cfg.tokenizer.path = str((ckpt / "tokenizer").resolve())
    return cfg
