import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import train_kosmos
from kosmos import checkpoint as ck
from kosmos.config import load_config
from kosmos.optim import WarmupLinearDecay, param_groups
from tests.helpers import DDP_DEBUG, ROOT, launch, log_lines, tiny_config, tiny_model

TINY = str(ROOT / "configs" / "tiny.yaml")


# ----------------------------------------------------------------------------- unit


def test_param_groups_decay_only_weight_matrices_and_skip_frozen_clip():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert not ids(decay) & ids(no_decay)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert ids(decay) | ids(no_decay) == trainable  # frozen CLIP left out, nothing twice (tied embedding)
    names = {id(p): n for n, p in model.named_parameters()}
    for pid in ids(decay):
        n = names[pid]
        assert not n.endswith(".bias") and "norm" not in n and "embed" not in n and "ln" not in n, n
    assert id(model.decoder.embed_tokens.weight) in ids(no_decay)
    assert id(model.decoder.layers[0].self_attn.q_proj.weight) in ids(decay)
    assert id(model.decoder.layers[0].self_attn.q_proj.bias) in ids(no_decay)
    assert id(model.decoder.layers[0].self_attn_layer_norm.weight) in ids(no_decay)


def test_schedule_warms_up_then_decays_linearly_to_zero():
    f = WarmupLinearDecay(375, 300_000)
    assert f(0) < 0.01 and f(374) == pytest.approx(1.0, abs=0.003) and f(375) == 1.0
    assert f(150_187) == pytest.approx(0.5, abs=1e-3)
    assert f(300_000) == 0.0 and f(400_000) == 0.0
    assert all(f(s) >= f(s + 1000) for s in range(375, 299_000, 1000))


def test_config_errors_name_the_key_before_heavy_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_kosmos.main(["--config", TINY, f"tokenizer.path={tmp_path}"])
    assert e.value.code == 2 and "tokenizer.path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_kosmos.main(["--config", TINY, "optim.lrr=1"])
    assert "optim.lrr" in capsys.readouterr().err


def test_reset_data_names_known_sources_or_all(tmp_path):
    shards = [f"data.{s}.shards=[{tmp_path}/x.tar]" for s in ("text", "captions")]
    cfg = load_config(TINY, [*shards, "data.interleaved.tokens_per_step=0"])
    assert ck.reset_sources(["all"], cfg) == ["text", "captions"]
    assert ck.reset_sources(["captions", " "], cfg) == ["captions"]
    with pytest.raises(ValueError, match=r"--reset-data txt: not a source of this run; its sources are text, "
                                         r"captions \(or give all\)"):
        ck.reset_sources(["text", "txt"], cfg)


@pytest.mark.parametrize("error", ["config", "data"])
def test_a_distributed_run_prints_an_error_once(tmp_path, capsys, monkeypatch, error):
    """Under a launcher (RANK, WORLD_SIZE): an error every rank meets (config, checkpoint) is printed by
    rank 0 alone; one a rank's data workers meet is printed by that rank, named; every rank exits 2."""
    from kosmos.config import ConfigError
    from kosmos.data.shards import DataError

    def fail(*a, **kw):
        raise (ConfigError if error == "config" else DataError)("it went wrong")

    monkeypatch.setattr("kosmos.training.check_config", fail)

    def ended_by_the_launcher():  # rank 0 exited 2: torch.distributed.run ends the other ranks (SIGTERM)
        raise SystemExit(-15)

    monkeypatch.setattr("kosmos.train.wait_for_rank_0", ended_by_the_launcher)
    monkeypatch.setenv("WORLD_SIZE", "2")
    printed = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            train_kosmos.main(["--config", TINY])
        assert e.value.code == (-15 if error == "config" and rank == "1" else 2)
        printed.append(capsys.readouterr().err)
    if error == "config":
        assert printed == ["error: it went wrong\n", ""]
        # rank 0 did not end the run within the grace: rank 1 says it
        monkeypatch.setattr("kosmos.train.wait_for_rank_0", lambda: None)
        with pytest.raises(SystemExit) as e:
            train_kosmos.main(["--config", TINY])
        assert e.value.code == 2 and capsys.readouterr().err == "error: rank 1: it went wrong\n"
    else:
        assert printed == ["error: rank 0: it went wrong\n", "error: rank 1: it went wrong\n"]


