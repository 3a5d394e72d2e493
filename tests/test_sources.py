"""Named sources (`data.sources.<name>`): the config, the plan, the data, resume checks and a tiny training
with four of them."""

import json
import os
import re

import pytest
import torch

from kosmos.config import ConfigError, load_config
from tests.helpers import TINY, caption_shards, instruction_shards, interleaved_shards, text_shards

NL = 4  # image slots per image in these tests


def _source(name: str, kind: str | None, shards, budget: int, mbs: int, **extra) -> list[str]:
    """Overrides of one source under data.sources.<name> (kind None: data.<name>, the first spelling)."""
    key = f"data.{name}" if kind is None else f"data.sources.{name}"
    out = [f"{key}.kind={kind}"] if kind else []
    out += [f"{key}.shards=[{','.join(map(str, shards))}]", f"{key}.tokens_per_step={budget}",
            f"{key}.micro_batch_size={mbs}"]
    return out + [f"{key}.{k}={v}" for k, v in extra.items()]


def _no_tiny_sources() -> list[str]:
    """tiny.yaml's three sources left out (their demo shards do not exist here)."""
    return [f"data.{n}.tokens_per_step=0" for n in ("text", "captions", "interleaved")]


def test_named_sources_of_any_kind_with_every_source_key():
    cfg = load_config(TINY, [*_no_tiny_sources(),
                             *_source("books", "text", ["b.tar"], 1024, 4, workers=0, max_tokens=100),
                             *_source("instructions", "text", ["i.tar"], 512, 2, loss="response"),
                             *_source("coco", "captions", ["c.tar"], 2048, 8, caption_choice="all",
                                      eval_shards="[ce.tar]"),
                             *_source("docs", "interleaved", ["d.tar"], 1024, 4, shuffle_buffer=7)])
    d = cfg.data
    assert list(d.named_sources()) == ["text", "captions", "interleaved", "books", "instructions", "coco",
                                       "docs"]
    assert list(d.active_sources()) == ["books", "instructions", "coco", "docs"]
    assert [s.kind for s in d.active_sources().values()] == ["text", "text", "captions", "interleaved"]
    assert (d.sources["books"].workers, d.sources["books"].max_tokens) == (0, 100)
    assert d.sources["instructions"].loss == "response" and d.sources["docs"].shuffle_buffer == 7
    assert (d.sources["coco"].caption_choice, d.sources["coco"].eval_shards) == (
        "all", [os.path.abspath("ce.tar")])  # an override's path: read against the working directory
    # per-kind defaults: captions are capped at 512 tokens like data.captions; the budget defaults to 0
    assert d.sources["coco"].max_tokens == 512
    bare = load_config(None, ["data.sources.cc.kind=captions", "data.sources.web.kind=text"]).data
    assert (bare.sources["cc"].max_tokens, bare.sources["web"].max_tokens) == (512, 0)
    assert bare.sources["cc"].tokens_per_step == 0 and not bare.active_sources()
    assert d.key("books") == "data.sources.books" and d.key("text") == "data.text"
    assert d.source("coco") is d.sources["coco"] and d.source("text") is d.text
    with pytest.raises(ConfigError, match="no data source named 'nope'; the config has text, captions, "):
        d.source("nope")
    # the first spelling: three sources of their own kind (filled in)
    assert (d.text.kind, d.captions.kind, d.interleaved.kind) == ("text", "captions", "interleaved")


@pytest.mark.parametrize("overrides, message", [
    (["data.sources.web.kind=images"],
     "config key 'data.sources.web.kind': must be one of text, captions, interleaved, got 'images'"),
    (["data.sources.web.shards=[x]"], "config key 'data.sources.web.kind': is required: one of text, "),
    (["data.sources.captions.kind=captions"],
     "config key 'data.sources.captions': 'captions' is the name of data.captions: configure that source"),
    (["data.text.kind=captions"],
     "config key 'data.text.kind': data.text is the text source, got 'captions'"),
    (["data.sources.web.kind=text", "data.sources.web.shard=[x]"],
     "unknown config key 'data.sources.web.shard' \\(did you mean 'data.sources.web.shards'\\?\\)"),
    (["data.sources.web=3"], "config key 'data.sources.web': expected SourceConfig, got 3"),
    (["data.sources.web.kind=text", "data.sources.web.micro_batch_size=0"],
     "config key 'data.sources.web.micro_batch_size': must be positive"),
    (["data.sources.web.kind=captions", "data.sources.web.caption_choice=every"],
     "config key 'data.sources.web.caption_choice': must be one of first, random, all"),
    (["data.sources._mixture.kind=text"], "config key 'data.sources._mixture': a source name is a letter"),
])
def test_bad_named_sources_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_bad_named_source_on_the_command_line_exits_2_naming_the_key(tiny_tokenizer, capsys):
    import train_kosmos

    with pytest.raises(SystemExit) as e:
        train_kosmos.main(["--config", str(TINY), f"tokenizer.path={tiny_tokenizer.path}",
                           "data.sources.captions.kind=captions", "data.sources.captions.shards=[x]"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "'data.sources.captions': 'captions' is the name of data.captions" in err


def _three(tmp_path):
    return {"text": text_shards(tmp_path / "t", 2, 30), "captions": caption_shards(tmp_path / "c", 2, 20),
            "interleaved": interleaved_shards(tmp_path / "i", 2, 10)}


def _batches(loader, n: int) -> list[dict]:
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def _same_batches(xs: list[dict], ys: list[dict]) -> bool:
    return all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["images"], y["images"])
               and x["sample_positions"] == y["sample_positions"] for x, y in zip(xs, ys, strict=True))


