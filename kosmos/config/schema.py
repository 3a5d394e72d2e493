"""The config's schema: one dataclass per concern, each field documented, each value checked.

Every field has a docstring (the string right below it: docs/config.md and generated CLI help are made from
them, `kosmos.docstrings.field_docs`); ``__post_init__`` checks values and names the offending field. A
field whose metadata is `FIXED` must keep its value on resume (`is_fixed_on_resume`). Loading and saving
are in `kosmos.config.loading`, FLOP counts in `kosmos.config.flops`, saved configs of older code in
`kosmos.config.migrations`; `kosmos.config` gathers them. Imports nothing heavy (no torch, no YAML).
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kosmos.config import flops
from kosmos.config.clip import open_clip_architecture
from kosmos.errors import KosmosError

KINDS = ("text", "captions", "interleaved")
"""The kinds of data source (`data.<source>.kind`), which are also the three unnamed sources' names."""
LOSSES = ("all", "response")
"""What an instruction sample's loss covers (`data.<source>.loss`): the whole text (the paper; default), or
the response only (no loss on `<s>` and the prompt)."""
CAPTION_CHOICES = ("first", "random", "all")
"""How a caption sample with several captions is visited (`data.<source>.caption_choice`; see
`kosmos.data.stream`)."""


class ConfigError(KosmosError, ValueError):
    """A bad config: unknown key, wrong type or invalid value. The message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


MAX_VOCAB_SIZE = 2**24
"""The largest `decoder.vocab_size` accepted: far beyond any tokenizer (SentencePiece's are up to ~256K
pieces), so that a slip (1000000000) is refused here, naming the key, rather than by a 256 GB embedding
allocation."""

MAX_SEED = 2**32 - 1
"""The largest `seed`: numpy's generator (seeded with it by accelerate's set_seed) takes 0 .. 2**32 - 1."""

FIXED = {"fixed_on_resume": True}
"""Field metadata of the keys a resume must keep (`fixed_on_resume`): they change the data order or the shapes
of what a run reads. `is_fixed_on_resume` reads it; `--allow-config-change KEY` lets a resume change one."""

PATH = {"path": "local"}
"""Field metadata of the keys that hold local paths (a string, or a list of them: shards): a relative one in a
config file is read against that file's folder, on the command line against the working directory, and a
saved config holds them absolute (`kosmos.config.paths`). URLs, `pipe:` commands and absolute paths are kept
as they are; `~/...` is the home folder."""
WEIGHTS = {"path": "weights"}
"""Field metadata of `vision.pretrained`: a path (as `PATH`) when it names a file (a weights suffix or a
folder in it), else an open_clip tag, kept as it is."""


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
    max_len: int = field(default=2048, metadata=FIXED)
    """Maximum sequence length (packed row length in training)."""
    xpos_scale_base: int = 512
    """xPos scale base (Sun et al., 2022); the paper uses 512."""
    layernorm_eps: float = 1e-5
    """LayerNorm epsilon."""
    share_embeddings: bool = True
    """Tie the input embedding and the output projection (the paper's ~1.3B decoder)."""
    scale_embedding: bool = True
    """Multiply token embeddings by sqrt(dim) (fairseq's `embed_scale`, on unless `no_scale_embedding`), so
    that with their N(0, dim^-1/2) init tokens enter the decoder at RMS 1, the scale of the projected image
    latents (~1.1), instead of 50x below them. Only the lookup is scaled, not the tied output projection nor
    the image latents. Checkpoints whose config.yaml predates this key were trained without it and load
    with false (`kosmos.config.migrations`)."""
    attention: str = "sdpa"
    """Attention kernel: `sdpa` (torch scaled_dot_product_attention, fp32 xPos) or `torchscale`
    (the stock bmm path, kept for comparison). Both have the same parameters."""
    checkpoint_activations: bool = False
    """Recompute each decoder layer in the backward pass (saves memory, costs ~30% time)."""
    compile: bool = False
    """Compile each decoder layer with torch.compile (in place: parameter names and checkpoints are the
    same as without). The first steps are slow while it compiles; needs a C++ compiler on CPU."""
    document_mask: bool = False
    """Beyond the paper: attention stops at document boundaries inside a packed row and xPos positions
    restart at each document (the packer's `doc_ids`). False is the paper's plain stream packing. Needs
    `attention: sdpa`; its boolean mask rules out the flash kernel on GPU. No new parameters."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "layers", "dim", "ffn_dim", "heads", "max_len", "xpos_scale_base"):
            _check(getattr(self, name) > 0, f"decoder.{name}", f"must be positive, got {getattr(self, name)}")
        _check(self.vocab_size <= MAX_VOCAB_SIZE, "decoder.vocab_size",
               f"must be at most {MAX_VOCAB_SIZE} (2**24; the paper's is 64007), got {self.vocab_size}")
        _check(self.dim % self.heads == 0, "decoder.heads",
               f"must divide decoder.dim={self.dim}, got {self.heads}")
        _check(self.head_dim % 2 == 0, "decoder.heads", f"head dim {self.head_dim} must be even for xPos")
        _check(self.activation in ("gelu", "relu", "swish"), "decoder.activation",
               f"must be gelu, relu or swish, got {self.activation!r}")
        for name in ("dropout", "attention_dropout"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"decoder.{name}", f"must be in [0, 1), got {v}")
        _check(isinstance(self.scale_embedding, bool), "decoder.scale_embedding",
               f"must be true or false, got {self.scale_embedding!r}")
        _check(self.attention in ("sdpa", "torchscale"), "decoder.attention",
               f"must be 'sdpa' or 'torchscale', got {self.attention!r}")
        _check(isinstance(self.document_mask, bool), "decoder.document_mask",
               f"must be true or false, got {self.document_mask!r}")
        _check(not self.document_mask or self.attention == "sdpa", "decoder.document_mask",
               f"needs decoder.attention=sdpa (the torchscale path has no document mask), "
               f"got {self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def magneto_init_scale(self) -> float:
        """Magneto's gain sqrt(log 2N) for a decoder-only model of N layers: torchscale multiplies PyTorch's
        default init of fc1/fc2/out_proj/v_proj (weights and biases) by it; we give it to the image
        projection's weight too."""
        return math.sqrt(math.log(2 * self.layers))

    def non_embedding_params(self) -> int:
        """Parameters of the decoder layers and final norm (no embeddings): `kosmos.config.flops`."""
        return flops.non_embedding_params(self)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) of the decoder: `kosmos.config.flops`."""
        return flops.decoder_flops_per_token(self, seq_len)


@dataclass
class VisionConfig:
    """The image encoder: an open_clip ViT returning its patch tokens."""

    model_name: str = "ViT-L-14"
    """open_clip architecture name (its JSON config gives the defaults below)."""
    pretrained: str | None = field(default=None, metadata=WEIGHTS)
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
    quick_gelu: bool | None = None
    """The tower's activation: true for QuickGELU (OpenAI's CLIP), false for GELU, null to decide from the
    weights' origin: QuickGELU for a `-quickgelu` model name or a tag open_clip's pretrained config marks
    (`openai`), GELU otherwise, a local file included (set true for OpenAI weights saved to a file). Not
    stored in the weights, and a wrong one raises no error: it silently shifts every frozen block's output."""
    trainable_blocks: int = 1
    """How many of the last ViT blocks are trained (the paper: all frozen but the last). 0 freezes all;
    all of them (= vision.layers) trains the whole tower, patch embedding included."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "head_width"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"vision.{name}", f"must be positive or null, got {v}")
        _check(self.quick_gelu in (None, True, False), "vision.quick_gelu",
               f"must be true, false or null (auto), got {self.quick_gelu!r}")
        _check(self.trainable_blocks >= 0, "vision.trainable_blocks", "must be >= 0")
        if self.layers is not None:
            _check(self.trainable_blocks <= self.layers, "vision.trainable_blocks",
                   f"must be <= vision.layers={self.layers}")
        if self.width is not None and self.head_width is not None:
            _check(self.width % self.head_width == 0, "vision.head_width", "must divide vision.width")

    def resolved(self) -> dict[str, Any]:
        """The open_clip vision_cfg dict: the architecture's JSON with this config's overrides. Read from
        open_clip's shipped model configs without importing open_clip (so without torch)."""
        cfg = dict(open_clip_architecture(self.model_name)["vision_cfg"])
        for name in ("image_size", "patch_size", "width", "layers", "head_width"):
            if getattr(self, name) is not None:
                cfg[name] = getattr(self, name)
        return cfg

    # Derived values: resolved here, once, so that training, evaluation and generation agree (the data
    # pipeline resizes images to `input_size`; the model checks that it is given that size).

    def _side(self, name: str) -> int:
        """`image_size` or `patch_size` of the resolved architecture as one side (open_clip allows pairs)."""
        value = self.resolved()[name]
        if isinstance(value, (list, tuple)):
            _check(value[0] == value[1], f"vision.{name}", f"only square sizes are supported, got {value}")
            value = value[0]
        return int(value)

    @property
    def input_size(self) -> int:
        """Pixels per side of the images the tower reads (`image_size`, or the architecture's)."""
        return self._side("image_size")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.input_size // self._side("patch_size")

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (the class token not counted): 256 for ViT-L/14 at 224 px."""
        return self.grid**2

    @property
    def feature_width(self) -> int:
        """Width of the patch tokens (the resampler's width): 1024 for ViT-L/14."""
        return int(self.resolved()["width"])

    def forward_flops(self, blocks: int | None = None) -> float:
        """Forward FLOPs of the tower for one image (`blocks` of its blocks, default all):
        `kosmos.config.flops`."""
        return flops.vision_forward_flops(self, blocks)


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
            _check(getattr(self, name) > 0, f"connector.{name}",
                   f"must be positive, got {getattr(self, name)}")


@dataclass
class TokenizerConfig:
    """Where the SentencePiece tokenizer lives (built with `python -m kosmos.tokenizer.build`)."""

    path: str | None = field(default=None, metadata=FIXED | PATH)
    """Directory holding tokenizer.model and tokenizer_config.json."""


SOURCES = KINDS
"""The sources of the first spelling, `data.text`, `data.captions` and `data.interleaved`: each is named after
its kind. Any other goes under `data.sources.<name>` (DataConfig.named_sources() lists them all)."""

SOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
"""A source name: it appears in config keys, tracker metrics (`train/<name>_loss`), the data state of a
checkpoint and `python -m kosmos.eval loss --shards NAME=PATTERN`."""


@dataclass
class SourceConfig:
    """One training source: its kind, its shards and its share of each optimizer step."""

    kind: str = field(default="", metadata=FIXED)
    """How its samples are read: `text` (`KEY.txt` documents), `captions` (an image and its caption(s)) or
    `interleaved` (`KEY.json` segments + images). Required under `data.sources.<name>`; `data.text`,
    `data.captions` and `data.interleaved` are of their own kind (left empty, it is filled in)."""
    shards: list[str] = field(default_factory=list, metadata=FIXED | PATH)
    """Training shards: files, directories of `*.tar`, globs, or brace patterns (`cap-{000000..000099}.tar`);
    local, URLs (`https://`, `s3://`, ...) or `pipe:COMMAND` (kosmos/data/remote.py)."""
    eval_shards: list[str] = field(default_factory=list, metadata=PATH)
    """Held-out shards for periodic evaluation (same forms as `shards`)."""
    tokens_per_step: int = field(default=0, metadata=FIXED)
    """Token budget of this source per optimizer step, all ranks together (0 leaves the source out)."""
    micro_batch_size: int = field(default=8, metadata=FIXED)
    """Packed rows per forward pass."""
    workers: int = 2
    """DataLoader worker processes for this source, per rank."""
    shuffle_buffer: int = field(default=1000, metadata=FIXED)
    """Samples held by each worker's shuffle buffer (0: no shuffling beyond the shard order)."""
    max_tokens: int = field(default=0, metadata=FIXED)
    """A sample longer than this many tokens (`<s>`, text and image spans) is cut there, never inside an
    image span; its tail is dropped and counted (`train/truncated/<source>`). 0: no cap. Default 512 for
    captions (a 1 MB caption would otherwise fill thousands of rows), none for text and interleaved documents
    (the paper packs long documents over several rows)."""
    loss: str = field(default="all", metadata=FIXED)
    """Text sources: what the loss of an instruction sample (from `python -m kosmos.data_tools.text --format
    instructions`, whose shards mark the prompt) covers: `all`, the whole templated text (as the paper trains
    it), or `response`, the response only (labels -100 over `<s>` and the prompt). Plain text is
    unaffected."""
    max_epochs: int = 0
    """Warn once, in the log, when a logical stream of this source starts its pass number max_epochs + 1
    (the source repeated more than max_epochs times; the epoch each source is in shows in the log line as
    `e0`, `e1`, ...). Only a warning: the run goes on. 0: never warn."""
    caption_choice: str = field(default="random", metadata=FIXED)
    """Caption sources whose samples carry several captions (COCO's five; a `captions` list in `KEY.json`):
    `random`, one caption per visit drawn from (seed, epoch, sample), so every caption is used over the
    epochs while an epoch still shows each image once (the same images and epoch length as with one caption;
    resumes exactly); `all`, each caption a sample of its own (an image with 5 captions is seen 5 times per
    epoch); `first`, `KEY.txt` only."""

    @staticmethod
    def kind_defaults(given: dict[str, Any]) -> dict[str, Any]:
        """The defaults of a `data.sources.<name>` entry that depend on its kind (`given`, the entry as
        written): captions are capped at 512 tokens, like `data.captions`. The config's own values for the
        kind come first (`DataConfig.fill_defaults`)."""
        return {"max_tokens": 512} if given.get("kind") == "captions" else {}


INHERITED_KEYS = ("micro_batch_size", "workers", "shuffle_buffer", "max_tokens", "loss", "max_epochs",
                  "caption_choice")
"""The keys of a source that a `data.sources.<name>` entry takes from the config's first source of its kind
when it does not give them (`DataConfig.fill_defaults`): how its samples are read and batched. Not its
shards, held-out shards or budget (a new source must not read another's shards, nor take a share of the step
unless given one)."""


def takes_part(src: SourceConfig | dict[str, Any]) -> bool:
    """Whether a source takes part in a run (a SourceConfig, or one saved as a dict): it has shards and a
    positive token budget."""
    get = src.get if isinstance(src, dict) else (lambda k, d=None: getattr(src, k, d))
    return bool(get("shards")) and (get("tokens_per_step", 0) or 0) > 0


@dataclass
class DataConfig:
    """The sources, mixed by token budget per step (the paper: 0.5M text, 0.5M image-caption, 0.2M interleaved
    tokens of each 1.2M-token batch). `text`, `captions` and `interleaved` are three sources named after their
    kind; `sources` adds any number of others by name. A source takes part when it has shards and a
    positive budget."""

    text: SourceConfig = field(default_factory=lambda: SourceConfig(tokens_per_step=500_000))
    """Text corpora: shards of `KEY.txt` documents."""
    captions: SourceConfig = field(
        default_factory=lambda: SourceConfig(tokens_per_step=500_000, max_tokens=512))
    """Image-caption pairs: img2dataset-style `KEY.jpg` + `KEY.txt`."""
    interleaved: SourceConfig = field(default_factory=lambda: SourceConfig(tokens_per_step=200_000))
    """Interleaved image-text documents: `KEY.json` segments + `KEY.imgN.jpg`."""
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """More sources by name, each with its `kind` and the keys of a source (`data.sources.instructions.kind:
    text`, `...shards`, `...tokens_per_step`, ...): two text sources with budgets of their own, say. The
    budget defaults to 0 (left out). The other keys it does not give (`micro_batch_size`, `workers`,
    `shuffle_buffer`, `max_tokens`, `loss`, `max_epochs`, `caption_choice`) default to the values the config
    gives the first source of the same kind: `data.<kind>` when the config sets any of its keys, else the
    first `data.sources` entry of that kind (so a source added on the command line to a file reads like the
    file's); with none, to the field defaults (`max_tokens` 512 for captions). They come after
    data.text/captions/interleaved in the plan, in the order given; a name must not be one of those three
    (configure them there). Each reads its shards in an order seeded by (seed, name)
    (`kosmos.data.mixture.source_seed`): two sources given the same shards do not read them in step."""
    mixture_tolerance: float = field(default=0.05, metadata=FIXED)
    """How far (relative) the step's total tokens or a source's share of them may be from the budgets once
    rounded to whole micro-batches (kosmos/data/mixture.py); beyond it the run is refused."""
    allow_mixture_drift: bool = False
    """Run anyway when the mixture is beyond `mixture_tolerance` (the effective numbers are still printed)."""
    allow_missing_shards: bool = False
    """Train on the shards that exist when a brace pattern in `shards` or `eval_shards` names some that do not
    (`cap-{000000..000099}.tar` with a few missing); the run then warns with their count at start. False: the
    run is refused, naming them."""
    read_timeout: float = 60.0
    """Remote shards (URLs, `pipe:COMMAND`; see kosmos/data/remote.py): seconds a read may wait for a byte
    before it fails; a failed read is retried (`read_retries`), then the shard is skipped and counted."""
    read_retries: int = 3
    """Retries of a remote shard's failed read, after 1, 2, 4, ... seconds, resuming where it stopped."""
    read_give_up: float = 600.0
    """Stop the run (exit 2, naming the last failure) when a worker's shard reads have kept failing, one
    after the other, for this many seconds without a sample: the storage is down, not one shard."""
    read_min_speed: float = 10_000.0
    """Remote shards: bytes per second a read must average over each `read_timeout` seconds; a slower one (a
    server that trickles a byte at a time never waits `read_timeout` for a single byte) fails like a timeout,
    is retried, then skipped and counted. 0: no floor."""

    @staticmethod
    def fill_defaults(data: dict[str, Any]) -> dict[str, Any]:
        """The `data` section as written (a nested dict), with each `data.sources.<name>` entry's missing
        INHERITED_KEYS taken from the first source of its kind that the section gives: `data.<kind>` when
        it sets any key, else the first `data.sources` entry of that kind (see the `sources` field). A new
        dict; `data` is left as it is."""
        entries = data.get("sources")
        if not isinstance(entries, dict):
            return data
        first: dict[str, dict[str, Any]] = {k: data[k] for k in SOURCES if isinstance(data.get(k), dict)
                                            and data[k]}
        filled = {}
        for name, entry in entries.items():
            kind = entry.get("kind") if isinstance(entry, dict) else None
            like = first.get(kind) if isinstance(kind, str) else None
            if like is None:
                if isinstance(kind, str) and kind in KINDS:
                    first[kind] = entry
                filled[name] = entry
                continue
            filled[name] = {**{k: like[k] for k in INHERITED_KEYS if k in like}, **entry}
        return {**data, "sources": filled}

    def __post_init__(self) -> None:
        _check(self.read_timeout > 0, "data.read_timeout", f"must be positive, got {self.read_timeout}")
        _check(self.read_retries >= 0, "data.read_retries", f"must be >= 0, got {self.read_retries}")
        _check(self.read_give_up > 0, "data.read_give_up", f"must be positive, got {self.read_give_up}")
        _check(self.read_min_speed >= 0, "data.read_min_speed", f"must be >= 0, got {self.read_min_speed}")
        for name in SOURCES:
            src = getattr(self, name)
            _check(src.kind in ("", name), f"data.{name}.kind",
                   f"data.{name} is the {name} source, got {src.kind!r} (put a source of another kind under "
                   f"data.sources.<name>)")
            src.kind = name
        for name, src in self.sources.items():
            key = f"data.sources.{name}"
            _check(name not in SOURCES, key, f"'{name}' is the name of data.{name}: configure that source "
                   f"there, or give this one another name")
            _check(isinstance(name, str) and SOURCE_NAME.fullmatch(name) is not None, key,
                   "a source name is a letter, then letters, digits, '_' or '-'")
            _check(src.kind in KINDS, f"{key}.kind",
                   f"must be one of {', '.join(KINDS)}, got {src.kind!r}" if src.kind else
                   f"is required: one of {', '.join(KINDS)}")
        for name, src in self.named_sources().items():
            key = self.key(name)
            _check(src.tokens_per_step >= 0, f"{key}.tokens_per_step", "must be >= 0")
            _check(src.micro_batch_size > 0, f"{key}.micro_batch_size", "must be positive")
            _check(src.workers >= 0, f"{key}.workers", "must be >= 0")
            _check(src.shuffle_buffer >= 0, f"{key}.shuffle_buffer", "must be >= 0")
            _check(src.max_tokens >= 0, f"{key}.max_tokens", "must be >= 0 (0: no cap)")
            _check(src.max_epochs >= 0, f"{key}.max_epochs", "must be >= 0 (0: never warn)")
            _check(src.loss in LOSSES, f"{key}.loss",
                   f"must be one of {', '.join(LOSSES)}, got {src.loss!r}")
            _check(src.caption_choice in CAPTION_CHOICES, f"{key}.caption_choice",
                   f"must be one of {', '.join(CAPTION_CHOICES)}, got {src.caption_choice!r}")
        _check(0 <= self.mixture_tolerance < 1, "data.mixture_tolerance",
               f"must be in [0, 1), got {self.mixture_tolerance}")

    # The one way to go over the sources: everything that iterates over them by name (the mixture, the
    # loaders, evaluation, the checks) goes through these.

    def named_sources(self) -> dict[str, SourceConfig]:
        """Every configured source by name, taking part or not: data.text, data.captions, data.interleaved,
        then data.sources in the order given."""
        return {**{name: getattr(self, name) for name in SOURCES}, **self.sources}

    def active_sources(self) -> dict[str, SourceConfig]:
        """The sources that take part: with shards and a positive budget, in named_sources() order."""
        return {name: src for name, src in self.named_sources().items() if takes_part(src)}

    @staticmethod
    def active_keys(data: dict[str, Any]) -> list[str]:
        """`active_sources`' keys (`data.text`, `data.sources.<name>`) of a `data` section saved as a nested
        dict (a checkpoint's config, which this code may not be able to build: only the two keys are read)."""
        named = {**{n: data.get(n) for n in SOURCES}, **(data.get("sources") or {})}
        return [DataConfig.key(n) for n, src in named.items() if isinstance(src, dict) and takes_part(src)]

    def source(self, name: str) -> SourceConfig:
        """The source called `name`; a ConfigError listing the names when there is none."""
        named = self.named_sources()
        if name not in named:
            raise ConfigError(f"no data source named {name!r}; the config has {', '.join(named)}")
        return named[name]

    @staticmethod
    def key(name: str) -> str:
        """The config key of source `name`: `data.text` for the three of the first spelling, else
        `data.sources.<name>`."""
        return f"data.{name}" if name in SOURCES else f"data.sources.{name}"


@dataclass
class OptimConfig:
    """AdamW (8-bit, bitsandbytes) and the paper's schedule: linear warmup, then linear decay to zero."""

    name: str = "adamw8bit"
    """`adamw8bit` (bitsandbytes AdamW8bit, the paper's), `adamw8bit_torchao` (torchao's AdamW8bit, the same
    8-bit AdamW for FSDP2's sharded parameters, which bitsandbytes cannot step) or `adamw` (torch, fp32
    states)."""
    lr: float = 2e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """Adam betas."""
    eps: float = 1e-6
    """Adam epsilon."""
    weight_decay: float = 0.01
    """Weight decay on the weights of linear maps only; never on norms, biases, embeddings or learned
    tokens and positions (`kosmos.optim.param_groups`)."""
    warmup_steps: int = 375
    """Linear warmup from 0 to `lr`."""
    total_steps: int = 300_000
    """The learning rate reaches 0 here (linear decay after the warmup)."""
    grad_clip: float = 2.0
    """Clip the global gradient norm to this (0: no clipping)."""
    vision_lr_scale: float = 1.0
    """The CLIP tower's trainable parameters learn at `lr` times this (warmed up and decayed alike); the
    resampler, the projection and the decoder at `lr`. 1 in the paper (its tower is pretrained and trains
    only its last block); the toy demo trains a random tower from scratch at 3x (scripts/demo.py)."""

    def __post_init__(self) -> None:
        _check(self.name in ("adamw8bit", "adamw8bit_torchao", "adamw"), "optim.name",
               f"must be adamw8bit, adamw8bit_torchao or adamw, got {self.name!r}")
        _check(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               f"must be two numbers in [0, 1), got {self.betas}")
        _check(self.eps > 0, "optim.eps", "must be positive")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.total_steps > self.warmup_steps, "optim.total_steps",
               f"must exceed optim.warmup_steps={self.warmup_steps}, got {self.total_steps}")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        _check(self.vision_lr_scale > 0, "optim.vision_lr_scale",
               f"must be positive, got {self.vision_lr_scale}")