def test_missing_shards_are_named(tiny_tokenizer, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_kosmos.main(["--config", TINY, f"tokenizer.path={tiny_tokenizer.path}",
                           "data.text.tokens_per_step=0", "data.interleaved.tokens_per_step=0",
                           f"data.captions.shards=[{tmp_path}/none-*.tar]"])
    assert "data.captions.shards" in capsys.readouterr().err


class _TwoRanks:
    """An accelerator stand-in: one process playing two identical ranks (a sum over ranks doubles)."""

    device = torch.device("cpu")
    num_processes = 2

    def __init__(self, main: bool = True):
        self.is_main_process = main
        self.reduced = 0

    def reduce(self, t, reduction):
        assert reduction == "sum"
        self.reduced += 1
        return t * 2


def test_meter_reduces_the_window_over_ranks_and_formats_the_log_line(monkeypatch):
    from types import SimpleNamespace

    from kosmos import metrics
    from kosmos.training import StepResult

    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    # 100 FLOPs per token, 2 x 10 x 4 per image (a forward of 10 parameters over 3 patches + 1 class token)
    model = SimpleNamespace(cfg=SimpleNamespace(flops_per_token=lambda: 100.0,
                                                flops_per_image=lambda: 2 * 10 * 4))
    acc = _TwoRanks()
    meter = metrics.Meter(acc, model, peak_flops=10_000.0, names=["captions", "text"])
    stat = lambda mean, n: torch.tensor([mean * n, float(n)])  # noqa: E731  (loss sum, tokens)
    counts = {"rows": 64, "real": 40, "images": 2}
    meter.add(StepResult(True, 1.0, {"captions": stat(2.0, 10), "text": stat(3.0, 30)}, **counts))
    meter.add(StepResult(False, float("nan"), {"captions": stat(float("nan"), 10)}, **counts))
    meter.add(StepResult(True, 1.5, {"captions": stat(4.0, 30)}, **counts))
    clock[0] += 2.0
    report = meter.report(10, lr=1e-4, gnorm=1.5, bad_steps=1,
                          skipped={"captions": {"bad_image": 3}, "text": {}})
    # before the reduction
    assert report.local()["captions"]["loss_sum"] == pytest.approx(2.0 * 10 + 4.0 * 30)
    m = report.metrics
    # losses: token-weighted over the applied steps only (the skipped step's NaN is left out)
    assert m["train/captions_loss"] == pytest.approx(3.5) and m["train/text_loss"] == pytest.approx(3.0)
    assert m["train/loss"] == pytest.approx(230 / 70)
    # counts: every computed step, summed over the two ranks
    assert report.tokens == 240 and m["train/tokens_per_s"] == pytest.approx(120)
    assert m["train/padding"] == pytest.approx(1 - 240 / 384)
    assert m["train/mfu"] == pytest.approx((384 * 100 + 12 * 2 * 10 * 4) / 2.0 / (10_000 * 2))
    assert m["train/skipped_samples"] == 6  # all ranks
    assert m["train/skipped/captions/bad_image"] == 3  # this rank, by reason
    assert m["train/skipped/captions"] == 6 and m["train/skipped/text"] == 0  # by source, all ranks
    assert m["train/lr"] == 1e-4 and m["train/grad_norm"] == 1.5 and m["train/bad_steps"] == 1
    assert acc.reduced == 1  # one packed all-reduce per log line, whatever each rank saw
    head, mem = report.line.rsplit(" | ", 1)
    assert head == ("step     10 | loss 3.2857 | captions 3.500 | text 3.000 | lr 1.00e-04 | gnorm 1.500 | "
                    "tok/s 120 | mfu 98.4% | pad 37.5% | skipped 6 (captions 6) | bad 1")
    assert mem.startswith("mem ") and mem.endswith("GiB")
    assert meter.losses == {} and meter.rows == meter.real == meter.images == 0  # a new window

    meter = metrics.Meter(acc, model, peak_flops=None, names=["text"])
    meter.add(StepResult(True, 1.0, {"text": stat(3.0, 30)}, rows=64, real=40, images=0))
    clock[0] += 1.0
    assert "| mfu n/a |" in meter.report(1, lr=1e-4, gnorm=1.0, bad_steps=0, skipped={}).line


def test_run_log_prints_and_appends_to_train_log_on_the_main_process_only(tmp_path, capsys):
    from kosmos.metrics import RunLog, eval_line

    out = []
    for main, progress in ((True, True), (False, True), (True, False)):
        log = RunLog(_TwoRanks(main), tmp_path / f"main{main}" / "train.log", progress=progress)
        log.start_bar(10, 0)
        log.info(eval_line({"eval/captions_loss": 2.0, "eval/captions_ppl": 7.389}))
        log.advance()
        log.close()
        cap = capsys.readouterr()
        out += cap.out.splitlines()
        assert ("train:" in cap.err) == (main and progress)  # the bar
    assert out == ["eval captions_loss 2.000 captions_ppl 7.389"] * 2
    assert not (tmp_path / "mainFalse").exists()
    log = RunLog(_TwoRanks(), tmp_path / "mainTrue" / "train.log")  # a resumed run appends
    log.info("resumed from here")
    log.close()
    assert log_lines(tmp_path / "mainTrue" / "train.log") == [
        "eval captions_loss 2.000 captions_ppl 7.389"] * 2 + ["resumed from here"]
    first = (tmp_path / "mainTrue" / "train.log").read_text().splitlines()[0]  # each line after its UTC time
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ eval captions_loss 2\.000 captions_ppl 7\.389",
                        first)
    from kosmos.metrics import stamp

    assert stamp("a\nb", now=0) == "1970-01-01T00:00:00Z a\n1970-01-01T00:00:00Z b"  # a block: every line


