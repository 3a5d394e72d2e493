"""FSDP2 (kosmos.sharding): the wrapping, its refusals, sharded checkpoints and their consolidation. The
2-process tests run on CPU with gloo: tests/fsdp_check.py through torch.distributed.run, and the trainer
itself through `accelerate launch --multi_gpu` with `train.sharding=fsdp2` (accelerate turns an FSDP request
on CPU into DDP, so there the trainer shards the model itself, with the same function)."""

import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from kosmos import checkpoint as ck
from kosmos.config import ConfigError
from kosmos.weights import load_model
from tests.helpers import (
    DDP_DEBUG,
    ROOT,
    finish,
    launch,
    log_lines,
    make_row,
    random_images,
    start,
    tiny_config,
    tiny_model,
)

TINY = str(ROOT / "configs" / "tiny.yaml")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this checkout


# ----------------------------------------------------------------------------- unit


def test_config_keys_are_checked_by_name():
    assert tiny_config("train.sharding=fsdp2", "optim.name=adamw8bit_torchao").train.sharding == "fsdp2"
    with pytest.raises(ConfigError, match="train.sharding"):
        tiny_config("train.sharding=fsdp")
    with pytest.raises(ConfigError, match="optim.name"):
        tiny_config("optim.name=adamw8bit_ao")


def test_units_are_layers_clip_blocks_resampler_then_root_and_the_loss_is_unchanged(one_process_group):
    from torch.distributed.fsdp import FSDPModule

    from kosmos.sharding import is_sharded, shard_model, units

    ref = tiny_model()
    model = shard_model(tiny_model())
    assert is_sharded(model) and not is_sharded(ref)
    wrapped = [m for m in model.modules() if isinstance(m, FSDPModule)]
    blocks = list(model.vision.visual.transformer.resblocks)
    assert set(map(id, wrapped)) == {id(m) for m in [*model.decoder.layers, *blocks, model.resampler, model]}
    assert units(model)[-1] is model  # the root last
    # no unit below the root mixes frozen and trainable parameters (the root's own may: per-parameter shards)
    for m in units(model)[:-1]:
        assert len({p.requires_grad for p in m.parameters()}) == 1, type(m).__name__
    assert {p.requires_grad for p in blocks[-1].parameters()} == {True}
    assert {p.requires_grad for p in blocks[0].parameters()} == {False}
    # same weights, same loss: a text-only row (the blank image adds zero) and a row with an image
    ids, mask = make_row(ref, 4, 1, 6)
    for kw in (dict(input_ids=ids[:, :5], labels=ids[:, :5]),
               dict(input_ids=ids, images=random_images(ref, 1), image_mask=mask, labels=ids)):
        assert torch.allclose(model(**kw).loss, ref(**kw).loss, atol=1e-6)


def test_torchao_8bit_adamw_has_the_same_hyperparameters_and_groups():
    from kosmos.optim import build_optimizer

    model = tiny_model()
    cfg = tiny_config("optim.name=adamw8bit_torchao").optim
    opt, bnb = build_optimizer(model, cfg), build_optimizer(model, tiny_config().optim)
    assert type(opt).__module__.startswith("torchao.optim") and type(opt).__name__ == "AdamW8bit"
    for key in ("lr", "betas", "eps"):
        want = tuple(cfg.betas) if key == "betas" else getattr(cfg, key)
        assert opt.defaults[key] == bnb.defaults[key] == want
    same = [([id(p) for p in g["params"]], g["weight_decay"]) for g in opt.param_groups]
    assert same == [([id(p) for p in g["params"]], g["weight_decay"]) for g in bnb.param_groups]


def test_shard_for_run_refuses_what_sharding_cannot_run(tmp_path):
    from accelerate.utils import DistributedType

    from kosmos.sharding import shard_for_run

    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_fsdp2=False,
                          device=torch.device("cpu"), mixed_precision="no")
    model = object()
    assert shard_for_run(acc, tiny_config(), model) is model  # train.sharding=none: untouched
    with pytest.raises(ConfigError, match="train.sharding.*distributed launch"):
        shard_for_run(acc, tiny_config("train.sharding=fsdp2", "optim.name=adamw"), model)
    fsdp1 = SimpleNamespace(**{**acc.__dict__, "distributed_type": DistributedType.FSDP})
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        shard_for_run(fsdp1, tiny_config(), model)


def test_bnb_and_benchmarks_are_refused_when_sharded(one_process_group):
    from accelerate.utils import DistributedType

    from kosmos.sharding import shard_for_run

    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, is_fsdp2=False,
                          device=torch.device("cpu"), mixed_precision="no")
    with pytest.raises(ConfigError, match="optim.name.*adamw8bit_torchao"):
        shard_for_run(acc, tiny_config("train.sharding=fsdp2"), tiny_model())
    task = "train.eval_tasks=[{task: vqa, data: x.jsonl}]"
    with pytest.raises(ConfigError, match="train.eval_tasks"):
        shard_for_run(acc, tiny_config("train.sharding=fsdp2", "optim.name=adamw", task), tiny_model())


