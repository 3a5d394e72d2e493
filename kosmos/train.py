"""Train KOSMOS-1 on text, image-caption pairs and interleaved documents, mixed by token budget.

    accelerate launch train_kosmos.py --config configs/kosmos1.yaml [key=value ...] [--resume latest]
    python train_kosmos.py --config configs/tiny.yaml train.max_steps=50     # one process
    python -m kosmos.train ..., kosmos-train ...                             # the same command
    accelerate launch -m kosmos.train --config kosmos1 ...                  # installed: a shipped config

Each optimizer step takes tokens_per_step tokens from every source (data.text, data.captions, data.interleaved
and any data.sources.<name>; the paper: 0.5M text, 0.5M image-caption, 0.2M interleaved), planned over all
ranks together, as micro-batches of packed rows, accumulates their gradients (the step's loss: every target
token of every source and rank weighs the same), clips, and steps 8-bit AdamW on the warmup/linear-decay
schedule. Checkpoints go to train.output_dir/checkpoints; `--resume latest` picks up the newest complete one
with its optimizer, schedule, RNG and data position (a damaged one is named and the one before it taken). A
resume keeps the settings that change the data order or shapes (seed, max_len, micro_batch_size, shards, ...)
unless `--allow-config-change KEY,...` names them; `--reset-data SOURCE,...|all` starts those sources' data
over instead of restoring it. SIGTERM or Ctrl-C saves a checkpoint and exits 0.
`train.init_from=CHECKPOINT` starts a new run from a checkpoint's weights only (fine-tuning, another number of
processes). Log lines also go to train.output_dir/train.log; `--no-progress` drops the bar. A wait (data, a
collective, a save) longer than train.collective_timeout ends the run with the rank, step and wait named and
the stacks in train.log (kosmos/watchdog.py); under a launcher each rank dies with it.

The pieces: kosmos/training.py (builders, train_step, evaluate), kosmos/metrics.py (log window, log line),
kosmos/checkpoint.py (save, load, resume, the stop signal), kosmos/watchdog.py (no silent hang).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from kosmos.config import load_config


def parse_args(argv: list[str] | None):
    from kosmos.errors import command_name

    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    as_script = script.endswith(".py") and script != "__main__.py"  # python train_kosmos.py
    prog = f"python {script}" if as_script else command_name("kosmos.train")
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True,
                    help="YAML config (configs/tiny.yaml, ...; its relative paths are read against its "
                         "folder) or a shipped one's name (tiny, kosmos1)")
    ap.add_argument("--resume",
                    help="`latest` (newest checkpoint in train.output_dir, if any) or a checkpoint dir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (log lines still printed)")
    from kosmos.config import fixed_on_resume_keys

    ap.add_argument("--allow-config-change", default="", metavar="KEY,...",
                    help="resume although these keys (or sections, e.g. data.text) differ from the "
                         "checkpoint's, or these sources (data.sources.NAME) were added or removed; "
                         f"otherwise refused for {', '.join(fixed_on_resume_keys())}")
    ap.add_argument("--reset-data", default="", metavar="SOURCE,...|all",
                    help="resume with these sources' data (or all) started over from scratch, with fresh "
                         "streams for this run's layout, instead of their saved data position")
    ap.add_argument("--debug", action="store_true",
                    help="on an error, show its traceback instead of one `error:` line (also KOSMOS_DEBUG=1)")
    ap.add_argument("overrides", nargs="*",
                    help="dotted config overrides, e.g. train.max_steps=100 optim.lr=1e-4")
    return ap.parse_args(argv)


def train(cfg, resume: str | None = None, on_step=None, progress: bool = True,
          allow_change: list[str] | tuple = (), reset_data: list[str] | tuple = (), on_report=None) -> dict:
    """Run the training loop; returns the final trainer state (`TrainState.state_dict()` and `last_saved`).
    `on_step(acc, state, model, samples)` is called after every optimizer step with the (source, shard,
    offset) of the samples it started, and `on_report(acc, state, report)` after every log line with its
    metrics.Report (tests). `allow_change`: config keys a resume may change although they change the data
    (`kosmos.config.is_fixed_on_resume`). `reset_data`: sources (or `all`) whose data a resume starts over."""
    from kosmos import checkpoint as ck
    from kosmos.metrics import eval_line
    from kosmos.training import BadSteps, evaluate, train_step

    run = _Run(cfg, resume, progress, allow_change, reset_data, on_report)  # setup and resume
    acc, model, state, log, dog, mixture = run.acc, run.model, run.state, run.log, run.dog, run.mixture
    bad = BadSteps(cfg.train.max_bad_steps, log.info)
    max_steps = cfg.train.max_steps or cfg.optim.total_steps
    with log, ck.StopFlag() as stop, contextlib.closing(mixture), dog:  # closing: ends the DataLoader workers
        while state.step < max_steps:
            dog.step = state.step + 1
            res = train_step(acc, model, run.optimizer, run.scheduler, mixture, cfg.optim.grad_clip,
                             cfg.train.loss_weighting, waiting=dog.waiting)
            dog.warm = True  # compiled: from now on the gradient sync's forward and backward are watched too
            run.meter.add(res)
            if not bad.passed(res, state):  # skipped: counted and logged; too many in a row raise
                continue
            state.step = dog.step = step = state.step + 1
            log.advance()
            if on_step is not None:
                on_step(acc, state, model, res.samples)
            logged = step % cfg.train.log_every == 0 or step == max_steps
            if logged:
                run.report_window(res)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                if ev := evaluate(acc, cfg, model, run.encoder, step, waiting=dog.waiting):
                    acc.log(ev, step=step)
                    log.info(eval_line(ev))
            with dog.waiting("the stop-flag reduce"):
                stop_now = stop.any_rank(acc)
            with dog.waiting("the checkpoint save"):  # its barriers wait for rank 0's writing
                # a checkpoint between log lines writes the window's line first: its cumulative figures
                # (tokens, images) then count every step so far, and a resume goes on from the right totals
                window = None if logged else lambda res=res: run.report_window(res)  # called in this step
                saved = run.checkpointer.maybe_save(state, last=step == max_steps, stop=stop_now,
                                                    before=window)
            if saved is not None:  # the main process
                log.info(f"saved {saved}")
            if stop_now:
                log.info(f"stopped by signal at step {step}; resume with --resume latest")
                break
    acc.end_training()
    return {**state.state_dict(), "last_saved": run.checkpointer.last_saved}


class _Run:
    """A training run's objects, set up: the checkpoints to resume checked before anything heavy, the
    accelerator, the log, the model, optimizer, schedule and mixture (kosmos.training.setup), the resumed
    (or fresh) TrainState, the log window (`report_window`) and the watchdog."""

    def __init__(self, cfg, resume, progress, allow_change, reset_data, on_report):
        from kosmos import checkpoint as ck
        from kosmos.metrics import Meter, RunLog, write_hparams
        from kosmos.procs import die_with_parent
        from kosmos.training import (
            build_accelerator,
            describe_mixture,
            flat_config,
            hparam_metrics,
            peak_flops,
            setup,
        )
        from kosmos.watchdog import Watchdog, rank_log_path, under_launcher

        # The weights come from the checkpoint to resume, else from train.init_from, else the seed. `--resume`
        # wins over train.init_from when there is a checkpoint to resume, so that a killed fine-tuning run
        # continues instead of starting over from its initial weights. The checkpoints are checked (files
        # whole, config unchanged) before anything heavy.
        if under_launcher():  # a rank ends with its launcher (killed by a timeout, say) instead of running on
            die_with_parent(os.getppid())
        self.cfg, self.on_report, out_dir = cfg, on_report, Path(cfg.train.output_dir)
        notes: list[str] = []
        self.checkpointer = ckpt = ck.Checkpointer(cfg, allow_change, reset_data, say=notes.append)
        candidates = ckpt.pick(ck.resume_candidates(resume, out_dir))
        init_from = Path(cfg.train.init_from) if cfg.train.init_from and not candidates else None
        self.acc = acc = build_accelerator(cfg)
        self.log = log = RunLog(acc, out_dir / "train.log", progress=progress)
        for note in notes:
            log.info(note)
        ckpt.say = log.info
        self.encoder, self.model, self.optimizer, self.scheduler, self.mixture = setup(acc, cfg, init_from)
        ckpt.attach(acc, self.model, self.optimizer, self.scheduler, self.mixture)
        self.state, path = ck.TrainState(), None
        if candidates:
            path, self.state = ckpt.resume()
            log.info(f"resumed from {path} at step {self.state.step}")
            if self.mixture.resume_note:
                log.info(self.mixture.resume_note)
        elif resume:
            log.info(f"--resume {resume}: no checkpoint in {out_dir}, starting a new run")
        if init_from is not None:
            log.info(f"initialised from {init_from}: model weights only; new optimizer, schedule and data")
        if cfg.train.tracker != "none":  # hparams on a fresh start only; TensorBoard's into the run itself
            tensorboard = cfg.train.tracker == "tensorboard"
            acc.init_trackers("kosmos", config=flat_config(cfg) if path is None and not tensorboard else None)
            if path is None and tensorboard:
                write_hparams(acc, flat_config(cfg), hparam_metrics(cfg, self.mixture))
        log.info(describe_mixture(acc, cfg, self.mixture))
        if note := schedule_note(cfg, self.scheduler):
            log.info(note)
        self.meter = Meter(acc, acc.unwrap_model(self.model), peak_flops(cfg, acc.device),
                           names=list(self.mixture.plans), totals=self.state.sources or None)
        self.warned: set[str] = set()  # sources past data.<source>.max_epochs, warned once
        log.start_bar(cfg.train.max_steps or cfg.optim.total_steps, self.state.step)
        self.model.train()
        # The watchdog ends this rank when a wait (data, a collective, a save) outlasts
        # train.collective_timeout.
        self.dog = Watchdog(cfg.train.collective_timeout, acc.process_index,
                            rank_log_path(out_dir / "train.log", acc.process_index))

    def report_window(self, res) -> None:
        """The log line of the window that ends at this step (a collective: every rank calls it at the same
        steps), its cumulative per-source figures into the trainer state."""
        acc, state, log = self.acc, self.state, self.log
        with self.dog.waiting("the log-window reduce"):
            report = self.meter.report(state.step, lr=self.scheduler.get_last_lr()[0], gnorm=res.gnorm,
                                       bad_steps=state.bad_steps, **self.mixture.figures())
        state.tokens += report.tokens
        state.sources = report.sources
        log.info(report.line)
        for name, fig in report.sources.items():
            limit = self.cfg.data.source(name).max_epochs
            if limit and fig["epoch"] >= limit and name not in self.warned:
                self.warned.add(name)
                log.info(f"WARNING: {name} started pass {fig['epoch'] + 1} over its data, more than "
                         f"{self.cfg.data.key(name)}.max_epochs={limit}: its samples are being repeated")
        if self.on_report is not None:
            self.on_report(acc, state, report)
        for line in self.mixture.shard_failures():  # named by each rank (the counts are in the line above)
            log.info(line) if acc.is_main_process else print(f"rank {acc.process_index}: {line}",
                                                              file=sys.stderr)
        acc.log(report.metrics, step=state.step)


def schedule_note(cfg, scheduler) -> str | None:
    """A warning when `train.max_steps` ends the run before its learning-rate schedule ends
    (`optim.total_steps`): the rate stops high instead of decaying, with no other sign."""
    max_steps, total = cfg.train.max_steps, cfg.optim.total_steps
    if not max_steps or max_steps >= total:
        return None
    left = scheduler.lr_lambdas[0](max_steps) if hasattr(scheduler, "lr_lambdas") else None
    at = f": the learning rate stops at {left:.0%} of its peak" if left is not None else ""
    return (f"WARNING: train.max_steps={max_steps} ends the run before its schedule, "
            f"optim.total_steps={total}{at}; set optim.total_steps={max_steps} for a schedule that ends with "
            "the run")


def launched_rank() -> tuple[int, int]:
    """(rank, world size) of this process as the launcher (accelerate launch, torchrun) set them in the
    environment, before or without torch.distributed: (0, 1) for a plain `python train_kosmos.py`."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