def _micro_batch(model, specs, L: int, seed: int) -> dict:
    """A micro-batch of right-padded rows `(text_before, images, text_after)`, labelled like the packer's:
    -100 at image slots and padding."""
    from tests.helpers import make_row, random_images

    rows = [make_row(model, *spec, seed=seed + i) for i, spec in enumerate(specs)]
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    padding = torch.ones(len(rows), L, dtype=torch.bool)
    for i, (r, m) in enumerate(rows):
        n = r.shape[1]
        ids[i, :n], mask[i, :n], padding[i, :n] = r[0], m[0], False
    labels = ids.masked_fill(mask | padding, -100)
    n_images = sum(spec[1] for spec in specs)
    return {"input_ids": ids, "labels": labels, "image_mask": mask, "padding_mask": padding,
            "images": random_images(model, n_images, seed=seed), "n_real": (~padding).sum(),
            "sample_positions": []}


@pytest.mark.parametrize("weighting", ["tokens", "budget"])
def test_step_gradient_is_the_token_mean_over_the_whole_step(weighting):
    """`tokens`: one step's gradient is the gradient of the mean token loss of all its micro-batches taken
    as one batch, whatever source each token comes from (a caption row, mostly image slots, has few loss
    tokens). `budget`: the older objective, the budget-weighted sum of the per-source mean losses."""
    from types import SimpleNamespace

    from kosmos.data.mixture import Mixture, plan
    from kosmos.training import build_accelerator, train_step

    shards = [f"data.{s}.shards=[x]" for s in ("text", "captions", "interleaved")]
    cfg = load_config(TINY, [*shards, "data.text.tokens_per_step=2048", "train.tracker=none"])
    p = plan(cfg)
    assert {n: s.micro_batches for n, s in p.sources.items()} == {"text": 2, "captions": 1, "interleaved": 1}
    model = tiny_model()
    L = 40
    batches = {"captions": [_micro_batch(model, [(0, 1, 6), (0, 1, 3), (0, 2, 2)], L, seed=1)],
               "text": [_micro_batch(model, [(L - 1, 0, 0), (20, 0, 0)], L, seed=2),
                        _micro_batch(model, [(L - 1, 0, 0)], L, seed=3)],
               "interleaved": [_micro_batch(model, [(5, 1, 4), (3, 2, 10)], L, seed=4)]}
    mixture = Mixture({n: iter(b) for n, b in batches.items()}, p)
    grads = {}

    def snapshot():
        grads.update({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})

    optimizer = SimpleNamespace(step=snapshot, zero_grad=lambda set_to_none: model.zero_grad())
    acc = build_accelerator(cfg)
    res = train_step(acc, model, optimizer, SimpleNamespace(step=lambda: None), mixture, 0.0, weighting)
    assert res.ok and grads

    every = [b for bs in batches.values() for b in bs]
    if weighting == "tokens":
        keys = ("input_ids", "labels", "image_mask", "padding_mask", "images")
        step = {k: torch.cat([b[k] for b in every]) for k in keys}
        out = model(**step)
        loss = out.loss
        tokens = sum(float(s[1]) for s in res.losses.values())
        assert tokens == out.n_tokens and sum(float(s[0]) for s in res.losses.values()) / tokens == \
            pytest.approx(loss.item(), rel=1e-5)  # the logged loss is the objective
    else:
        share = {n: s.budget / p.budget for n, s in p.sources.items()}
        skip = ("n_real", "sample_positions")
        loss = sum(share[n] * model(**{k: v for k, v in b.items() if k not in skip}).loss / len(bs)
                   for n, bs in batches.items() for b in bs)
    model.zero_grad()
    loss.backward()
    assert grads.keys() == {n for n, q in model.named_parameters() if q.grad is not None}
    for n, q in model.named_parameters():
        if q.grad is not None:
            assert torch.allclose(grads[n], q.grad, rtol=1e-4, atol=1e-7), n


def test_objective_and_mixture_keys_are_checked_by_name(tiny_tokenizer, monkeypatch, capsys):
    from kosmos.config import ConfigError

    with pytest.raises(ConfigError, match="train.loss_weighting"):
        load_config(TINY, ["train.loss_weighting=mean"])
    with pytest.raises(ConfigError, match="data.mixture_tolerance"):
        load_config(TINY, ["data.mixture_tolerance=1.5"])
    # 3 micro-batches of unequal sizes cannot be split evenly over 4 ranks: refused before anything heavy
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit):
        train_kosmos.main(["--config", TINY, f"tokenizer.path={tiny_tokenizer.path}"])
    assert "data.mixture_tolerance" in capsys.readouterr().err


