"""Know before you launch: memory, speed, duration and loader needs of a config on N GPUs, from a traced step.

    python -m kosmos.plan configs/kosmos1.yaml --gpus 64 --gpu-memory 80 [--gpu h100] [--mfu 0.40]
    kosmos-plan configs/kosmos1.yaml train.sharding=fsdp2 decoder.checkpoint_activations=true --gpus 8 ...

One real optimizer step of the configured model, at full size, is run on fake tensors (torch's
FakeTensorMode: shapes, dtypes and storages, no values, no memory), under torch's fake process group of
`--gpus` ranks: FSDP2 (`kosmos.sharding.shard_model`, bf16 parameters through MixedPrecisionPolicy) with
`train.sharding=fsdp2`, else DDP. Each taking source's heaviest micro-batch runs forward and backward
(autocast bf16, the config's activation checkpointing and document mask), then gradient clipping and the
optimizer step; twice, the second step measured (the optimizer state exists then). torch's memory trackers
(`FSDPMemTracker`, `MemTracker`) sort every tensor alive at the peak into parameters, gradients, optimizer
state, activations, temporaries and communication buffers.

What stands for the GPU, not the CPU the trace runs on:

* Attention. The CPU's kernel keeps the attention matrix (its math path, with dropout); a GPU's flash or
  memory-efficient kernel keeps its output and the log-sum-exp (fp32, one per query and head) besides
  q, k and v, and the backward allocates dq, dk, dv. `gpu_attention` puts a stand-in of exactly that in
  place of `F.scaled_dot_product_attention` (decoder and CLIP alike). Residual error: the kernels' own
  workspace (flash's fp32 dq accumulator in the backward, one layer at a time: B x heads x L x head_dim x 4
  bytes, 128 MiB for 8 x 2048 x 2048) is not counted.
* The 8-bit optimizers (bitsandbytes', torchao's) do not run on fake tensors: the step is traced with torch's
  AdamW (one parameter at a time, as their fused kernels do) and the optimizer state is replaced by the
  8-bit size: 2 bytes per element plus one fp32 scale per block of 256 for each of the two moments (tensors
  under 4096 elements keep fp32 moments, as bitsandbytes does).
* DDP's gradient buckets (a copy of the gradients, fp32, 25 MiB buckets) are added as communication
  buffers; the trace itself runs the unwrapped model (the reducer does not run on fake tensors).
* The caching allocator's fragmentation is not counted: keep 5-10% of the GPU free (the verdict asks for
  `--headroom`, default 0.08).

Speed is what the stated MFU gives: FLOPs per step (`kosmos.config.flops`, the counts the trainer's MFU uses)
over the GPUs' dense bf16 peak times the MFU. The heaviest micro-batch of captions has as many images as a
row holds with captions of `--caption-tokens` tokens; interleaved rows hold `--max-images` images each.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass, field

import torch

from kosmos.config import SOURCES, Config, ConfigError, load_config

GPUS = {  # dense bf16 peak FLOP/s and memory (GiB) of one GPU
    "h100": (989e12, 80),
    "h200": (989e12, 141),
    "a100": (312e12, 80),
    "a100-40": (312e12, 40),
    "b200": (2250e12, 180),
    "l40s": (362e12, 48),
}
LOADER_IMAGES_PER_WORKER = 780.0
"""Images/s one DataLoader worker delivers: `bench/data.py` on 256 px caption shards (the converters' default;
the loader resizes), in a DataLoader worker, 2-core CPU: 808, 773, 781 (docs/benchmarks.md)."""
GiB = 1024**3


# ----------------------------------------------------------------------------- micro-batches


@dataclass
class MicroBatch:
    """The shape of one source's heaviest micro-batch."""

    name: str
    kind: str
    rows: int
    images: int


def sources_planned(cfg: Config) -> dict:
    """The sources a run of `cfg` trains on: those taking part (shards and a budget); a config without any
    shards (a template such as configs/kosmos1.yaml, shards given at launch) plans data.text, data.captions
    and data.interleaved, those with a positive budget."""
    active = cfg.data.active_sources()
    if active:
        return active
    return {n: getattr(cfg.data, n) for n in SOURCES if getattr(cfg.data, n).tokens_per_step > 0}


