"""KOSMOS-1 for `transformers` (remote code, written by `kosmos-export-hf`): plain torch, no other package.

The same computation as the training code (kosmos-pretrain), module by module, with the same parameter
names, so the exported state dict maps 1:1:

    vision.visual.*   open_clip's VisionTransformer as kosmos uses it: patch conv, class token, position
                      embedding, ln_pre, pre-norm blocks (torch's nn.MultiheadAttention, GELU or QuickGELU),
                      ln_post, class token dropped; pixels normalised with the tower's mean/std
    resampler.*       flamingo-pytorch 0.1.2's PerceiverResampler (one image per call)
    proj.*            the linear projection into the decoder's width
    decoder.*         torchscale 0.3.0's Magneto (sub-LN) decoder with xPos, computed in fp32 as
                      kosmos/decoder.py does; embed_tokens (times `embed_scale`), layer_norm,
                      output_projection (tied to embed_tokens with `tie_word_embeddings`)

Input: `input_ids` in which every image is `<image>`, `num_latents` slots (any id, the pad id by the
processor), `</image>`; `pixel_values` (N, 3, S, S), normalised floats (the processor's) or uint8 pixels;
the slots are found from the ids (between `<image>` and `</image>`) unless `image_mask` is given. Images
are encoded on the prefill step only; the KV cache is transformers' `Cache` (keys stored before xPos,
which is applied at the absolute offset = cached length, as kosmos does).
"""

from collections import OrderedDict
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_kosmos import KosmosConfig

# ----------------------------------------------------------------------------- vision tower (open_clip)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CastLayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: computed as torch's, cast back to the input dtype."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class VisionBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (no layer scale)."""

    def __init__(self, width, heads, mlp_width, quick_gelu, eps):
        super().__init__()
        self.ln_1 = CastLayerNorm(width, eps=eps)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = CastLayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        width, eps = c["width"], c.get("layer_norm_eps", 1e-5)
        grid = c["image_size"] // c["patch_size"]
        self.conv1 = nn.Conv2d(3, width, kernel_size=c["patch_size"], stride=c["patch_size"], bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = CastLayerNorm(width, eps=eps)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            VisionBlock(width, c["heads"], c["mlp_width"], c["quick_gelu"], eps) for _ in range(c["layers"]))
        self.ln_post = CastLayerNorm(width, eps=eps)

    def forward(self, x):
        x = self.conv1(x)  # (N, W, g, g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (N, P, W)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for blk in self.transformer.resblocks:
            x = blk(x)
        return self.ln_post(x)[:, 1:]  # the patch tokens, class token dropped


class VisionEncoder(nn.Module):
    """Pixels -> patch tokens (N, P, width); uint8 pixels are normalised here as kosmos does (fp32)."""

    def __init__(self, c):
        super().__init__()
        self.visual = VisionTransformer(c)
        self.image_mean = tuple(c["image_mean"])
        self.image_std = tuple(c["image_std"])

    def normalize(self, images):
        if images.dtype != torch.uint8:
            return images  # the processor's normalised floats
        mean = torch.tensor(self.image_mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def forward(self, images):
        x = self.normalize(images).to(self.visual.conv1.weight.dtype).contiguous()
        return self.visual(x)


# ----------------------------------------------------------------------------- perceiver resampler (flamingo)


class PerceiverAttention(nn.Module):
    def __init__(self, dim, dim_head, heads):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        """x (b, t, n, d) media, latents (b, t, m, d)."""
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        h = self.heads
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)

        def heads(t):  # b t n (h d) -> b h t n d
            b, tt, n, hd = t.shape
            return t.view(b, tt, n, h, hd // h).permute(0, 3, 1, 2, 4)

        q, k, v = heads(q) * self.scale, heads(k), heads(v)
        sim = torch.einsum("... i d, ... j d -> ... i j", q, k)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = torch.einsum("... i j, ... j d -> ... i d", sim.softmax(dim=-1), v)
        b, _, t, n, d = out.shape
        return self.to_out(out.permute(0, 2, 3, 1, 4).reshape(b, t, n, h * d))


class PerceiverResampler(nn.Module):
    def __init__(self, dim, c):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(c["num_latents"], dim))
        self.media_pos_emb = nn.Parameter(torch.zeros(1, 1, dim))
        inner = int(dim * c.get("ff_mult", 4))
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(dim, c["dim_head"], c["heads"]),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                          nn.Linear(inner, dim, bias=False)),
        ]) for _ in range(c["depth"]))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        """x (N, P, d) -> (N, num_latents, d)."""
        x = x[:, None] + self.media_pos_emb[:1]
        latents = self.latents[None, None].expand(x.shape[0], 1, -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)[:, 0]


# ----------------------------------------------------------------------------- decoder (torchscale, xPos)


@lru_cache(maxsize=8)
def _xpos_tables(total, head_dim, scale_base, device):
    """(up, down) complex64 (total, head_dim/2): scale^(+-1) e^(i angle), torchscale's XPOS in fp32."""
    with torch.inference_mode(False), torch.no_grad():
        half = head_dim // 2
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        zeta = (channels + 0.4 * head_dim) / (1.4 * head_dim)
        min_pos = -total // 2
        pos = torch.arange(min_pos, min_pos + total, dtype=torch.float32, device=device)
        scale = zeta[None, :] ** (pos[:, None] / scale_base)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, half, dtype=torch.float32, device=device) / half))
        angles = torch.arange(total, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        return torch.polar(scale, angles), torch.polar(1.0 / scale, angles)


def apply_xpos(x, offset, downscale, scale_base):
    """xPos on x (B, H, T, hd) at positions offset..offset+T-1, in fp32 whatever x's dtype."""
    T, hd = x.shape[-2], x.shape[-1]
    up, down = _xpos_tables(T + offset, hd, scale_base, x.device)
    table = (down if downscale else up)[-T:]
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * table).flatten(-2).to(x.dtype)