def test_mixture_block_shows_the_plan_and_warns_about_default_budgets():
    from types import SimpleNamespace

    from kosmos.config import Config
    from kosmos.data.mixture import Mixture, plan
    from kosmos.training import describe_mixture

    acc = SimpleNamespace(mixed_precision="bf16")

    def block(cfg, world_size=1):
        return describe_mixture(acc, cfg, Mixture({}, plan(cfg, world_size)))

    # only the shards given: the paper's 0.5M-token caption budget, silently, before
    text = block(load_config(None, ["data.captions.shards=[x]"]))
    assert "WARNING: data.captions.tokens_per_step not set: the default budget 500,000" in text
    assert block(load_config(None, ["data.captions.shards=[x]", "data.captions.tokens_per_step=500000"])) \
        .count("WARNING") == 0
    assert Config().given("data.text.tokens_per_step")  # a config built in code: everything counts as set
    tiny = load_config(TINY)
    assert tiny.given("data.text.tokens_per_step") and not tiny.given("data.mixture_tolerance")

    lines = block(load_config(ROOT / "configs" / "kosmos1.yaml", [
        *[f"data.{s}.shards=[x]" for s in ("text", "captions", "interleaved")],
        *[f"data.{s}.tokens_per_step={n}" for s, n in (("text", 500_000), ("captions", 500_000),
                                                        ("interleaved", 200_000))]]), 32).splitlines()
    assert lines[0].startswith("mixture per step: 32 process(es), 1,212,416 tokens (budget 1,200,000), ratio "
                               "text:captions:interleaved 0.419:0.419:0.162 (target 0.417:0.417:0.167), "
                               "objective tokens")
    assert lines[1].split() == ["text", "0-1", "micro-batches/rank,", "31", "in", "all", "x", "8", "rows",
                                "x", "2048", "=", "507,904", "tokens,", "share", "0.419", "(budget",
                                "500,000,", "0.417)"]
    assert lines[4].startswith("  ranks run 2 or 3 passes per step (rotating): 23% of pass slots wait")
    assert len(lines) == 5


# ----------------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_weights_only_and_resume_wins(tiny_run, tiny_tokenizer, tmp_path,
                                                                       capsys):
    from safetensors.torch import load_file, save_model

    with pytest.raises(SystemExit):  # a wrong path fails before anything heavy
        train_kosmos.main(["--config", TINY, f"tokenizer.path={tiny_tokenizer.path}",
                           f"train.init_from={tmp_path / 'none'}"])
    assert "train.init_from" in capsys.readouterr().err

    src = tmp_path / "src"  # weights no new run has: another seed
    src.mkdir()
    save_model(tiny_model(seed=7), str(src / "model.safetensors"))
    out = tmp_path / "run"
    extra = {"train.init_from": src, "optim.lr": "1.0e-9", "data.text.tokens_per_step": 0,
             "data.interleaved.tokens_per_step": 0, "data.captions.workers": 0}
    # --resume latest finds nothing yet: the run starts from init_from
    args = ["--config", TINY, "--no-progress", "--resume", "latest", *_overrides(tiny_run, out, 1, **extra)]
    assert train_kosmos.main(args)["step"] == 1
    first = ck.list_checkpoints(out)[-1]
    w0, w1 = load_file(src / "model.safetensors"), load_file(first / "model.safetensors")
    assert w0.keys() == w1.keys()
    assert all(torch.allclose(w0[k], w1[k], atol=1e-6) for k in w0)  # one step at a tiny lr
    assert ck.load_torch(first / "scheduler.pt")["last_epoch"] == 1  # a new schedule (and optimizer)

    # killed and restarted with the same command: it resumes, it does not start over from init_from
    assert train_kosmos.main([*args, "train.max_steps=2"])["step"] == 2
    log = (out / "train.log").read_text()
    assert log.count(f"initialised from {src}") == 1 and f"resumed from {first} at step 1" in log


def _overrides(tiny_run, out, steps, **extra):
    o = [*tiny_run, f"train.output_dir={out}", f"train.max_steps={steps}",
         f"optim.total_steps={max(steps, 30)}", "optim.warmup_steps=5"]
    return o + [f"{k}={v}" for k, v in extra.items()]


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_and_stop_the_run(tiny_run, tmp_path, monkeypatch):
    from kosmos.model import Kosmos

    real = Kosmos.forward
    calls = {"n": 0, "poison": {0}}

    def poisoned(self, *a, **kw):
        out = real(self, *a, **kw)
        if calls["n"] in calls["poison"]:
            out.loss = out.loss * float("nan")
        calls["n"] += 1
        return out

    monkeypatch.setattr(Kosmos, "forward", poisoned)
    zero_workers = [f"data.{s}.workers=0" for s in ("captions", "text", "interleaved")]
    cfg = load_config(TINY, _overrides(tiny_run, tmp_path / "a", 3) + zero_workers)
    state = train_kosmos.train(cfg)
    assert state["step"] == 3 and state["bad_steps"] == 1  # the poisoned step was skipped, the run went on

    calls.update(n=0, poison=set(range(1000)))
    cfg = load_config(TINY,
                      _overrides(tiny_run, tmp_path / "b", 3, **{"train.max_bad_steps": 2}) + zero_workers)
    with pytest.raises(RuntimeError, match="2 steps in a row"):
        train_kosmos.train(cfg)


