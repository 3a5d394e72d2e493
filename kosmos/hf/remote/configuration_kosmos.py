"""KOSMOS-1 configuration for `transformers` (remote code, written by `kosmos-export-hf`).

Depends on transformers and the standard library only. Every value comes from the training config of
the exported checkpoint; `vision_config` and `perceiver_config` are plain dicts.
"""

from transformers import PretrainedConfig


class KosmosConfig(PretrainedConfig):
    """The decoder's sizes with transformers' usual names; `vision_config` the CLIP ViT tower (image_size,
    patch_size, width, layers, heads, mlp_width, quick_gelu, image_mean, image_std, layer_norm_eps);
    `perceiver_config` the resampler (num_latents, depth, heads, dim_head, ff_mult)."""

    model_type = "kosmos_pretrain"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=64007, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, hidden_act="gelu", layer_norm_eps=1e-5, xpos_scale_base=512,
                 max_position_embeddings=2048, embed_scale=1.0, vision_config=None, perceiver_config=None,
                 image_token_id=4, image_end_token_id=5, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                 tie_word_embeddings=True, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.xpos_scale_base = xpos_scale_base
        self.max_position_embeddings = max_position_embeddings
        self.embed_scale = embed_scale
        self.vision_config = dict(vision_config or {})
        self.perceiver_config = dict(perceiver_config or {})
        self.image_token_id = image_token_id
        self.image_end_token_id = image_end_token_id
        self.use_cache = use_cache
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
