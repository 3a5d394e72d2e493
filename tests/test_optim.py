"""Parameter groups: which parameters the optimizer decays, listed name by name for the tiny model, and the
tower's own learning rate."""

from __future__ import annotations

import pytest

from kosmos.optim import param_groups
from tests.helpers import tiny_config, tiny_model

D, N = "decay", "no_decay"

CLIP_BLOCK = {  # open_clip ResidualAttentionBlock
    "ln_1.weight": N, "ln_1.bias": N,
    "attn.in_proj_weight": D, "attn.in_proj_bias": N, "attn.out_proj.weight": D, "attn.out_proj.bias": N,
    "ln_2.weight": N, "ln_2.bias": N,
    "mlp.c_fc.weight": D, "mlp.c_fc.bias": N, "mlp.c_proj.weight": D, "mlp.c_proj.bias": N,
}
DECODER_LAYER = {  # torchscale DecoderLayer with Magneto sub-LN
    "self_attn.k_proj.weight": D, "self_attn.k_proj.bias": N,
    "self_attn.v_proj.weight": D, "self_attn.v_proj.bias": N,
    "self_attn.q_proj.weight": D, "self_attn.q_proj.bias": N,
    "self_attn.out_proj.weight": D, "self_attn.out_proj.bias": N,
    "self_attn.inner_attn_ln.weight": N, "self_attn.inner_attn_ln.bias": N,
    "self_attn_layer_norm.weight": N, "self_attn_layer_norm.bias": N,
    "ffn.fc1.weight": D, "ffn.fc1.bias": N, "ffn.fc2.weight": D, "ffn.fc2.bias": N,
    "ffn.ffn_layernorm.weight": N, "ffn.ffn_layernorm.bias": N,
    "final_layer_norm.weight": N, "final_layer_norm.bias": N,
}
# configs/tiny.yaml: a 2-block CLIP tower trained in its last block, a 1-layer resampler, 2 decoder layers.
EXPECTED = {
    **{f"vision.visual.transformer.resblocks.1.{k}": g for k, g in CLIP_BLOCK.items()},
    "vision.visual.ln_post.weight": N, "vision.visual.ln_post.bias": N,
    "resampler.latents": N,  # learned queries, not a map: not pulled towards zero
    "resampler.media_pos_emb": N,  # a learned position embedding
    "resampler.layers.0.0.norm_media.weight": N, "resampler.layers.0.0.norm_media.bias": N,
    "resampler.layers.0.0.norm_latents.weight": N, "resampler.layers.0.0.norm_latents.bias": N,
    "resampler.layers.0.0.to_q.weight": D, "resampler.layers.0.0.to_kv.weight": D,
    "resampler.layers.0.0.to_out.weight": D,
    "resampler.layers.0.1.0.weight": N, "resampler.layers.0.1.0.bias": N,  # the feed-forward's LayerNorm
    "resampler.layers.0.1.1.weight": D, "resampler.layers.0.1.3.weight": D,
    "resampler.norm.weight": N, "resampler.norm.bias": N,
    "proj.weight": D, "proj.bias": N,
    "decoder.embed_tokens.weight": N,  # tied with the output projection (an nn.Linear): still not decayed
    **{f"decoder.layers.{i}.{k}": g for i in range(2) for k, g in DECODER_LAYER.items()},
    "decoder.layer_norm.weight": N, "decoder.layer_norm.bias": N,
}
FROZEN = {  # CLIP but its last block: in no group
    "vision.visual.class_embedding", "vision.visual.positional_embedding", "vision.visual.conv1.weight",
    "vision.visual.ln_pre.weight", "vision.visual.ln_pre.bias",
    *(f"vision.visual.transformer.resblocks.0.{k}" for k in CLIP_BLOCK),
}


def test_parameter_groups_of_the_tiny_model_name_by_name():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    group_of: dict[int, list[str]] = {}
    for label, group in ((D, decay), (N, no_decay)):
        for p in group["params"]:
            group_of.setdefault(id(p), []).append(label)
    assert all(len(labels) == 1 for labels in group_of.values())  # every parameter in one group, once
    got = {name: group_of[id(p)][0] for name, p in model.named_parameters() if id(p) in group_of}
    frozen = {name for name, p in model.named_parameters() if id(p) not in group_of}
    assert got == EXPECTED
    assert frozen == FROZEN
    assert all(not p.requires_grad for name, p in model.named_parameters() if name in FROZEN)
    assert all(p.requires_grad for name, p in model.named_parameters() if name in EXPECTED)
    n_groups = len(decay["params"]) + len(no_decay["params"])
    assert n_groups == len(EXPECTED)  # the tied output projection is not listed a second time