def test_the_three_keys_give_the_same_plan_and_data_as_before(tmp_path, tiny_tokenizer):
    """data.text/captions/interleaved are three named sources: written under data.sources with other names,
    the same shards and keys give the same plan (names aside); their loaders read the micro-batches that the
    loaders built before named sources existed read (SourceDataset(kind, ..., seed=cfg.seed)), and a named
    source the same, with its own seed."""
    from kosmos.data import SourceLoader, build_loader, plan
    from kosmos.data.mixture import ratio, source_seed
    from kosmos.data.shards import expand_shards
    from kosmos.sequence import SequenceEncoder
    from tests.helpers import source_dataset

    shards = _three(tmp_path)
    keys = {"text": (1024, 4), "captions": (2048, 8), "interleaved": (1024, 4)}
    extra = {"workers": 0, "shuffle_buffer": 5}
    drift = "data.allow_mixture_drift=true"  # 8 ranks need 8 micro-batches: the plans must still agree
    old = load_config(TINY, [drift, *[o for n, (b, m) in keys.items()
                                      for o in _source(n, None, shards[n], b, m, **extra)]])
    new = load_config(TINY, [drift, *_no_tiny_sources(),
                             *[o for n, (b, m) in keys.items()
                               for o in _source(f"my_{n}", n, shards[n], b, m, **extra)]])
    for world_size in (1, 2, 3, 8):
        p_old, p_new = plan(old, world_size), plan(new, world_size)
        assert list(p_old.sources) == ["text", "captions", "interleaved"]
        assert list(p_new.sources) == ["my_text", "my_captions", "my_interleaved"]
        assert [s.micro_batches for s in p_old.sources.values()] == \
            [s.micro_batches for s in p_new.sources.values()]
        assert [list(s.values()) for s in p_old.slots] == [list(s.values()) for s in p_new.slots]
        assert ratio(p_old, names=False) == ratio(p_new, names=False)
    assert plan(old, 1).tokens == 4096
    assert ratio(plan(old, 1)) == "text:captions:interleaved 0.250:0.500:0.250"
    enc = SequenceEncoder(tiny_tokenizer, NL, 32)

    def before(cfg, name, kind, seed):  # what build_loader built before named sources existed
        src = cfg.data.source(name)
        return SourceLoader(source_dataset(
            kind, expand_shards(src.shards), enc, max_len=cfg.decoder.max_len,
            micro_batch_size=src.micro_batch_size, num_workers=src.workers, seed=seed,
            shuffle_buffer=src.shuffle_buffer, infinite=True, max_tokens=src.max_tokens, loss=src.loss,
            caption_choice=src.caption_choice))

    for name in keys:
        a, b = build_loader(old, name, enc), build_loader(new, f"my_{name}", enc)
        assert (a.dataset.kind, a.dataset.name) == (name, name)
        assert (b.dataset.kind, b.dataset.name) == (name, f"my_{name}")
        assert source_seed(old, name) == old.seed != source_seed(new, f"my_{name}")
        n = 4  # past the first epoch of the smaller sources
        xs, ys = _batches(a, n), _batches(b, n)
        assert _same_batches(xs, _batches(before(old, name, name, old.seed), n))
        assert _same_batches(ys, _batches(before(new, f"my_{name}", name, source_seed(new, f"my_{name}")), n))
        assert a.state_dict()["kind"] == b.state_dict()["kind"] == name


