"""kosmos.weights: CLIP weights loaded into the vision tower (local files without pickle, the `openai` tag
with QuickGELU) and checkpoints written by older code loaded with what they were trained with. (Moved here
unchanged from test_model.py; non-finite weights: test_checkpoint.py.)"""

import pytest
import torch

from kosmos.vision import VisionEncoder
from kosmos.weights import load_model
from tests.helpers import loaded_vision, make_row, random_images, tiny_config, tiny_model


def test_vision_weights_load_from_local_files_without_pickle(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny_config().vision
    torch.manual_seed(1)
    src = VisionEncoder(cfg)
    sd = {k: v.clone() for k, v in src.visual.state_dict().items()}
    save_file(sd, str(tmp_path / "vision.safetensors"))
    torch.save({"state_dict": {f"visual.{k}": v for k, v in sd.items()}}, tmp_path / "clip_full.pt")
    for name in ("vision.safetensors", "clip_full.pt"):
        cfg.pretrained = str(tmp_path / name)
        torch.manual_seed(2)
        enc = loaded_vision(cfg)
        for k, v in enc.visual.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)
    # a pickle that would run code is refused, with the file named
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    cfg.pretrained = str(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt"):
        loaded_vision(cfg)


# ----------------------------------------------------------------------------- QuickGELU (OpenAI CLIP)

TINY_B32 = ("vision.model_name=ViT-B-32",)  # a small text tower for open_clip's full CLIP; tiny.yaml's tower


def _random_clip(vision_cfg, quick_gelu: bool, seed: int = 3):
    """A randomly initialised full open_clip CLIP with `vision_cfg`'s (tiny) tower."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.create_model(vision_cfg.model_name, quick_gelu=quick_gelu,
                                  vision_cfg=vision_cfg.resolved()).eval()


def _open_clip_tokens(visual, enc, images):
    """open_clip's own patch tokens (its forward: ln_post, class token dropped), same pixels as `enc`."""
    visual.output_tokens = True
    with torch.no_grad():
        return visual(enc.normalize(images))[1]


def test_openai_tag_builds_quickgelu_and_matches_open_clip(tmp_path, monkeypatch):
    """`vision.pretrained=openai`: open_clip's pretrained config says QuickGELU, so the tower must use it
    (open_clip 2.32's create_model builds GELU for it and only warns). The download is replaced by a saved
    random QuickGELU CLIP; our patch tokens must be open_clip's own, and a GELU tower's are not."""
    import open_clip.factory
    from torch import nn

    cfg = tiny_config(*TINY_B32, "vision.pretrained=openai").vision
    ref = _random_clip(cfg, quick_gelu=True)
    torch.save(ref.state_dict(), tmp_path / "openai.bin")
    fetched = []

    def fake_download(pretrained_cfg, *args, **kwargs):
        fetched.append(pretrained_cfg)
        return str(tmp_path / "openai.bin")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", fake_download)
    # the served "openai" weights are the tiny tower's: the fit check (before any download) must see them so
    import kosmos.config

    served = {**kosmos.config.open_clip_architecture(cfg.model_name), "vision_cfg": cfg.resolved()}
    monkeypatch.setattr("kosmos.config.open_clip_architecture", lambda name: served)
    assert VisionEncoder(cfg) and not fetched  # building the model downloads nothing
    enc = loaded_vision(cfg).eval()
    assert fetched and fetched[0]["quick_gelu"] is True
    assert enc.quick_gelu is True
    assert isinstance(enc.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)

    images = torch.randint(0, 256, (2, 3, enc.image_size, enc.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = enc(images)
    want = _open_clip_tokens(ref.visual, enc, images)
    assert ours.shape == want.shape == (2, enc.num_patches, enc.width)
    assert (ours - want).abs().max() < 1e-5

    gelu = _random_clip(cfg, quick_gelu=False)
    gelu.load_state_dict(ref.state_dict())
    assert isinstance(gelu.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)
    assert (_open_clip_tokens(gelu.visual, enc, images) - want).abs().max() > 1e-3  # the test can fail


def test_local_openai_weights_with_quick_gelu_true(tmp_path):
    """A local file carries no activation: `vision.quick_gelu=true` gives open_clip's QuickGELU tokens."""
    cfg = tiny_config(*TINY_B32).vision
    ref = _random_clip(cfg, quick_gelu=True)
    torch.save(ref.state_dict(), tmp_path / "clip.pt")
    cfg = tiny_config(*TINY_B32, f"vision.pretrained={tmp_path / 'clip.pt'}", "vision.quick_gelu=true").vision
    enc = loaded_vision(cfg).eval()
    assert enc.quick_gelu is True
    images = torch.randint(0, 256, (2, 3, enc.image_size, enc.image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = enc(images)
    want = _open_clip_tokens(ref.visual, enc, images)
    assert (ours - want).abs().max() < 1e-5
    cfg.quick_gelu = False
    with torch.no_grad():
        gelu_tokens = loaded_vision(cfg).eval()(images)
    assert (gelu_tokens - want).abs().max() > 1e-3


# ----------------------------------------------------------------------------- checkpoints by older code


def _saved_checkpoint(tmp_path, model, drop: dict[str, list[str]], set_: dict[str, dict] | None = None):
    """A checkpoint of `model` whose config.yaml lacks the keys in `drop` (as written by older code, which
    wrote no `config_format` either: kosmos.config.migrations)."""
    import yaml

    from tests.helpers import checkpoint_dir

    (tmp_path / "tok").mkdir()
    ckpt = checkpoint_dir(tmp_path / "run", tmp_path / "tok", model)
    data = yaml.safe_load((ckpt / "config.yaml").read_text())
    del data["config_format"]
    for section, keys in drop.items():
        for k in keys:
            del data[section][k]
    for section, values in (set_ or {}).items():
        data[section].update(values)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return ckpt


def test_checkpoint_predating_quick_gelu_keeps_gelu(tmp_path):
    """Before vision.quick_gelu, `openai` weights ran with GELU: such a checkpoint is rebuilt with GELU
    (what it was trained with), and its weights are refused by a model that would run QuickGELU."""
    from kosmos.checkpoint import load_model_weights
    from kosmos.config import Config

    ckpt = _saved_checkpoint(tmp_path, tiny_model(), drop={"vision": ["quick_gelu"]},
                             set_={"vision": {"pretrained": "openai"}})
    assert Config.from_checkpoint(ckpt).vision.quick_gelu is False
    assert load_model(ckpt).vision.quick_gelu is False  # no download: weights from the checkpoint
    with pytest.raises(ValueError, match=r"vision\.quick_gelu=false"):
        load_model_weights(tiny_model("vision.quick_gelu=true"), ckpt)
    load_model_weights(tiny_model("vision.quick_gelu=false"), ckpt)


def test_checkpoint_predating_scale_embedding_loads_unscaled(tmp_path):
    """A checkpoint whose config.yaml lacks decoder.scale_embedding was trained without the scale: it is
    rebuilt without it (same logits as the model that was saved), and a scaled model refuses its weights."""
    from kosmos.checkpoint import load_model_weights
    from kosmos.config import Config

    old = tiny_model("decoder.scale_embedding=false").eval()
    ckpt = _saved_checkpoint(tmp_path, old, drop={"decoder": ["scale_embedding"]})
    assert Config.from_checkpoint(ckpt).decoder.scale_embedding is False
    loaded = load_model(ckpt)
    assert loaded.decoder.embed_tokens.scale == 1.0
    ids, mask = make_row(old, 3, 1, 4)
    images = random_images(old, 1)
    with torch.no_grad():
        assert torch.allclose(loaded(ids, images, mask).logits, old(ids, images, mask).logits, atol=1e-5)
    with pytest.raises(ValueError, match=r"decoder\.scale_embedding=false"):
        load_model_weights(tiny_model(), ckpt)
