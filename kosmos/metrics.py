"""What a training run reports, and where it goes.

`Meter` keeps one log window of steps on the device (no sync per step), reduces it over the ranks once per
log line and turns it into tracker metrics (losses, lr, tokens/s, padding, MFU, memory, skipped samples)
and the log line. `train/loss` is the mean over every loss token of the window, all sources and ranks: the
objective that train_step optimises (with the default `train.loss_weighting: tokens`); `train/<source>_loss`
the same per source, by the source's name (`data.sources.<name>` included), as are, since the start of the
run and over all ranks, the tokens, images and samples seen, the skipped and truncated samples and the epoch
(`train/tokens/<source>`, ..., `train/epoch/<source>`; `train/skipped/<source>/<reason>` is this rank's).
The window is reduced in one all-reduce of a vector laid out by the config's sources, the same on every
rank whatever each saw (kosmos.distributed), so the figures are right on any number of ranks. `RunLog` writes
the lines people read: through the progress bar's writer, so that they never break the bar, and into
`train.output_dir/train.log`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kosmos.training import StepResult


SOURCE_FIELDS = ("loss_sum", "loss_tokens", "tokens", "images", "samples")
"""A source's figures of one log window on one rank: the loss sum and loss tokens of the applied steps; the
non-padding tokens, images and samples started of every computed step."""

@dataclass
class Report:
    metrics: dict[str, float]
    """Tracker metrics (`train/...`), summed or averaged over all ranks."""
    line: str
    """The log line."""
    tokens: int
    """Non-padding tokens of the window over all ranks (skipped steps included: they were computed)."""
    sources: dict[str, dict] = field(default_factory=dict)
    """Per source, all ranks: `loss` (the window's, absent when no loss token), and since the start of the
    run `tokens`, `images`, `samples`, `skipped`, `truncated`, and `epoch`, `epoch_min` (the furthest and the
    least advanced of its logical streams: 0 is the first pass). What trainer_state.json keeps."""
    names: list[str] = field(default_factory=list, repr=False)
    mine: torch.Tensor | None = field(default=None, repr=False)
    """This rank's packed window before the reduction (see local())."""

    def local(self) -> dict[str, dict[str, float]]:
        """Per source, this rank's window before the reduction (SOURCE_FIELDS): for checking the reduction
        (a device-to-host copy; tests call it, the loop does not)."""
        if self.mine is None:
            return {}
        flat = self.mine.tolist()
        k = 2 * len(self.names)
        out = {}
        for i, n in enumerate(self.names):
            tok, img, smp = flat[k + 3 + 6 * i:k + 6 + 6 * i]
            out[n] = dict(zip(SOURCE_FIELDS, (flat[2 * i], flat[2 * i + 1], tok, img, smp), strict=True))
        return out


class Meter:
    """One log window: per-source (loss sum, loss tokens) of the applied steps, and rows, real tokens, images
    and samples of every computed step, for throughput, MFU and the per-source counts. Kept on the device and
    reduced over the ranks only in `report()`, which every rank must call (it is a collective) and which
    starts the next window.

    The reduction is one all-reduce of one vector whose layout every rank knows from the config alone: the
    sources in `names` order (the mixture's, the same on every rank), zeros for a source this rank did not
    see in the window, and each source's logical streams (kosmos.distributed). `totals` carries the tokens and
    images seen per source over a resume (trainer_state.json's `sources`)."""

    def __init__(self, acc, model, peak_flops: float | None, names: Sequence[str] = (),
                 totals: dict[str, dict] | None = None):
        self.acc = acc
        self.peak = peak_flops
        self.names = list(names)
        self.dec_flops = model.cfg.flops_per_token()
        self.img_flops = model.cfg.flops_per_image()  # frozen blocks: forward only (kosmos.config)
        self.totals = {n: {"tokens": int((totals or {}).get(n, {}).get("tokens", 0)),
                           "images": int((totals or {}).get(n, {}).get("images", 0))} for n in self.names}
        self._reset()

    def _reset(self) -> None:
        self.losses: dict[str, torch.Tensor] = {}
        self.counts: dict[str, list[int]] = {}  # per source: tokens, images, samples of computed steps
        self.rows = self.real = self.images = 0
        self.t0 = time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.rows += result.rows
        self.real += result.real
        self.images += result.images
        for name, c in result.counts.items():
            have = self.counts.setdefault(name, [0, 0, 0])
            for i, v in enumerate(c):
                have[i] += v
        if result.ok:  # a skipped step's losses are not finite
            for name, s in result.losses.items():
                self.losses[name] = self.losses[name] + s if name in self.losses else s.clone()

    def report(self, step: int, *, lr: float, gnorm: float, bad_steps: int,
               skipped: dict[str, dict[str, int]], truncated: dict[str, int] | None = None,
               samples: dict[str, int] | None = None, epochs: dict[str, list[int]] | None = None) -> Report:
        """Reduce the window over the ranks (one all-reduce) and start a new one. The other figures are this
        rank's since the start of the run, per source (mixture.figures()): `skipped` samples by reason,
        `truncated` samples cut to `data.<source>.max_tokens`, `samples` started, and `epochs`, the epoch of
        each of the source's logical streams that this rank reads (0 for the others: each stream is read by
        one rank, so the sum over the ranks is every stream's)."""
        from kosmos.distributed import all_reduce_sum, pack

        acc = self.acc
        names = self.names or list(dict.fromkeys([*skipped, *(truncated or {}), *self.losses, *self.counts]))
        unknown = (set(self.losses) | set(self.counts) | set(skipped)) - set(names)
        if unknown:
            raise KeyError(f"figures for {sorted(unknown)} outside the meter's sources {names}")
        elapsed = time.perf_counter() - self.t0
        truncated, samples, epochs = truncated or {}, samples or {}, epochs or {}
        n_streams = [len(epochs.get(n, ())) for n in names]
        local = {n: [*self.counts.get(n, (0, 0, 0))] for n in names}
        host = [float(self.rows), float(self.real), float(self.images)]
        host += pack(names, {n: [*local[n], sum(skipped.get(n, {}).values()), truncated.get(n, 0),
                                 samples.get(n, 0)] for n in names}, 6)
        host += [float(e) for n in names for e in epochs.get(n, ())]
        zero = torch.zeros(2, device=acc.device)
        device_part = torch.stack([self.losses.get(n, zero).float() for n in names]).double().flatten() \
            if names else torch.zeros(0, device=acc.device, dtype=torch.float64)
        vec = torch.cat([device_part, torch.tensor(host, device=acc.device, dtype=torch.float64)])
        mine = vec.clone()  # this rank's window, for Report.local()
        flat = all_reduce_sum(acc, vec, "log window").tolist()  # sync point: once per log window
        lossv, flat = flat[:2 * len(names)], flat[2 * len(names):]
        rows, real, images = flat[:3]
        per = flat[3:3 + 6 * len(names)]
        stream_epochs = flat[3 + 6 * len(names):]
        sources: dict[str, dict] = {}
        losses: dict[str, float] = {}
        total_sum = total_tokens = 0.0
        for i, n in enumerate(names):
            loss_sum, loss_tokens = lossv[2 * i], lossv[2 * i + 1]
            tok, img, smp, skp, trn, seen = per[6 * i:6 * i + 6]
            self.totals.setdefault(n, {"tokens": 0, "images": 0})
            self.totals[n]["tokens"] += int(tok)
            self.totals[n]["images"] += int(img)
            k0 = sum(n_streams[:i])
            ep = [int(e) for e in stream_epochs[k0:k0 + n_streams[i]]] or [0]
            fig = {"tokens": self.totals[n]["tokens"], "images": self.totals[n]["images"],
                   "samples": int(seen), "skipped": int(skp), "truncated": int(trn),
                   "epoch": max(ep), "epoch_min": min(ep), "window_samples": int(smp)}
            if loss_tokens > 0:
                fig["loss"] = losses[n] = loss_sum / loss_tokens
                total_sum, total_tokens = total_sum + loss_sum, total_tokens + loss_tokens
            sources[n] = fig
        by_reason = {f"train/skipped/{src}/{reason}": k for src, reasons in skipped.items()
                     for reason, k in reasons.items()}  # this rank's workers
        flops = rows * self.dec_flops + images * self.img_flops
        metrics = {"train/loss": total_sum / max(total_tokens, 1.0),
                   **{f"train/{n}_loss": v for n, v in losses.items()},
                   "train/lr": lr, "train/grad_norm": gnorm,
                   "train/tokens_per_s": real / elapsed, "train/padding": 1 - real / max(1, rows),
                   "train/skipped_samples": sum(f["skipped"] for f in sources.values()),
                   "train/bad_steps": bad_steps, "train/mem_gib": memory_gib(acc.device)}
        if self.peak:
            metrics["train/mfu"] = flops / elapsed / (self.peak * acc.num_processes)
        for n, f in sources.items():
            metrics[f"train/skipped/{n}"] = f["skipped"]
            metrics[f"train/truncated/{n}"] = f["truncated"]
            for key in ("tokens", "images", "samples", "epoch"):
                metrics[f"train/{key}/{n}"] = f[key]
        metrics.update(by_reason)
        self._reset()
        line = log_line(step, metrics, losses, {n: f["skipped"] for n, f in sources.items()},
                        {n: (f["epoch_min"], f["epoch"]) for n, f in sources.items()} if epochs else None)
        return Report(metrics, line, int(real), sources, names, mine)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def log_line(step: int, m: dict, losses: dict, skipped: dict[str, int] | None = None,
             epochs: dict[str, tuple[int, int]] | None = None) -> str:
    """The step's line: the loss, then each source's by name with the epoch its logical streams are in
    (`captions 3.500 e1`; `e1-2` while some streams are a pass ahead), ...; the skipped samples of all ranks,
    with the sources that had some by name (`skipped 6 (captions 5, web 1)`)."""
    by_source = ", ".join(f"{n} {k}" for n, k in (skipped or {}).items() if k)
    parts = [f"step {step:>6}", f"loss {m['train/loss']:.4f}"]
    for n, v in losses.items():
        lo, hi = (epochs or {}).get(n, (None, None))
        ep = "" if lo is None else f" e{lo}" if lo == hi else f" e{lo}-{hi}"
        parts.append(f"{n} {v:.3f}{ep}")
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


def stamp(line: str, now: float | None = None) -> str:
    """`line` as train.log holds it: each of its lines after the UTC time it was written, ISO 8601 to the
    second (`2026-12-03T04:55:21Z step      2 | loss ...`); `LOG_STAMP` matches the prefix."""
    t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return "\n".join(f"{t} {part}" for part in line.split("\n"))


LOG_STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "
"""A regular expression for the time `stamp` puts before each train.log line (for readers of the file)."""


def write_hparams(acc, hparams: dict, metrics: Sequence[str]) -> None:
    """The run's hyperparameters (`flat_config`) into its own TensorBoard run, with `metrics`, the scalar
    tags the HParams tab shows against them (their latest values: the run's final figures). accelerate's
    `init_trackers(config=...)` goes through SummaryWriter.add_hparams, which writes them into a new
    timestamped sub-run holding nothing else: the run list doubled and the HParams tab listed no run with
    scalars. The main process only; a no-op without the TensorBoard tracker."""
    if not acc.is_main_process or not any(t.name == "tensorboard" for t in acc.trackers):
        return
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    writer = acc.get_tracker("tensorboard", unwrap=True)
    experiment, start, end = hparams_summaries(hparams, {m: 0.0 for m in metrics})
    file_writer = writer._get_file_writer()  # SummaryWriter has no public add_summary
    for summary in (experiment, start, end):
        file_writer.add_summary(summary)
    writer.flush()


class RunLog:
    """The lines people read (log lines, eval lines, what the run is doing), from the main process only:
    printed through tqdm.write, so that they never break the progress bar, and appended to `path`
    (train.output_dir/train.log; a resumed run continues the file), each line there after the UTC time it
    was written (`stamp`). Also owns the progress bar; as a context manager, closes both on the way out, an
    exception included."""

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
            self.file.write(stamp(line) + "\n")

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
