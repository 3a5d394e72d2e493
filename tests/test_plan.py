"""The run planner (kosmos.plan): a traced optimizer step on fake tensors, its memory categories, the GPU
attention kernel's stand-in, the verdict and its re-traced suggestion, and the check against a real run."""

import pytest
import torch

from kosmos import plan as P
from kosmos.config import ConfigError, load_config
from tests.helpers import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["decoder.max_len=64", "data.captions.micro_batch_size=4", "data.text.micro_batch_size=2",
         "data.interleaved.micro_batch_size=2"]


def _cfg(*overrides):
    return load_config(TINY, [*SMALL, *overrides])


def test_heaviest_micro_batches_fill_rows_with_images():
    """Captions: as many `<s> span caption </s>` samples as a row holds; interleaved: --max-images per row
    (default: as many spans as a row holds); text: none. A template without shards plans the three sources
    with a budget (configs/kosmos1.yaml: the paper's 5:5:2)."""
    cfg = _cfg()
    span = cfg.connector.num_latents + 2  # 10
    got = {b.name: (b.rows, b.images) for b in P.heaviest_batches(cfg)}
    assert got == {"captions": (4, 4 * (64 // (span + 3))), "text": (2, 0),
                   "interleaved": (2, 2 * (62 // span))}
    got = {b.name: b.images for b in P.heaviest_batches(cfg, caption_tokens=20, max_images=2)}
    assert got == {"captions": 4 * (64 // (span + 22)), "text": 0, "interleaved": 4}
    paper = load_config(ROOT / "configs" / "kosmos1.yaml")
    assert [b.name for b in P.heaviest_batches(paper)] == ["text", "captions", "interleaved"]
    assert {b.name: b.images for b in P.heaviest_batches(paper)} == \
        {"text": 0, "captions": 8 * (2048 // 69), "interleaved": 8 * (2046 // 66)}


@pytest.mark.slow
def test_the_gpu_attention_stand_in_keeps_output_and_log_sum_exp_not_the_matrix():
    """With attention dropout the CPU kernel keeps the (B, heads, L, L) matrix and its dropout mask; the
    GPU stand-in keeps the output and an fp32 log-sum-exp per query and head. Traced activations of the
    same step: the CPU's exceed the GPU's by at least the matrices, the GPU's stand-in gives gradients of
    the inputs' shapes."""
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    out = P._flash_sdpa(q, k, v, is_causal=True, dropout_p=0.1)
    assert out.shape == q.shape and out.dtype == q.dtype
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape

    cfg = _cfg("decoder.attention_dropout=0.1", "decoder.max_len=128")
    batches = [b for b in P.heaviest_batches(cfg) if b.name == "text"]
    gpu = P.trace_step(cfg, 2, batches, attention="gpu", precision="fp32")
    cpu = P.trace_step(cfg, 2, batches, attention="cpu", precision="fp32")
    d = cfg.decoder
    matrices = d.layers * batches[0].rows * d.heads * d.max_len**2 * 4  # one fp32 (B, H, L, L) per layer
    assert cpu.categories["activations"] - gpu.categories["activations"] >= matrices


@pytest.mark.slow
def test_ddp_categories_and_the_8_bit_state():
    """DDP: every GPU holds the parameters (fp32), their gradients, the 8-bit state (2 bytes per element and
    the block scales, fp32 below 4096 elements) and the gradient buckets; the peak is the categories'
    sum. With optim.name=adamw the state is torch's fp32 moments: 8 bytes per trainable element."""
    from kosmos.model import Kosmos
    from kosmos.optim import param_groups

    cfg = _cfg()
    with torch.device("meta"):
        model = Kosmos(cfg)
    params = [p for g in param_groups(model, 0.01) for p in g["params"]]
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    t = P.trace_step(cfg, 2, P.heaviest_batches(cfg))
    assert t.peak == sum(t.categories.values())
    assert t.categories["parameters"] >= 4 * n_all
    assert t.categories["optimizer"] == P.eight_bit_state_bytes(params) < 8 * n_train
    assert t.categories["communication"] == 4 * n_train
    assert set(t.source_peaks) == {"text", "captions", "interleaved"}
    assert max(t.source_peaks.values()) <= t.peak
    fp32 = P.trace_step(_cfg("optim.name=adamw"), 2, P.heaviest_batches(cfg))
    assert 8 * n_train <= fp32.categories["optimizer"] <= 8 * n_train + 4 * len(params)  # + step counters


@pytest.mark.slow
def test_fsdp2_shards_the_state_over_the_ranks():
    """FSDP2 on 2 and 4 fake ranks: the sharded parameters and the optimizer state per rank halve (within
    the padding of each parameter's shard); the gradients accumulated unsharded between the step's
    micro-batches are counted as gradients."""
    cfg = _cfg("train.sharding=fsdp2", "optim.name=adamw8bit_torchao")
    batches = P.heaviest_batches(cfg)
    two, four = (P.trace_step(cfg, n, batches) for n in (2, 4))
    for c in ("parameters", "optimizer"):
        assert 0.45 < four.categories[c] / two.categories[c] < 0.6, c
    assert two.categories["gradients"] > 0


@pytest.mark.slow
def test_the_command_prints_the_plan_and_the_first_change_that_fits(capsys):
    """Too little memory: the verdict says so, tries the changes in order (activation checkpointing first,
    then smaller micro-batches, FSDP2, more GPUs) re-tracing each, and names the first that fits; its
    re-traced peak is within the budget."""
    res = P.main([TINY, *SMALL, "--gpus", "2", "--gpu-memory", "0.05"])
    out = capsys.readouterr().out
    for word in ("parameters", "gradients", "optimizer", "activations", "temporaries", "communication",
                 "peak", "FLOPs per step", "tokens/s per GPU", "GPU-hours", "worker(s) per GPU"):
        assert word in out, word
    assert res["fits"]  # 0.05 GiB holds the small tiny config
    res = P.main([TINY, *SMALL, "--gpus", "2", "--gpu-memory", str(res["trace"].peak * 0.85 / 2**30 / 0.92)])
    out = capsys.readouterr().out
    assert not res["fits"] and "does NOT fit" in out
    what, trace = res["suggestion"]
    assert what.startswith("decoder.checkpoint_activations=true") and f"first change that fits: {what}" in out
    assert trace.peak <= res["trace"].peak * 0.85
    # speed: the trainer's FLOP counts
    cfg = _cfg()
    sp = res["speed"]
    assert sp.flops_per_step == pytest.approx(sp.tokens_per_step * cfg.flops_per_token()
                                              + sp.images_per_step * cfg.flops_per_image())


def test_a_mixture_the_ranks_cannot_share_is_refused_naming_the_key():
    """As the trainer refuses them, before any trace: 128 ranks and the paper's 73 micro-batches of 8 rows;
    FSDP2 on 64 ranks with 1 to 2 passes per rank (every rank must run the same number)."""
    paper = str(ROOT / "configs" / "kosmos1.yaml")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        P.main([paper, "--gpus", "128", "--no-suggest"])
    with pytest.raises(ConfigError, match="1 to 2 passes per step; FSDP needs the same number"):
        P.main([paper, "train.sharding=fsdp2", "--gpus", "64", "--no-suggest"])


_REAL_STEP = r'''
import gc, json, sys
import torch
from kosmos import plan as P
from kosmos.config import load_config
torch.set_num_threads(1)
cfg = load_config(sys.argv[1], sys.argv[2:])
batches = P.heaviest_batches(cfg)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
# a step of 1-row micro-batches first: the kernels' code is paged in, the allocator warmed
P.trace_step(cfg, 1, [P.MicroBatch(b.name, b.kind, 1, b.images // b.rows) for b in batches], fake=False,
             attention="cpu", precision="fp32")
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident set size (VmHWM)
before = status("VmRSS")
t = P.trace_step(cfg, 1, batches, fake=False, attention="cpu", precision="fp32")
print(json.dumps({"tracker": t.peak, "rss": status("VmHWM") - before}))
'''


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    [],  # the tiny config: ~117 MiB
    ["decoder.dim=256", "decoder.ffn_dim=1024", "decoder.vocab_size=8000", "decoder.max_len=384"],  # ~650 MiB
], ids=["tiny", "few-hundred-MB"])
def test_the_planned_peak_is_within_15_percent_of_a_real_cpu_run(overrides):
    """Checked against reality: the planner's peak (fake tensors, fake process group; the CPU attention
    kernel, as the real run has it) against one real CPU step of the same micro-batches, measured twice in a
    fresh process: the rise of its resident set (VmHWM after the step over VmRSS before, after a warm-up step
    of 1-row micro-batches; glibc told to return freed memory at once, so that the resident set follows the
    live tensors) and torch's MemTracker on the real tensors. Both within 15%."""
    import json
    import os
    import subprocess
    import sys

    args = [TINY, "optim.name=adamw", *overrides]  # torch's AdamW: the real run's state is what is traced
    cfg = load_config(TINY, args[1:])
    planned = P.trace_step(cfg, 1, P.heaviest_batches(cfg), attention="cpu", precision="fp32")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    res = subprocess.run([sys.executable, "-c", _REAL_STEP, *args], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    real = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"planned {planned.peak / 2**20:.1f} MiB, real: tracker {real['tracker'] / 2**20:.1f} MiB, "
          f"resident set {real['rss'] / 2**20:.1f} MiB")
    assert abs(planned.peak / real["tracker"] - 1) < 0.15
    assert abs(planned.peak / real["rss"] - 1) < 0.15
