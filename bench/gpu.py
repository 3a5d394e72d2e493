"""The prepared GPU check: one table of what a GPU run needs to know, measured in at most --budget-s seconds.

    python -m bench.gpu [--out gpu.json]     # one GPU: configs/kosmos1.yaml (random weights), 480 s at most
    python -m bench.gpu --tiny [--out X]     # configs/tiny.yaml on the CPU: the same sections, small counts

Rows (configs/kosmos1.yaml, bf16 autocast over fp32 weights, sdpa attention, `optim.name` of the config:
bitsandbytes' 8-bit AdamW; CLIP ViT-L/14 randomly initialised, `vision.pretrained=null`: nothing is
downloaded):

  train step     tokens/s, MFU and peak memory (torch.cuda.max_memory_allocated, reset per configuration)
                 of one optimizer step on one caption micro-batch (kosmos.plan's: 8 rows of 2048 tokens and
                 as many images as captions of --caption-tokens tokens leave room for), activation
                 checkpointing off and on, decoder.compile off and on; the planner's peak for the same
                 micro-batch on 1 GPU (kosmos.plan.trace_step, traced on fake tensors in a process of its own
                 beside the GPU work); the 8-bit AdamW step alone
  vision         the frozen CLIP tower's forward, images/s
  generation     kosmos.generate with the KV cache, greedy and beam 5: tokens/s over 256 new tokens after a
                 prompt of one image and 32 text tokens, and the ms per token of the first and the last 16
  evaluation     kosmos.eval's captioning task (beam 5, 20 tokens) on a folder of synthetic images, images/s
  loader         caption shards of 256 px JPEGs through the training pipeline in 1 and 8 DataLoader workers,
                 images/s (bench/data.py's measurement, a window of seconds after the workers' start-up)

Bounded: the budget counts from the start of the process and is shared among the sections in order (time a
section leaves goes to the next); each measures a few warm steps after warm-up (timed with the device
synchronised) and stops early at its share; a section still running past its share is interrupted (SIGALRM)
and its rows say `skipped: budget`; one that fails says its error in its rows and the next runs.
torch.compile runs last and only when --compile-min-s seconds are left (its first step compiles). A watchdog
prints the table and exits (status 3) if the run outlives the budget by 30 s (a hang in native code). Exit
status 1 when a row has an error.

Without CUDA (and without --tiny) it prints one line saying so and exits 0: `make bench` on a CPU machine
runs every bench/ script, and the full-size model on a CPU would take hours; tests/test_bench_gpu.py runs
--tiny, so the code cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

T0 = time.monotonic()  # the budget counts from here: torch's and the project's imports included
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._perf import PeakMemory, wall_times  # noqa: E402

GiB = 2**30
SHARES = {"train": 0.22, "vision": 0.04, "generation": 0.12, "evaluation": 0.08, "loader": 0.10,
          "compiled": 0.44}
"""Each section's share of the budget, in the order they run; time a section leaves goes to those after."""


# ----------------------------------------------------------------------------- rows and the budget


@dataclasses.dataclass
class Row:
    what: str
    setting: str
    unit: str
    value: float | None = None
    note: str = ""
    status: str = "pending"
    """ok (value set), skipped (note says why), error (note: the error)."""

    def set(self, value: float, note: str = "") -> None:
        self.value, self.status = float(value), "ok"
        if note:
            self.note = note

    def skip(self, why: str) -> None:
        if self.status == "pending":
            self.status, self.note = "skipped", why

    def fail(self, why: str) -> None:
        if self.status == "pending":
            self.status, self.note = "error", why