def heaviest_batches(cfg: Config, caption_tokens: int = 1, max_images: int | None = None) -> list[MicroBatch]:
    """Per planned source, its heaviest micro-batch: `micro_batch_size` full rows, with as many images as the
    packer can put in a row (captions: `<s>`, the image span, `caption_tokens` tokens and `</s>` per sample;
    interleaved: `max_images` per row, default as many spans as a row holds)."""
    L, span = cfg.decoder.max_len, cfg.connector.num_latents + 2
    out = []
    for name, src in sources_planned(cfg).items():
        if src.kind == "captions":
            per_row = L // (span + 2 + caption_tokens)
        elif src.kind == "interleaved":
            per_row = (L - 2) // span if max_images is None else min(max_images, (L - 2) // span)
        else:
            per_row = 0
        out.append(MicroBatch(name, src.kind, src.micro_batch_size, per_row * src.micro_batch_size))
    return out


def make_batch(cfg: Config, mb: MicroBatch) -> dict[str, torch.Tensor]:
    """Real tensors of `mb`'s shapes: a valid micro-batch (the image slots in row-major order, one document
    per row, no padding), so that the same batch serves the fake trace and a real run."""
    L, n_lat = cfg.decoder.max_len, cfg.connector.num_latents
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.decoder.vocab_size, (mb.rows, L), generator=g)
    image_mask = torch.zeros(mb.rows, L, dtype=torch.bool)
    per_row = mb.images // max(1, mb.rows)
    for r in range(mb.rows):
        for i in range(per_row):
            start = 2 + i * (n_lat + 2)
            image_mask[r, start:start + n_lat] = True
    batch = {"input_ids": ids, "labels": ids.masked_fill(image_mask, -100), "image_mask": image_mask,
             "padding_mask": torch.zeros(mb.rows, L, dtype=torch.bool),
             "doc_ids": torch.ones(mb.rows, L, dtype=torch.long)}
    if mb.images:
        S = cfg.vision.input_size
        batch["images"] = torch.randint(0, 256, (mb.images, 3, S, S), dtype=torch.uint8, generator=g)
    return batch


# ----------------------------------------------------------------------------- the GPU's attention kernel


class _FlashAttention(torch.autograd.Function):
    """What a GPU's fused attention (flash or memory-efficient) keeps and allocates: the output, q, k, v
    (and the mask, if any) and the fp32 log-sum-exp saved for the backward; dq, dk, dv in the backward. The
    values are not computed (a memory stand-in for traces)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return _FlashAttention.apply(q, k, v, attn_mask)


@contextlib.contextmanager
def gpu_attention():
    """`F.scaled_dot_product_attention` replaced by the GPU kernel's memory stand-in for the block."""
    from unittest import mock

    with mock.patch("torch.nn.functional.scaled_dot_product_attention", _flash_sdpa):
        yield


# ----------------------------------------------------------------------------- the trace


CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries", "communication")
_FSDP = {"Sharded Param": "parameters", "Buffer": "parameters", "Sharded Grad": "gradients",
         "Unsharded Grad": "gradients", "OptState": "optimizer", "Activation": "activations",
         "Inputs": "activations", "Temp": "temporaries", "Unsharded Param": "communication",
         "All Gather": "communication", "Reduce Scatter": "communication"}
_DDP = {"Parameter": "parameters", "Buffer": "parameters", "Gradient": "gradients", "Optstate": "optimizer",
        "Activation": "activations", "Temp": "temporaries", "Other": "activations"}


@dataclass
class Trace:
    peak: int
    """Bytes per GPU at the step's peak (the categories summed)."""
    categories: dict[str, int]
    """Bytes per category at the peak."""
    source_peaks: dict[str, int] = field(default_factory=dict)
    """Per source: the peak of its micro-batch's forward and backward (the step's second pass)."""
    where: str = ""
    """Which part of the step holds the peak (a source's micro-batch, or the optimizer step)."""