class XPos(nn.Module):
    """Holds torchscale's `scale` buffer (part of the state dict; the tables are computed in fp32)."""

    def __init__(self, head_dim, scale_base):
        super().__init__()
        self.scale_base = scale_base
        self.register_buffer("scale", (torch.arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim))


class KosmosAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.inner_attn_ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.xpos = XPos(self.head_dim, config.xpos_scale_base)

    def forward(self, x, padding=None, past_key_values=None):
        """x (B, T, E); padding (B, S) True at padding keys (S = cached + T) or None."""
        B, T, E = x.shape
        H, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, H, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, hd).transpose(1, 2)
        if past_key_values is not None:  # cached before xPos, as kosmos caches them
            k, v = past_key_values.update(k, v, self.layer_idx)
        S = k.shape[2]
        k = apply_xpos(k, 0, True, self.xpos.scale_base)
        q = apply_xpos(q, S - T, False, self.xpos.scale_base)
        mask, causal = None, False
        if padding is not None or (T > 1 and T != S):
            qpos = torch.arange(S - T, S, device=q.device)[:, None]
            kpos = torch.arange(S, device=q.device)[None, :]
            mask = (kpos <= qpos)[None, None]
            if padding is not None:
                # every query sees itself: a padding query would otherwise be all-masked (NaN)
                mask = (mask & ~padding[:, None, None, :]) | (kpos == qpos)[None, None]
        elif T > 1:
            causal = True
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        attn = self.inner_attn_ln(attn.transpose(1, 2).reshape(B, T, E))
        return self.out_proj(attn)


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "swish": F.silu}


class FeedForward(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_layernorm = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)

    def forward(self, x):
        h = self.fc1(x)
        h = self.activation(h.float()).type_as(h)
        return self.fc2(self.ffn_layernorm(h))


class KosmosDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = KosmosAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, padding=None, past_key_values=None):
        x = x + self.self_attn(self.self_attn_layer_norm(x), padding, past_key_values)
        return x + self.ffn(self.final_layer_norm(x))


class KosmosDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(KosmosDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_projection = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# ----------------------------------------------------------------------------- the model


class KosmosPreTrainedModel(PreTrainedModel):
    config_class = KosmosConfig
    base_model_prefix = "kosmos"
    main_input_name = "input_ids"
    _no_split_modules = ["KosmosDecoderLayer", "VisionBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """Exports carry every weight; this only initialises a model built from a config alone."""
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class KosmosForCausalLM(KosmosPreTrainedModel, GenerationMixin):
    """KOSMOS-1: a causal LM over text in which images are spans of embeddings (see the module docstring).
    A causal LM (not an image-to-text model): it takes text-only prompts as well, and generation continues
    the interleaved sequence."""

    _tied_weights_keys = {"decoder.output_projection.weight": "decoder.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        vc = config.vision_config
        self.vision = VisionEncoder(vc)
        self.resampler = PerceiverResampler(vc["width"], config.perceiver_config)
        self.proj = nn.Linear(vc["width"], config.hidden_size)
        self.decoder = KosmosDecoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value):
        self.decoder.embed_tokens = value

    def get_output_embeddings(self):
        return self.decoder.output_projection

    def set_output_embeddings(self, value):
        self.decoder.output_projection = value

    def encode_images(self, pixel_values):
        """(N, 3, S, S) -> image embeddings (N, num_latents, hidden_size)."""
        return self.proj(self.resampler(self.vision(pixel_values)))

    def image_slots(self, input_ids):
        """(B, L) True strictly between `<image>` and `</image>`."""
        opened = (input_ids == self.config.image_token_id).cumsum(-1)
        closed = (input_ids == self.config.image_end_token_id).cumsum(-1)
        return (opened > closed) & (input_ids != self.config.image_token_id)

    def embed(self, input_ids, pixel_values=None, image_mask=None):
        x = self.decoder.embed_tokens(input_ids)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        if pixel_values is not None and len(pixel_values):
            mask = self.image_slots(input_ids) if image_mask is None else image_mask.bool()
            need = pixel_values.shape[0] * self.config.perceiver_config["num_latents"]
            if int(mask.sum()) != need:
                raise ValueError(f"input_ids hold {int(mask.sum())} image slots but {pixel_values.shape[0]} "
                                 f"images need {need}; build prompts with the processor")
            feats = self.encode_images(pixel_values).to(x.dtype)
            x = x.masked_scatter(mask.unsqueeze(-1), feats)
        return x

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_mask=None,
                past_key_values=None, inputs_embeds=None, use_cache=None, labels=None, logits_to_keep=0,
                return_dict=None, **kwargs):
        """input_ids (B, T); attention_mask (B, cached + T), 0 at padding (left padding for batches);
        pixel_values (N, 3, S, S) for the images of the prompt (prefill only); image_mask (B, T) True at
        image slots (default: found from the ids); labels (B, T) as input_ids, -100 where no loss."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x = self.embed(input_ids, pixel_values, image_mask) if inputs_embeds is None else inputs_embeds
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cache = past_key_values if isinstance(past_key_values, Cache) else None
        padding = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            padding = attention_mask == 0
        for layer in self.decoder.layers:
            x = layer(x, padding, cache)
        x = self.decoder.layer_norm(x)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            x = x[:, logits_to_keep]
        logits = self.decoder.output_projection(x)
        loss = None
        if labels is not None:
            if input_ids is not None and pixel_values is not None:
                labels = labels.masked_fill(self.image_slots(input_ids), -100)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)
