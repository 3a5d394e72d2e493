import math

import pytest
import torch

from kosmos.decoder import apply_xpos
from kosmos.model import Kosmos
from kosmos.vision import VisionEncoder
from tests.helpers import loaded_vision, make_row, random_images, tiny_config, tiny_model


def test_forward_shapes_and_loss():
    model = tiny_model()
    ids, mask = make_row(model, 3, 2, 5)
    imgs = random_images(model, 2)
    out = model(ids, imgs, mask, labels=ids.clone())
    assert out.logits.shape == (1, ids.shape[1], model.cfg.decoder.vocab_size)
    assert torch.isfinite(out.loss)
    # targets: every discrete token after the first, minus the image slots
    assert int(out.n_tokens) == ids.shape[1] - 1 - 2 * model.num_latents


def test_loss_ignores_labels_at_image_slots_and_padding():
    model = tiny_model()
    ids, mask = make_row(model, 3, 1, 4)
    pad = 6
    ids = torch.cat([ids, torch.zeros(1, pad, dtype=torch.long)], 1)
    mask = torch.cat([mask, torch.zeros(1, pad, dtype=torch.bool)], 1)
    padding = torch.zeros_like(mask)
    padding[:, -pad:] = True
    imgs = random_images(model, 1)
    labels = ids.clone()
    base = model(ids, imgs, mask, labels=labels, padding_mask=padding).loss
    scrambled = labels.clone()
    scrambled[mask] = 7
    scrambled[padding] = 9
    changed = model(ids, imgs, mask, labels=scrambled, padding_mask=padding).loss
    assert torch.equal(base, changed)
    # ...but a label on a discrete token does change it (the test can fail)
    other = labels.clone()
    other[0, 2] = (other[0, 2] + 1) % model.cfg.decoder.vocab_size
    assert not torch.equal(base, model(ids, imgs, mask, labels=other, padding_mask=padding).loss)


def test_image_changes_logits_after_it_only():
    model = tiny_model().eval()
    ids, mask = make_row(model, 4, 1, 6)
    first_slot = int(mask[0].nonzero()[0])
    a = model(ids, random_images(model, 1, seed=1), mask).logits
    b = model(ids, random_images(model, 1, seed=2), mask).logits
    assert torch.equal(a[:, :first_slot], b[:, :first_slot])  # causality: nothing before the image moves
    assert not torch.allclose(a[:, first_slot:], b[:, first_slot:], atol=1e-4)


def _default_linear_std(fan_in: int) -> float:
    return 1.0 / math.sqrt(3 * fan_in)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))


def test_magneto_scaling_on_fc_out_v_not_q():
    model = tiny_model("decoder.layers=3", "decoder.dim=128", "decoder.ffn_dim=512")
    gain = math.sqrt(math.log(2 * 3))
    layer = model.decoder.layers[1]
    ratios = {}
    for name, lin in [("fc1", layer.ffn.fc1), ("fc2", layer.ffn.fc2), ("out_proj", layer.self_attn.out_proj),
                      ("v_proj", layer.self_attn.v_proj), ("q_proj", layer.self_attn.q_proj),
                      ("k_proj", layer.self_attn.k_proj)]:
        ratios[name] = lin.weight.std().item() / _default_linear_std(lin.weight.shape[1])
    for name in ("fc1", "fc2", "out_proj", "v_proj"):
        assert ratios[name] == pytest.approx(gain, rel=0.05), (name, ratios)
    for name in ("q_proj", "k_proj"):
        assert ratios[name] == pytest.approx(1.0, rel=0.05), (name, ratios)


def test_clip_frozen_but_last_block_and_grads_reach_connector():
    model = tiny_model("vision.layers=3")
    blocks = model.vision.visual.transformer.resblocks
    assert all(not p.requires_grad for blk in blocks[:-1] for p in blk.parameters())
    assert all(p.requires_grad for p in blocks[-1].parameters())
    assert not model.vision.visual.conv1.weight.requires_grad
    ids, mask = make_row(model, 2, 1, 3)
    out = model(ids, random_images(model, 1), mask, labels=ids)
    out.loss.backward()
    for p in blocks[:-1].parameters():
        assert p.grad is None
    assert model.vision.visual.conv1.weight.grad is None
    for name, p in [*model.resampler.named_parameters(), *model.proj.named_parameters(),
                    *blocks[-1].named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_text_only_batch_still_touches_every_trainable_parameter():
    # DDP needs every trainable parameter in the graph on every rank, images or not.
    model = tiny_model()
    ids = torch.randint(10, 100, (2, 12))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_image_slot_count_must_match():
    model = tiny_model()
    ids, mask = make_row(model, 2, 2, 3)
    with pytest.raises(ValueError, match="slots"):
        model(ids, random_images(model, 1), mask)


def test_xpos_matches_torchscale_in_fp32():
    from torchscale.component.xpos_relative_position import XPOS

    ref = XPOS(16, 512)
    x = torch.randn(6, 40, 16)
    for offset, down in [(0, True), (0, False), (39, False)]:
        xi = x[:, -1:] if offset else x
        assert torch.allclose(apply_xpos(xi, offset, down, 512), ref(xi, offset=offset, downscale=down),
                              atol=1e-6)


def test_left_padding_does_not_change_real_positions():
    model = tiny_model().eval()
    ids = torch.randint(10, 500, (1, 9))
    emb = model.decoder.embed_tokens(ids)
    ref = model.decoder(emb)
    pad = 4
    emb_p = torch.cat([model.decoder.embed_tokens(torch.zeros(1, pad, dtype=torch.long)), emb], 1)
    padding = torch.zeros(1, 9 + pad, dtype=torch.bool)
    padding[:, :pad] = True
    out = model.decoder(emb_p, padding_mask=padding)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, pad:], ref, atol=1e-5)