EVAL_TASK_NAMES = ("coco_captioning", "flickr30k_captioning", "captioning", "vqav2", "okvqa", "vizwiz", "vqa",
                   "imagenet", "classification", "choice", "labels", "storycloze", "hellaswag", "winograd",
                   "winogrande", "piqa", "boolq", "cb", "copa", "rendered_sst2", "hatefulmemes", "cub",
                   "relativesize", "memorycolor", "colorterms", "websrc")
"""The benchmark tasks, as `kosmos.eval.tasks.TASKS` names them (it checks that they agree): here so that a
config is checked without importing the evaluation."""
EVAL_TASK_SETTINGS = ("kind", "prompt", "demo", "separator", "num_beams", "max_new_tokens", "length_penalty",
                      "stop", "mode", "answer", "top_k", "batch_size", "metrics", "vqa_rules", "format",
                      "description")
"""The task settings an entry may change: the fields of `kosmos.eval.tasks.TaskSpec` (it checks that they
agree)."""
VQA_RULES = ("vqa2017", "vqa2021", "lmms-eval", "vizwiz")
"""The VQA accuracy conventions (`kosmos.eval.vqa_metrics`, which takes them from here)."""
_EVAL_TASK_STRINGS = ("data", "annotations", "images", "split", "classnames", "support",
                      "support_annotations")


