"""The language decoder: torchscale's Magneto (sub-LN) Decoder with xPos, and a faster attention path.

We keep torchscale's modules, parameter names and initialisation. That initialisation is PyTorch's
default (`nn.Linear`: U(+-1/sqrt(fan_in)) for weights and biases), with Magneto's gain sqrt(log 2N)
multiplied into fc1/fc2/out_proj/v_proj (weights and biases) inside torchscale's constructor; q_proj and
k_proj keep the default (torchscale 0.3.0 never calls its attention's xavier `reset_parameters`). Nothing
here re-initialises after it. Token embeddings come from the caller (`kosmos.model.build_token_embedding`)
and `embed_scale` stays 1 (`no_scale_embedding=True`): any scale is the embedding's own
(`decoder.scale_embedding`).

What we replace:

* `KosmosAttention`: a subclass of torchscale's MultiheadAttention (same parameters, so checkpoints load in
  either path) whose `sdpa` path uses `F.scaled_dot_product_attention`, computes xPos in fp32 whatever the
  model dtype (torchscale's xPos in bf16 rounds positions near 2048 to multiples of 8), never materialises
  the (B*heads, T, S) score matrix (fused kernels: flash attention; on CUDA with a padding mask or in fp32,
  the memory-efficient one), and supports padded batches (torchscale's gives NaN with left padding).
  `attention: torchscale` runs the stock code.
* `build_decoder(cfg)` with `decoder.compile: true` compiles each decoder layer in place with
  `torch.compile` (state_dict keys unchanged).
* `KosmosDecoder.forward`: builds the causal mask once (not per layer), takes precomputed embeddings
  (text embeddings with image slots filled in), supports activation checkpointing through
  `torch.utils.checkpoint`, and uses torchscale's incremental-state format for the KV cache
  (`incremental_state["is_first_step"] = True` for the prefill).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import checkpoint
from torchscale.architecture.config import DecoderConfig as TorchscaleDecoderConfig
from torchscale.architecture.decoder import Decoder, DecoderLayer
from torchscale.component.multihead_attention import MultiheadAttention

from kosmos.config import DecoderConfig

# ----------------------------------------------------------------------------- xPos in fp32


def _xpos_angles_and_scale(total: int, head_dim: int, scale_base: int, device: torch.device):
    """angles and scale (total, head_dim/2) in fp32, as torchscale's XPOS builds them: rotation angles
    from positions 0..total-1, decay zeta^(n/scale_base) from positions centred on 0 (n = -total//2 ...)."""
    half = head_dim // 2
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    zeta = (channels + 0.4 * head_dim) / (1.4 * head_dim)
    min_pos = -total // 2
    pos = torch.arange(min_pos, min_pos + total, dtype=torch.float32, device=device)
    scale = zeta[None, :] ** (pos[:, None] / scale_base)  # (total, half)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, dtype=torch.float32, device=device) / half))
    angles = torch.arange(total, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return angles, scale


@lru_cache(maxsize=8)  # one length per training shape; one per step (shared by all layers) when decoding
def _xpos_complex_tables(total: int, head_dim: int, scale_base: int, device: torch.device):
    """(up, down): complex64 (total, head_dim/2) tables scale^(+-1) * e^(i angle), built once per length.
    Made outside inference mode so that a table first built under torch.inference_mode() can still be
    saved for backward later."""
    with torch.inference_mode(False), torch.no_grad():
        angles, scale = _xpos_angles_and_scale(total, head_dim, scale_base, device)
        return torch.polar(scale, angles), torch.polar(1.0 / scale, angles)


def apply_xpos(x: torch.Tensor, offset: int, downscale: bool, scale_base: int,
               positions: torch.Tensor | None = None) -> torch.Tensor:
    """xPos (Sun et al., 2022) on x (..., T, head_dim) at positions offset..offset+T-1, in fp32 whatever
    x's dtype (bf16 cannot even hold the positions: near 2048 it rounds them to multiples of 8).
    Queries are scaled by zeta^n, keys by zeta^-m, so q.k depends on n - m only.

    `positions` (B, T) int, for x (B, H, T, head_dim) and offset 0: each token's own position instead
    (document masking restarts them at every document). They index the same length-T tables, so queries
    and keys of one row share the decay's centre and q.k still depends on n - m only: a document gets the
    scores it would get alone.

    Each channel pair (x0, x1) is rotated by the position's angle and scaled, which is the complex
    product (x0 + i x1) * scale * e^(i angle): one kernel in eager mode with a cached table. Under
    torch.compile the same product is written out in real numbers (inductor generates no complex code)."""
    T, hd = x.shape[-2], x.shape[-1]
    if positions is not None and offset:
        raise ValueError("apply_xpos: per-token positions are absolute; give offset 0 with them")
    xf = x.float()
    if torch.compiler.is_compiling():
        angles, scale = _xpos_angles_and_scale(T + offset, hd, scale_base, x.device)
        if positions is None:
            angles, scale = angles[-T:], scale[-T:]  # (T, hd/2)
        else:
            angles, scale = angles[positions][:, None], scale[positions][:, None]  # (B, 1, T, hd/2)
        if downscale:
            scale = 1.0 / scale
        cos, sin = torch.cos(angles) * scale, torch.sin(angles) * scale
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
        return out.to(x.dtype)
    # under a fake-tensor trace (kosmos.plan, the tests) the table is fake: not cached, or a real run in the
    # same process would meet it
    tables = _xpos_complex_tables.__wrapped__ if is_fake(x) else _xpos_complex_tables
    up, down = tables(T + offset, hd, scale_base, x.device)
    table = down if downscale else up  # (T + offset, hd/2) complex
    table = table[-T:] if positions is None else table[positions][:, None]  # (T, hd/2) or (B, 1, T, hd/2)
    pairs = xf.unflatten(-1, (-1, 2))  # (..., T, hd/2, 2)
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-2]):
        pairs = pairs.contiguous()  # view_as_complex needs (real, imag) adjacent and aligned
    xc = torch.view_as_complex(pairs)
    return torch.view_as_real(xc * table).flatten(-2).to(x.dtype)


