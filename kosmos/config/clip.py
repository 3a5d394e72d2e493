"""open_clip's architecture configs, read without importing open_clip (so without torch).

`VisionConfig` resolves the tower's sizes from them (`resolved`, `input_size`, ...) and the legacy-key
migration reads a model's activation from them: both must work in a process that has not imported torch
(`import kosmos.config` imports neither torch nor open_clip; tests/test_config.py checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_ARCH_CACHE: dict[str, dict] = {}


def open_clip_architecture(model_name: str) -> dict[str, Any]:
    """open_clip's JSON config of `model_name` (e.g. ViT-L-14). Read from the installed package's
    `model_configs/` without importing it; names open_clip only knows at run time (added with
    `open_clip.add_model_config`) fall back to `open_clip.get_model_config`, which imports torch."""
    if model_name not in _ARCH_CACHE:
        import importlib.util
        import json

        spec = importlib.util.find_spec("open_clip")
        arch = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            path = Path(loc) / "model_configs" / f"{model_name}.json"
            if path.is_file():
                arch = json.loads(path.read_text())
                break
        if arch is None and spec is not None:
            import open_clip

            arch = open_clip.get_model_config(model_name)
        if arch is None or "vision_cfg" not in arch:
            from kosmos.config.schema import ConfigError  # here: schema imports this module

            raise ConfigError(f"config key 'vision.model_name': unknown open_clip model {model_name!r}")
        _ARCH_CACHE[model_name] = arch
    return _ARCH_CACHE[model_name]