def _label_accumulated_grads(model, tracker) -> None:
    """FSDP2 keeps the gradients of the micro-batches before a step's last unsharded (fp32, the reduce
    dtype) until the reduce-scatter; the tracker saw them made in the backward (temporaries): they are
    gradients."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
        for fp in group.fsdp_params if group is not None else ():
            grad = getattr(fp, "unsharded_accumulated_grad", None)
            if grad is not None:
                tracker._update_and_maybe_create_winfos(grad, _FSDPRefType.UNSHARDED_GRAD)


class _NoHook:
    def remove(self) -> None:
        pass


def eight_bit_state_bytes(params) -> int:
    """Bytes of the 8-bit AdamW state of `params` (two moments: 1 byte per element and an fp32 scale per
    block of 256; fp32 moments for tensors under 4096 elements, as bitsandbytes keeps them)."""
    from kosmos.sharding import local

    total = 0
    for p in params:
        n = local(p).numel()
        total += 2 * (n + 4 * math.ceil(n / 256)) if n >= 4096 else 8 * n
    return total


def _ddp_buckets(params) -> int:
    """DDP's gradient buckets: a copy of the trainable parameters' gradients (fp32), in 25 MiB buckets."""
    n = sum(p.numel() * 4 for p in params)
    bucket = 25 * 2**20
    return math.ceil(n / bucket) * bucket if n > bucket else n


def trace_step(cfg: Config, world_size: int, batches: list[MicroBatch], *, fake: bool = True,
               attention: str = "gpu", precision: str = "bf16", accumulate: bool = True) -> Trace:
    """Memory per rank of one optimizer step of `cfg` on `world_size` ranks, each of `batches` run once
    (forward, backward), then clipping and the optimizer step; the second of two steps is measured.
    `fake`: on fake tensors under torch's fake process group (no memory used); False: on real tensors, one
    real rank (gloo; the planner's check against reality). `attention`: `gpu` (the fused kernel's memory,
    see gpu_attention) or `cpu` (the CPU's own kernel, as a real CPU run has it). `precision`: bf16 (autocast,
    and FSDP2's bf16 parameters) or fp32. `accumulate`: the ranks run several passes per step (FSDP2 then
    keeps the earlier passes' gradients unsharded until the last); False: one pass per step, every
    micro-batch's gradients reduce-scattered at once."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    from kosmos.model import Kosmos
    from kosmos.optim import param_groups
    from kosmos.sharding import gradient_sync, shard_model

    sharded = cfg.train.sharding == "fsdp2"
    bf16 = precision == "bf16"
    own_pg = not dist.is_initialized()
    if own_pg:
        if fake:
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
        else:
            assert world_size == 1, "a real trace runs one rank"
            dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    mode = FakeTensorMode(allow_non_fake_inputs=False) if fake else contextlib.nullcontext()
    kernel = gpu_attention() if attention == "gpu" else contextlib.nullcontext()
    try:
        real = [make_batch(cfg, mb) for mb in batches]
        if sharded:  # outside fake mode: the mesh reads its ranks
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world_size,))
        with mode, kernel:
            torch.manual_seed(0)
            model = Kosmos(cfg)
            model.train()
            if sharded:
                from torch.distributed.fsdp import MixedPrecisionPolicy

                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                shard_model(model, mp if bf16 else None, mesh)
            trainable = [p for g in param_groups(model, cfg.optim.weight_decay) for p in g["params"]]
            # torch's AdamW stands for the 8-bit ones (their state is resized below); one parameter at a
            # time like their kernels, unless the config's optimizer is torch's (foreach on a GPU)
            optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=1e-4,
                                          foreach=cfg.optim.name == "adamw")
            tracker = FSDPMemTracker(model, optimizer) if sharded else MemTracker()
            if not sharded:
                tracker.track_external(model, optimizer)
                for p in model.parameters():  # MemTracker hooks every parameter's gradient: not the frozen
                    if not p.requires_grad:
                        tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            source_peaks, where_peak, peak_snap = {}, "", {}
            # Step 1 makes the optimizer state (the lightest micro-batch is enough); step 2 is measured, each
            # source's micro-batch after a leading pass, so that every one runs with the gradients of the
            # step accumulated (as all but the first of a real step's micro-batches do).
            lightest = min(range(len(batches)), key=lambda i: (batches[i].images, batches[i].rows))
            steps = [[lightest], [len(batches) - 1, *range(len(batches))]]
            source_peaks, where_peak, peak_snap = {}, "", {}
            with tracker:
                for step, order in enumerate(steps):
                    for j, i in enumerate(order):
                        mb = batches[i]
                        # the micro-batch "on the device": made for its pass, as the trainer's to_device does
                        batch = {k: mode.from_tensor(v) if fake else v.clone() for k, v in real[i].items()}
                        tracker.reset_mod_stats()  # the trackers follow one forward per model
                        tracker._peak_mem, tracker._peak_mem_snap = {}, {}  # this micro-batch's own peak
                        if sharded:
                            tracker.track_inputs((batch,))
                            gradient_sync(model, j == len(order) - 1 or not accumulate)
                        else:
                            tracker.track_external(*batch.values())  # "Other": counted as activations
                        with amp:
                            out = model(**batch)
                        out.loss.backward()
                        del out, batch
                        if sharded:
                            _label_accumulated_grads(model, tracker)
                        snap = next(iter(tracker.get_tracker_snapshot("peak").values()), {})
                        if step == 1 and j > 0:
                            source_peaks[mb.name] = snap.get("Total", 0)
                            if snap.get("Total", 0) > peak_snap.get("Total", 0):
                                peak_snap, where_peak = snap, f"{mb.name} micro-batch"
                    tracker._peak_mem, tracker._peak_mem_snap = {}, {}
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    snap = next(iter(tracker.get_tracker_snapshot("peak").values()), {})
                    if step == 1 and snap.get("Total", 0) > peak_snap.get("Total", 0):
                        peak_snap, where_peak = snap, "optimizer step"
        names = _FSDP if sharded else _DDP
        cats = dict.fromkeys(CATEGORIES, 0)
        for k, v in peak_snap.items():
            if k != "Total":
                cats[names.get(k, "temporaries")] += v
        if cfg.optim.name != "adamw":
            cats["optimizer"] = eight_bit_state_bytes(trainable) if cats["optimizer"] else 0
        if not sharded and world_size > 1:
            cats["communication"] += _ddp_buckets(trainable)
        peak = sum(cats.values())
        shift = peak - peak_snap.get("Total", 0)
        return Trace(peak, cats, {n: v + shift for n, v in source_peaks.items()}, where_peak)
    finally:
        if own_pg:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- speed and the verdict


