"""Run under `accelerate launch --multi_gpu --num_processes N` (CPU, gloo) by tests/test_distributed.py:
trains configs/tiny.yaml with the overrides given after OUT and checks, at every log line, that each
per-source figure equals the one recomputed from every rank's own window, gathered separately (not through
the reduction under test), and after every step that the ranks hold bit-identical weights. The main process
writes the reports' per-source figures to OUT/reports.json. Prints SOURCES_OK on success.

Options before the overrides (tests/soak.py): `--phase NAME` names the files written: OUT/NAME.reports.json
and, per rank, OUT/NAME.rank{R}.json with every step's sorted (source, shard, offset) of the samples the rank
started and a hash of the full weights; `--sigterm STEP:WHO` sends SIGTERM at that step to rank WHO's own
process, or to every rank's (`all`), as a preemption would; `--resume` resumes from the newest checkpoint.
Like train_kosmos.main, a ConfigError / CheckpointError / DataError is one `error: ...` line and exit 2."""

import hashlib
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object

import train_kosmos  # the checkout's: the test puts it on PYTHONPATH
from kosmos.config import ConfigError, load_config


def check_report(every: list[dict], report) -> None:
    """`every`: each rank's report.local(); the report's figures must be what they add up to."""
    for name, fig in report.sources.items():
        s = sum(r[name]["loss_sum"] for r in every)
        n = sum(r[name]["loss_tokens"] for r in every)
        if n:
            assert math.isclose(fig["loss"], s / n, rel_tol=1e-9), (name, fig["loss"], s / n)
            assert report.metrics[f"train/{name}_loss"] == fig["loss"]
            assert f"{name} {fig['loss']:.3f}" in report.line, (name, report.line)
        else:
            assert "loss" not in fig and f"train/{name}_loss" not in report.metrics, name
        assert fig["window_samples"] == sum(r[name]["samples"] for r in every), name
    total = sum(r[n]["loss_sum"] for r in every for n in r) / max(1, sum(r[n]["loss_tokens"] for r in every
                                                                         for n in r))
    assert math.isclose(report.metrics["train/loss"], total, rel_tol=1e-9)


def weights_of(acc, model) -> torch.Tensor:
    """The full weights as one flat fp32 vector (a collective under train.sharding=fsdp2: every rank calls
    it)."""
    from kosmos.sharding import full

    return torch.cat([full(p.detach()).float().flatten() for p in acc.unwrap_model(model).parameters()])


def main():
    from kosmos.checkpoint import CheckpointError, list_checkpoints
    from kosmos.data.shards import DataError
    from kosmos.sharding import is_sharded
    from kosmos.training import check_config

    out, args = Path(sys.argv[1]), sys.argv[2:]
    phase, sigterm, resume = None, None, None
    while args[:1] and args[0].startswith("--"):
        opt = args.pop(0)
        if opt == "--phase":
            phase = args.pop(0)
        elif opt == "--sigterm":
            at, who = args.pop(0).split(":")
            sigterm = (int(at), who)
        elif opt == "--resume":
            resume = "latest"
        else:
            raise SystemExit(f"dist_sources.py: unknown option {opt}")
    prefix = f"{phase}." if phase else ""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", args)
    reports, steps = [], []
    tokens = {}
    if resume and (saved := list_checkpoints(cfg.train.output_dir)):
        # the cumulative figures go on from the checkpoint's
        sources = json.loads((saved[-1] / "trainer_state.json").read_text()).get("sources") or {}
        tokens = {n: int(f["tokens"]) for n, f in sources.items()}

    def on_step(acc, state, model, samples):
        weights = weights_of(acc, model)
        if not is_sharded(acc.unwrap_model(model)):  # DDP: every rank holds the whole model
            every = acc.gather(weights[None])
            assert all(torch.equal(every[0], w) for w in every), f"step {state.step}: weights differ"
        if phase:
            digest = hashlib.sha256(weights.cpu().numpy().tobytes()).hexdigest()[:16]
            steps.append({"step": state.step, "samples": [list(x) for x in samples], "weights": digest})
            (out / f"{prefix}rank{acc.process_index}.json").write_text(json.dumps(steps))
        if sigterm and state.step == sigterm[0] and sigterm[1] in ("all", str(acc.process_index)):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_report(acc, state, report):
        every = gather_object([report.local()])
        check_report(every, report)
        for name in report.sources:  # cumulative tokens: the sum of every window's
            tokens[name] = tokens.get(name, 0) + int(sum(r[name]["tokens"] for r in every))
            assert report.sources[name]["tokens"] == tokens[name], name
        reports.append({"step": state.step, "line": report.line, "sources": report.sources})
        if acc.is_main_process:
            (out / f"{prefix}reports.json").write_text(json.dumps(reports))

    try:
        check_config(cfg)
        train_kosmos.train(cfg, resume=resume, on_step=on_step, on_report=on_report, progress=False)
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"SOURCES_OK {len(reports)} reports", flush=True)


if __name__ == "__main__":
    main()