def test_fsdp_yaml_is_an_fsdp2_plugin_for_accelerate(monkeypatch, one_process_group):
    """configs/accelerate/fsdp.yaml as `accelerate launch` reads it: an FSDP2 plugin (no GPU needed to read
    it), and accelerate's FSDP2 preparation keeps a model the trainer has already sharded."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from accelerate.utils.launch import prepare_multi_gpu_env

    from kosmos.sharding import shard_model

    yaml = str(ROOT / "configs" / "accelerate" / "fsdp.yaml")
    args = launch_command_parser().parse_args(["--config_file", yaml, "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward
    model = shard_model(tiny_model())
    assert fsdp2_prepare_model(None, model) is model  # accelerate leaves the project's wrapping alone


# ----------------------------------------------------------------------------- 2 processes (slow)


def _torchrun(*args, **env) -> str:
    """tests/fsdp_check.py ARGS on 2 processes (torchrun; no DDP wrapper: DETAIL's collective checks)."""
    return launch(2, ROOT / "tests" / "fsdp_check.py", args, timeout=600, launcher="torchrun", env=env).stdout


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["step", "activation_checkpointing", "torchao"])
def test_fsdp2_step_equals_the_ddp_step(mode):
    """One step of the sharded model (gradients reduced on the last micro-batch only) gives the losses and
    full weights of the DDP step, frozen CLIP parameters untouched; with activation checkpointing too; with
    torchao's 8-bit AdamW within 8-bit tolerance. bitsandbytes' AdamW8bit refuses the DTensor shards."""
    args = ["step", "decoder.checkpoint_activations=true"] if mode == "activation_checkpointing" else [mode]
    # torchao compiles its step with torch.compile; on a CPU that is inductor's C++ backend, which took ~100 s
    # here and once died with SIGSEGV on rank 1 while compiling on a CI machine (a cold cache; not reproduced
    # here in 3 cold runs). What is tested is the sharded 8-bit step, not the compiler: run it eagerly.
    out = _torchrun(*args, **({"TORCHDYNAMO_DISABLE": "1"} if mode == "torchao" else {}))
    assert out.count("FSDP_OK") == 2, out[-2000:]
    assert (out.count("BNB_REFUSES_DTENSOR") == 2) == (mode != "torchao"), out[-2000:]


def _launch(tiny_run, out, steps, log, *extra, **kw):
    o = [*tiny_run, f"train.output_dir={out}", f"train.max_steps={steps}", "optim.total_steps=30",
         "optim.warmup_steps=5", "optim.name=adamw", "train.log_every=1", "train.save_every=2",
         "train.keep_last=10",
         # two micro-batches of every rank in every step: FSDP needs the same number of passes on each rank
         "data.captions.micro_batch_size=4",
         *[f"data.{s}.shuffle_buffer=4" for s in ("captions", "text", "interleaved")]]
    # DDP's constructor cannot run under DETAIL (tests.helpers.DDP_DEBUG); the FSDP2 runs have no DDP wrapper
    debug = "DETAIL" if "train.sharding=fsdp2" in extra else DDP_DEBUG
    return start(2, ROOT / "train_kosmos.py", ["--config", TINY, "--no-progress", *o, *extra], debug=debug,
                 stdout=log, stderr=subprocess.STDOUT, **kw)


def _finish(proc, log_path, timeout: float = 600) -> int:
    """The launcher's exit status; past `timeout` all of it is killed and the test fails with the log."""
    return finish(proc, timeout, lambda: log_path.read_text())


def _losses(run) -> dict[int, float]:
    lines = "\n".join(log_lines(run / "train.log"))
    return {int(s): float(v) for s, v in re.findall(r"^step\s+(\d+) \| loss (\S+)", lines, re.M)}