@dataclass
class Speed:
    flops_per_step: float
    tokens_per_step: int
    images_per_step: float
    step_seconds: float
    tokens_per_second_per_gpu: float
    images_per_second_per_gpu: float
    passes: tuple[int, int]
    """Fewest and most passes (micro-batches) of a rank per step."""
    total_tokens: float
    days: float
    gpu_hours: float


def speed(cfg: Config, gpus: int, peak_flops: float, mfu: float, caption_tokens: int,
          mean_images: dict[str, float]) -> Speed:
    """Step time and duration at `mfu` of `peak_flops` per GPU: FLOPs per step from the step's tokens (all
    ranks, the mixture's micro-batches) and images (`mean_images` per row and source kind)."""
    from kosmos.data.mixture import plan

    planned = sources_planned(cfg)
    trial = _with_shards(cfg, planned)
    try:
        p = plan(trial, gpus)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tokens = p.tokens
    images = sum(s.micro_batches * s.micro_batch_size * mean_images.get(planned[n].kind, 0.0)
                 for n, s in p.sources.items())
    flops = tokens * cfg.flops_per_token() + images * cfg.flops_per_image()
    step_s = flops / (gpus * peak_flops * mfu)
    total = float(tokens) * (cfg.train.max_steps or cfg.optim.total_steps)
    seconds = step_s * (cfg.train.max_steps or cfg.optim.total_steps)
    return Speed(flops, tokens, images, step_s, tokens / step_s / gpus, images / step_s / gpus, p.passes(),
                 total, seconds / 86400, seconds * gpus / 3600)


def _with_shards(cfg: Config, planned: dict) -> Config:
    """`cfg` with a placeholder shard in each planned source that has none (the mixture plan needs them)."""
    import copy

    trial = copy.deepcopy(cfg)
    for name in planned:
        src = trial.data.source(name)
        if not src.shards:
            src.shards = [f"plan://{name}"]
    return trial


def _override(cfg: Config, key: str, value) -> Config:
    import copy

    trial = copy.deepcopy(cfg)
    section, _, rest = key.partition(".")
    obj = getattr(trial, section)
    *path, last = rest.split(".")
    for p in path:
        obj = getattr(obj, p) if not isinstance(obj, dict) else obj[p]
    setattr(obj, last, value)
    return trial


