"""Configuration: one dataclass per concern, loaded from YAML with dotted ``key=value`` overrides.

This module imports nothing heavy (no torch), so a config can be loaded and checked before any
model, data or process group is built. Every field has a docstring (the string right below it);
``__post_init__`` checks values and names the offending field. Unknown keys and values of the
wrong type fail in :func:`load_config` with the dotted key in the message.

    cfg = load_config("configs/tiny.yaml", ["decoder.layers=4", "vision.pretrained=openai"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type or invalid value. The message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


@dataclass
class DecoderConfig:
    """The language decoder: torchscale's Decoder with Magneto (sub-LN) and xPos."""

    vocab_size: int = 64007
    """Vocabulary size, special tokens included (must match the tokenizer)."""
    layers: int = 24
    """Number of transformer layers."""
    dim: int = 2048
    """Model width (hidden size)."""
    ffn_dim: int = 8192
    """Hidden size of the feed-forward network."""
    heads: int = 32
    """Number of attention heads; must divide `dim`."""
    activation: str = "gelu"
    """Feed-forward activation: gelu, relu or swish."""
    dropout: float = 0.1
    """Dropout on residual branches and embeddings."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    max_len: int = 2048
    """Maximum sequence length (packed row length in training)."""
    xpos_scale_base: int = 512
    """xPos scale base (Sun et al., 2022); the paper uses 512."""
    layernorm_eps: float = 1e-5
    """LayerNorm epsilon."""
    share_embeddings: bool = True
    """Tie the input embedding and the output projection (the paper's ~1.3B decoder)."""
    attention: str = "sdpa"
    """Attention kernel: `sdpa` (torch scaled_dot_product_attention, fp32 xPos) or `torchscale`
    (the stock bmm path, kept for comparison). Both have the same parameters."""
    checkpoint_activations: bool = False
    """Recompute each decoder layer in the backward pass (saves memory, costs ~30% time)."""
    compile: bool = False
    """Compile each decoder layer with torch.compile (in place: parameter names and checkpoints are the
    same as without). The first steps are slow while it compiles; needs a C++ compiler on CPU."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "layers", "dim", "ffn_dim", "heads", "max_len", "xpos_scale_base"):
            _check(getattr(self, name) > 0, f"decoder.{name}", f"must be positive, got {getattr(self, name)}")
        _check(self.dim % self.heads == 0, "decoder.heads", f"must divide decoder.dim={self.dim}, got {self.heads}")
        _check(self.head_dim % 2 == 0, "decoder.heads", f"head dim {self.head_dim} must be even for xPos")
        _check(self.activation in ("gelu", "relu", "swish"), "decoder.activation",
               f"must be gelu, relu or swish, got {self.activation!r}")
        for name in ("dropout", "attention_dropout"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"decoder.{name}", f"must be in [0, 1), got {v}")
        _check(self.attention in ("sdpa", "torchscale"), "decoder.attention",
               f"must be 'sdpa' or 'torchscale', got {self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def magneto_init_scale(self) -> float:
        """Magneto's gain sqrt(log 2N) applied to fc1/fc2/out_proj/v_proj (decoder-only)."""
        return math.sqrt(math.log(2 * self.layers))

    def non_embedding_params(self) -> int:
        """Parameters of the decoder layers and final norm (no embeddings), computed from the shape."""
        d, f = self.dim, self.ffn_dim
        attn = 4 * (d * d + d) + 2 * d  # q,k,v,out with biases + sub-LN inner_attn_ln
        ffn = (d * f + f) + (f * d + d) + 2 * f  # fc1, fc2 with biases + sub-LN ffn_layernorm
        norms = 2 * 2 * d  # self_attn_layer_norm, final_layer_norm
        return self.layers * (attn + ffn + norms) + 2 * d

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) of the decoder, PaLM-style:
        6 * N (matmuls incl. the output projection) + 12 * layers * dim * seq_len (attention)."""
        seq_len = seq_len or self.max_len
        n = self.non_embedding_params() + self.vocab_size * self.dim
        return 6 * n + 12 * self.layers * self.dim * seq_len


@dataclass
class VisionConfig:
    """The image encoder: an open_clip ViT returning its patch tokens."""

    model_name: str = "ViT-L-14"
    """open_clip architecture name (its JSON config gives the defaults below)."""
    pretrained: str | None = None
    """Weights: an open_clip pretrained tag (e.g. `openai`, `laion2b_s32b_b82k`, downloaded by open_clip),
    a local `.safetensors`/`.pt`/`.bin` file (full CLIP or vision-only state dict), or null for random
    initialisation (tests and offline demos; a warning says so)."""
    image_size: int | None = None
    """Input resolution; null takes the architecture's (224 for ViT-L/14)."""
    patch_size: int | None = None
    """Patch size; null takes the architecture's."""
    width: int | None = None
    """ViT width; null takes the architecture's (1024 for ViT-L/14)."""
    layers: int | None = None
    """ViT depth; null takes the architecture's (24 for ViT-L/14)."""
    head_width: int | None = None
    """Width per attention head; null takes the architecture's (64)."""
    trainable_blocks: int = 1
    """How many of the last ViT blocks are trained (the paper: all frozen but the last). 0 freezes all."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "head_width"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"vision.{name}", f"must be positive or null, got {v}")
        _check(self.trainable_blocks >= 0, "vision.trainable_blocks", "must be >= 0")
        if self.layers is not None:
            _check(self.trainable_blocks <= self.layers, "vision.trainable_blocks",
                   f"must be <= vision.layers={self.layers}")
        if self.width is not None and self.head_width is not None:
            _check(self.width % self.head_width == 0, "vision.head_width", "must divide vision.width")

    def resolved(self) -> dict[str, Any]:
        """The open_clip vision_cfg dict: the architecture's JSON with this config's overrides."""
        import open_clip  # heavy; only when a model is actually built

        arch = open_clip.get_model_config(self.model_name)
        if arch is None:
            raise ConfigError(f"config key 'vision.model_name': unknown open_clip model {self.model_name!r}")
        cfg = dict(arch["vision_cfg"])
        for name in ("image_size", "patch_size", "width", "layers", "head_width"):
            if getattr(self, name) is not None:
                cfg[name] = getattr(self, name)
        return cfg


@dataclass
class ConnectorConfig:
    """Perceiver resampler (flamingo-pytorch) pooling the patch tokens, then a linear projection."""

    num_latents: int = 64
    """Image embeddings per image in the sequence (the paper: 64)."""
    depth: int = 2
    """Resampler layers."""
    heads: int = 8
    """Resampler attention heads."""
    dim_head: int = 64
    """Resampler width per head."""
    ff_mult: int = 4
    """Resampler feed-forward expansion."""

    def __post_init__(self) -> None:
        for name in ("num_latents", "depth", "heads", "dim_head", "ff_mult"):
            _check(getattr(self, name) > 0, f"connector.{name}", f"must be positive, got {getattr(self, name)}")


@dataclass
class TokenizerConfig:
    """Where the SentencePiece tokenizer lives (built with `python -m tokenizer.build`)."""

    path: str | None = None
    """Directory holding tokenizer.model and tokenizer_config.json."""


@dataclass
class Config:
    """The whole run. Sections are added here as the project grows (data, optim, train)."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: int = 0
    """Random seed for initialisation and data order."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (int, float, bool, str, X | None, list[X], dict)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
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
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            valid = ", ".join(f"{prefix}{n}" for n in names)
            raise ConfigError(f"unknown config key '{key}'{hint}; valid keys here: {valid}")
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
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build a :class:`Config` from a nested dict plus dotted overrides."""
    data = dict(data or {})
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    return _build(Config, data)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
