"""What a training run reports, and where it goes.

`Meter` keeps one log window of steps on the device (no sync per step), reduces it over the ranks once per
log line and turns it into tracker metrics (losses, lr, tokens/s, padding, MFU, memory, skipped samples)
and the log line. `train/loss` is the mean over every loss token of the window, all sources and ranks: the
objective that train_step optimises (with the default `train.loss_weighting: tokens`); `train/<source>_loss`
the same per source, by the source's name (`data.sources.<name>` included), as are the skipped samples
(`train/skipped/<source>`, all ranks; `train/skipped/<source>/<reason>`, this rank). `RunLog` writes the
lines people read: through the progress bar's writer, so that they never break the bar, and into
`train.output_dir/train.log`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kosmos.training import StepResult


@dataclass
class Report:
    metrics: dict[str, float]
    """Tracker metrics (`train/...`), summed or averaged over all ranks."""
    line: str
    """The log line."""
    tokens: int
    """Non-padding tokens of the window over all ranks (skipped steps included: they were computed)."""


class Meter:
    """One log window: per-source (loss sum, tokens) of the applied steps, and rows, real tokens and images
    of every computed step, for throughput and MFU. Kept on the device and reduced over the ranks only in
    `report()`, which every rank must call (it is a collective) and which starts the next window."""

    def __init__(self, acc, model, peak_flops: float | None):
        self.acc = acc
        self.peak = peak_flops
        self.dec_flops = model.cfg.flops_per_token()
        self.img_flops = model.cfg.flops_per_image()  # frozen blocks: forward only (kosmos.config)
        self._reset()

    def _reset(self) -> None:
        self.losses: dict[str, torch.Tensor] = {}
        self.rows = self.real = self.images = 0
        self.t0 = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.rows += result.rows
        self.real += result.real
        self.images += result.images
        if result.ok:  # a skipped step's losses are not finite
            for name, s in result.losses.items():
                self.losses[name] = self.losses[name] + s if name in self.losses else s.clone()

    def report(self, step: int, *, lr: float, gnorm: float, bad_steps: int,
               skipped: dict[str, dict[str, int]], truncated: dict[str, int] | None = None) -> Report:
        """Reduce the window over the ranks (in the same order on every rank) and start a new one. `skipped`
        is this rank's skipped samples per source and reason (mixture.skipped()), `truncated` its samples cut
        to `data.<source>.max_tokens` per source (mixture.truncated())."""
        acc = self.acc
        elapsed = time.perf_counter() - self.t0
        counts = torch.tensor([self.rows, self.real, self.images], device=acc.device, dtype=torch.float64)
        rows, real, images = acc.reduce(counts, reduction="sum").tolist()
        per_source = {n: acc.reduce(w, reduction="sum") for n, w in self.losses.items()}
        losses = {n: (w[0] / w[1].clamp(min=1)).item() for n, w in per_source.items()}  # sync point
        total = sum(w[0] for w in per_source.values()) / sum(w[1] for w in per_source.values()).clamp(min=1)
        by_reason = {f"train/skipped/{src}/{reason}": n for src, reasons in skipped.items()
                     for reason, n in reasons.items()}  # this rank's workers
        # per source, all ranks: every rank has the same sources in the same order (the mixture's loaders)
        mine = [float(sum(reasons.values())) for reasons in skipped.values()]
        per_source_skipped = dict(zip(skipped, acc.reduce(torch.tensor(mine or [0.0], device=acc.device),
                                                          reduction="sum").long().tolist()))
        n_skipped = sum(per_source_skipped.values())
        flops = rows * self.dec_flops + images * self.img_flops
        metrics = {"train/loss": total.item(), **{f"train/{n}_loss": v for n, v in losses.items()},
                   "train/lr": lr, "train/grad_norm": gnorm,
                   "train/tokens_per_s": real / elapsed, "train/padding": 1 - real / max(1, rows),
                   "train/skipped_samples": n_skipped, "train/bad_steps": bad_steps,
                   "train/mem_gib": memory_gib(acc.device)}
        if self.peak:
            metrics["train/mfu"] = flops / elapsed / (self.peak * acc.num_processes)
        metrics.update({f"train/skipped/{src}": n for src, n in per_source_skipped.items()})
        metrics.update(by_reason)
        metrics.update({f"train/truncated/{src}": n for src, n in (truncated or {}).items()})  # this rank
        self._reset()
        return Report(metrics, log_line(step, metrics, losses, per_source_skipped), int(real))


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def log_line(step: int, m: dict, losses: dict, skipped: dict[str, int] | None = None) -> str:
    """The step's line: the loss, then each source's by name, ...; the skipped samples of all ranks, with
    the sources that had some by name (`skipped 6 (captions 5, web 1)`)."""
    by_source = ", ".join(f"{n} {k}" for n, k in (skipped or {}).items() if k)
    parts = [f"step {step:>6}", f"loss {m['train/loss']:.4f}"]
    parts += [f"{n} {v:.3f}" for n, v in losses.items()]
    parts += [f"lr {m['train/lr']:.2e}", f"gnorm {m['train/grad_norm']:.3f}",
              f"tok/s {m['train/tokens_per_s']:,.0f}",
              f"mfu {m['train/mfu']:.1%}" if "train/mfu" in m else "mfu n/a",
              f"pad {m['train/padding']:.1%}",
              f"skipped {m['train/skipped_samples']}" + (f" ({by_source})" if by_source else ""),
              f"bad {m['train/bad_steps']}", f"mem {m['train/mem_gib']:.2f}GiB"]
    return " | ".join(parts)


def eval_line(results: dict[str, float]) -> str:
    """`eval captions_loss 2.345 captions_ppl 10.432 coco_captioning/CIDEr 12.345 ...` from evaluate()'s
    `eval/...` results."""
    return "eval " + " ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in results.items())


class RunLog:
    """The lines people read (log lines, eval lines, what the run is doing), from the main process only:
    printed through tqdm.write, so that they never break the progress bar, and appended to `path`
    (train.output_dir/train.log; a resumed run continues the file). Also owns the progress bar; as a
    context manager, closes both on the way out, an exception included."""

    def __init__(self, acc, path: str | Path, progress: bool = True):
        self.main = acc.is_main_process
        self.progress = progress
        self.bar = None
        self.file = None
        if self.main:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)  # line-buffered: a killed run keeps every line it wrote

    def info(self, line: str) -> None:
        from tqdm.auto import tqdm

        if self.main:
            tqdm.write(line)
            self.file.write(line + "\n")

    def start_bar(self, total: int, initial: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not (self.main and self.progress), desc="train",
                        dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None