def suggestions(cfg: Config, gpus: int) -> list[tuple[str, Config, int]]:
    """The changes tried, in order, when a config does not fit: (overrides, config, gpus). Activation
    checkpointing; then, with it, the micro-batches halved down to 1 row; then FSDP2 (under DDP every GPU
    holds the whole state); then twice and four times the GPUs (FSDP2 shards the state over them)."""
    out = []
    keys: list[str] = []
    base = cfg
    if not cfg.decoder.checkpoint_activations:
        keys = ["decoder.checkpoint_activations=true"]
        base = _override(cfg, "decoder.checkpoint_activations", True)
        out.append((" ".join(keys), base, gpus))
    planned = sources_planned(cfg)
    mbs = max(s.micro_batch_size for s in planned.values()) // 2
    while mbs >= 1:
        trial, more = base, []
        for name, src in planned.items():
            if src.micro_batch_size > mbs:
                trial = _override(trial, f"{cfg.data.key(name)}.micro_batch_size", mbs)
                more.append(f"{cfg.data.key(name)}.micro_batch_size={mbs}")
        out.append((" ".join(keys + more), trial, gpus))
        mbs //= 2
    if cfg.train.sharding != "fsdp2":
        keys = [*keys, "train.sharding=fsdp2"]
        base = _override(base, "train.sharding", "fsdp2")
        if cfg.optim.name == "adamw8bit":  # bitsandbytes cannot step DTensors (kosmos.sharding)
            keys.append("optim.name=adamw8bit_torchao")
            base = _override(base, "optim.name", "adamw8bit_torchao")
        out.append((" ".join(keys), base, gpus))
    for k in (2, 4):
        out.append((" ".join([*keys, f"--gpus {gpus * k}"]), base, gpus * k))
    return out


# ----------------------------------------------------------------------------- the command


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB / 4 else f"{n / 2**20:8.1f} MiB"


