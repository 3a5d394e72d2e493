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


def test_vision_sizes_are_resolved_in_the_config_without_torch():
    """The tower's input size and patch count come from open_clip's model config, read without importing
    open_clip or torch, so the data pipeline, evaluation and generation all size images alike."""
    import subprocess
    import sys

    code = ("import sys; from kosmos.config import load_config; "
            "c = load_config(None, ['vision.model_name=ViT-L-14-336']).vision; "
            "print(c.input_size, c.num_patches, c.feature_width, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out == ["336", "576", "1024", "False"]
    tiny = load_config(CONFIGS[0].parent / "tiny.yaml")
    assert (tiny.vision.input_size, tiny.vision.num_patches) == (64, 64)
    with pytest.raises(ConfigError, match="vision.model_name.*ViT-Q-99"):
        _ = load_config(None, ["vision.model_name=ViT-Q-99"]).vision.input_size


def test_image_flops_sit_beside_token_flops():
    cfg = load_config(CONFIGS[0].parent / "kosmos1.yaml")
    # ViT-L/14 forward alone is at least 2 x 303M parameters x 257 tokens; the trainable last block, the
    # resampler and the projection add their forward and backward.
    assert 2 * 303e6 * 257 < cfg.flops_per_image() < 1.4 * 2 * 303e6 * 257
    frozen = load_config(CONFIGS[0].parent / "kosmos1.yaml", ["vision.trainable_blocks=0"])
    assert frozen.flops_per_image() < cfg.flops_per_image()
    assert cfg.flops_per_token() == cfg.decoder.flops_per_token()


def test_encoder_and_model_agree_on_the_image_size(tiny_tokenizer):
    import warnings

    from kosmos.model import Kosmos
    from kosmos.sequence import SequenceEncoder

    cfg = load_config(CONFIGS[0].parent / "tiny.yaml", ["vision.image_size=48"])
    enc = SequenceEncoder.from_config(cfg, tiny_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Kosmos(cfg)
    assert enc.image_size == model.vision.image_size == 48
    assert enc.num_latents == model.num_latents



@pytest.mark.parametrize("spelling, value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("+2e-3", 2e-3), ("2e3", 2000.0),
                                             ("1.0e-4", 1e-4), (".5", 0.5), ("3", 3.0), ("1_000.5", 1000.5),
                                             ("5e+2", 500.0)])
def test_every_float_spelling_is_a_float_in_overrides_and_yaml(tmp_path, spelling, value):
    """PyYAML (YAML 1.1) reads `1e-4` as a string: float fields take it, in overrides and in YAML files,
    in lists (optim.betas) and in `float | None` fields too."""
    cfg = load_config(None, [f"optim.lr={spelling}", f"train.peak_flops={spelling}"])
    assert cfg.optim.lr == value and isinstance(cfg.optim.lr, float)
    assert cfg.train.peak_flops == value and isinstance(cfg.train.peak_flops, float)
    p = tmp_path / "c.yaml"
    p.write_text(f"optim:\n  lr: {spelling}\n  eps: {spelling}\n  betas: [9e-1, 98e-2]\n")
    cfg = load_config(p)
    assert cfg.optim.lr == cfg.optim.eps == value and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.9, 0.98]


def test_words_and_bad_numbers_are_still_refused_by_name():
    for bad in ("fast", "1e-4x", "nan", "1e", "e-4"):
        with pytest.raises(ConfigError, match=r"'optim\.lr'"):
            load_config(None, [f"optim.lr={bad}"])
    with pytest.raises(ConfigError, match=r"'decoder\.layers'.*expected int"):
        load_config(None, ["decoder.layers=2e0"])  # int fields stay ints
    with pytest.raises(ConfigError, match=r"'optim\.lr'.*positive"):
        load_config(None, ["optim.lr=-1e-4"])