def test_activation_checkpointing_gives_same_grads():
    a = tiny_model()
    b = tiny_model("decoder.checkpoint_activations=true")
    ids = torch.randint(10, 500, (2, 10))
    a(ids, labels=ids).loss.backward()
    b(ids, labels=ids).loss.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_paper_model_size_on_meta_device():
    from kosmos.config import load_config
    from kosmos.summary import summarize
    from tests.helpers import ROOT

    counts = summarize(load_config(ROOT / "configs" / "kosmos1.yaml"))
    assert 1.5e9 < counts["total"] < 1.75e9
    assert 1.25e9 < counts["decoder"] + counts["embeddings"] < 1.4e9
    assert counts["embeddings"] == 64007 * 2048  # tied: counted once
    assert isinstance(counts, dict) and Kosmos  # import sanity


def test_all_blocks_trainable_trains_the_whole_tower():
    model = tiny_model("vision.trainable_blocks=2")  # tiny.yaml's tower has 2 blocks
    ids, mask = make_row(model, 2, 1, 3)
    model(ids, random_images(model, 1), mask, labels=ids).loss.backward()
    frozen = [n for n, p in model.vision.named_parameters() if not p.requires_grad or p.grad is None]
    assert not frozen


# ----------------------------------------------------------------------------- QuickGELU (OpenAI CLIP)


def test_quick_gelu_resolution():
    from kosmos.vision import resolve_quick_gelu

    def resolve(*overrides):
        return resolve_quick_gelu(tiny_config(*overrides).vision)

    assert resolve("vision.pretrained=openai") is True
    assert resolve("vision.pretrained=laion2b_s32b_b82k") is False
    assert resolve("vision.model_name=ViT-B-32-quickgelu") is True  # from the architecture's name
    assert resolve() is False  # random tower
    assert resolve("vision.pretrained=/some/file.safetensors") is False  # nothing tells: documented default
    assert resolve("vision.pretrained=/some/file.safetensors", "vision.quick_gelu=true") is True
    assert resolve("vision.pretrained=openai", "vision.quick_gelu=false") is False  # forced
    with pytest.raises(ValueError, match="no_such_tag"):
        resolve("vision.pretrained=no_such_tag")


# ----------------------------------------------------------------------------- embedding scales


def _rms(x: torch.Tensor) -> float:
    return x.float().pow(2).mean().sqrt().item()


def _paper_embedding_rms(*overrides: str) -> tuple[float, float]:
    """(token RMS, image RMS) at init with configs/kosmos1.yaml's dims, from the model's own builders: the
    token embedding (dim 2048; a 4096-row vocabulary, as the RMS does not depend on the row count) and the
    connector (ViT-L/14 width 1024, 64 latents, 2048 out, Magneto gain of the 24 decoder layers), fed by a
    random ViT-L/14 tower at 224 px cut to 1 block: its patch tokens leave `ln_post`, so their RMS is 1
    whatever the depth. The 24-layer decoder itself is not built (it is what makes it slow, and nothing in
    it acts before the first layer: `embed_scale` is 1 and there is no embedding LayerNorm)."""
    from kosmos.config import load_config
    from kosmos.model import build_connector, build_token_embedding
    from tests.helpers import ROOT

    cfg = load_config(ROOT / "configs" / "kosmos1.yaml", ["decoder.vocab_size=4096", *overrides])
    torch.manual_seed(0)
    embed = build_token_embedding(cfg.decoder)
    ids = torch.randint(0, cfg.decoder.vocab_size, (4, 256))
    cfg_vision = load_config(ROOT / "configs" / "kosmos1.yaml", ["vision.layers=1"]).vision
    tower = VisionEncoder(cfg_vision).eval()
    with pytest.warns(UserWarning, match="randomly initialised"):
        loaded_vision(cfg_vision)
    resampler, proj = build_connector(cfg, tower.width)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        patches = tower(images)
        assert patches.shape == (2, 256, 1024)
        image_embeds = proj(resampler(patches).squeeze(1))
        assert image_embeds.shape == (2, 64, 2048)
        return _rms(embed(ids)), _rms(image_embeds)


