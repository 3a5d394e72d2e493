"""FLOP and parameter counts computed from a config's shapes (no model built, no torch), for the MFU figure
(`kosmos.metrics`) and the benchmarks. The config dataclasses delegate to these
(`DecoderConfig.flops_per_token`, `VisionConfig.forward_flops`, `Config.flops_per_image`, ...), so callers
ask the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: schema imports this module
    from kosmos.config.schema import Config, DecoderConfig, VisionConfig


def non_embedding_params(d: DecoderConfig) -> int:
    """Parameters of the decoder layers and final norm (no embeddings), computed from the shape."""
    dim, f = d.dim, d.ffn_dim
    attn = 4 * (dim * dim + dim) + 2 * dim  # q,k,v,out with biases + sub-LN inner_attn_ln
    ffn = (dim * f + f) + (f * dim + dim) + 2 * f  # fc1, fc2 with biases + sub-LN ffn_layernorm
    norms = 2 * 2 * dim  # self_attn_layer_norm, final_layer_norm
    return d.layers * (attn + ffn + norms) + 2 * dim


def decoder_flops_per_token(d: DecoderConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward) of the decoder, PaLM-style:
    6 * N (matmuls incl. the output projection) + 12 * layers * dim * seq_len (attention)."""
    seq_len = seq_len or d.max_len
    n = non_embedding_params(d) + d.vocab_size * d.dim
    return 6 * n + 12 * d.layers * d.dim * seq_len


def vision_forward_flops(v: VisionConfig, blocks: int | None = None) -> float:
    """Forward FLOPs of the tower for one image (matmuls and attention; `blocks` of its transformer
    blocks, default all, plus the patch embedding when all are counted)."""
    arch = v.resolved()
    w, n_layers = v.feature_width, int(arch["layers"])
    mlp = w * float(arch.get("mlp_ratio", 4.0))
    patch = v._side("patch_size")
    P = v.num_patches
    T = P + 1  # class token
    block = 2 * T * (4 * w * w + 2 * w * mlp) + 2 * 2 * T * T * w  # qkv+out and mlp; QK^T and AV
    blocks = n_layers if blocks is None else blocks
    embed = 2 * P * 3 * patch * patch * w if blocks == n_layers else 0
    return blocks * block + embed


def flops_per_image(cfg: Config) -> float:
    """Training FLOPs per image: the tower's forward (frozen blocks need no backward) plus the backward
    of its trainable blocks, and the resampler and projection forward + backward (3x forward)."""
    v, c, d = cfg.vision, cfg.connector, cfg.decoder
    layers = int(v.resolved()["layers"])
    trainable = min(v.trainable_blocks, layers)
    # frozen blocks: forward only; trainable ones (all of them: the embedding too) backward as well
    vision = vision_forward_flops(v) + 2 * vision_forward_flops(v, trainable)
    w, n, M = v.feature_width, c.num_latents, v.num_patches
    inner = c.heads * c.dim_head
    layer = (2 * n * w * inner + 2 * (M + n) * w * 2 * inner + 2 * 2 * n * (M + n) * inner
             + 2 * n * inner * w + 2 * n * 2 * w * c.ff_mult * w)
    connector = 3 * (c.depth * layer + 2 * n * w * d.dim)
    return vision + connector
