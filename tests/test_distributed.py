"""Collectives that every rank issues alike (kosmos.distributed), and per-source figures that are right on any
number of ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import DDP_DEBUG, easy_text_shards, instruction_shards, launch

ROOT = Path(__file__).resolve().parents[1]


class _Recording:
    """An accelerator stand-in for rank `rank` of `world`: reduce() records the shape and dtype of every
    collective and sums `world` copies of the tensor."""

    def __init__(self, rank: int = 0, world: int = 2):
        self.process_index, self.num_processes = rank, world
        self.device = torch.device("cpu")
        self.is_main_process = rank == 0
        self.calls: list[tuple] = []

    def reduce(self, t, reduction):
        assert reduction == "sum"
        self.calls.append((tuple(t.shape), t.dtype))
        return t * self.num_processes


def _model():
    return SimpleNamespace(cfg=SimpleNamespace(flops_per_token=lambda: 1.0, flops_per_image=lambda: 1.0))


def _result(sources: list[str], ok: bool = True):
    from kosmos.training import StepResult

    losses = {n: torch.tensor([2.0 * (i + 1) * 10, 10.0]) for i, n in enumerate(sources)}
    counts = {n: [10, i, 2] for i, n in enumerate(sources)}
    return StepResult(ok, 1.0, losses, rows=16, real=10 * len(sources), images=1, counts=counts)


def test_pack_lays_figures_out_in_the_agreed_order_with_zeros_for_what_a_rank_did_not_see():
    from kosmos.distributed import pack, unpack

    names = ["text", "captions", "web"]
    flat = pack(names, {"web": [1, 2], "text": [3, 4]}, 2)
    assert flat == [3.0, 4.0, 0.0, 0.0, 1.0, 2.0]
    assert unpack(names, flat, 2) == {"text": [3.0, 4.0], "captions": [0.0, 0.0], "web": [1.0, 2.0]}
    with pytest.raises(KeyError, match="other"):
        pack(names, {"other": [1, 2]}, 2)  # outside the layout: an error, never dropped silently
    with pytest.raises(ValueError, match="3 figures"):
        pack(names, {"text": [1, 2, 3]}, 2)


def test_meter_issues_one_reduction_of_one_shape_whatever_the_rank_saw():
    """Two ranks of one window: one met text then captions, the other web alone (the order in which each met
    its sources differs too). Both issue exactly one all-reduce, of the same shape and dtype, and read every
    source's figures from the same places: the bug was one all-reduce per source met, in meeting order."""
    from kosmos.metrics import Meter

    names = ["text", "captions", "web", "inst"]
    epochs = {n: [0] * (i + 1) for i, n in enumerate(names)}  # 1-4 logical streams
    calls, lines = [], []
    for seen in (["captions", "text"], ["web"]):
        acc = _Recording()
        meter = Meter(acc, _model(), None, names=names)
        meter.add(_result(seen))
        report = meter.report(1, lr=1.0, gnorm=1.0, bad_steps=0, skipped={n: {} for n in names},
                              truncated={}, samples={}, epochs=epochs)
        calls.append(acc.calls)
        lines.append(report.line)
        assert set(report.sources) == set(names) and all("loss" not in report.sources[n]
                                                         for n in names if n not in seen)
    assert calls[0] == calls[1] and len(calls[0]) == 1, calls
    assert calls[0][0] == ((2 * 4 + 3 + 6 * 4 + 10,), torch.float64)


def test_meter_rejects_figures_of_a_source_outside_its_layout():
    from kosmos.metrics import Meter

    meter = Meter(_Recording(), _model(), None, names=["text"])
    meter.add(_result(["captions"]))
    with pytest.raises(KeyError, match="captions"):
        meter.report(1, lr=1.0, gnorm=1.0, bad_steps=0, skipped={"text": {}})


def test_meter_reports_epochs_tokens_images_and_samples_per_source_over_all_ranks():
    from kosmos.metrics import Meter

    acc = _Recording(world=2)  # the stand-in doubles: what the other rank would add, were it the same
    meter = Meter(acc, _model(), None, names=["text", "captions"],
                  totals={"text": {"tokens": 5, "images": 0}})
    meter.add(_result(["text", "captions"]))
    report = meter.report(3, lr=1.0, gnorm=1.0, bad_steps=0,
                          skipped={"text": {"bad_json": 1}, "captions": {}},
                          truncated={"captions": 2}, samples={"text": 7, "captions": 4},
                          epochs={"text": [1, 0], "captions": [2, 2, 2]})
    text, captions = report.sources["text"], report.sources["captions"]
    assert text["tokens"] == 5 + 20 and captions["images"] == 2  # resumed totals + this window, both ranks
    assert text["samples"] == 14 and text["skipped"] == 2 and captions["truncated"] == 4
    assert (text["epoch_min"], text["epoch"]) == (0, 2) and captions["epoch"] == 4  # summed stand-in streams
    assert report.metrics["train/epoch/captions"] == 4 and report.metrics["train/tokens/text"] == 25
    assert "text 2.000 e0-2 | captions 4.000 e4 |" in report.line