def test_two_named_sources_on_the_same_shards_read_them_in_their_own_order(tmp_path, tiny_tokenizer):
    from kosmos.data import build_loader
    from kosmos.sequence import SequenceEncoder

    shards = text_shards(tmp_path / "t", 4, 20)
    cfg = load_config(TINY, [*_no_tiny_sources(), *_source("a", "text", shards, 512, 2, workers=0),
                             *_source("b", "text", shards, 512, 2, workers=0)])
    enc = SequenceEncoder(tiny_tokenizer, NL, 32)
    a, b, a2 = (_batches(build_loader(cfg, n, enc), 3) for n in ("a", "b", "a"))
    assert not _same_batches(a, b) and _same_batches(a, a2)  # its own order, the same in every run


def test_mixture_block_warns_about_a_named_source_left_out_by_its_default_budget():
    from types import SimpleNamespace

    from kosmos.data.mixture import Mixture, plan
    from kosmos.training import describe_mixture

    cfg = load_config(None, ["data.captions.shards=[c]", "data.captions.tokens_per_step=500000",
                             "data.sources.web.kind=text", "data.sources.web.shards=[w]"])
    block = describe_mixture(SimpleNamespace(mixed_precision="no"), cfg, Mixture({}, plan(cfg)))
    assert block.splitlines()[-1] == \
        "  WARNING: data.sources.web has shards but tokens_per_step 0: it is left out"
    cfg = load_config(None, ["data.captions.shards=[c]", "data.captions.tokens_per_step=500000",
                             "data.sources.web.kind=text", "data.sources.web.tokens_per_step=1000"])
    block = describe_mixture(SimpleNamespace(mixed_precision="no"), cfg, Mixture({}, plan(cfg)))
    assert "WARNING" not in block


def test_a_three_key_checkpoint_config_resumes_unchanged():
    """A config saved before named sources existed (no `kind`, no `data.sources`) compares equal."""
    from kosmos.checkpoint import config_changes

    cfg = load_config(TINY)
    saved = cfg.to_dict()
    for name in ("text", "captions", "interleaved"):
        del saved["data"][name]["kind"]
    del saved["data"]["sources"]
    assert config_changes("ckpt", saved, cfg) == []


def test_resume_refuses_a_source_added_or_removed_unless_allowed(tmp_path):
    from kosmos.checkpoint import config_changes

    base = load_config(TINY)
    more = load_config(TINY, _source("instructions", "text", ["i.tar"], 512, 2))
    idle = load_config(TINY, ["data.sources.instructions.kind=text",
                              "data.sources.instructions.shards=[i.tar]"])
    with pytest.raises(ConfigError, match=r"ckpt was trained with other settings .*: source "
                       r"data.sources.instructions added\. "
                       r".*--allow-config-change data.sources.instructions$"):
        config_changes("ckpt", base.to_dict(), more)
    with pytest.raises(ConfigError, match="source data.sources.instructions removed"):
        config_changes("ckpt", more.to_dict(), base)
    with pytest.raises(ConfigError, match="data.sources.instructions.tokens_per_step: 512 -> 0"):
        config_changes("ckpt", more.to_dict(), idle)  # left out by its budget: a change of that key
    assert config_changes("ckpt", base.to_dict(), idle) == []  # a source that takes no part changes nothing
    assert config_changes("ckpt", base.to_dict(), more, ["data.sources.instructions"]) == \
        ["config changed since the checkpoint (allowed): source data.sources.instructions added"]
    assert config_changes("ckpt", more.to_dict(), base, ["data.sources"]) == \
        ["config changed since the checkpoint (allowed): source data.sources.instructions removed"]
    changed = load_config(TINY, _source("instructions", "text", ["j.tar"], 512, 2))
    i, j = os.path.abspath("i.tar"), os.path.abspath("j.tar")  # the overrides' paths, read against the cwd
    with pytest.raises(ConfigError, match=re.escape(f"data.sources.instructions.shards: ['{i}'] -> ['{j}']")):
        config_changes("ckpt", more.to_dict(), changed)
    with pytest.raises(ConfigError, match="--allow-config-change data.sources.other: not a config key"):
        config_changes("ckpt", more.to_dict(), base, ["data.sources.other"])


def test_eval_loss_takes_shards_of_any_named_source(tmp_path, tiny_tokenizer, capsys):
    from kosmos.eval import main
    from tests.helpers import checkpoint_dir, tiny_model

    model = tiny_model("data.sources.qa.kind=text", "data.sources.qa.micro_batch_size=2")
    ckpt = checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, model)
    shards = instruction_shards(tmp_path / "qa", 1, 5)
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(ckpt), "--shards", f"qa={shards[0]}", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"qa"} and results["qa"]["tokens"] > 0
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--shards", "pictures=x.tar"])
    assert "SOURCE one of text, captions, interleaved, qa" in capsys.readouterr().err


