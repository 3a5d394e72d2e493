"""Configuration: one dataclass per concern, loaded from YAML with dotted ``key=value`` overrides.

This package imports nothing heavy (no torch, no open_clip; PyYAML only when a config is read), so a config
can be loaded and checked before any model, data or process group is built. Unknown keys and values of the
wrong type fail in :func:`load_config` with the dotted key in the message.

    cfg = load_config("configs/tiny.yaml", ["decoder.layers=4", "vision.pretrained=openai"])

Its modules, one concern each (import from here; the names below are the package's interface):

    schema.py       the dataclasses (every field documented and checked), ConfigError, the allowed values,
                    the keys fixed on resume (`FIXED`, `is_fixed_on_resume`), the eval-task entries
    loading.py      YAML files (or a preset's name) and overrides -> Config (types checked by the
                    annotations); save_config
    paths.py        the keys that hold paths, read against the config file's folder; what is remote
    migrations.py   saved configs of older code -> today's keys, behind one format version (CONFIG_FORMAT)
    flops.py        FLOP and parameter counts from the shapes (the dataclasses' flops methods call them)
    clip.py         open_clip's architecture configs, read without importing open_clip
"""

from kosmos.config.clip import open_clip_architecture
from kosmos.config.flops import (
    decoder_flops_per_token,
    flops_per_image,
    non_embedding_params,
    vision_forward_flops,
)
from kosmos.config.loading import (
    MAX_CONFIG_SIZE,
    PRESETS,
    config_from_checkpoint,
    config_from_dict,
    load_config,
    parse_overrides,
    preset_path,
    presets,
    read_config_file,
    save_config,
)
from kosmos.config.migrations import (
    CONFIG_FORMAT,
    FORMAT_KEY,
    MIGRATIONS,
    config_format,
    fill_legacy_keys,
    migrate,
)
from kosmos.config.paths import path_keys, resolve_paths
from kosmos.config.schema import (
    CAPTION_CHOICES,
    EVAL_TASK_NAMES,
    EVAL_TASK_OPTIONS,
    EVAL_TASK_SETTINGS,
    FIXED,
    KINDS,
    LOSSES,
    MAX_SEED,
    MAX_VOCAB_SIZE,
    SOURCE_NAME,
    SOURCES,
    VQA_RULES,
    Config,
    ConfigError,
    ConnectorConfig,
    DataConfig,
    DecoderConfig,
    EvalTaskConfig,
    OptimConfig,
    SourceConfig,
    TokenizerConfig,
    TrainConfig,
    VisionConfig,
    fixed_on_resume_keys,
    flatten,
    is_fixed_on_resume,
)

__all__ = [
    "CAPTION_CHOICES", "CONFIG_FORMAT", "EVAL_TASK_NAMES", "EVAL_TASK_OPTIONS", "EVAL_TASK_SETTINGS",
    "FIXED", "FORMAT_KEY", "KINDS", "LOSSES", "MAX_CONFIG_SIZE", "MAX_SEED", "MAX_VOCAB_SIZE", "MIGRATIONS",
    "SOURCES", "SOURCE_NAME", "VQA_RULES", "Config", "ConfigError", "ConnectorConfig", "DataConfig",
    "DecoderConfig", "EvalTaskConfig", "OptimConfig", "SourceConfig", "TokenizerConfig", "TrainConfig",
    "VisionConfig", "config_format", "config_from_checkpoint", "config_from_dict",
    "decoder_flops_per_token", "fill_legacy_keys", "fixed_on_resume_keys", "flatten", "flops_per_image",
    "is_fixed_on_resume", "load_config", "migrate", "non_embedding_params", "open_clip_architecture",
    "parse_overrides", "path_keys", "preset_path", "presets", "PRESETS", "read_config_file", "resolve_paths",
    "save_config", "vision_forward_flops",
]