@pytest.mark.slow
def test_periodic_evaluation_reports_loss_and_perplexity(tiny_run, tmp_path, capsys):
    captions = next(o.split("=", 1)[1] for o in tiny_run if o.startswith("data.captions.shards="))
    extra = {"data.captions.eval_shards": captions, "train.eval_every": 2, "train.eval_batches": 2,
             "data.text.tokens_per_step": 0, "data.interleaved.tokens_per_step": 0,
             "data.captions.workers": 0}
    train_kosmos.train(load_config(TINY, _overrides(tiny_run, tmp_path, 2, **extra)))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("eval "))
    loss, ppl = (float(v) for v in line.split()[2::2])
    assert line.split()[1::2] == ["captions_loss", "captions_ppl"]
    assert 0 < loss < 20 and ppl == pytest.approx(2.718281828**loss, rel=1e-2)


def _tensorboard_runs(root: Path) -> dict[str, dict]:
    """Each TensorBoard run (folder of event files) under `root`, as TensorBoard lists them: its scalar tags
    and whether the HParams tab finds a session (hyperparameters) in it, with its metrics and values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    runs = {}
    for folder in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        ea = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
        ea.Reload()
        try:
            content = ea.PluginTagToContent("hparams")
        except KeyError:  # no hyperparameters in this run
            content = {}
        hparams, metrics = {}, []
        for tag, raw in content.items():
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
            if tag == "_hparams_/experiment":
                metrics = [m.name.tag for m in data.experiment.metric_infos]
            elif tag == "_hparams_/session_start_info":
                hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                           for k, v in data.session_start_info.hparams.items()}
        runs[folder.relative_to(root).as_posix()] = {"scalars": set(ea.Tags()["scalars"]), "hparams": hparams,
                                                     "metrics": metrics}
    return runs


@pytest.mark.slow
def test_resume_appends_to_one_tensorboard_run_holding_its_hyperparameters(tiny_run, tmp_path, capsys):
    """One TensorBoard run per training run: its scalars and, for the HParams tab, its hyperparameters
    with the losses as metrics; a resume appends to it (no new run, the hyperparameters not written
    again). accelerate's add_hparams made a timestamped sub-run holding only hparams.yml."""
    out = tmp_path / "run"
    tensorboard = {"train.tracker": "tensorboard"}
    args = ["--config", TINY, "--no-progress", *_overrides(tiny_run, out, 2, **tensorboard)]
    workers = [f"data.{s}.workers=0" for s in ("captions", "text", "interleaved")]
    assert train_kosmos.main(args + workers)["step"] == 2
    runs = out / "kosmos"  # accelerate's TensorBoard run
    (run,) = _tensorboard_runs(runs).values()  # one run, no sub-run
    assert {"train/loss", "train/captions_loss", "train/lr"} <= run["scalars"]
    assert run["hparams"]["optim.lr"] == pytest.approx(2e-3) and run["hparams"]["train.max_steps"] == 2
    assert run["hparams"]["tokenizer.path"] == next(o.split("=", 1)[1] for o in tiny_run
                                                    if o.startswith("tokenizer.path="))
    assert run["metrics"][0] == "train/loss"
    assert {"train/captions_loss", "train/text_loss"} <= set(run["metrics"])
    assert set(run["metrics"]) <= run["scalars"]  # the tab shows each metric's last value against them
    assert not list(runs.rglob("hparams.yml")) and len(list(runs.glob("events.*"))) == 1
    assert train_kosmos.main(args + workers + ["train.max_steps=3", "--resume", "latest"])["step"] == 3
    assert list(_tensorboard_runs(runs)) == ["."]  # the resume appended to the same run
    assert len(list(runs.glob("events.*"))) == 2  # one event file per process start, read as one run
    cap = capsys.readouterr()
    assert "%|" not in cap.err and "step      2 | loss " in cap.out  # --no-progress: lines but no bar
    lines = log_lines(out / "train.log")
    resumed = [i for i, x in enumerate(lines) if x.startswith("resumed from")]
    assert sum(x.startswith("step      2 | loss ") for x in lines) == 1 and len(resumed) == 1
    assert lines[resumed[0] + 1].startswith("mixture per step: ")  # the plan printed again, as a block
    last = ck.list_checkpoints(out)[-1]  # a checkpoint is all inference needs
    assert (last / "config.yaml").is_file() and (last / "tokenizer" / "tokenizer.model").is_file()