class OutOfBudget(BaseException):
    """Raised in the main thread (SIGALRM) when a section runs past its share of the budget; a
    BaseException, as KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


class Budget:
    def __init__(self, seconds: float, t0: float | None = None):
        self.total = seconds
        self.t0 = time.monotonic() if t0 is None else t0
        self.end = self.t0 + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def share(self, section: str, selected: list[str]) -> float:
        """Seconds for `section`: the time left split among it and the `selected` sections after it by their
        shares."""
        names = [n for n in SHARES if n in selected]
        rest = sum(SHARES[n] for n in names[names.index(section):])
        return max(0.0, self.left() * SHARES[section] / rest)


@contextlib.contextmanager
def interrupt_after(seconds: float):
    """OutOfBudget in the main thread after `seconds` (at the next Python bytecode; a section inside one
    long native call is stopped by the watchdog instead)."""
    def handler(signum, frame):
        raise OutOfBudget

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- the run's setting


@dataclasses.dataclass
class Setup:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    """Of the inference sections (bf16 on CUDA, fp32 on the CPU); training autocasts on CUDA."""
    config: str
    overrides: list[str]
    tmp: Path
    tokenizer: object
    budget: Budget

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def cfg(self, *more: str):
        from kosmos.config import load_config

        return load_config(self.config, [*self.overrides, *more])

    def amp(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()


def build_model(cfg, device: torch.device):
    """`cfg`'s model, randomly initialised, made on `device` (on a GPU in seconds, where the CPU takes a
    minute for the 1.6B parameters); made on the CPU and moved if that fails."""
    from kosmos.model import Kosmos

    torch.manual_seed(0)
    try:
        with device:
            return Kosmos(cfg)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception:  # noqa: BLE001 - a module that builds on the CPU only: the slow way
        return Kosmos(cfg).to(device)


def train_batch(cfg, caption_tokens: int):
    """kosmos.plan's caption micro-batch of `cfg` (the rows full, captions of `caption_tokens` tokens)."""
    from kosmos import plan

    mb = next(b for b in plan.heaviest_batches(cfg, caption_tokens) if b.kind == "captions")
    return mb, plan.make_batch(cfg, mb)


# ----------------------------------------------------------------------------- the planner, beside


def plan_only(args) -> None:
    """--plan-only: the planner's peak for the train section's micro-batch on 1 GPU, one JSON line per
    --plan-checkpointing value (`decoder.checkpoint_activations`)."""
    from kosmos import plan
    from kosmos.config import load_config

    torch.set_num_threads(2)  # fake tensors compute nothing: leave the cores to the measurements
    cuda = torch.device(args.device).type == "cuda"
    for ckpt in args.plan_checkpointing.split(","):
        cfg = load_config(args.config, [*args.overrides, f"decoder.checkpoint_activations={ckpt}"])
        mb, _ = train_batch(cfg, args.caption_tokens)
        t = plan.trace_step(cfg, 1, [mb], attention="gpu" if cuda else "cpu",
                            precision="bf16" if cuda else "fp32")
        print(json.dumps({"checkpointing": ckpt == "true", "peak": t.peak, "categories": t.categories}),
              flush=True)