def test_the_help_example_override_is_accepted(capsys):
    import train_kosmos

    with pytest.raises(SystemExit):
        train_kosmos.parse_args(["--help"])
    assert "optim.lr=1e-4" in capsys.readouterr().out  # the example --help gives works as given
    cfg = load_config(CONFIGS[0].parent / "tiny.yaml", ["train.max_steps=100", "optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4


# ----------------------------------------------------------------------------- issue 22: items 12 and 13


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    p = tmp_path / "twice.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\ndecoder:\n  layers: 2\noptim:\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: config key 'optim' is given twice \(lines 1 and "
                                          r"5\)"):
        load_config(p)
    p.write_text("optim:\n  lr: 1.0e-3\n  warmup_steps: 3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"'optim\.lr' is given twice \(lines 2 and 4\)"):
        load_config(p)
    p.write_text("train:\n  eval_tasks:\n  - {task: vqa, data: x, data: y}\n")
    with pytest.raises(ConfigError, match=r"'train\.eval_tasks\[0\]\.data' is given twice"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"override 'train\.eval_tasks=.*': config key "
                                          r"'train\.eval_tasks\[0\]\.data' is given twice"):
        load_config(None, ["train.eval_tasks=[{task: vqa, data: x, data: y}]"])
    # a key that overrides one brought in by a merge key (<<) is not a duplicate
    p.write_text("optim:\n  <<: {lr: 1.0e-3, warmup_steps: 3}\n  lr: 2.0e-3\n")
    assert load_config(p).optim.lr == 2e-3


def test_seed_and_vocab_size_are_bounded_in_the_config():
    """Both passed validation and failed later with a traceback: numpy's seed range, a 256 GB embedding."""
    assert load_config(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1
    for seed in (2**75, 2**32, -1):
        with pytest.raises(ConfigError, match=r"config key 'seed': must be in 0 \.\. 4294967295"):
            load_config(None, [f"seed={seed}"])
    with pytest.raises(ConfigError, match=r"'decoder\.vocab_size': must be at most 16777216"):
        load_config(None, ["decoder.vocab_size=1000000000"])


BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
"""


def test_an_alias_bomb_in_eval_task_values_is_refused_before_anything_is_saved(tmp_path):
    """A 1.7 KB file whose eval_tasks values (only their keys were checked) expanded to a 128 MB config.yaml,
    written twice, and a 125 MB trainer_state.json: the values are checked, and the size of the whole config
    once expanded is bounded."""
    from kosmos.config import MAX_CONFIG_SIZE

    bomb = "".join(f"  {line}\n" for line in BOMB.splitlines())
    p = tmp_path / "bomb.yaml"
    p.write_text(f"x-bomb:\n{bomb}train:\n  eval_tasks:\n  - task: vqa\n    data: x.jsonl\n"
                 "    stop: *h\n")
    assert p.stat().st_size < 2000
    with pytest.raises(ConfigError, match=r"bomb\.yaml: config key 'x-bomb\.g': the config is larger than "
                                          r"8,000,000 characters"):
        load_config(p)  # 10**8 values: refused by size before anything else looks at it
    inner = "".join(f"      {line}\n" for line in BOMB.splitlines())
    p.write_text(f"train:\n  eval_tasks:\n  - task: vqa\n    data: x.jsonl\n    stop:\n{inner}")
    with pytest.raises(ConfigError, match=r"'train\.eval_tasks\[0\]\.stop\.g': the config is larger than"):
        load_config(p)
    # small nested values are refused by the check of the values; flat lists of scalars are kept
    with pytest.raises(ConfigError, match=r"'train\.eval_tasks\[0\]\.stop': must be a number, a string or a "
                                          r"list of them"):
        load_config(None, ["train.eval_tasks=[{task: vqa, data: x, stop: [[a, b], [c]]}]"])
    cfg = load_config(None, ["train.eval_tasks=[{task: vqa, data: x, stop: ['.', '?'], num_beams: 2}]"])
    assert cfg.train.eval_tasks[0]["stop"] == [".", "?"]
    # a flat list of aliases of one long string: bounded by size too
    long = "y" * 100_000
    p.write_text(f"s: &s {long}\ntrain:\n  eval_tasks:\n  - task: vqa\n    data: x\n    stop: ["
                 + ", ".join(["*s"] * (MAX_CONFIG_SIZE // 100_000 + 1)) + "]\n")
    with pytest.raises(ConfigError, match=r"'train\.eval_tasks\[0\]\.stop': the config is larger than"):
        load_config(p)
    p.write_text("train:\n  eval_tasks: &t\n  - task: vqa\n    data: x\n    stop: *t\n")
    with pytest.raises(ConfigError, match=r"'train\.eval_tasks\[0\]\.stop': contains itself"):
        load_config(p)


def test_the_keys_fixed_on_resume_come_from_the_fields_metadata():
    """One source for what a resume may not change: the config fields' `fixed_on_resume` metadata, from which
    the refusal (kosmos.checkpoint.config_changes) and `--allow-config-change`'s help are derived."""
    import train_kosmos
    from kosmos.config import fixed_on_resume_keys, is_fixed_on_resume

    fixed = ["seed", "decoder.max_len", "tokenizer.path", "data.mixture_tolerance", "data.text.shards",
             "data.captions.micro_batch_size", "data.sources.inst.tokens_per_step",
             "data.interleaved.max_tokens", "data.text.loss", "data.captions.caption_choice",
             "data.text.shuffle_buffer", "data.sources.x.kind"]
    free = ["decoder.dim", "optim.lr", "train.max_steps", "data.text.workers", "data.text.eval_shards",
            "data.text.max_epochs", "data.allow_missing_shards", "data.allow_mixture_drift",
            "data.read_timeout", "data.read_min_speed", "data.sources.x.workers", "data.text", "data.sources",
            "no.such.key"]
    assert [k for k in fixed if not is_fixed_on_resume(k)] == []
    assert [k for k in free if is_fixed_on_resume(k)] == []
    keys = fixed_on_resume_keys()
    assert {"seed", "decoder.max_len", "tokenizer.path", "data.<source>.shards"} <= set(keys)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        train_kosmos.parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    assert all(k in text for k in keys), text


def test_importing_the_config_imports_neither_torch_nor_open_clip():
    """`import kosmos.config` stays light (a config is loaded and checked before anything heavy; open_clip's
    model configs are read from its files, kosmos.config.clip): the whole package, without torch."""
    import subprocess
    import sys

    code = ("import kosmos.config, sys; heavy = sorted({'torch', 'open_clip'} & set(sys.modules)); "
            "assert not heavy, heavy; print([m for m in sys.modules if m.startswith('kosmos.config.')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "'kosmos.config.loading'" in out.stdout and "'kosmos.config.migrations'" in out.stdout


def test_a_saved_config_carries_its_format_and_loads_as_it_is(tmp_path):
    """save_config writes the format first (`config_format`, no config key: not in to_dict); load_config
    reads and drops it, as a checkpoint's config or not."""
    from kosmos.config import CONFIG_FORMAT, save_config

    cfg = load_config(None, ["decoder.layers=3", "decoder.scale_embedding=false"])
    save_config(cfg, tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text().startswith(f"config_format: {CONFIG_FORMAT}\n")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert load_config(tmp_path / "config.yaml", legacy=True) == cfg
    assert Config.from_checkpoint(tmp_path) == cfg
    assert "config_format" not in cfg.to_dict()


def test_a_checkpoint_config_is_migrated_from_its_format(tmp_path):
    """A checkpoint's config.yaml without `config_format` (older code) is format 1: a key it lacks takes the
    behaviour it was trained with (decoder.scale_embedding: false), in config.yaml or trainer_state.json's
    copy. One of today's format, or a config written by hand, takes today's default instead; a file that
    says `config_format: 1` is migrated wherever it is loaded from."""
    import json

    import yaml

    from kosmos.config import CONFIG_FORMAT, save_config

    path = tmp_path / "config.yaml"
    save_config(Config(), path)
    data = yaml.safe_load(path.read_text())
    del data["decoder"]["scale_embedding"]

    def written(**top) -> Path:
        path.write_text(yaml.safe_dump({**{k: v for k, v in data.items() if k != "config_format"}, **top}))
        return path

    assert Config.from_checkpoint(written().parent).decoder.scale_embedding is False
    assert load_config(written()).decoder.scale_embedding is True  # by hand: today's default
    assert Config.from_checkpoint(written(config_format=CONFIG_FORMAT).parent).decoder.scale_embedding is True
    assert load_config(written(config_format=1)).decoder.scale_embedding is False
    path.unlink()
    old = {k: v for k, v in data.items() if k != "config_format"}
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 1, "config": old}))
    assert Config.from_checkpoint(tmp_path).decoder.scale_embedding is False


@pytest.mark.parametrize("value, message", [
    ("99", r"the config was saved in format 99 by newer code; this code reads up to format \d+: update "),
    ("0", "must be a whole number >= 1"), ("two", "must be a whole number >= 1"),
    ("true", "must be a whole number >= 1"), ("1.5", "must be a whole number >= 1")])
def test_a_config_format_this_code_cannot_read_is_refused_naming_the_key(tmp_path, value, message):
    path = tmp_path / "config.yaml"
    path.write_text(f"config_format: {value}\ndecoder:\n  layers: 2\n")
    for legacy in (False, True):
        with pytest.raises(ConfigError, match=rf"config\.yaml: config key 'config_format': {message}"):
            load_config(path, legacy=legacy)


ROOT = Path(__file__).resolve().parents[1]


def test_relative_paths_in_a_file_are_read_against_its_folder_and_overrides_against_the_cwd(
        tmp_path, monkeypatch):
    """Every path key (kosmos.config.paths.path_keys) of a config file is read against the file's folder;
    URLs, pipe: commands, absolute paths and open_clip tags are kept; an override is read against the
    working directory."""
    from kosmos.config.paths import path_keys

    folder = tmp_path / "cfgs"
    folder.mkdir()
    (folder / "c.yaml").write_text(
        "tokenizer: {path: ../tok}\n"
        "vision: {pretrained: weights/clip.safetensors}\n"
        "data:\n"
        "  captions: {shards: ['cap-{000..009}.tar', 'https://h/x-{0..2}.tar', 'pipe:cat a.tar', /abs/s],\n"
        "             eval_shards: [held/*.tar]}\n"
        "  sources: {more: {kind: text, shards: [more], tokens_per_step: 10}}\n"
        "train:\n"
        "  output_dir: runs/r\n"
        "  init_from: ../ckpt\n"
        "  eval_tasks: [{task: vqa, data: vqa.jsonl, annotations: ann.json, images: img, limit: 2}]\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(folder / "c.yaml", ["data.text.shards=[mine]"])
    f = str(folder)
    assert cfg.tokenizer.path == str(tmp_path / "tok")
    assert cfg.vision.pretrained == f"{f}/weights/clip.safetensors"
    assert cfg.data.captions.shards == [f"{f}/cap-{{000..009}}.tar", "https://h/x-{0..2}.tar",
                                        "pipe:cat a.tar", "/abs/s"]
    assert cfg.data.captions.eval_shards == [f"{f}/held/*.tar"]
    assert cfg.data.sources["more"].shards == [f"{f}/more"]
    assert cfg.data.text.shards == [str(elsewhere / "mine")]  # an override: the working directory
    assert cfg.train.output_dir == f"{f}/runs/r" and cfg.train.init_from == str(tmp_path / "ckpt")
    task = cfg.train.eval_tasks[0]
    assert (task["data"], task["annotations"], task["images"], task["limit"]) == (
        f"{f}/vqa.jsonl", f"{f}/ann.json", f"{f}/img", 2)
    assert load_config(None, ["vision.pretrained=openai"]).vision.pretrained == "openai"  # a tag
    assert load_config(None, ["tokenizer.path=~/tok"]).tokenizer.path == str(Path.home() / "tok")
    assert load_config(None).train.output_dir == str(elsewhere / "runs/kosmos")  # a default: the cwd
    assert {"tokenizer.path", "vision.pretrained", "train.output_dir", "train.init_from",
            "data.<source>.shards", "data.<source>.eval_shards",
            "train.eval_tasks[].data"} <= set(path_keys())


def test_a_saved_config_holds_absolute_paths_and_works_from_anywhere(tmp_path, monkeypatch):
    """save_config writes paths absolute; an older saved config (format 2, or a checkpoint's without a
    format) keeps its relative paths relative to the working directory, as the code that wrote it read
    them."""
    import yaml

    from kosmos.config import save_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.output_dir=out"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["tokenizer"]["path"] == str(ROOT / "demo_out" / "tokenizer")
    assert saved["train"]["output_dir"] == str(tmp_path / "out")
    assert saved["data"]["text"]["shards"] == [str(ROOT / "demo_out" / "shards" / "text")]
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert load_config(tmp_path / "config.yaml") == cfg
    for old in ({"config_format": 2}, {}):  # saved by older code: relative to the cwd
        (tmp_path / "old.yaml").write_text(yaml.safe_dump({**old, "tokenizer": {"path": "tok"}}))
        loaded = load_config(tmp_path / "old.yaml", legacy=True)
        assert loaded.tokenizer.path == str(tmp_path / "sub" / "tok")


def test_a_resume_compares_an_older_checkpoints_relative_paths_as_absolute(tmp_path, monkeypatch):
    """A checkpoint of older code saved its paths as given; the same paths, now absolute, are no change."""
    from kosmos import checkpoint as ck

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["tokenizer.path=tok", "data.text.shards=[shards/t]"])
    saved = {**Config().to_dict(), "tokenizer": {"path": "tok"}}
    saved["data"]["text"]["shards"] = ["shards/t"]
    assert ck.config_changes(tmp_path, saved, cfg) == []
    saved["data"]["text"]["shards"] = ["shards/other"]
    with pytest.raises(ConfigError, match=f"data.text.shards: \\['{tmp_path}/shards/other'\\]"):
        ck.config_changes(tmp_path, saved, cfg)


def test_a_preset_name_loads_the_shipped_config_and_an_unknown_one_lists_them(tmp_path, monkeypatch):
    from kosmos.config import presets

    monkeypatch.chdir(tmp_path)
    assert {"tiny", "kosmos1"} <= set(presets())
    assert load_config("tiny") == load_config(ROOT / "configs" / "tiny.yaml")
    assert load_config("kosmos1").decoder.layers == 24
    with pytest.raises(ConfigError, match=r"^config 'tiyn': no such file, and no preset of that name; "
                                          r"presets: .*kosmos1, .*tiny"):
        load_config("tiyn")
    with pytest.raises(ConfigError, match=r"config file not found: tiny\.yaml"):
        load_config("tiny.yaml")  # a file name, not a preset: read from here
    (tmp_path / "mine").write_text("decoder: {layers: 3}\n")  # a bare name that is a file here
    assert load_config("mine").decoder.layers == 3


def test_the_own_data_template_names_every_path_relative_to_its_copy(tmp_path, monkeypatch):
    """configs/templates/my_data.yaml gives every path key (path_keys, but a benchmark's) in one block,
    read against the folder of the copy, wherever the command runs; it is no preset."""
    import shutil

    from kosmos.config import presets
    from kosmos.config.paths import path_keys

    copy = tmp_path / "exp" / "my_data.yaml"
    copy.parent.mkdir()
    shutil.copy(ROOT / "configs" / "templates" / "my_data.yaml", copy)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(copy)
    keys = [k.replace("<source>", s) for k in path_keys() if "eval_tasks" not in k
            for s in (("text", "captions", "interleaved") if "<source>" in k else ("",))]
    assert [k for k in keys if not cfg.given(k)] == []
    assert cfg.tokenizer.path == str(copy.parent / "tok")
    assert cfg.data.captions.shards == [str(copy.parent / "shards" / "mine")]
    assert cfg.train.output_dir == str(copy.parent / "runs" / "mine")
    assert "my_data" not in presets()