def _run(args, out_file, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train_kosmos.py"), "--config", TINY, *args],
                            cwd=ROOT, stdout=out_file, stderr=subprocess.STDOUT, env=env, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tiny_run, tmp_path):
    steps = 16
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    with open(tmp_path / "full.log", "w") as log:
        assert _run(_overrides(tiny_run, full_dir, steps, **{"train.save_every": 4}), log).wait(300) == 0

    with open(tmp_path / "cut.log", "w") as log:
        proc = _run(_overrides(tiny_run, cut_dir, steps, **{"train.save_every": 4}), log)
        deadline = time.time() + 300
        while not (ck.checkpoint_dir(cut_dir) / "step_00000008").is_dir():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "cut.log").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = ck.list_checkpoints(cut_dir)[-1].name
    assert killed_at in ("step_00000008", "step_00000012"), killed_at
    with open(tmp_path / "resume.log", "w") as log:
        assert _run(_overrides(tiny_run, cut_dir, steps, **{"train.save_every": 4}) + ["--resume", "latest"],
                    log).wait(300) == 0
    assert "resumed from" in (tmp_path / "resume.log").read_text()
    train_log = (cut_dir / "train.log").read_text()  # appended by the resumed run
    assert train_log.count("mixture per step") == 2
    assert f"resumed from {ck.checkpoint_dir(cut_dir)}" in train_log

    a, b = ck.list_checkpoints(full_dir)[-1], ck.list_checkpoints(cut_dir)[-1]
    assert a.name == b.name == f"step_{steps:08d}"
    sa, sb = ck.read_json(a / "trainer_state.json"), ck.read_json(b / "trainer_state.json")
    assert (sa["step"], sa["samples"], sa["bad_steps"]) == (sb["step"], sb["samples"], sb["bad_steps"])
    assert ck.load_torch(a / "scheduler.pt") == ck.load_torch(b / "scheduler.pt")  # schedule position
    assert ck.read_json(a / "data_rank0.json") == ck.read_json(b / "data_rank0.json")  # data position
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"