@pytest.mark.parametrize("world, mbs", [(8, 8), (64, 8), (128, 4)])
def test_plan_streams_and_reductions_are_identical_on_every_rank_at_scale(world, mbs):
    """Scale on paper: the paper's configuration (configs/kosmos1.yaml, 3 sources, 2 workers per rank) planned
    by each of `world` ranks under torch's fake process group: every rank makes the same step plan, the
    logical streams are each read by exactly one global worker, and each rank's log-window reduction (with
    what that rank saw: its own slot of the plan) is one all-reduce of the same shape. On 128 ranks the
    paper's 73 micro-batches of 8 rows per step cannot give every rank one: micro-batches of 4 rows."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from kosmos.config import load_config
    from kosmos.data.mixture import plan
    from kosmos.data.stream import SourceDataset
    from kosmos.metrics import Meter

    cfg = load_config(ROOT / "configs" / "kosmos1.yaml",
                      [f"data.{n}.{k}" for n in ("text", "captions", "interleaved")
                       for k in (f"shards=[s3://bucket/{n}]", f"micro_batch_size={mbs}")])
    plans = {r: plan(cfg, world) for r in range(0, world, max(1, world // 8))}
    first = next(iter(plans.values()))
    assert all(p.slots == first.slots and p.sources == first.sources for p in plans.values())
    names = list(first.sources)
    # what SourceDataset reads of its encoder before any data is read
    enc = SimpleNamespace(span=66, num_latents=64, pad_id=0, image_size=224)
    shapes = set()
    for name in names:
        src = cfg.data.source(name)
        owners: dict[int, tuple] = {}
        n_streams = set()
        for rank in range(world):
            ds = SourceDataset(src, [f"s3://bucket/{name}-{i:06d}.tar" for i in range(1000)], enc,
                               max_len=cfg.decoder.max_len, rank=rank, world_size=world, name=name)
            n_streams.add(ds.n_streams)
            for w in range(max(1, src.workers)):
                for s in ds.streams_of(w):
                    assert s not in owners, f"{name}: stream {s} read by {owners[s]} and {(rank, w)}"
                    owners[s] = (rank, w)
        assert len(n_streams) == 1 and sorted(owners) == list(range(n_streams.pop())), name
    streams = {n: max(1, world * max(1, cfg.data.source(n).workers)) for n in names}
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        for rank in range(0, world, max(1, world // 16)):
            acc = _Recording(rank, world)
            reduce = acc.reduce
            acc.reduce = lambda t, reduction, reduce=reduce: (dist.all_reduce(t), reduce(t, reduction))[1]
            meter = Meter(acc, _model(), None, names=names)
            for step in range(3):
                meter.add(_result([n for n, k in first.counts(rank, step).items() if k]))
            meter.report(3, lr=1.0, gnorm=1.0, bad_steps=0, skipped={n: {} for n in names},
                         epochs={n: [0] * streams[n] for n in names})
            shapes.add(tuple(acc.calls))
    finally:
        dist.destroy_process_group()
    assert len(shapes) == 1 and len(next(iter(shapes))) == 1, shapes


def _launch(nproc: int, script: str, args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    """tests/SCRIPT on `nproc` processes (tests.helpers.launch: KOSMOS_CHECK_COLLECTIVES=1; DDP, so without
    TORCH_DISTRIBUTED_DEBUG=DETAIL, which makes DDP's constructor crash on gloo in torch 2.14.1)."""
    return launch(nproc, ROOT / "tests" / script, args, timeout=timeout, debug=DDP_DEBUG)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 3])
def test_per_source_figures_are_right_on_several_ranks(tiny_run, tmp_path, nproc):
    """5 sources (the three of the demo, a named easy text source, a named instruction source), micro-batch
    sizes that make the ranks run 3 or 4 (2 ranks) and 2 or 3 (3 ranks) passes in rotation, a log line every
    step: each logged per-source loss equals the one recomputed from every rank's own sums, gathered apart
    from the reduction (tests/dist_sources.py); and the easy source's loss falls well below random text's.
    Before: one all-reduce per source met, in meeting order, which mixed sources across ranks (and hung when
    the ranks met different numbers of sources)."""
    easy = easy_text_shards(tmp_path / "easy", 2, 50)
    inst = instruction_shards(tmp_path / "inst", 2, 50)
    out = tmp_path / "run"
    out.mkdir()
    steps = 10
    args = [*tiny_run, f"train.output_dir={out}", f"train.max_steps={steps}", "optim.total_steps=30",
            "optim.warmup_steps=2", "train.log_every=1", "train.save_every=100",
            "data.captions.tokens_per_step=3072", "data.captions.micro_batch_size=4",
            "data.sources.easy.kind=text", f"data.sources.easy.shards=[{','.join(easy)}]",
            "data.sources.easy.tokens_per_step=512", "data.sources.easy.micro_batch_size=2",
            "data.sources.easy.workers=0", "data.sources.inst.kind=text",
            f"data.sources.inst.shards=[{','.join(inst)}]", "data.sources.inst.tokens_per_step=512",
            "data.sources.inst.micro_batch_size=2", "data.sources.inst.workers=0",
            "data.text.workers=0", "data.interleaved.workers=0",
            *[f"data.{s}.shuffle_buffer=8" for s in ("captions", "text", "interleaved")]]
    res = _launch(nproc, "dist_sources.py", [str(out), *args])
    assert res.stdout.count("SOURCES_OK") == nproc, res.stdout[-3000:]
    assert "passes per step (rotating)" in res.stdout, res.stdout[-3000:]
    reports = json.loads((out / "reports.json").read_text())
    assert [r["step"] for r in reports] == list(range(1, steps + 1))
    names = ["text", "captions", "interleaved", "easy", "inst"]
    assert all(list(r["sources"]) == names for r in reports)
    assert all(all("loss" in f for f in r["sources"].values()) for r in reports)  # each source every step
    last = reports[-1]["sources"]
    assert last["easy"]["loss"] < 0.5 * last["text"]["loss"], {n: f["loss"] for n, f in last.items()}
    state = json.loads((out / "checkpoints" / f"step_{steps:08d}" / "trainer_state.json").read_text())
    assert state["sources"]["captions"]["images"] == last["captions"]["images"] > 0
    assert sum(f["samples"] for f in state["sources"].values()) == state["samples"]