@pytest.mark.slow
def test_fsdp2_training_matches_ddp_and_resumes_after_sigkill_like_an_uninterrupted_run(tiny_run, tmp_path):
    """The trainer with train.sharding=fsdp2 on 2 processes: its first steps give DDP's losses and weights
    (read back through `python -m kosmos.checkpoint consolidate`); killed (SIGKILL) after a sharded
    checkpoint and resumed, it ends at the step, schedule, data position and weights of an uninterrupted
    run."""
    from safetensors.torch import load_file


    steps = 6
    runs = {k: tmp_path / k for k in ("ddp", "full", "cut")}

    def run(name, n, *extra):
        with open(tmp_path / f"{name}.log", "a") as log:
            rc = _finish(_launch(tiny_run, runs[name], n, log, *extra), tmp_path / f"{name}.log")
        assert rc == 0, (tmp_path / f"{name}.log").read_text()[-3000:]

    run("ddp", 2)
    run("full", steps, "train.sharding=fsdp2")
    full_ck = ck.list_checkpoints(runs["full"])
    assert [p.name for p in full_ck] == [f"step_{s:08d}" for s in (2, 4, 6)]
    assert (full_ck[0] / "sharded" / ".metadata").is_file()
    assert not (full_ck[0] / "model.safetensors").exists()

    ddp, fsdp = _losses(runs["ddp"]), _losses(runs["full"])
    assert set(ddp) == {1, 2} and all(abs(ddp[s] - fsdp[s]) <= 2e-4 for s in ddp), (ddp, fsdp)
    cmd = [sys.executable, "-m", "kosmos.checkpoint", "consolidate", str(full_ck[0]), str(tmp_path / "c2")]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    w_ddp = load_file(ck.list_checkpoints(runs["ddp"])[-1] / "model.safetensors")
    w_fsdp = load_file(tmp_path / "c2" / "model.safetensors")
    assert w_ddp.keys() == w_fsdp.keys()
    worst = max((w_ddp[k] - w_fsdp[k]).abs().max().item() for k in w_ddp)
    assert worst < 1e-5, f"FSDP2 weights after 2 steps differ from DDP's by {worst:.2e}"
    model = load_model(tmp_path / "c2")  # consolidated: loads on one process for inference
    assert not model.training and (tmp_path / "c2" / "tokenizer" / "tokenizer.model").is_file()
    on_the_fly = load_model(full_ck[0])  # the sharded checkpoint as it is: read in memory, the same weights
    assert not on_the_fly.training and all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), on_the_fly.state_dict().values(), strict=True))

    with open(tmp_path / "cut.log", "w") as log:
        proc = _launch(tiny_run, runs["cut"], steps, log, "train.sharding=fsdp2")
        deadline = time.time() + 600
        while not (ck.checkpoint_dir(runs["cut"]) / "step_00000002").is_dir():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "cut.log").read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait()
    killed_at = ck.list_checkpoints(runs["cut"])[-1].name
    assert killed_at in ("step_00000002", "step_00000004"), killed_at
    run("cut", steps, "train.sharding=fsdp2", "--resume", "latest")
    assert f"resumed from {ck.checkpoint_dir(runs['cut'])}" in (runs["cut"] / "train.log").read_text()

    a, b = ck.list_checkpoints(runs["full"])[-1], ck.list_checkpoints(runs["cut"])[-1]
    assert a.name == b.name == f"step_{steps:08d}"
    sa, sb = ck.read_json(a / "trainer_state.json"), ck.read_json(b / "trainer_state.json")
    assert (sa["step"], sa["samples"], sa["bad_steps"]) == (sb["step"], sb["samples"], sb["bad_steps"])
    assert ck.load_torch(a / "scheduler.pt") == ck.load_torch(b / "scheduler.pt")  # schedule position
    for r in (0, 1):  # data position of each rank
        assert ck.read_json(a / f"data_rank{r}.json") == ck.read_json(b / f"data_rank{r}.json")
    from kosmos.checkpoint import consolidate

    wa = load_file(consolidate(a, tmp_path / "ca") / "model.safetensors")
    wb = load_file(consolidate(b, tmp_path / "cb") / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"

    # a truncated shard in the newest checkpoint: named, and `--resume latest` falls back to the one before
    shard = next(f for f in sorted((b / "sharded").iterdir()) if f.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-1000])
    run("cut", steps, "train.sharding=fsdp2", "--resume", "latest")
    log = (runs["cut"] / "train.log").read_text()
    fell_back = "falling back to the previous checkpoint, step_00000004"
    assert f"{shard}: " in log and fell_back in log, log[-2000:]
    wc = load_file(consolidate(b, tmp_path / "cc") / "model.safetensors")  # steps 5 and 6 again: the same
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.slow
def test_fsdp2_periodic_evaluation_reports_the_held_out_loss(tiny_run, tmp_path):
    """Held-out shards of very different sizes, one per rank (one worker each: two logical streams), read to
    the end: the ranks have different numbers of micro-batches, and every forward of a sharded model is
    collective, so they stop together at the fewest instead of one waiting forever."""
    from tests.helpers import caption_shards

    big = caption_shards(tmp_path / "eval_big", 1, 120)
    small = caption_shards(tmp_path / "eval_small", 1, 1, seed=1)
    with open(tmp_path / "log", "w") as log:
        proc = _launch(tiny_run, tmp_path / "run", 2, log, "train.sharding=fsdp2", "data.captions.workers=1",
                       f"data.captions.eval_shards=[{big[0]},{small[0]}]", "train.eval_every=2",
                       "train.eval_batches=1000")
        assert _finish(proc, tmp_path / "log", 300) == 0, (tmp_path / "log").read_text()[-3000:]
    line = next(x for x in log_lines(tmp_path / "run" / "train.log") if x.startswith("eval "))
    assert line.split()[1::2] == ["captions_loss", "captions_ppl"] and 0 < float(line.split()[2]) < 20