class DocumentMask(NamedTuple):
    """What document masking needs in every layer, built once per forward from the row's document ids.
    It travels to `KosmosAttention` in torchscale's `attn_mask` argument (the layer passes that through
    unchanged), so torchscale's DecoderLayer.forward need not be copied."""

    mask: torch.Tensor
    """(B, 1, T, T) bool, True where query i may see key j: same document and j <= i."""
    positions: torch.Tensor
    """(B, T) long: each token's position within its document (0 at the document's first token)."""

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> DocumentMask:
        """doc_ids (B, T) int: each run of consecutive equal ids is one document (so only changes of id
        matter; padding, with an id of its own, sees only padding and never gives an all-masked, NaN
        row)."""
        B, T = doc_ids.shape
        idx = torch.arange(T, device=doc_ids.device).expand(B, T)
        new = torch.ones_like(doc_ids, dtype=torch.bool)
        new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, T) True at each document's first token
        first = torch.where(new, idx, torch.zeros_like(idx)).cummax(dim=1).values  # its document's start
        same = first[:, :, None] == first[:, None, :]  # (B, T, T): same document
        causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
        return cls(mask=(same & causal)[:, None], positions=idx - first)


# ----------------------------------------------------------------------------- attention


class KosmosAttention(MultiheadAttention):
    """torchscale MultiheadAttention with an SDPA path. Same parameters and cache layout
    (`prev_key`/`prev_value`: (B, heads, S, head_dim), stored before xPos)."""

    def __init__(self, args, embed_dim, num_heads, impl: str = "sdpa", **kwargs):
        super().__init__(args, embed_dim, num_heads, **kwargs)
        self.impl = impl

    def forward(self, query, key, value, incremental_state=None, key_padding_mask=None, attn_mask=None,
                rel_pos=None, is_first_step=False):
        if self.impl == "torchscale":
            return super().forward(query, key, value, incremental_state=incremental_state,
                                   key_padding_mask=key_padding_mask, attn_mask=attn_mask, rel_pos=rel_pos,
                                   is_first_step=is_first_step)
        assert rel_pos is None, "relative position bias is not used by KOSMOS (xPos is)"
        doc = attn_mask
        assert doc is None or isinstance(doc, DocumentMask), \
            "the sdpa path builds its own mask (causal, cache offset, padding) or takes a DocumentMask"
        assert doc is None or incremental_state is None, "document masking is for full rows, not the cache"
        B, T, E = query.shape
        H, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(key).view(B, T, H, hd).transpose(1, 2)
        v = self.v_proj(value).view(B, T, H, hd).transpose(1, 2)

        if incremental_state is not None:
            if "prev_key" in incremental_state:
                k = torch.cat([incremental_state["prev_key"], k], dim=2)
                v = torch.cat([incremental_state["prev_value"], v], dim=2)
            incremental_state["prev_key"] = k
            incremental_state["prev_value"] = v
        S = k.shape[2]

        if self.xpos is not None:
            scale_base = self.xpos.scale_base
            pos = None if doc is None else doc.positions
            k = apply_xpos(k, offset=0, downscale=True, scale_base=scale_base, positions=pos)
            q = apply_xpos(q, offset=S - T, downscale=False, scale_base=scale_base, positions=pos)

        mask, causal = None, False
        if doc is not None:
            # Block-diagonal and causal; padding is its own document, so every query sees itself.
            mask = doc.mask  # (B, 1, T, T)
            if key_padding_mask is not None:
                diag = torch.eye(T, dtype=torch.bool, device=q.device)
                mask = mask & (~key_padding_mask.to(torch.bool)[:, None, None, :] | diag)
        elif key_padding_mask is not None or (T > 1 and T != S):
            # Query i sits at absolute position S - T + i and may see keys 0..S-T+i that are not padding.
            qpos = torch.arange(S - T, S, device=q.device)[:, None]
            kpos = torch.arange(S, device=q.device)[None, :]
            mask = (kpos <= qpos)[None, None]  # (1, 1, T, S)
            if key_padding_mask is not None:
                mask = mask & ~key_padding_mask.to(torch.bool)[:, None, None, :]
                # A padding query would see nothing and softmax to NaN, which then leaks into real
                # positions through 0 * NaN; let every query see itself.
                mask = mask | (kpos == qpos)[None, None]
        elif T > 1:
            causal = True
        dropout_p = self.dropout_module.p if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        attn = attn.transpose(1, 2).reshape(B, T, E)  # (B, T, E)
        if self.inner_attn_ln is not None:  # Magneto's sub-LN inside attention
            attn = self.inner_attn_ln(attn)
        return self.out_proj(attn), None