RANK_0_GRACE_S = 10.0
"""How long another rank, having met an error that every rank meets, leaves rank 0 to print it and exit (the
launcher then ends the other ranks) before printing it itself: rank 0 may reach the error later, and a rank
that exited first would have the launcher end rank 0 before it printed anything."""


def wait_for_rank_0() -> None:
    import time

    time.sleep(RANK_0_GRACE_S)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from kosmos.data.shards import DataError  # after --help
    from kosmos.errors import KosmosError, debugging
    from kosmos.training import check_config

    allow = [k.strip() for k in args.allow_config_change.split(",") if k.strip()]
    reset = [k.strip() for k in args.reset_data.split(",") if k.strip()]
    try:
        cfg = load_config(args.config, args.overrides)
        check_config(cfg)  # before any heavy work
        return train(cfg, resume=args.resume, progress=not args.no_progress, allow_change=allow,
                     reset_data=reset)
    except KosmosError as e:  # one clear line naming the key, file or source
        if args.debug or debugging():
            raise
        rank, world = launched_rank()
        if world == 1:
            print(f"error: {e}", file=sys.stderr)
        elif isinstance(e, DataError):  # met by this rank's workers: its own, perhaps alone
            print(f"error: rank {rank}: {e}", file=sys.stderr)
        elif rank == 0:  # the config and the checkpoint are the same on every rank: so is the error
            print(f"error: {e}", file=sys.stderr)
        else:  # rank 0 prints it and exits, and the launcher then ends this rank; should it not, say it here
            wait_for_rank_0()
            print(f"error: rank {rank}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # a second SIGTERM / Ctrl-C
        print("error: stopped by a second signal, without a checkpoint of the current step; "
              "--resume latest resumes from the last one saved", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()  # exits 2 itself on a KosmosError (printed once by rank 0 under a launcher)
