from pathlib import Path

import pytest

from kosmos.config import Config, ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_paper_config_matches_the_paper():
    cfg = load_config(CONFIGS[0].parent / "kosmos1.yaml")
    d = cfg.decoder
    assert (d.layers, d.dim, d.ffn_dim, d.heads, d.vocab_size, d.max_len) == (24, 2048, 8192, 32, 64007, 2048)
    assert cfg.connector.num_latents == 64 and cfg.vision.model_name == "ViT-L-14"


def test_typo_in_override_names_the_key():
    with pytest.raises(ConfigError, match=r"decoder\.layerz.*did you mean 'decoder\.layers'"):
        load_config(None, ["decoder.layerz=3"])


def test_typo_in_yaml_names_the_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("decoder:\n  layers: 2\n  num_heads: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'decoder\.num_heads'"):
        load_config(p)


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"'decodr'.*did you mean 'decoder'"):
        load_config(None, ["decodr.layers=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"'decoder\.layers'.*expected int"):
        load_config(None, ["decoder.layers=many"])


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"'decoder\.heads'.*divide"):
        load_config(None, ["decoder.dim=100", "decoder.heads=3"])
    with pytest.raises(ConfigError, match=r"'decoder\.attention'"):
        load_config(None, ["decoder.attention=flash"])


def test_overrides_apply_and_coerce():
    cfg = load_config(None, ["decoder.layers=3", "decoder.dropout=0", "vision.pretrained=openai",
                             "vision.width=null"])
    assert cfg.decoder.layers == 3
    assert cfg.decoder.dropout == 0.0 and isinstance(cfg.decoder.dropout, float)
    assert cfg.vision.pretrained == "openai" and cfg.vision.width is None


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


ACCELERATE = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_every_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.mixed_precision == "bf16"