class KosmosDecoderLayer(DecoderLayer):
    def build_self_attention(self, embed_dim, args):
        return KosmosAttention(args, embed_dim, args.decoder_attention_heads, impl=args.kosmos_attention,
                               dropout=args.attention_dropout, self_attention=True,
                               encoder_decoder_attention=False, subln=args.subln)


class KosmosDecoder(Decoder):
    """torchscale Decoder taking precomputed token embeddings (B, T, D) and returning logits (B, T, V)."""

    def build_decoder_layer(self, args, depth, is_moe_layer=False, is_encoder_decoder=False):
        # Built inside torchscale's constructor, before its Magneto scaling runs over these parameters.
        return KosmosDecoderLayer(args, depth, is_moe_layer=is_moe_layer,
                                  is_encoder_decoder=is_encoder_decoder)

    def forward(self, token_embeddings: torch.Tensor, padding_mask: torch.Tensor | None = None,
                incremental_state: dict | None = None, features_only: bool = False,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """token_embeddings (B, T, D); padding_mask (B, S) True at padding keys (S = cached + T), only
        needed for left-padded batches (right padding is harmless under a causal mask); incremental_state
        a dict kept between calls for the KV cache, with "is_first_step" True for the prefill.

        doc_ids (B, T) int, for document masking: each run of equal ids is a document that attends only
        to itself, with xPos positions from 0 at its first token. Whole rows only (no KV cache), sdpa
        path only."""
        first = bool(incremental_state is not None and incremental_state.get("is_first_step", False))
        x = self.embed_scale * token_embeddings
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x)
        T = x.size(1)

        attn_mask = None
        if doc_ids is not None:
            if self.args.kosmos_attention != "sdpa" or incremental_state is not None:
                raise ValueError("document masking (doc_ids) needs decoder.attention=sdpa and no KV cache")
            if doc_ids.shape != x.shape[:2]:
                raise ValueError(f"doc_ids {tuple(doc_ids.shape)} does not match the tokens "
                                 f"{tuple(x.shape[:2])}")
            attn_mask = DocumentMask.from_doc_ids(doc_ids)  # built once, shared by the layers
        elif self.args.kosmos_attention == "torchscale" and T > 1:
            # torchscale builds this (T, T) additive mask inside every layer; once is enough.
            attn_mask = torch.triu(torch.full((T, T), float("-inf"), device=x.device, dtype=x.dtype), 1)

        for idx, layer in enumerate(self.layers):
            state = incremental_state.setdefault(idx, {}) if incremental_state is not None else None
            if self.args.kosmos_checkpoint and self.training and state is None:
                x = checkpoint(_run_layer, layer, x, attn_mask, padding_mask, None, False,
                               use_reentrant=False)
            else:
                x = _run_layer(layer, x, attn_mask, padding_mask, state, first)

        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x if features_only else self.output_layer(x)