@pytest.mark.slow
@pytest.mark.parametrize("to", ["main", "group"])
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_run, tmp_path, to):
    """SIGTERM to the main process, or to the whole process group as `timeout`, SLURM preemption and
    container stops send it: the DataLoader workers (one per source) ignore it, the main process saves."""
    out = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        proc = _run(_overrides(tiny_run, out, 10_000, **{"train.save_every": 10_000}), log,
                    start_new_session=True)
        deadline = time.time() + 120
        while "step      5" not in (tmp_path / "log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.1)
        if to == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, (tmp_path / "log").read_text()
    text = (tmp_path / "log").read_text()
    assert "stopped by signal" in text and "killed by signal" not in text and "Traceback" not in text
    assert ck.list_checkpoints(out), "no checkpoint written on SIGTERM"
    lines = log_lines(out / "train.log")  # the printed lines, the bar left out
    assert lines[0].startswith("mixture per step: ")
    assert any(x.startswith("step      5 | loss ") for x in lines)
    assert lines[-2].startswith("saved ") and lines[-1].startswith("stopped by signal at step ")


def _two_processes(args: list[str]) -> subprocess.CompletedProcess:
    """tests/dist_check.py ARGS under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo; DDP, so
    without DETAIL's checks: tests.helpers.DDP_DEBUG); it must succeed within 300 s."""
    return launch(2, ROOT / "tests" / "dist_check.py", args, timeout=300, debug=DDP_DEBUG)


@pytest.mark.slow
@pytest.mark.parametrize("captions_rows", [2, 8])
def test_two_processes_gloo_different_data_identical_weights(tiny_run, tmp_path, captions_rows):
    """Captions in micro-batches of 2 rows: 4 + 1 + 1 micro-batches per step, 3 passes on each rank. Of 8: one
    micro-batch per source, so the ranks run 2 and 1 passes (rotating): DDP still syncs once per step."""
    res = _two_processes([*_overrides(tiny_run, tmp_path / "run", 3),
                          # Small buffers and batches so that 3 steps stay inside each rank's first epoch:
                          # ranks read disjoint shares of an epoch, but a rank already in its next epoch may
                          # meet a sample another rank has now.
                          *[f"data.{s}.shuffle_buffer=4" for s in ("captions", "text", "interleaved")],
                          f"data.captions.micro_batch_size={captions_rows}"])
    assert res.stdout.count("DIST_OK") == 2 and "[1, 2, 3]" in res.stdout, res.stdout[-2000:]
    assert ("ranks run 1 or 2 passes per step" in res.stdout) == (captions_rows == 8), res.stdout[-2000:]


@pytest.mark.slow
def test_two_processes_resume_on_one_without_replaying_or_skipping_samples(tiny_run, tmp_path):
    """Elastic resume: trained 2 steps on 2 processes (gloo), resumed on 1 process for 1 more. The logical
    streams of each source are dealt over the one rank: within the epoch no sample is consumed twice, and each
    stream goes on where it was (its position after the resume is past the one saved)."""
    out = tmp_path / "run"
    shuffle = [f"data.{s}.shuffle_buffer=4" for s in ("captions", "text", "interleaved")]
    _two_processes(["--samples", str(tmp_path), *_overrides(tiny_run, out, 2), *shuffle])
    before = [tuple(x) for r in range(2) for step in json.loads((tmp_path / f"rank{r}.json").read_text())
              for x in step]
    saved = ck.list_checkpoints(out)[-1]
    assert saved.name == "step_00000002" and (saved / "data_rank1.json").is_file()
    per_rank = [ck.read_json(saved / f"data_rank{r}.json") for r in range(2)]
    started = sum(st["samples"] for sd in per_rank for name in ("captions", "text", "interleaved")
                  for st in sd[name]["streams"].values())
    assert ck.read_json(saved / "trainer_state.json")["samples"] == started > 0  # both ranks', not rank 0's

    after = []
    cfg = load_config(TINY, [*_overrides(tiny_run, out, 3), *shuffle])
    state = train_kosmos.train(cfg, resume="latest", progress=False,
                               on_step=lambda acc, state, model, samples: after.extend(map(tuple, samples)))
    assert state["step"] == 3
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "elastic resume" in log, log[-2000:]
    consumed = Counter(before + after)
    assert before and after and max(consumed.values()) == 1, [k for k, n in consumed.items() if n > 1][:5]
    final = ck.read_json(ck.list_checkpoints(out)[-1] / "data_rank0.json")
    for name in ("captions", "text", "interleaved"):
        streams = {s: st for sd in per_rank for s, st in sd[name]["streams"].items()}
        assert streams and set(streams) <= set(final[name]["streams"])
        assert final[name]["world_size"] == 1 and final[name]["n_streams"] == per_rank[0][name]["n_streams"]
        for s, st in streams.items():  # every stream goes on from its saved position, none starts over
            now = final[name]["streams"][s]
            assert (now["epoch"], now["k"], now["offset"]) >= (st["epoch"], st["k"], st["offset"]), (name, s)
            assert now["samples"] >= st["samples"]
        assert all(st["epoch"] == 0 for st in final[name]["streams"].values()), \
            "the test should stay in epoch 0"


@pytest.mark.slow
def test_one_process_resumes_on_two_with_a_one_shard_source_and_resets_data(tiny_run, tmp_path):
    """Scaling up: trained on 1 process with a text source of one shard (one logical stream), resumed with
    --resume latest on 2 processes (gloo): the stream is split by samples over the 2 ranks, which then read
    disjoint samples (dist_check). Then --reset-data text starts the text over on 1 process, with a
    warning."""
    from tests.helpers import text_shards

    text_shards(tmp_path / "one", 1, 300)
    out = tmp_path / "run"
    only_text = ["data.captions.tokens_per_step=0", "data.interleaved.tokens_per_step=0",
                 f"data.text.shards=[{tmp_path / 'one'}]", "data.text.shuffle_buffer=4",
                 "data.text.tokens_per_step=2048"]  # a micro-batch per rank on 2
    cfg = load_config(TINY, [*_overrides(tiny_run, out, 1), *only_text])
    train_kosmos.train(cfg, progress=False)
    saved = ck.read_json(ck.list_checkpoints(out)[-1] / "data_rank0.json")["text"]
    assert saved["n_streams"] == 1 and saved["world_size"] == 1

    res = _two_processes(["--resume", "latest", *_overrides(tiny_run, out, 2), *only_text])
    assert res.stdout.count("DIST_OK") == 2 and "[2]" in res.stdout, res.stdout[-2000:]
    log = (out / "train.log").read_text()
    assert "resumed from" in log and "1 logical streams split by samples into 2" in log, log[-2000:]
    split = [ck.read_json(ck.list_checkpoints(out)[-1] / f"data_rank{r}.json")["text"] for r in range(2)]
    assert [sd["n_streams"] for sd in split] == [2, 2]
    assert [list(sd["streams"]) for sd in split] == [["0"], ["1"]]

    cfg = load_config(TINY, [*_overrides(tiny_run, out, 3), *only_text])
    assert train_kosmos.train(cfg, resume="latest", progress=False, reset_data=["text"])["step"] == 3
    log = (out / "train.log").read_text()
    assert "warning: --reset-data text: the data position of data.text in step_00000002 is not " \
           "restored" in log
    final = ck.read_json(ck.list_checkpoints(out)[-1] / "data_rank0.json")["text"]
    assert final["n_streams"] == 1 and final["streams"]["0"]["part"] == [0, 1, 0, 1]  # fresh (else 2 streams)


@pytest.mark.slow
def test_image_pathway_learns(tiny_run, tmp_path):
    """Trained on captions that only the image can tell (colour, shape, position), the model's loss on caption
    tokens of held-out shapes must be clearly lower with the true image than with another image."""
    import random

    from kosmos.data_tools.shapes import COLOURS, POSITIONS, SHAPES, caption, draw
    from kosmos.generate import load_for_inference
    from kosmos.sequence import IGNORE_INDEX

    steps = 150
    extra = {"data.text.tokens_per_step": 0, "data.interleaved.tokens_per_step": 0,
             "data.captions.workers": 0, "optim.lr": 3e-3, "optim.warmup_steps": 10}
    cfg = load_config(TINY, _overrides(tiny_run, tmp_path / "run", steps, **extra))
    train_kosmos.train(cfg)
    model, enc = load_for_inference(str(tmp_path / "run"))  # the run's newest checkpoint, nothing else
    tok = enc.tokenizer
    rng = random.Random(99)
    combos = [(c, s, p) for c in COLOURS for s in SHAPES for p in POSITIONS]
    picks = rng.sample(combos, 32)
    images = torch.stack([enc.image(draw(*x, 64, rng)) for x in picks])
    seqs = [enc.encode([images[i], caption(*x)]) for i, x in enumerate(picks)]
    L = max(len(q) for q in seqs)
    ids = torch.tensor([q.ids + [tok.pad_id] * (L - len(q)) for q in seqs])  # right-padded
    mask = torch.tensor([q.image_mask + [False] * (L - len(q)) for q in seqs])
    padding = torch.tensor([[False] * len(q) + [True] * (L - len(q)) for q in seqs])
    labels = ids.masked_fill(padding, IGNORE_INDEX)
    labels[:, : int(mask[0].nonzero().max()) + 2] = IGNORE_INDEX  # loss on the caption (and </s>) only
    with torch.no_grad():
        true = model(ids, images, mask, labels=labels, padding_mask=padding).loss.item()
        other = model(ids, images.roll(1, dims=0), mask, labels=labels, padding_mask=padding).loss.item()
    print(f"\ncaption loss with the true image {true:.3f}, with another image {other:.3f}, "
          f"gap {other - true:.3f}")
    assert other - true > 0.3 and other > 2 * true, (true, other)


def test_a_run_shorter_than_its_schedule_is_warned_about():
    from kosmos.optim import build_scheduler
    from kosmos.train import schedule_note

    cfg = tiny_config("train.max_steps=60", "optim.total_steps=800", "optim.warmup_steps=10")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    note = schedule_note(cfg, build_scheduler(opt, cfg.optim))
    assert note.startswith("WARNING: train.max_steps=60 ends the run before its schedule, "
                           "optim.total_steps=800")
    assert "stops at 94% of its peak" in note  # (800 - 60) / (800 - 10)
    assert note.endswith("set optim.total_steps=60 for a schedule that ends with the run")
    for ok in (["train.max_steps=800", "optim.total_steps=800"], ["optim.total_steps=800"]):
        assert schedule_note(tiny_config(*ok), build_scheduler(opt, tiny_config(*ok).optim)) is None


def test_init_from_takes_a_run_folder(tmp_path, tiny_tokenizer):
    from kosmos.training import build_model
    from tests.helpers import checkpoint_dir

    trained = tiny_model(seed=5)
    checkpoint_dir(tmp_path / "run", tiny_tokenizer.path, trained)  # run/checkpoints/step_00000007
    model = build_model(tiny_config(), tmp_path / "run")  # the run folder: its newest checkpoint
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values(),
                                                 strict=True))