def test_token_and_image_embeddings_enter_at_comparable_scale_paper_dims():
    """At init, with the paper's dims, token embeddings and projected image latents enter the decoder
    within 2x of each other (before decoder.scale_embedding: 0.022 vs 1.14, 52x apart)."""
    tokens, images = _paper_embedding_rms()
    assert tokens == pytest.approx(1.0, rel=0.02)
    assert 0.5 < tokens / images < 2.0, (tokens, images)
    old_tokens, old_images = _paper_embedding_rms("decoder.scale_embedding=false")
    assert old_tokens == pytest.approx(2048**-0.5, rel=0.02)
    assert old_images / old_tokens > 20  # the old imbalance, so this test can fail


def test_first_layer_sees_tokens_and_images_at_comparable_scale():
    """What the first decoder layer receives in the tiny model: text and image positions within 2x; the
    scale is in the lookup only, so the tied output projection is unscaled and decoding steps that call
    `decoder.embed_tokens` get the same scale as the prompt."""
    model = tiny_model().eval()
    ids, mask = make_row(model, 20, 2, 20)
    seen = {}
    model.decoder.layers[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        logits = model(ids, random_images(model, 2), mask).logits
    x = seen["x"][0]
    text, image = _rms(x[~mask[0]]), _rms(x[mask[0]])
    assert text == pytest.approx(1.0, rel=0.1)
    assert 0.5 < text / image < 2.0, (text, image)
    emb = model.decoder.embed_tokens
    assert emb.scale == pytest.approx(math.sqrt(model.cfg.decoder.dim))
    assert model.decoder.output_projection.weight is emb.weight
    h = model.decoder(model.embed(ids, random_images(model, 2), mask), features_only=True)
    assert torch.allclose(logits, h @ emb.weight.T, atol=1e-5)


@pytest.mark.parametrize("source", ["text", "captions", "interleaved"])
def test_the_forward_reads_nothing_back_from_the_device(source):
    """Each source's micro-batch through the forward (and its loss) under fake tensors, whose values do not
    exist: any int()/.item()/.tolist() of a device tensor in the forward fails there (on a GPU it would stall
    the queue of kernels every micro-batch). Before: Kosmos.embed read the image-slot count back."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tests.test_train import _micro_batch

    model = tiny_model()
    rows = {"text": [(30, 0, 0), (12, 0, 0)], "captions": [(0, 1, 6), (0, 1, 3)],
            "interleaved": [(5, 1, 4), (3, 2, 10)]}[source]
    batch = _micro_batch(model, rows, 40, seed=1)
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "image_mask", "padding_mask",
                                                     "images")}
    if source == "text":
        batch.pop("images")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) for k, v in batch.items()}
        out = model(**fake)
    assert out.loss.shape == () and out.logits.shape[:2] == batch["input_ids"].shape


def test_evaluating_puts_the_model_back_in_its_mode_even_after_an_error():
    from kosmos.model import evaluating

    model = tiny_model()
    for mode in (True, False):
        model.train(mode)
        with pytest.raises(RuntimeError), evaluating(model):
            assert not model.training and not model.decoder.training
            raise RuntimeError("inside")
        assert model.training is mode and model.decoder.training is mode


def test_clip_weights_that_cannot_fit_the_tower_are_refused_before_any_download(monkeypatch):
    """vision.pretrained=openai with tiny.yaml's width-64 tower: one line naming the overrides, and nothing
    fetched (it used to download ViT-L's weights, then fail after 106 lines)."""
    import open_clip

    from kosmos.weights import CheckpointError

    def no_download(*a, **kw):
        raise AssertionError("nothing may be downloaded for a tower the weights cannot fill")

    monkeypatch.setattr(open_clip, "create_model", no_download)
    enc = VisionEncoder(tiny_config("vision.pretrained=openai").vision)
    with pytest.raises(CheckpointError) as e:
        _loaded_into(enc)
    msg = str(e.value)
    assert "\n" not in msg and "vision.width=64 (the weights' 1024)" in msg and "vision.layers=2" in msg
    assert "vision.pretrained=null" in msg


def _loaded_into(enc):
    from kosmos.weights import load_clip_weights

    load_clip_weights(enc)


def test_summary_prints_each_count_in_the_unit_that_suits_it():
    from kosmos.summary import human

    assert [human(n) for n in (7, 4_160, 336_512, 12_345_678, 1_666_511_872)] == [
        "7", "4.2K", "336.5K", "12.3M", "1.667B"]  # a toy model was 0.000B
