"""Train KOSMOS-1 on text, image-caption pairs and interleaved documents, mixed by token budget.

    accelerate launch train_kosmos.py --config configs/kosmos1.yaml [key=value ...] [--resume latest]
    python train_kosmos.py --config configs/tiny.yaml train.max_steps=50     # one process

Each optimizer step takes data.<source>.tokens_per_step tokens from every source (the paper: 0.5M text,
0.5M image-caption, 0.2M interleaved) as micro-batches of packed rows, accumulates their gradients
(per-source mean losses weighted by the budgets), clips, and steps 8-bit AdamW on the warmup/linear-decay
schedule. Checkpoints go to train.output_dir/checkpoints; `--resume latest` picks up the newest complete
one with its optimizer, schedule, RNG and data position. SIGTERM or Ctrl-C saves a checkpoint and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

from kosmos.config import ConfigError, load_config, save_config


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config (configs/tiny.yaml, configs/kosmos1.yaml, ...)")
    ap.add_argument("--resume", help="`latest` (newest checkpoint in train.output_dir, if any) or a checkpoint dir")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.max_steps=100 optim.lr=1e-4")
    return ap.parse_args(argv)


def check_config(cfg) -> None:
    """Fail on what would otherwise fail late: missing tokenizer or shards, a vocabulary mismatch."""
    from kosmos.data import plan
    from kosmos.data.shards import expand_shards

    if not cfg.tokenizer.path or not (Path(cfg.tokenizer.path) / "tokenizer.model").is_file():
        raise ConfigError(f"config key 'tokenizer.path': no tokenizer.model in {cfg.tokenizer.path!r} "
                          "(build one with `python -m tokenizer.build`)")
    cfg.vision.input_size  # resolves vision.model_name through open_clip's configs (a clear error if unknown)
    try:
        plan(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, src in cfg.data.sources().items():
        for key, patterns in (("shards", src.shards), ("eval_shards", src.eval_shards)):
            try:
                if patterns:
                    expand_shards(patterns)
            except FileNotFoundError as e:
                raise ConfigError(f"config key 'data.{name}.{key}': {e}") from None


# ----------------------------------------------------------------------------- building


def build_accelerator(cfg):
    import torch
    from accelerate import Accelerator

    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    log_with = None if cfg.train.tracker == "none" else cfg.train.tracker
    return Accelerator(mixed_precision=mp, log_with=log_with, project_dir=cfg.train.output_dir)


def build_tokenizer(cfg):
    from tokenizer import KosmosTokenizer

    tok = KosmosTokenizer.from_dir(cfg.tokenizer.path)
    if len(tok) > cfg.decoder.vocab_size:
        raise ConfigError(f"config key 'decoder.vocab_size': {cfg.decoder.vocab_size} is smaller than the "
                          f"tokenizer's {len(tok)} ids ({cfg.tokenizer.path})")
    return tok


def build_model(cfg):
    from kosmos.model import Kosmos

    return Kosmos(cfg)  # decoder.compile is applied inside (kosmos/decoder.py)


def peak_flops(cfg, device) -> float | None:
    """Dense bf16 peak of one device, for MFU: the config's, or a known GPU's."""
    import torch

    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("A10", 125e12),
                           ("L4", 121e12), ("4090", 165e12), ("3090", 71e12)):
            if key in name:
                return flops
    return None


# ----------------------------------------------------------------------------- checkpoints


def _sharded(acc) -> bool:
    from accelerate import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save_checkpoint(acc, cfg, model, optimizer, scheduler, mixture, state: dict) -> Path | None:
    import shutil

    from safetensors.torch import save_model

    from kosmos import checkpoint as ck

    step = state["step"]
    tmp = ck.tmp_path_for(cfg.train.output_dir, step)
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    if _sharded(acc):
        # FSDP / DeepSpeed (not exercised in this project's CI, which has no GPUs): accelerate writes the
        # sharded model and optimizer itself (and reads them back with weights_only=True); we add a full
        # model.safetensors for generation.
        acc.save_state(str(tmp / "sharded"))
        full = acc.get_state_dict(model)
        if acc.is_main_process:
            from safetensors.torch import save_file

            if cfg.decoder.share_embeddings:  # stored once, as in the unsharded path
                full.pop("decoder.output_projection.weight", None)
            save_file({k: v.contiguous() for k, v in full.items()}, str(tmp / "model.safetensors"))
    elif acc.is_main_process:
        save_model(acc.unwrap_model(model), str(tmp / "model.safetensors"))
        ck.save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
    if acc.is_main_process:
        ck.save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
    ck.save_torch(ck.rng_state(), tmp / f"rng_rank{acc.process_index}.pt")
    ck.write_json(mixture.state_dict(), tmp / f"data_rank{acc.process_index}.json")
    acc.wait_for_everyone()
    final = None
    if acc.is_main_process:
        ck.write_json({**state, "world_size": acc.num_processes, "config": cfg.to_dict()}, tmp / "trainer_state.json")
        final = ck.finalize(cfg.train.output_dir, step, cfg.train.keep_last)
    acc.wait_for_everyone()
    return final


def load_checkpoint(acc, path: Path, model, optimizer, scheduler, mixture) -> dict:
    from kosmos import checkpoint as ck

    state = ck.read_json(path / "trainer_state.json")
    if state["world_size"] != acc.num_processes:
        raise RuntimeError(f"{path} was written by {state['world_size']} processes, this run has "
                           f"{acc.num_processes}; the data position is per rank, so resume with the same number")
    if _sharded(acc):
        acc.load_state(str(path / "sharded"))
    else:
        ck.load_model_weights(acc.unwrap_model(model), path)
        optimizer.load_state_dict(ck.load_torch(path / "optimizer.pt"))
    scheduler.load_state_dict(ck.load_torch(path / "scheduler.pt"))
    ck.set_rng_state(ck.load_torch(path / f"rng_rank{acc.process_index}.pt"))
    mixture.load_state_dict(ck.read_json(path / f"data_rank{acc.process_index}.json"))
    state.pop("config", None)
    state.pop("world_size", None)
    return state


# ----------------------------------------------------------------------------- the loop


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit at the end of the current step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def any_rank(self, acc) -> bool:
        if acc.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)  # sync point, once per step


def to_device(batch: dict, device):
    """A micro-batch on the device; images stay uint8 (the model normalises them)."""
    images = batch["images"]
    return {
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "labels": batch["labels"].to(device, non_blocking=True),
        "image_mask": batch["image_mask"].to(device, non_blocking=True),
        "padding_mask": batch["padding_mask"].to(device, non_blocking=True),
        "images": images.to(device, non_blocking=True) if len(images) else None,
    }


def evaluate(acc, cfg, model, encoder) -> dict[str, float]:
    """Loss and perplexity per source on its eval shards (at most train.eval_batches micro-batches each)."""
    import torch

    from kosmos.data import build_loader

    results = {}
    model.eval()
    for name, src in cfg.data.sources().items():
        if not src.eval_shards:
            continue
        loader = build_loader(cfg, name, encoder, rank=acc.process_index, world_size=acc.num_processes, train=False)
        total = torch.zeros(2, device=acc.device)  # loss sum, tokens
        with torch.no_grad(), acc.autocast():
            for i, batch in enumerate(loader):
                if i == cfg.train.eval_batches:
                    break
                out = model(**to_device(batch, acc.device))
                total += torch.stack([out.loss.float() * out.n_tokens, out.n_tokens.float()])
        total = acc.reduce(total, reduction="sum")
        loss = (total[0] / total[1].clamp(min=1)).item()
        results[f"eval/{name}_loss"] = loss
        results[f"eval/{name}_ppl"] = math.exp(min(loss, 50))
    model.train()
    return results


def train(cfg, resume: str | None = None, on_step=None) -> dict:
    """Run the training loop; returns the final trainer state. `on_step(acc, state, model, samples)` is
    called after every optimizer step with the (source, shard, offset) of the samples it started (tests)."""
    import torch
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from kosmos import checkpoint as ck
    from kosmos.data import build_mixture
    from kosmos.optim import build_optimizer, build_scheduler
    from kosmos.sequence import SequenceEncoder

    acc = build_accelerator(cfg)
    set_seed(cfg.seed)  # the same initial weights on every rank
    tok = build_tokenizer(cfg)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = acc.prepare(model, optimizer)
    # The scheduler stays unwrapped: accelerate's wrapper steps it once per process per call.
    scheduler = build_scheduler(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, cfg.optim)
    encoder = SequenceEncoder.from_config(cfg, tok)
    mixture = build_mixture(cfg, encoder, rank=acc.process_index, world_size=acc.num_processes)
    out_dir = Path(cfg.train.output_dir)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")

    state = {"step": 0, "tokens": 0, "bad_steps": 0, "samples": 0}
    path = ck.resolve_resume(resume, out_dir) if resume else None
    if path is not None:
        state = load_checkpoint(acc, path, model, optimizer, scheduler, mixture)
        acc.print(f"resumed from {path} at step {state['step']}")
    elif resume and acc.is_main_process:
        acc.print(f"--resume {resume}: no checkpoint in {out_dir}, starting from scratch")
    if cfg.train.tracker != "none":
        acc.init_trackers("kosmos", config=_flat(cfg.to_dict()))

    max_steps = cfg.train.max_steps or cfg.optim.total_steps
    plans = mixture.plans
    n_micro = sum(p.micro_batches for p in plans.values())
    budget = sum(p.tokens_per_step for p in plans.values())
    weights = {name: p.tokens_per_step / budget / p.micro_batches for name, p in plans.items()}
    dec_flops, img_flops = cfg.flops_per_token(), cfg.flops_per_image()
    peak = peak_flops(cfg, acc.device)
    ds = acc.state.deepspeed_plugin
    if ds is not None and ds.deepspeed_config.get("gradient_accumulation_steps") != n_micro:
        raise ConfigError(f"DeepSpeed steps the optimizer every gradient_accumulation_steps backward passes: set "
                          f"it to {n_micro} (the micro-batches of one step) in the accelerate config")
    acc.print("mixture per step: " + ", ".join(
        f"{p.name} {p.micro_batches}x{p.micro_batch_size} rows ({p.tokens_per_step:,} tok)" for p in plans.values())
        + f"; {acc.num_processes} process(es), mixed precision {acc.mixed_precision}")

    stop = StopFlag()
    bar = tqdm(total=max_steps, initial=state["step"], disable=not acc.is_main_process, desc="train",
               dynamic_ncols=True)
    window = defaultdict(lambda: torch.zeros(2, device=acc.device))  # per source: loss sum, tokens (on device)
    win_rows = win_real = win_images = 0
    t_win = time.perf_counter()
    consecutive_bad = 0
    last_saved = state["step"]
    model.train()
    while state["step"] < max_steps:
        # ---- one optimizer step: the planned micro-batches of every source
        step_stats = defaultdict(lambda: torch.zeros(2, device=acc.device))
        step_samples = []
        for i, (name, batch) in enumerate(mixture.step()):
            step_samples += [(name, *pos) for pos in batch["sample_positions"]]
            win_rows += batch["input_ids"].numel()
            win_real += int(batch["n_real"])
            win_images += len(batch["images"])
            sync = i == n_micro - 1
            ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(model)
            with ctx:
                out = model(**to_device(batch, acc.device))
                acc.backward(out.loss * weights[name])
            step_stats[name] += torch.stack([out.loss.detach().float() * out.n_tokens, out.n_tokens.float()])
        if cfg.optim.grad_clip > 0:
            gnorm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
        gnorm = float(gnorm)  # sync point: once per step, also the NaN/inf check
        if not math.isfinite(gnorm) or not all(math.isfinite(float(s[0])) for s in step_stats.values()):
            optimizer.zero_grad(set_to_none=True)
            state["bad_steps"] += 1
            consecutive_bad += 1
            acc.print(f"step {state['step']}: non-finite loss or gradient, step skipped "
                      f"({consecutive_bad} in a row, {state['bad_steps']} in all)")
            if consecutive_bad >= cfg.train.max_bad_steps:
                raise RuntimeError(f"{consecutive_bad} steps in a row had a NaN/inf loss or gradient: stopping. "
                                   f"Lower optim.lr, check the data, or resume from an earlier checkpoint.")
            continue
        consecutive_bad = 0
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        for name, s in step_stats.items():
            window[name] += s
        bar.update(1)
        if on_step is not None:
            on_step(acc, state, model, step_samples)

        # ---- log, evaluate, save
        step = state["step"]
        if step % cfg.train.log_every == 0 or step == max_steps:
            elapsed = time.perf_counter() - t_win
            counts = torch.tensor([win_rows, win_real, win_images], device=acc.device, dtype=torch.float64)
            counts = acc.reduce(counts, reduction="sum").tolist()
            per_source = {n: acc.reduce(w, reduction="sum") for n, w in window.items()}
            losses = {n: (w[0] / w[1].clamp(min=1)).item() for n, w in per_source.items()}  # sync point
            total = sum(w[0] for w in per_source.values()) / sum(w[1] for w in per_source.values()).clamp(min=1)
            state["tokens"] += int(counts[1])
            by_reason = {f"train/skipped/{src}/{reason}": n for src, reasons in mixture.skipped().items()
                         for reason, n in reasons.items()}  # this rank's workers
            skipped = int(acc.reduce(torch.tensor([float(sum(by_reason.values()))], device=acc.device),
                                     reduction="sum").item())  # all ranks
            flops = counts[0] * dec_flops + counts[2] * img_flops
            mfu = flops / elapsed / (peak * acc.num_processes) if peak else None
            mem = (torch.cuda.max_memory_allocated() / 2**30 if acc.device.type == "cuda"
                   else _rss_gib())
            metrics = {"train/loss": total.item(), **{f"train/{n}_loss": v for n, v in losses.items()},
                       "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": gnorm,
                       "train/tokens_per_s": counts[1] / elapsed, "train/padding": 1 - counts[1] / max(1, counts[0]),
                       "train/skipped_samples": skipped, "train/bad_steps": state["bad_steps"],
                       "train/mem_gib": mem}
            if mfu is not None:
                metrics["train/mfu"] = mfu
            metrics.update(by_reason)
            if acc.is_main_process:
                tqdm.write(_log_line(step, metrics, losses))
            acc.log(metrics, step=step)
            window.clear()
            win_rows = win_real = win_images = 0
            t_win = time.perf_counter()
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            ev = evaluate(acc, cfg, model, encoder)
            if ev:
                acc.log(ev, step=step)
                acc.print("eval " + " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in ev.items()))
        stop_now = stop.any_rank(acc)
        if step % cfg.train.save_every == 0 or step == max_steps or stop_now:
            state["samples"] = mixture.samples_seen()
            saved = save_checkpoint(acc, cfg, model, optimizer, scheduler, mixture, state)
            last_saved = step
            if saved is not None:
                tqdm.write(f"saved {saved}")
        if stop_now:
            acc.print(f"stopped by signal at step {step}; resume with --resume latest")
            break
    bar.close()
    acc.end_training()
    state["last_saved"] = last_saved
    return state


def _rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _log_line(step: int, m: dict, losses: dict) -> str:
    parts = [f"step {step:>6}", f"loss {m['train/loss']:.4f}"]
    parts += [f"{n} {v:.3f}" for n, v in losses.items()]
    parts += [f"lr {m['train/lr']:.2e}", f"gnorm {m['train/grad_norm']:.3f}",
              f"tok/s {m['train/tokens_per_s']:,.0f}",
              f"mfu {m['train/mfu']:.1%}" if "train/mfu" in m else "mfu n/a",
              f"pad {m['train/padding']:.1%}", f"skipped {m['train/skipped_samples']}",
              f"bad {m['train/bad_steps']}", f"mem {m['train/mem_gib']:.2f}GiB"]
    return " | ".join(parts)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_config(cfg)
    except ConfigError as e:  # before any heavy work: one clear line
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return train(cfg, resume=args.resume)


if __name__ == "__main__":
    main()