def test_whole_tower_trainable_decays_the_patch_embedding_but_not_its_tokens():
    model = tiny_model("vision.trainable_blocks=2")
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "vision.visual.conv1.weight" in decayed  # the patch embedding is a linear map
    assert {"vision.visual.class_embedding", "vision.visual.positional_embedding"} <= kept


def test_the_towers_own_learning_rate_puts_its_parameters_in_groups_of_their_own():
    from kosmos.optim import build_optimizer, build_scheduler

    cfg = tiny_config("vision.trainable_blocks=2", "optim.name=adamw", "optim.lr=1e-3",
                      "optim.vision_lr_scale=3", "optim.warmup_steps=4", "optim.total_steps=10")
    model = tiny_model("vision.trainable_blocks=2")
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim)
    tower = {id(p) for p in model.vision.parameters()}
    rest = {id(p) for p in model.parameters() if p.requires_grad and id(p) not in tower}
    groups = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert len(groups) == 4 and groups[0] | groups[1] == rest and groups[2] | groups[3] == tower
    assert sum(map(len, groups)) == len(tower | rest)  # each trainable parameter once
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0] * 2
    assert "vision.visual.conv1.weight" in {n for n, p in model.named_parameters() if id(p) in groups[2]}
    for _ in range(4):  # to the end of the warmup: the peak, 3x for the tower
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-3, 3e-3, 3e-3])
    # the default keeps the two groups older checkpoints' optimizer states hold
    assert len(build_optimizer(model, tiny_config("optim.name=adamw").optim).param_groups) == 2


def test_a_resume_whose_trainable_parameters_changed_is_one_config_error_naming_the_keys():
    from kosmos.checkpoint import check_param_groups
    from kosmos.config import ConfigError
    from kosmos.optim import build_optimizer

    saved = build_optimizer(tiny_model(), tiny_config("optim.name=adamw").optim).state_dict()
    check_param_groups(saved, build_optimizer(tiny_model(), tiny_config("optim.name=adamw").optim), "opt.pt")
    for change in (["vision.trainable_blocks=2"], ["optim.vision_lr_scale=2"]):
        model = tiny_model(*change)
        opt = build_optimizer(model, tiny_config("optim.name=adamw", *change).optim)
        with pytest.raises(ConfigError, match=r"opt.pt: .*vision.trainable_blocks.*optim.vision_lr_scale"):
            check_param_groups(saved, opt, "opt.pt")
    with pytest.raises(ConfigError, match="optim.vision_lr_scale.*must be positive"):
        tiny_config("optim.vision_lr_scale=0")


def test_a_peak_learning_rate_changed_on_resume_takes_effect_and_is_said():
    """LambdaLR's state brings back the checkpoint's peaks (base_lrs): without keep_configured_peaks a new
    optim.lr on resume would be silently ignored."""
    from kosmos.optim import build_optimizer, build_scheduler, keep_configured_peaks

    def built(*overrides):
        cfg = tiny_config("optim.name=adamw", "optim.warmup_steps=4", "optim.total_steps=20", *overrides)
        opt = build_optimizer(tiny_model(), cfg.optim)
        return opt, build_scheduler(opt, cfg.optim)

    opt, sched = built("optim.lr=1e-3")
    for _ in range(6):
        opt.step()
        sched.step()
    saved = opt.state_dict(), sched.state_dict()
    at_6 = 1 - (6 - 4) / (20 - 4)  # the schedule's factor at step 6
    for lr, note in (("1e-3", None), ("5e-4", "0.001 -> 0.0005")):
        opt, sched = built(f"optim.lr={lr}")
        configured = list(sched.base_lrs)
        opt.load_state_dict(saved[0])
        sched.load_state_dict(saved[1])
        said = keep_configured_peaks(sched, configured)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([float(lr) * at_6] * 2)
        assert said is None if note is None else note in said and "step 6" in said
        opt.step()
        sched.step()  # and the schedule goes on from there at the new peak
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([float(lr) * (1 - 3 / 16)] * 2)