@pytest.mark.slow
def test_a_config_reads_its_paths_against_its_folder_and_its_saved_copy_works_from_anywhere(
        tiny_run, tmp_path, monkeypatch):
    """`kosmos-train --config /abs/exp/my.yaml` from another folder finds the tokenizer and shards that
    my.yaml names relative to itself; the run's config.yaml (absolute paths) resumes it from a third."""
    import yaml

    given = dict(o.split("=", 1) for o in tiny_run)
    # elsewhere is deeper than exp: a path relative to exp means nothing from there
    folder, elsewhere, third = tmp_path / "exp", tmp_path / "a" / "elsewhere", tmp_path / "third"
    for d in (folder, elsewhere, third):
        d.mkdir(parents=True)
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    data["tokenizer"]["path"] = os.path.relpath(given["tokenizer.path"], folder)
    for s in ("captions", "text", "interleaved"):
        data["data"][s].update(shards=[os.path.relpath(given[f"data.{s}.shards"].strip("[]"), folder)],
                               workers=0)
    data["train"].update(output_dir="run", tracker="none", max_steps=1, log_every=1)
    data["optim"].update(total_steps=30, warmup_steps=5)
    (folder / "my.yaml").write_text(yaml.safe_dump(data))

    def train(cwd, *args):  # as `kosmos-train ...` run in `cwd`
        monkeypatch.chdir(cwd)
        return train_kosmos.main(["--no-progress", *args])["step"]

    assert train(elsewhere, "--config", str(folder / "my.yaml")) == 1
    saved = yaml.safe_load((folder / "run" / "config.yaml").read_text())
    assert saved["tokenizer"]["path"] == given["tokenizer.path"]
    assert saved["data"]["text"]["shards"] == [given["data.text.shards"].strip("[]")]
    assert saved["train"]["output_dir"] == str(folder / "run")
    assert train(third, "--config", str(folder / "run" / "config.yaml"), "--resume", "latest",
                 "train.max_steps=2") == 2
    assert "resumed from" in (folder / "run" / "train.log").read_text()
    assert not list(elsewhere.iterdir()) and not list(third.iterdir())  # nothing written where it ran