class Planner:
    """The planner's traces for activation checkpointing off and on, started at once in processes of their
    own (CPU work, beside the GPU's): on a GPU one process each (a full-size trace takes minutes), on the CPU
    one for both (two cores); read when the table is written."""

    def __init__(self, s: Setup, train: bool = True):
        path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # wheels there too
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "2"}
        groups = ([["false"], ["true"]] if s.cuda else [["false", "true"]]) if train else []
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "bench.gpu", "--plan-only", "--plan-checkpointing", ",".join(g),
             "--config", s.config, "--caption-tokens", str(s.args.caption_tokens), "--device", str(s.device),
             *s.overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for g in groups]
        self.results: dict[bool, dict] = {}
        self.errors: list[str] = []

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float) -> None:
        """Reads what the processes printed, waiting at most `timeout` seconds for them."""
        end = time.monotonic() + timeout
        for p in self.procs:
            if p.returncode is not None:
                continue
            try:
                out, err = p.communicate(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue
            for line in out.splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    self.results[r["checkpointing"]] = r
            if p.returncode:
                self.errors.append((err.strip().splitlines() or ["no output"])[-1])

    def peak(self, ckpt: bool) -> tuple[float | None, str]:
        """(planned peak bytes or None, why not)."""
        if ckpt in self.results:
            return self.results[ckpt]["peak"], ""
        if self.errors:
            return None, f"planner failed: {self.errors[0]}"
        if not self.procs:
            return None, "skipped: not selected (--sections: no train section)"
        return None, "the planner was still tracing"

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# ----------------------------------------------------------------------------- sections


def train_rows(rows: dict, key: str) -> list[Row]:
    return [rows[("train step", key)], rows[("train MFU", key)], rows[("train peak memory", key)]]


def measure_train(s: Setup, rows: dict, ckpt: bool, compile_: bool, deadline: float) -> None:
    """One configuration's train step: forward (autocast bf16 on CUDA), backward, clipping, the optimizer
    step of `optim.name`, on the planner's caption micro-batch; tokens/s, MFU and peak memory."""
    from kosmos.optim import build_optimizer
    from kosmos.training import peak_flops

    key = train_key(ckpt, compile_)
    step_row, mfu_row, mem_row = train_rows(rows, key)
    cfg = s.cfg(f"decoder.checkpoint_activations={str(ckpt).lower()}",
                f"decoder.compile={str(compile_).lower()}")
    mb, batch = train_batch(cfg, s.args.caption_tokens)
    model = build_model(cfg, s.device).train()
    optimizer = build_optimizer(model, cfg.optim)
    batch = {k: v.to(s.device) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with s.amp():
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t_warm = time.monotonic()
    for _ in range(s.args.warmup):  # the first makes the optimizer's state; compiles with decoder.compile
        step()
    warm = time.monotonic() - t_warm
    if s.cuda:
        torch.cuda.reset_peak_memory_stats(s.device)
        times = wall_times(step, s.device, s.args.steps, 0, deadline)
        peak = torch.cuda.max_memory_allocated(s.device)
    else:
        times = wall_times(step, s.device, s.args.steps, 0, deadline)
        held = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
        held += sum(v.nbytes for st in optimizer.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
        with PeakMemory(s.device) as mem:
            step()
        peak = held + mem.peak_bytes
    t = statistics.median(times)
    tokens = batch["input_ids"].numel()
    images = len(batch.get("images", ()))
    n_warm = s.args.warmup
    step_row.set(tokens / t, f"{t:.3f} s a step (median of {len(times)} after {n_warm} warm-up "
                             f"step{'s' if n_warm > 1 else ''}: {warm:.1f} s); {mb.rows} x "
                             f"{cfg.decoder.max_len} tokens + {images} images")
    peak_fl = peak_flops(cfg, s.device)
    flops = tokens * cfg.flops_per_token() + images * cfg.flops_per_image()  # as kosmos.metrics counts
    if peak_fl:
        mfu_row.set(flops / t / peak_fl, f"{flops / t / 1e12:.1f} TFLOP/s of {peak_fl / 1e12:g} "
                                         "(kosmos.training.peak_flops)")
    else:
        mfu_row.skip(f"no dense peak known for {s.device.type} (train.peak_flops); "
                     f"{flops / t / 1e12:.3f} TFLOP/s")
    how = "torch.cuda.max_memory_allocated" if s.cuda else \
        "CPU: weights and optimizer state + live tensors of a step (bench._perf.PeakMemory)"
    mem_row.set(peak / GiB, how)
    opt_row = rows[("optimizer step", cfg.optim.name)]
    if opt_row.status == "pending" and not compile_:  # the optimizer step alone, one micro-batch's gradients
        with s.amp():
            loss = model(**batch).loss
        loss.backward()
        del loss
        t_opt = wall_times(optimizer.step, s.device, s.args.steps, 1, deadline)
        optimizer.zero_grad(set_to_none=True)
        n = sum(p.numel() for p in params)
        opt_row.set(
            1e3 * statistics.median(t_opt), f"{type(optimizer).__module__.split('.')[0]} "
            f"{type(optimizer).__name__} on {s.device.type}, {n / 1e6:,.1f}M trainable parameters "
            f"(median of {len(t_opt)})")


def train_key(ckpt: bool, compile_: bool) -> str:
    return (f"activation checkpointing {'on' if ckpt else 'off'}, "
            f"decoder.compile {'on' if compile_ else 'off'}")


def section_train(s: Setup, rows: dict, deadline: float, compile_: bool) -> None:
    """Activation checkpointing off, then on; with decoder.compile only when --compile-min-s seconds are
    left (the first step compiles the layer, forward and backward)."""
    for ckpt in (False, True):
        key = train_key(ckpt, compile_)
        if compile_ and not s.args.compile:
            for r in train_rows(rows, key):
                r.skip("skipped: --tiny (inductor's first compile: most of a minute on 2 CPU cores; "
                       "--compile runs it)")
            continue
        left = deadline - time.monotonic()
        if compile_ and left < s.args.compile_min_s:
            for r in train_rows(rows, key):
                r.skip(f"skipped: budget ({left:.0f} s left, compiling needs about {s.args.compile_min_s:g})")
            continue
        try:
            # each configuration up to its half of what is left (the second: all of it)
            end = time.monotonic() + (left / 2 if not ckpt else left)
            measure_train(s, rows, ckpt, compile_, end)
        except Exception as e:  # noqa: BLE001 - the row says it; the next configuration runs
            failed(train_rows(rows, key), e, s)
        finally:
            gc.collect()  # the configuration's model and optimizer state, before the next is built
            if s.cuda:
                torch.cuda.empty_cache()


def planned_rows(s: Setup, rows: dict, planner: Planner, deadline: float) -> None:
    """The planner's peaks, as rows of their own (waited for until `deadline`), and beside each measured
    peak of the same activation checkpointing."""
    planner.wait(deadline - time.monotonic())
    for ckpt in (False, True):
        row = rows[("planned peak memory", f"activation checkpointing {'on' if ckpt else 'off'}")]
        peak, why = planner.peak(ckpt)
        if peak is None:
            if why.startswith("planner failed"):
                row.fail(f"error: {why}")
            else:
                row.skip(why if why.startswith("skipped") else f"skipped: budget ({why})")
            continue
        for compile_ in (False, True):
            measured = rows[("train peak memory", train_key(ckpt, compile_))]
            if measured.value:
                measured.note += f"; planner {peak / GiB:.2f} GiB (measured / planned " \
                                 f"{measured.value * GiB / peak:.2f})"
        memory = _memory(s) if s.cuda else None
        fits = "" if memory is None else (
            f"; {'fits' if peak <= 0.92 * memory else 'does NOT fit'} in 92% of this GPU's "
            f"{memory / GiB:.0f} GiB")
        row.set(peak / GiB, "kosmos.plan.trace_step, 1 GPU, the same micro-batch" + fits)


def inference_model(s: Setup):
    """The model of the vision, generation and evaluation sections: eval mode, bf16 on CUDA (as
    bench/generate.py and bench/eval.py measure)."""
    model = build_model(s.cfg(), s.device)
    return model.to(dtype=s.dtype).eval()


def section_vision(s: Setup, rows: dict, model, deadline: float) -> None:
    """The vision tower's forward (frozen: no autograd) on a batch of random pixels, images/s."""
    row = rows[("vision tower forward", "frozen, inference")]
    n = s.args.images
    size = model.vision.image_size
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=s.device)

    def forward():
        with torch.no_grad():
            model.vision(images)

    times = wall_times(forward, s.device, s.args.steps, 1, deadline)
    t = statistics.median(times)
    fl = model.cfg.vision.forward_flops()
    row.set(n / t, f"batch {n} of {size} px, {model.cfg.vision.model_name}; {n * fl / t / 1e12:.3g} TFLOP/s "
                   f"(median of {len(times)})")


def section_generation(s: Setup, rows: dict, model, deadline: float) -> None:
    """kosmos.generate with the KV cache, greedy then beam 5, no eos (every step runs): tokens/s of the
    returned sequence, and the ms per token at the start and the end (bench/generate.py's clock)."""
    from bench.generate import DecoderCalls, image_prompt, token_costs
    from kosmos.generate import GenerationConfig, generate

    prompt = image_prompt(model, s.args.prompt_tokens)
    clock = DecoderCalls(model, s.device)
    w = s.args.window
    for beams in (1, 5):
        name = "greedy" if beams == 1 else f"beam {beams}"
        speed = rows[("generation, KV cache", name)]
        first, last = rows[("generation, ms per token", f"{name}, first {w}")], \
            rows[("generation, ms per token", f"{name}, last {w}")]
        if time.monotonic() > deadline:
            for r in (speed, first, last):
                r.skip("skipped: budget")
            continue
        try:
            generate(model, [prompt], GenerationConfig(max_new_tokens=4, num_beams=beams))  # warm-up
            with clock:
                t0 = time.perf_counter()
                out = generate(model, [prompt], GenerationConfig(max_new_tokens=s.args.new_tokens,
                                                                 num_beams=beams))[0]
                total = time.perf_counter() - t0
            c = token_costs(clock.times, w)
            speed.set(len(out) / total, f"{len(out)} new tokens after {len(prompt.ids)} (1 image), "
                                        f"prefill {c['prefill_ms']:.1f} ms"
                                        + (f"; the best of {beams} beams" if beams > 1 else ""))
            first.set(c["start_ms"], f"median over the first {w} new tokens")
            last.set(c["end_ms"], f"median over the last {w}: {c['end_ms'] / c['start_ms']:.2f}x the first")
        except Exception as e:  # noqa: BLE001
            failed([speed, first, last], e, s)


class _ToyDecode:
    """The toy tokenizer before a model of a larger vocabulary (configs/kosmos1.yaml's 64007 ids, random
    weights: any id comes out): ids beyond the tokenizer's decode as nothing. Everything else is the
    tokenizer's."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)

    def decode(self, ids, skip_special: bool = False) -> str:
        n = len(self._tok)
        return self._tok.decode([i for i in list(ids) if i < n], skip_special)


def section_evaluation(s: Setup, rows: dict, model, deadline: float) -> None:
    """kosmos.eval's captioning task on a folder of JPEGs (predictions only: no references), one batch of
    warm-up, then all of them: images/s, loading and resizing the images included."""
    from kosmos.eval.prompts import Shots
    from kosmos.eval.run import load_task_data, run_task
    from kosmos.eval.tasks import get_task
    from kosmos.sequence import SequenceEncoder

    row = rows[("evaluation", "captioning task, beam 5, 20 tokens")]
    folder = s.tmp / "eval_images"
    write_images(folder, s.args.eval_images)
    spec = get_task("captioning")
    data = load_task_data(spec, str(folder))
    cfg = model.cfg
    encoder = SequenceEncoder(_ToyDecode(s.tokenizer), cfg.connector.num_latents, cfg.vision.input_size)
    run_task(model, encoder, "captioning", spec, data, s.tmp / "eval_warm", Shots(), limit=spec.batch_size,
             progress=False)  # warm-up: one batch
    t0 = time.perf_counter()
    res = run_task(model, encoder, "captioning", spec, data, s.tmp / "eval_out", Shots(), progress=False)
    t = time.perf_counter() - t0
    if res.predicted == 0:
        raise RuntimeError(f"no image predicted (skipped: {res.skipped})")
    row.set(res.predicted / t, f"kosmos.eval.run.run_task, {res.predicted} images of 256 px (decoded and "
                               f"resized too) in batches of {spec.batch_size}, predictions only")


def write_images(folder: Path, n: int, side: int = 256) -> None:
    """`n` JPEGs of `side` px: random crops of the shipped photos (bench/data.py's, as its shards hold)."""
    import random

    from bench.data import photo_crop, shipped_photos

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    photos = shipped_photos()
    for i in range(n):
        photo_crop(rng, photos, side).save(folder / f"{i:05d}.jpg", quality=90)


def section_loader(s: Setup, rows: dict, deadline: float, beside: bool = False) -> None:
    """Caption shards of 256 px JPEGs (the converters' default size) through the training pipeline with 1 and
    8 DataLoader workers (--tiny: 1 and 2): images/s handed to this process (bench/data.py). `beside`: the
    planner's traces still run (they take CPU cores from the workers: the note says so)."""
    from bench.data import make_shards, through_workers

    cfg = s.cfg()
    workers = s.args.workers
    per_shard = max(1, s.args.loader_images // (2 * max(workers)))  # every worker reads shards of its own
    paths = make_shards(s.tmp, s.args.loader_images, per_shard=per_shard)
    for n in workers:
        row = rows[("loader", f"{n} worker{'s' if n > 1 else ''}")]
        left = deadline - time.monotonic()
        if left <= 0:
            row.skip("skipped: budget")
            continue
        window = min(s.args.loader_seconds, left / 3)
        try:
            rate = through_workers(paths, s.tokenizer, cfg.decoder.max_len, cfg.connector.num_latents,
                                   cfg.vision.input_size, workers=n, seconds=window)
            row.set(rate, f"caption shards of 256 px JPEGs (resized to {cfg.vision.input_size}), rows of "
                          f"{cfg.decoder.max_len}; a {window:.1f} s window after each worker's first "
                          "micro-batch (bench/data.py)"
                          + ("; the planner's traces ran beside" if beside else ""))
        except Exception as e:  # noqa: BLE001
            failed([row], e, s)


def _memory(s: Setup) -> int:
    return torch.cuda.get_device_properties(s.device).total_memory


def failed(rows: list[Row], e: BaseException, s: Setup) -> None:
    """`rows` say what went wrong: out of the GPU's memory (a result: skipped, saying so), else the error."""
    if s.cuda and isinstance(e, torch.cuda.OutOfMemoryError):
        for r in rows:
            r.skip(f"skipped: out of memory on this {_memory(s) / GiB:.0f} GiB GPU")
        return
    line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    for r in rows:
        r.fail(f"error: {type(e).__name__}: {line}"[:300])


# ----------------------------------------------------------------------------- the table


def declare_rows(s: Setup) -> dict:
    """Every row the run fills, in the table's order (a row not reached says why)."""
    cfg = s.cfg()
    w = s.args.window
    rows = {}

    def add(what, setting, unit):
        rows[(what, setting)] = Row(what, setting, unit)

    for compile_ in (False, True):
        for ckpt in (False, True):
            key = train_key(ckpt, compile_)
            add("train step", key, "tokens/s")
            add("train MFU", key, "fraction")
            add("train peak memory", key, "GiB")
    for ckpt in ("off", "on"):
        add("planned peak memory", f"activation checkpointing {ckpt}", "GiB")
    add("optimizer step", cfg.optim.name, "ms")
    add("vision tower forward", "frozen, inference", "images/s")
    for name in ("greedy", "beam 5"):
        add("generation, KV cache", name, "tokens/s")
        add("generation, ms per token", f"{name}, first {w}", "ms")
        add("generation, ms per token", f"{name}, last {w}", "ms")
    add("evaluation", "captioning task, beam 5, 20 tokens", "images/s")
    for n in s.args.workers:
        add("loader", f"{n} worker{'s' if n > 1 else ''}", "images/s")
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"


def table(rows: list[Row]) -> str:
    lines = ["| what | setting | value | unit | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.what} | {r.setting} | {_fmt(r.value)} | {r.unit} | {r.note.replace('|', '/')} |")
    return "\n".join(lines)


def header(s: Setup) -> dict:
    dev = torch.cuda.get_device_name(s.device) if s.cuda else f"cpu ({os.cpu_count()} cores, " \
        f"{torch.get_num_threads()} threads)"
    return {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda, "config": s.config,
            "overrides": s.overrides, "tiny": s.args.tiny, "budget_s": s.args.budget_s,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def report(s: Setup, rows: dict, elapsed: float, out: str | None, took: dict | None = None) -> None:
    """The table (stdout) and the JSON (--out): what was measured so far, the rest saying why not; `took`:
    the seconds of each section run."""
    for r in rows.values():
        r.skip("not reached: budget")
    head = save(s, rows, elapsed, out, took)
    print(f"\n# bench.gpu: {head['device']}, torch {head['torch']} (CUDA {head['cuda']}), {s.config}, "
          f"{head['date']}, {elapsed:.0f} s of {s.args.budget_s:g}")
    print(table(list(rows.values())), flush=True)


def save(s: Setup, rows: dict, elapsed: float, out: str | None, took: dict | None = None) -> dict:
    """The JSON (--out) of the rows as they are (also after each section: a run killed from outside leaves
    what it measured); returns its head (where and when)."""
    head = {**header(s), "elapsed_s": round(elapsed, 1), "sections_s": took or {}}
    if out:
        tmp = Path(f"{out}.tmp")
        tmp.write_text(json.dumps({**head, "rows": [dataclasses.asdict(r) for r in rows.values()]}, indent=1)
                       + "\n")
        tmp.replace(out)
    return head


# ----------------------------------------------------------------------------- main


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    ap.add_argument("--tiny", action="store_true",
                    help="configs/tiny.yaml on the CPU, small counts (what tests/test_bench_gpu.py runs)")
    ap.add_argument("--config", help="YAML config (default configs/kosmos1.yaml; --tiny: configs/tiny.yaml)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for everything (default 480)")
    ap.add_argument("--out", help="write the rows and the run's setting to this JSON file")
    ap.add_argument("--device", help="default: cuda (--tiny: cpu)")
    ap.add_argument("--compile-min-s", type=float, default=150.0,
                    help="compile only when this many seconds are left for it (default 150)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="measure decoder.compile=true (default: yes, but not with --tiny)")
    ap.add_argument("--caption-tokens", type=int, default=20,
                    help="caption length of the train micro-batch: its images (default 20)")
    ap.add_argument("--sections", default=",".join(SHARES),
                    help="comma-separated (default all; they run in this order: " + ", ".join(SHARES) + "); "
                         "the others' rows say `skipped: not selected`")
    ap.add_argument("--fault", help=argparse.SUPPRESS)  # a section that raises at its start (the tests')
    ap.add_argument("--stall", help=argparse.SUPPRESS)  # a section that hangs at its start (the tests')
    ap.add_argument("--plan-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plan-checkpointing", default="false,true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.config = args.config or str(ROOT / "configs" / ("tiny.yaml" if tiny else "kosmos1.yaml"))
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.compile = (not tiny) if args.compile is None else args.compile
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = [x for x in args.sections if x not in SHARES]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; the sections are: {', '.join(SHARES)}")
    # counts: --tiny, else the GPU's
    args.warmup, args.steps = (1, 1) if tiny else (2, 5)
    args.images = 4 if tiny else 128
    args.new_tokens, args.prompt_tokens, args.window = (12, 8, 3) if tiny else (256, 32, 16)
    args.eval_images = 2 if tiny else 64
    args.workers = [1, 2] if tiny else [1, 8]
    args.loader_images, args.loader_seconds = (40, 1.0) if tiny else (800, 8.0)
    if tiny:  # two caption rows a micro-batch: the train step in about a second on a CPU core; more ids than
        # the toy tokenizer has, as configs/kosmos1.yaml's 64007 (evaluation decodes what a random model says)
        args.overrides = ["data.captions.micro_batch_size=2", "decoder.vocab_size=4096", *args.overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.plan_only:
        plan_only(args)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; this check needs one GPU (`make gpu-check`, "
              "docs/benchmarks.md#gpu-check). `python -m bench.gpu --tiny` runs the same sections on "
              "configs/tiny.yaml on the CPU.")
        return 0
    from kosmos.tokenizer import TINY_CORPUS
    from kosmos.tokenizer.build import build_tokenizer

    budget = Budget(args.budget_s, T0)
    if args.tiny:  # tiny operators: threads only wait on each other (and on the planner's process, beside)
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        tmp = Path(tmp)
        tok = build_tokenizer([TINY_CORPUS], tmp / "tok", 1000, character_coverage=0.995, quiet=True)
        overrides = ["vision.pretrained=null", f"tokenizer.path={tmp / 'tok'}", *args.overrides]
        s = Setup(args, device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.config,
                  overrides, tmp, tok, budget)
        rows = declare_rows(s)
        for section in SHARES:
            if section not in args.sections:
                for r in section_rows(rows, section):
                    r.skip("skipped: not selected (--sections)")
        train = "train" in args.sections or "compiled" in args.sections
        for r in rows.values():
            if r.what == "planned peak memory" and not train:
                r.skip("skipped: not selected (--sections: no train section)")
        planner = Planner(s, train)
        done, took = threading.Event(), {}
        now: list[str] = []  # the section running

        def watchdog():  # a hang in native code: the table so far, then out
            if not done.wait(budget.left() + 30):
                print("\nbench.gpu: the run outlived its budget by 30 s: stopping", flush=True)
                for r in section_rows(rows, now[-1]) if now else ():
                    r.fail("error: still running 30 s after the budget's end (a hang?): stopped by the "
                           "watchdog")
                planner.close()
                report(s, rows, time.monotonic() - budget.t0, args.out, took)
                os._exit(3)

        threading.Thread(target=watchdog, daemon=True).start()
        model = None
        try:
            for section in [x for x in SHARES if x in args.sections]:
                now.append(section)
                if section == "compiled" and model is not None:
                    del model  # the compiled train step wants the memory
                    model = None
                    if s.cuda:
                        torch.cuda.empty_cache()
                seconds = budget.share(section, args.sections)
                deadline = time.monotonic() + seconds
                if seconds < 1:
                    for r in section_rows(rows, section):
                        r.skip("skipped: budget (no time left)")
                    continue
                print(f"bench.gpu: {section} ({seconds:.0f} s at most)", flush=True)
                try:
                    with interrupt_after(seconds + min(5.0, 0.1 * seconds)):  # a step's grace to finish
                        if section == args.fault:
                            raise RuntimeError(f"a fault planted in {section} (--fault)")
                        if section == args.stall:
                            time.sleep(2 * seconds + 60)  # a hang planted (--stall)
                        if section == "train":
                            section_train(s, rows, deadline, compile_=False)
                        elif section == "compiled":
                            section_train(s, rows, deadline, compile_=True)
                        elif section == "loader":
                            section_loader(s, rows, deadline, planner.running())
                        else:
                            if model is None:
                                model = inference_model(s)
                            {"vision": section_vision, "generation": section_generation,
                             "evaluation": section_evaluation}[section](s, rows, model, deadline)
                except OutOfBudget:
                    for r in section_rows(rows, section):
                        r.skip(f"skipped: budget (its {seconds:.0f} s ran out)")
                except Exception as e:  # noqa: BLE001 - the rows say it; the next section runs
                    failed(section_rows(rows, section), e, s)
                took[section] = round(seconds - (deadline - time.monotonic()), 1)
                print(f"bench.gpu: {section} took {took[section]:.0f} s", flush=True)
                save(s, rows, time.monotonic() - budget.t0, args.out, took)
            planned_rows(s, rows, planner, budget.end)
        finally:
            planner.close()
            done.set()
        report(s, rows, time.monotonic() - budget.t0, args.out, took)
    return 1 if any(r.status == "error" for r in rows.values()) else 0


def section_rows(rows: dict, section: str) -> list[Row]:
    """The rows a section fills."""
    prefix = {"train": ("train ", "optimizer step"), "compiled": ("train ",),
              "vision": ("vision",), "generation": ("generation",), "evaluation": ("evaluation",),
              "loader": ("loader",)}[section]
    return [r for r in rows.values() if r.what.startswith(prefix)
            and (section not in ("train", "compiled")
                 or r.what == "optimizer step" or ("compile on" in r.setting) == (section != "train"))]


if __name__ == "__main__":
    raise SystemExit(main())
