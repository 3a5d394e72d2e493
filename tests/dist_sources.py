"""Run under `accelerate launch --multi_gpu --num_processes N` (CPU, gloo) by tests/test_distributed.py:
trains configs/tiny.yaml with the overrides given after OUT and checks, at every log line, that each
per-source figure equals the one recomputed from every rank's own window, gathered separately (not through
the reduction under test), and after every step that the ranks hold bit-identical weights. The main process
writes the reports' per-source figures to OUT/reports.json. Prints SOURCES_OK on success."""

import json
import math
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object

import train_kosmos  # the checkout's: the test puts it on PYTHONPATH
from kosmos.config import load_config


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


def main():
    out, args = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", args)
    reports = []
    tokens = {}

    def on_step(acc, state, model, samples):
        weights = torch.cat([p.detach().float().flatten() for p in acc.unwrap_model(model).parameters()])
        every = acc.gather(weights[None])
        assert all(torch.equal(every[0], w) for w in every), f"step {state['step']}: weights differ"

    def on_report(acc, state, report):
        every = gather_object([report.local()])
        check_report(every, report)
        for name in report.sources:  # cumulative tokens: the sum of every window's
            tokens[name] = tokens.get(name, 0) + int(sum(r[name]["tokens"] for r in every))
            assert report.sources[name]["tokens"] == tokens[name], name
        reports.append({"step": state["step"], "line": report.line, "sources": report.sources})
        if acc.is_main_process:
            (out / "reports.json").write_text(json.dumps(reports))

    train_kosmos.train(cfg, on_step=on_step, on_report=on_report, progress=False)
    print(f"SOURCES_OK {len(reports)} reports", flush=True)


if __name__ == "__main__":
    main()