def main(argv: list[str] | None = None) -> dict:
    from kosmos.errors import command_name

    ap = argparse.ArgumentParser(prog=command_name("kosmos.plan"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config, e.g. configs/kosmos1.yaml")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.sharding=fsdp2")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs (processes) of the run")
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS),
                    help="GPU kind: its dense bf16 peak for the speed, and its memory unless --gpu-memory "
                         "(default h100: " + ", ".join(f"{k} {v[0] / 1e12:g} TFLOP/s {v[1]} GiB"
                                                       for k, v in GPUS.items()) + ")")
    ap.add_argument("--gpu-memory", type=float, default=None, help="GiB of one GPU (default: the --gpu's)")
    ap.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed (default 0.40)")
    ap.add_argument("--headroom", type=float, default=0.08,
                    help="fraction of the GPU kept free for the allocator's fragmentation and the CUDA "
                         "context (default 0.08): fits means peak <= (1 - headroom) x memory")
    ap.add_argument("--caption-tokens", type=int, default=1,
                    help="tokens of the shortest caption: the heaviest caption row holds "
                         "max_len // (span + 2 + this) images (default 1: the packer's worst case)")
    ap.add_argument("--max-images", type=int, default=None,
                    help="images per interleaved row in its heaviest micro-batch (default: as many spans "
                         "as a row holds)")
    ap.add_argument("--mean-caption-tokens", type=float, default=20.0,
                    help="mean caption length, for the images per step and the loaders (default 20)")
    ap.add_argument("--mean-interleaved-images", type=float, default=2.0,
                    help="mean images per interleaved row, for the images per step (default 2)")
    ap.add_argument("--worker-images", type=float, default=LOADER_IMAGES_PER_WORKER,
                    help=f"images/s one DataLoader worker delivers (default {LOADER_IMAGES_PER_WORKER:g}: "
                         "bench/data.py, 256 px shards, docs/benchmarks.md); measure yours with it")
    ap.add_argument("--attention", default="gpu", choices=("gpu", "cpu"),
                    help="gpu: the fused kernel's memory (default); cpu: the CPU kernel's, as a CPU run has")
    ap.add_argument("--no-suggest", action="store_true", help="do not re-trace changes when it does not fit")
    args = ap.parse_args(argv)
    if args.gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {args.gpus}")
    cfg = load_config(args.config, args.overrides)
    peak_flops, memory = GPUS[args.gpu]
    memory = args.gpu_memory if args.gpu_memory is not None else memory
    budget = memory * GiB * (1 - args.headroom)
    precision = "fp32" if cfg.train.mixed_precision in ("no",) else "bf16"

    def run(c: Config, gpus: int, accumulate: bool = True) -> Trace:
        return trace_step(c, gpus, heaviest_batches(c, args.caption_tokens, args.max_images),
                          attention=args.attention, precision=precision, accumulate=accumulate)

    L, span = cfg.decoder.max_len, cfg.connector.num_latents + 2
    mean_images = {"captions": L / (span + 2 + args.mean_caption_tokens),
                   "interleaved": args.mean_interleaved_images}
    sp = speed(cfg, args.gpus, peak_flops, args.mfu, args.caption_tokens, mean_images)
    lo, hi = sp.passes
    if cfg.train.sharding == "fsdp2" and lo != hi:  # what the trainer refuses (training.check_passes)
        raise ConfigError(f"config key 'data.mixture_tolerance': on {args.gpus} GPUs the mixture gives ranks "
                          f"{lo} to {hi} passes per step; FSDP needs the same number on every rank: change "
                          f"the budgets or micro_batch_size, or allow a larger tolerance")
    batches = heaviest_batches(cfg, args.caption_tokens, args.max_images)
    tr = run(cfg, args.gpus, accumulate=hi > 1)
    fits = tr.peak <= budget
    sharding = "FSDP2" if cfg.train.sharding == "fsdp2" else "DDP"
    print(f"{args.config} on {args.gpus} x {args.gpu} ({memory:g} GiB), {sharding}, {precision}, "
          f"activation checkpointing {'on' if cfg.decoder.checkpoint_activations else 'off'}, "
          f"document mask {'on' if cfg.decoder.document_mask else 'off'}, optimizer {cfg.optim.name}")
    if cfg.train.sharding == "fsdp2" and cfg.optim.name == "adamw8bit":
        print("note: the trainer refuses optim.name=adamw8bit with FSDP2 (bitsandbytes cannot step its "
              "sharded parameters): set optim.name=adamw8bit_torchao, the same 8-bit state")
    print("heaviest micro-batch per source: " + ", ".join(
        f"{b.name} {b.rows} x {L}" + (f" + {b.images} images" if b.images else "") for b in batches))
    print("memory per GPU at the peak (" + tr.where + "):")
    for c in CATEGORIES:
        print(f"  {c:<14} {_gib(tr.categories[c])}")
    print(f"  {'peak':<14} {_gib(tr.peak)}  of {memory:g} GiB ({tr.peak / (memory * GiB):.0%}; "
          f"budget {(1 - args.headroom):.0%} = {_gib(budget).strip()})")
    print("  peak per source's micro-batch: " + ", ".join(f"{n} {_gib(v).strip()}"
                                                       for n, v in tr.source_peaks.items()))
    print(f"speed at MFU {args.mfu:.2f} of {peak_flops / 1e12:g} TFLOP/s (bf16 dense):")
    print(f"  FLOPs per step {sp.flops_per_step:.3e} ({sp.tokens_per_step:,} tokens, "
          f"{sp.images_per_step:,.0f} images; {cfg.flops_per_token():.3e} per token, "
          f"{cfg.flops_per_image():.3e} per image)")
    print(f"  step {sp.step_seconds:.2f} s ({lo}{f'-{hi}' if hi != lo else ''} micro-batches per GPU), "
          f"{sp.tokens_per_second_per_gpu:,.0f} tokens/s per GPU")
    steps = cfg.train.max_steps or cfg.optim.total_steps
    print(f"  {steps:,} steps, {sp.total_tokens / 1e9:,.1f}B tokens: {sp.days:.1f} days, "
          f"{sp.gpu_hours:,.0f} GPU-hours")
    workers = math.ceil(sp.images_per_second_per_gpu / args.worker_images)
    configured = sum(s.workers for s in sources_planned(cfg).values() if s.kind != "text")
    print(f"  loaders: {sp.images_per_second_per_gpu:,.0f} images/s per GPU; at {args.worker_images:g} "
          f"images/s per worker that takes {workers} worker(s) per GPU (configured: {configured} on image "
          f"sources)")
    result = {"trace": tr, "speed": sp, "fits": fits, "workers": workers, "suggestion": None}
    if fits:
        print(f"verdict: fits ({_gib(tr.peak).strip()} of {_gib(budget).strip()})")
        return result
    print(f"verdict: does NOT fit ({_gib(tr.peak).strip()} > {_gib(budget).strip()})")
    if args.no_suggest:
        return result
    tries = suggestions(cfg, args.gpus)
    for what, trial, gpus in tries:
        t = run(trial, gpus)
        print(f"  tried {what}: peak {_gib(t.peak).strip()}")
        if t.peak <= budget:
            print(f"  first change that fits: {what} (re-traced: {_gib(t.peak).strip()})")
            result["suggestion"] = (what, t)
            return result
    per_gpu = tr.categories["parameters"] + tr.categories["gradients"] + tr.categories["optimizer"]
    print(f"  nothing tried fits; the state alone is {per_gpu / GiB:.1f} GiB per GPU: more GPUs with "
          f"train.sharding=fsdp2, or a smaller model")
    return result


if __name__ == "__main__":
    from kosmos.errors import run_cli

    raise SystemExit(run_cli(main))