_MISMATCH = """
import sys, torch, torch.distributed as dist
from types import SimpleNamespace
from kosmos.distributed import CollectiveMismatch, all_reduce_sum
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
def gather(t):
    out = [torch.zeros_like(t) for _ in range(2)]
    dist.all_gather(out, t)
    return torch.cat(out)
def reduce(t, reduction):
    dist.all_reduce(t)
    return t
acc = SimpleNamespace(num_processes=2, process_index=rank, device=torch.device("cpu"), gather=gather,
                      reduce=reduce)
try:
    all_reduce_sum(acc, torch.ones(3), "log window")
    if rank == 1:  # the bug: a reduction that one rank alone makes
        all_reduce_sum(acc, torch.ones(1), "stop flag")
    all_reduce_sum(acc, torch.ones(()), "loss tokens of the step")
    print("NO MISMATCH", flush=True)
except CollectiveMismatch as e:
    print("MISMATCH", e, flush=True)
"""


@pytest.mark.slow
def test_a_collective_one_rank_alone_makes_is_named_instead_of_hanging(tmp_path):
    """KOSMOS_CHECK_COLLECTIVES=1 (the tests' setting): rank 1 reduces the stop flag where rank 0 reduces the
    step's loss tokens; both ranks stop with CollectiveMismatch naming the two reductions. Without the check
    the two all-reduces (of 1 and of 0 dimensions) pair up and the run goes on with wrong numbers or hangs."""
    env = {**os.environ, "KOSMOS_CHECK_COLLECTIVES": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", _MISMATCH, str(r), str(store)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all("MISMATCH" in o and "NO MISMATCH" not in o for o in outs), outs
    assert "'stop flag'" in outs[0] and "'loss tokens of the step'" in outs[0], outs[0]


def test_every_rank_skips_a_step_whose_loss_is_not_finite_on_another_rank():
    """A NaN/inf loss on one rank makes every rank skip the step (the count travels with the step's loss-token
    reduction): a rank stepping alone would leave the others' weights and step counters, and so their
    collectives, behind. Here this rank's losses are finite and the other rank reports one that is not."""
    from kosmos.config import load_config
    from kosmos.data.mixture import Mixture, plan
    from kosmos.training import build_accelerator, train_step
    from tests.helpers import tiny_model
    from tests.test_train import TINY, _micro_batch

    cfg = load_config(TINY, [f"data.{s}.shards=[x]" for s in ("text", "captions", "interleaved")]
                      + ["train.tracker=none"])
    model = tiny_model()
    batches = {"captions": [_micro_batch(model, [(0, 1, 6)], 40, seed=1)],
               "text": [_micro_batch(model, [(39, 0, 0)], 40, seed=2)],
               "interleaved": [_micro_batch(model, [(5, 1, 4)], 40, seed=4)]}

    class OtherRankNaN:  # this process as rank 0 of 2; the reductions add rank 1's figures
        num_processes = 2

        def __init__(self, acc):
            self.acc = acc

        def __getattr__(self, name):
            return getattr(self.acc, name)

        def reduce(self, t, reduction):
            return t + torch.tensor([7.0, 1.0], dtype=t.dtype) if t.shape == (2,) else t

    stepped = []
    optimizer = SimpleNamespace(step=lambda: stepped.append(1),
                                zero_grad=lambda set_to_none: model.zero_grad())
    res = train_step(OtherRankNaN(build_accelerator(cfg)), model, optimizer,
                     SimpleNamespace(step=lambda: None),
                     Mixture({n: iter(b) for n, b in batches.items()}, plan(cfg)), 1.0)
    assert all(torch.isfinite(s[0]) for s in res.losses.values())  # this rank's own losses were fine
    assert not res.ok and not stepped