def _run_layer(layer, x, attn_mask, padding_mask, state, first):
    return layer(x, incremental_state=state, self_attn_mask=attn_mask, self_attn_padding_mask=padding_mask,
                 is_first_step=first)[0]


def build_decoder(cfg: DecoderConfig, embed_tokens: nn.Embedding) -> KosmosDecoder:
    """The paper's decoder (Sec. 2.1/3.1): Magneto sub-LN, xPos, pre-norm, tied embeddings."""
    args = TorchscaleDecoderConfig(
        vocab_size=cfg.vocab_size,
        decoder_embed_dim=cfg.dim,
        decoder_ffn_embed_dim=cfg.ffn_dim,
        decoder_layers=cfg.layers,
        decoder_attention_heads=cfg.heads,
        activation_fn=cfg.activation,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        subln=True,  # Magneto: sub-LayerNorm and its initialisation
        xpos_rel_pos=True,  # relative positions, no learned absolute positions
        xpos_scale_base=cfg.xpos_scale_base,
        max_target_positions=cfg.max_len,
        share_decoder_input_output_embed=cfg.share_embeddings,
        layernorm_eps=cfg.layernorm_eps,
        no_scale_embedding=True,
        checkpoint_activations=False,  # done in KosmosDecoder.forward with torch.utils.checkpoint
        fsdp=False,  # wrapping belongs to the training script (accelerate), not the model
    )
    args.kosmos_attention = cfg.attention
    args.kosmos_checkpoint = cfg.checkpoint_activations
    decoder = KosmosDecoder(args, embed_tokens=embed_tokens)
    if cfg.compile:
        # Module.compile() compiles the layer's call in place: no OptimizedModule wrapper, so no
        # `_orig_mod.` in parameter names and checkpoints stay interchangeable with eager models. The
        # layers are alike, so they share one compiled graph (parameters are graph inputs).
        for layer in decoder.layers:
            layer.compile()
    return decoder
