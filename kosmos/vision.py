"""The image encoder: CLIP ViT-L/14 (open_clip) returning its patch tokens, frozen but for its last block.

KOSMOS-1 (Sec. 2.2, 3.1) encodes each image with a pretrained CLIP ViT-L/14 at 224 px and keeps every
CLIP parameter frozen except the last layer. We return the 256 patch tokens (after `ln_post`, before the
contrastive projection), which the Perceiver resampler pools to 64 latents. OpenAI's CLIP weights were
trained with QuickGELU: `resolve_quick_gelu` picks the activation, which the weights do not record.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from kosmos.config import VisionConfig
from kosmos.config.paths import names_weights_file
from kosmos.image import CLIP_MEAN, CLIP_STD


def is_local_weights(spec: str) -> bool:
    """Whether `vision.pretrained` names a file (rather than an open_clip tag): by its form
    (`kosmos.config.paths.names_weights_file`), or a file of that name here."""
    return names_weights_file(spec) or Path(spec).exists()


def resolve_quick_gelu(cfg: VisionConfig) -> bool:
    """Whether the tower uses QuickGELU (x * sigmoid(1.702 x), OpenAI CLIP's activation) instead of GELU.

    The activation is not stored in the weights, and loading OpenAI's weights into a GELU tower raises no
    error: every block silently computes something else. So: `vision.quick_gelu` when set; else true when
    the architecture says so (open_clip's `-quickgelu` model names) or when open_clip's pretrained config
    of the tag does (`openai` and the other QuickGELU-trained tags); else false, which is also what a local
    weights file gets, since nothing in a state dict tells (OpenAI weights need `vision.quick_gelu=true`)."""
    if cfg.quick_gelu is not None:
        return cfg.quick_gelu
    from kosmos.config import open_clip_architecture

    if open_clip_architecture(cfg.model_name).get("quick_gelu", False):
        return True
    if cfg.pretrained and not is_local_weights(cfg.pretrained):
        from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

        tag_cfg = get_pretrained_cfg(cfg.model_name, cfg.pretrained)
        if not tag_cfg:
            tags = list_pretrained_tags_by_model(cfg.model_name)
            raise ValueError(f"vision.pretrained={cfg.pretrained!r} is neither an existing file nor an "
                             f"open_clip tag of {cfg.model_name} (its tags: {tags})")
        return bool(tag_cfg.get("quick_gelu", False))
    return False


class VisionEncoder(nn.Module):
    """open_clip VisionTransformer -> patch tokens (N, num_patches, width)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from open_clip.model import _build_vision_tower

        from kosmos.config import open_clip_architecture

        self.cfg = cfg
        # The activation is not in the weights: resolved from the config and the tag, so a model rebuilt from
        # a checkpoint runs the activation it trained with. The tower starts randomly initialised: CLIP's
        # weights are loaded by `kosmos.weights.load_clip_weights` (training's fresh start), a checkpoint's by
        # `kosmos.weights.load_model_weights`; building the model never reads a file or the network.
        self.quick_gelu = resolve_quick_gelu(cfg)
        arch = open_clip_architecture(cfg.model_name)
        visual = _build_vision_tower(arch["embed_dim"], cfg.resolved(), quick_gelu=self.quick_gelu)
        # We use the patch tokens, not the pooled contrastive embedding: drop the unused projection so
        # that every trainable parameter receives a gradient (DDP requires it).
        visual.proj = None
        visual.output_tokens = True
        self.visual = visual
        self.width = visual.ln_post.normalized_shape[0]
        grid = visual.grid_size
        self.num_patches = grid[0] * grid[1]
        self.image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
        resolved = (cfg.input_size, cfg.num_patches, cfg.feature_width)
        if (self.image_size, self.num_patches, self.width) != resolved:
            raise ValueError(  # the data pipeline sizes images by the config: both must agree
                f"the {cfg.model_name} tower reads {self.image_size} px, {self.num_patches} patches of width "
                f"{self.width}, but the config resolves to {cfg.input_size} px, {cfg.num_patches} x "
                f"{cfg.feature_width}")
        # Pixels come in as uint8; the model normalises them with the statistics the tower was trained with
        # (CLIP's; `load_clip_weights` sets those of an open_clip tag). Plain floats, not buffers: nothing to
        # save, and a model cast to bf16 still normalises in fp32.
        self.pixel_mean = tuple(float(m) for m in (getattr(visual, "image_mean", None) or CLIP_MEAN))
        self.pixel_std = tuple(float(s) for s in (getattr(visual, "image_std", None) or CLIP_STD))
        self.freeze(cfg.trainable_blocks)

    def freeze(self, trainable_blocks: int) -> None:
        """Freeze everything but the last `trainable_blocks` transformer blocks and the final norm; with
        every block trainable, nothing is frozen (a tower trained from scratch)."""
        blocks = self.visual.transformer.resblocks
        self.n_frozen_blocks = max(0, len(blocks) - trainable_blocks)
        self.embeds_trainable = trainable_blocks >= len(blocks)
        self.visual.requires_grad_(self.embeds_trainable)
        if 0 < trainable_blocks < len(blocks):
            blocks[self.n_frozen_blocks:].requires_grad_(True)
            self.visual.ln_post.requires_grad_(True)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (N, 3, S, S) -> float, scaled to [0, 1] and normalised with the tower's mean/std."""
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 pixels (N, 3, {self.image_size}, {self.image_size}); got "
                            f"{images.dtype} (the model normalises them itself)")
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"images must be (N, 3, {self.image_size}, {self.image_size}), got "
                             f"{tuple(images.shape)}; resize with kosmos.image.clip_resize_crop")
        mean = _channel_constants(self.pixel_mean, images.device)
        std = _channel_constants(self.pixel_std, images.device)
        x = (images.float() / 255.0 - mean) / std  # fp32, then the tower's dtype
        # Batches from the data loader are channels last in memory (kosmos.data.packing.collate): the tower
        # gets the usual layout whatever it was given.
        return x.to(self.pixel_dtype).contiguous()

    @property
    def pixel_dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: uint8 pixels (N, 3, S, S) -> patch tokens (N, num_patches, width)."""
        images = self.normalize(images)
        v = self.visual
        blocks = v.transformer.resblocks
        # The frozen part needs no activations kept for backward: run it without autograd.
        with contextlib.nullcontext() if self.embeds_trainable else torch.no_grad():
            x = v._embeds(images)  # (N, 1 + P, W), class token first
            for blk in blocks[: self.n_frozen_blocks]:
                x = blk(x)
        for blk in blocks[self.n_frozen_blocks:]:
            x = blk(x)
        _, tokens = v._pool(x)  # ln_post, then drop the class token -> (N, P, W)
        return tokens


def _channel_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(1, C, 1, 1) fp32 of `values`, made on `device` by fills: `torch.tensor(values, device=cuda)` copies
    from the host, and that copy waits for the GPU's queue of kernels in every forward with images (found by
    tests/test_cuda_paths.py)."""
    t = torch.empty(1, len(values), 1, 1, device=device)
    for i, v in enumerate(values):
        t[:, i].fill_(v)
    return t