@dataclass
class EvalTaskConfig:
    """One `train.eval_tasks` entry, checked and typed (`from_dict`): the options of `python -m kosmos.eval
    run` and the task settings it changes (`kosmos.eval.tasks.TaskSpec`)."""

    task: str
    """A task of `kosmos.eval.tasks.TASKS` (EVAL_TASK_NAMES)."""
    data: str = field(metadata=PATH)
    """As `--data`: the benchmark's file, a folder, shards or a JSONL."""
    annotations: str | None = field(default=None, metadata=PATH)
    """vqa: the annotations JSON (answers); without it, predictions only."""
    images: str | None = field(default=None, metadata=PATH)
    """The image root (default: the folder of `data`)."""
    split: str = "test"
    """The Karpathy split evaluated."""
    classnames: str | None = field(default=None, metadata=PATH)
    """classification: class names, one per line or a JSON list."""
    shots: int = 0
    """Demonstrations before each query (one number)."""
    support: str | None = field(default=None, metadata=PATH)
    """The few-shot support set, in the format of `data` (default: as `python -m kosmos.eval run`)."""
    support_annotations: str | None = field(default=None, metadata=PATH)
    """vqa: the support set's annotations."""
    retrieval: bool = False
    """Few-shot: the most similar support images (RICES) instead of random ones."""
    seed: int = 0
    """Seed of the random demonstrations."""
    limit: int = 200
    """Items evaluated at most (the first ones)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Task settings by name (`num_beams`, `prompt`, ...): the entry's other keys."""

    @classmethod
    def from_dict(cls, entry: Any, key: str = "train.eval_tasks[0]") -> EvalTaskConfig:
        """The entry as a config; a ConfigError naming `key` (and the option) for an unknown task, option
        or setting, or a value of the wrong kind."""
        _check(isinstance(entry, dict), key, f"must be a mapping with task and data, got {entry!r}")
        _check("task" in entry and "data" in entry, key, f"needs task and data, got {sorted(entry)}")
        _check(entry["task"] in EVAL_TASK_NAMES, f"{key}.task",
               f"unknown task {entry['task']!r}; tasks: {', '.join(EVAL_TASK_NAMES)}")
        unknown = sorted(set(entry) - set(EVAL_TASK_OPTIONS) - set(EVAL_TASK_SETTINGS))
        settings = ", ".join(sorted(EVAL_TASK_SETTINGS))
        _check(not unknown, key, f"unknown option(s) {', '.join(unknown)}; options: "
               f"{', '.join(EVAL_TASK_OPTIONS)} and the task settings {settings}")
        _check(isinstance(entry.get("shots", 0), int) and entry.get("shots", 0) >= 0, f"{key}.shots",
               "must be one number >= 0")
        limit = entry.get("limit", 1)
        _check(isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1, f"{key}.limit",
               f"must be a number of items >= 1, got {limit!r}")
        _check(entry.get("vqa_rules", VQA_RULES[0]) in VQA_RULES, f"{key}.vqa_rules",
               f"must be one of {' | '.join(VQA_RULES)}, got {_short(entry.get('vqa_rules'))}")
        for name, value in entry.items():  # values too: a nested one may be an alias bomb, expanded on save
            flat = value if isinstance(value, list) else [value]
            _check(all(v is None or isinstance(v, str | int | float | bool) for v in flat), f"{key}.{name}",
                   f"must be a number, a string or a list of them, got {_short(value)}")
        for name in _EVAL_TASK_STRINGS:
            value = entry.get(name)
            _check(value is None and name != "data" or isinstance(value, str), f"{key}.{name}",
                   f"must be a string, got {_short(value)}")
        _check(isinstance(entry.get("retrieval", False), bool), f"{key}.retrieval",
               f"must be true or false, got {_short(entry.get('retrieval'))}")
        _check(isinstance(entry.get("seed", 0), int), f"{key}.seed", f"must be a whole number, got "
               f"{_short(entry.get('seed'))}")
        options = {k: v for k, v in entry.items() if k in EVAL_TASK_OPTIONS and v is not None}
        return cls(**options, settings={k: v for k, v in entry.items() if k not in EVAL_TASK_OPTIONS})