@pytest.mark.slow
def test_four_named_sources_train_log_by_name_and_resume_by_name(tiny_run, tmp_path, monkeypatch, capsys):
    """Two text sources (plain documents and instructions), captions and interleaved documents, all under
    data.sources: the plan shows the four, the log line and the tracker carry a loss and skip count per
    name, the data position is kept per name, and a resume without one of them is refused naming it."""
    import accelerate

    import train_kosmos

    given = {o.split("=", 1)[0]: o.split("=", 1)[1].strip("[]") for o in tiny_run}
    inst = instruction_shards(tmp_path / "inst", 2, 40)
    out = tmp_path / "run"
    overrides = [o for o in tiny_run if not o.startswith("data.")] + [
        *_no_tiny_sources(),
        *_source("web", "text", [given["data.text.shards"]], 512, 2, workers=0),
        *_source("instructions", "text", inst, 512, 2, workers=0, loss="response"),
        *_source("coco", "captions", [given["data.captions.shards"]], 1024, 4, workers=1),
        *_source("docs", "interleaved", [given["data.interleaved.shards"]], 512, 2, workers=0),
        f"train.output_dir={out}", "train.max_steps=3", "train.log_every=3", "optim.total_steps=30",
        "optim.warmup_steps=2"]
    logged = []
    monkeypatch.setattr(accelerate.Accelerator, "log", lambda self, values, step=None, **kw:
                        logged.append((step, dict(values))))
    seen = []
    state = train_kosmos.train(load_config(TINY, overrides), progress=False,
                               on_step=lambda acc, st, model, samples: seen.extend(s[0] for s in samples))
    assert state["step"] == 3
    printed = capsys.readouterr().out
    block = printed[printed.index("mixture per step"):].splitlines()
    assert [line.split()[0] for line in block[1:5]] == ["web", "instructions", "coco", "docs"]
    assert "ratio web:instructions:coco:docs 0.200:0.200:0.400:0.200" in block[0]
    line = next(x for x in printed.splitlines() if x.startswith("step      3"))
    for name in ("web", "instructions", "coco", "docs"):
        assert f" | {name} " in line
    step, metrics = logged[-1]
    assert step == 3
    for name in ("web", "instructions", "coco", "docs"):
        assert 0 < metrics[f"train/{name}_loss"] < 20 and metrics[f"train/skipped/{name}"] == 0
    assert set(seen) == {"web", "instructions", "coco", "docs"}
    ckpt = out / "checkpoints" / "step_00000003"
    data = json.loads((ckpt / "data_rank0.json").read_text())
    assert set(data) == {"web", "instructions", "coco", "docs", "_mixture"}
    assert data["instructions"]["kind"] == "text" and data["coco"]["kind"] == "captions"
    assert data["_mixture"]["micro_batches"] == {"web": 1, "instructions": 1, "coco": 1, "docs": 1}

    without = [o for o in overrides if not o.startswith("data.sources.instructions.")] + ["train.max_steps=4"]
    with pytest.raises(SystemExit) as e:
        train_kosmos.main(["--config", str(TINY), "--resume", "latest", "--no-progress", *without])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "source data.sources.instructions removed" in err
    assert "--allow-config-change data.sources.instructions" in err


def test_a_named_source_takes_its_kinds_defaults_from_the_config_it_is_added_to():
    """tiny.yaml's text source reads with 1 worker, a 100-sample buffer and 4 rows; a text source added on the
    command line reads like it (not with the field defaults 2, 1000, 8), a captions one like data.captions;
    what the entry gives wins, and shards, held-out shards and budget are never taken."""
    cfg = load_config(TINY, ["data.sources.web.kind=text", "data.sources.cc.kind=captions",
                             "data.sources.cc.workers=3"])
    web, cc, text = cfg.data.sources["web"], cfg.data.sources["cc"], cfg.data.text
    assert (web.workers, web.shuffle_buffer, web.micro_batch_size) == (text.workers, text.shuffle_buffer,
                                                                        text.micro_batch_size) == (1, 100, 4)
    assert (cc.workers, cc.shuffle_buffer, cc.max_tokens) == (3, cfg.data.captions.shuffle_buffer, 512)
    assert (web.shards, web.eval_shards, web.tokens_per_step) == ([], [], 0)
    assert not cfg.given("data.sources.web.workers")  # taken, not given
    # no data.<kind> in the config: the first data.sources entry of the kind sets the defaults
    bare = load_config(None, ["data.sources.a.kind=text", "data.sources.a.workers=0",
                              "data.sources.a.shuffle_buffer=5", "data.sources.b.kind=text"]).data
    assert (bare.sources["b"].workers, bare.sources["b"].shuffle_buffer) == (0, 5)