EVAL_TASK_OPTIONS = tuple(f.name for f in dataclasses.fields(EvalTaskConfig) if f.name != "settings")
"""The keys of a `train.eval_tasks` entry that are options of the run (`EvalTaskConfig`'s fields); the
others are task settings."""


def _check_eval_task(task: Any, key: str) -> None:
    """One `train.eval_tasks` entry: a known task, its data, known options and task settings."""
    EvalTaskConfig.from_dict(task, key)


def _short(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, for a message (the value may be huge)."""
    r = reprlib.Repr()  # Python 3.11: no keyword arguments
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring = 2, 4, 4, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class TrainConfig:
    """The training run: precision, logging, evaluation, checkpoints."""

    output_dir: str = field(default="runs/kosmos", metadata=PATH)
    """Checkpoints (`checkpoints/step_XXXXXXXX/`), logs and the resolved config go here."""
    max_steps: int | None = None
    """Optimizer steps to run (null: optim.total_steps)."""
    mixed_precision: str = "auto"
    """`auto` (bf16 where the device supports it, else fp32), `bf16`, `fp16` or `no`."""
    log_every: int = 10
    """Steps between log lines (and tracker points); a checkpoint written between them gets a line too, so
    that the cumulative figures it saves count every step before it."""
    eval_every: int = 1000
    """Steps between evaluations on data.*.eval_shards (0: never)."""
    eval_batches: int = 20
    """Micro-batches per source per evaluation, per rank (at most; a pass ends sooner if the shards do, and
    on several processes where any rank's share does: all ranks run the same number)."""
    eval_tasks: list[dict] = field(default_factory=list, metadata={"entries": EvalTaskConfig})
    """Benchmarks run every eval_every steps beside the held-out loss, their metrics logged to the tracker
    as `eval/TASK/METRIC`: a list of `{task, data, ...}` with the options of `python -m kosmos.eval run`
    (`annotations`, `images`, `split`, `classnames`, `shots` (one number), `support`, `retrieval`, `seed`)
    and any task setting (`num_beams`, `max_new_tokens`, `prompt`, ...); `limit` caps the items (default
    200). Predictions go to train.output_dir/eval/step_XXXXXXXX/."""
    save_every: int = 1000
    """Steps between checkpoints (one is always written at the end and on SIGTERM/Ctrl-C)."""
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted)."""
    tracker: str = "tensorboard"
    """`tensorboard`, `wandb` or `none`."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for the MFU figure (null: known GPUs are detected; otherwise no MFU)."""
    loss_weighting: str = "tokens"
    """The step's objective. `tokens`: the sum of the token losses of all micro-batches of all ranks divided
    by the step's loss tokens, so every target token weighs the same (fairseq's). `budget`: the older
    objective, the sum of per-source mean losses weighted by the budget shares (a caption token, with image
    slots carrying no loss, then weighs about 1/0.21 = 4.8 times a text token); the logged `loss` stays the
    token mean, so with `budget` it is not the objective optimised."""
    sharding: str = "none"
    """`none` or `fsdp2`: shard parameters, gradients and optimizer state over the processes with FSDP2
    (kosmos.sharding) under a launch that accelerate does not shard itself (CPU, or `--multi_gpu`).
    accelerate's FSDP config (configs/accelerate/fsdp.yaml) shards with the same function whatever this is."""
    max_bad_steps: int = 5
    """Stop when this many steps in a row have a NaN/inf loss or gradient (each is skipped and counted)."""
    init_from: str | None = field(default=None, metadata=PATH)
    """A checkpoint directory (or its model.safetensors) whose model weights start a new run, with a fresh
    optimizer, schedule and data position: for fine-tuning (a resume may change the number of processes:
    kosmos.data.stream). Weights only, never unpickled. `--resume` wins when train.output_dir
    has a checkpoint to resume, so a killed fine-tuning run continues instead of starting over."""
    collective_timeout: float = 600.0
    """Seconds one rank may wait, in the training loop, on a micro-batch of a source (`data.<source>`), the
    gradient sync, the stop-flag and log-window reduces, the held-out loss reduces of an evaluation, or a
    checkpoint save (its barriers, rank 0's writing included), before the run ends: the rank writes `rank R:
    no progress for T s at step S waiting on WHAT` and the stacks of all its threads to train.log (rank R > 0:
    train.log.rankR) and stderr, kills its DataLoader workers and exits with status 3 (kosmos.watchdog).
    Not watched: setup, the first step's forward and backward (torch.compile), benchmark tasks
    (train.eval_tasks); there the process group's timeout, max(collective_timeout + 60, 300) seconds, ends a
    hung collective. The default leaves room for a slow checkpoint save of a big model; raise it if saves or
    shard reads take longer."""
    ddp_fixed_reduction_order: bool = False
    """DDP only: all-reduce the gradients as one bucket laid out in a fixed parameter order
    (kosmos.distributed.fixed_order_allreduce), so that a resume on the same number of processes gives
    bit-identical weights on 3 or more processes too. By default DDP re-buckets the gradients after a
    process's first step, which moves them within the ring all-reduce and changes the order in which 3+ ranks'
    values are summed: a resumed run's first step then differs from the uninterrupted run's in the last bits
    (same data, same losses). Costs the overlap of the gradient all-reduce with the backward (one all-reduce
    after it) and a copy of the gradients per step: for reproducibility checks, not for speed. FSDP2's
    reductions have a fixed layout already; 1 and 2 processes are bit-identical either way."""

    def __post_init__(self) -> None:
        _check(self.max_steps is None or self.max_steps > 0, "train.max_steps", "must be positive or null")
        _check(self.mixed_precision in ("auto", "bf16", "fp16", "no"), "train.mixed_precision",
               f"must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")
        for name in ("log_every", "save_every", "keep_last", "max_bad_steps", "eval_batches"):
            _check(getattr(self, name) > 0, f"train.{name}", f"must be positive, got {getattr(self, name)}")
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(self.collective_timeout > 0, "train.collective_timeout",
               f"must be positive (seconds), got {self.collective_timeout}")
        _check(self.tracker in ("tensorboard", "wandb", "none"), "train.tracker",
               f"must be tensorboard, wandb or none, got {self.tracker!r}")
        _check(self.sharding in ("none", "fsdp2"), "train.sharding",
               f"must be none or fsdp2, got {self.sharding!r}")
        _check(self.loss_weighting in ("tokens", "budget"), "train.loss_weighting",
               f"must be tokens or budget, got {self.loss_weighting!r}")
        for i, task in enumerate(self.eval_tasks):
            _check_eval_task(task, f"train.eval_tasks[{i}]")


def is_fixed_on_resume(key: str) -> bool:
    """Whether the dotted config `key` must keep the checkpoint's value on resume (its field carries `FIXED`
    metadata): the seed, `decoder.max_len`, `tokenizer.path` and the data keys that change the data order or
    shapes (`data.<source>.shards`, `micro_batch_size`, ...; not `workers`, `eval_shards`, `max_epochs`, the
    `allow_*` switches or how remote shards are read). `data.sources.<name>.KEY` is a source's KEY."""
    cls: Any = Config
    parts = key.split(".")
    i = 0
    while i < len(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        f = fields.get(parts[i])
        if f is None:
            return False
        if f.metadata.get("fixed_on_resume"):
            return i == len(parts) - 1 or not dataclasses.is_dataclass(_field_type(cls, f.name))
        tp = _field_type(cls, f.name)
        if typing.get_origin(tp) is dict:  # data.sources.<name>
            tp, i = typing.get_args(tp)[1], i + 1
        cls, i = tp, i + 1
    return False


def fixed_on_resume_keys() -> list[str]:
    """The keys `is_fixed_on_resume` accepts, for help texts and docs (`<source>`: any source's name)."""
    out = []

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            tp = _field_type(cls, f.name)
            if f.metadata.get("fixed_on_resume"):
                out.append(prefix + f.name)
            elif dataclasses.is_dataclass(tp) and tp is not SourceConfig:
                walk(tp, f"{prefix}{f.name}.")
    walk(Config, "")
    out += [f"data.<source>.{f.name}" for f in dataclasses.fields(SourceConfig)
            if f.metadata.get("fixed_on_resume")]
    return out


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict (a config's `to_dict()`, a saved one) as flat `section.key` entries."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Config:
    """The whole run. Sections are added here as the project grows (data, optim, train)."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = field(default=0, metadata=FIXED)
    """Random seed for initialisation and data order: 0 .. 2**32 - 1 (numpy's range)."""

    def __post_init__(self) -> None:
        _check(0 <= self.seed <= MAX_SEED, "seed",
               f"must be in 0 .. {MAX_SEED} (2**32 - 1, numpy's seed range), got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, overrides: list[str] | None = None) -> Config:
        """The config a checkpoint directory was trained with: its `config.yaml` (or, in checkpoints from
        before that file existed, the copy in `trainer_state.json`), with the tokenizer path pointed at the
        checkpoint's own copy of the tokenizer when it has one. Keys the saved config predates take the
        behaviour the checkpoint was trained with, not today's default (`kosmos.config.migrations`)."""
        from kosmos.config.loading import config_from_checkpoint  # here: loading imports this module

        return config_from_checkpoint(ckpt, overrides)

    def given(self, key: str) -> bool:
        """Whether the dotted `key` was set by the YAML file or an override (not a default). A config built
        in code, not by load_config, counts every key as given."""
        keys = getattr(self, "_given", None)
        return keys is None or any(key == k or key.startswith(k + ".") for k in keys)

    def flops_per_token(self) -> float:
        """Training FLOPs per decoder token (forward + backward), see `DecoderConfig.flops_per_token`."""
        return self.decoder.flops_per_token()

    def flops_per_image(self) -> float:
        """Training FLOPs per image (tower, resampler and projection): `kosmos.config.flops`."""
        return flops.flops_per_image(self)
