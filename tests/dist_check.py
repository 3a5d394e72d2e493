"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) by tests/test_train.py:
trains configs/tiny.yaml for a few steps and checks, after every step, that the two ranks saw different
samples and hold bit-identical weights. Prints DIST_OK on success. With `--samples DIR` first, each rank
also writes the (source, shard, offset[, caption]) of the samples it started, per step, to
DIR/rank{R}.json. With `--resume SPEC` (after --samples, if both), the run resumes (train_kosmos --resume)."""

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object

import train_kosmos  # the checkout's: the test puts it on PYTHONPATH
from kosmos.config import load_config


def main():
    args, out = sys.argv[1:], None
    if args[:1] == ["--samples"]:
        out, args = Path(args[1]), args[2:]
    resume = None
    if args[:1] == ["--resume"]:
        resume, args = args[1], args[2:]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", args)
    checked = []
    steps = []

    def on_step(acc, state, model, samples):
        assert acc.num_processes == 2, f"expected 2 processes, got {acc.num_processes}"
        weights = torch.cat([p.detach().float().flatten() for p in acc.unwrap_model(model).parameters()])
        both = acc.gather(weights[None])  # (2, n)
        assert torch.equal(both[0], both[1]), f"step {state.step}: weights differ between ranks"
        seen = gather_object([sorted(samples)])
        shared = set(seen[0]) & set(seen[1])
        assert seen[0] and seen[1] and not shared, \
            f"step {state.step}: ranks share data {sorted(shared)[:5]}"
        checked.append(state.step)
        steps.append(sorted(samples))
        if out is not None:
            (out / f"rank{acc.process_index}.json").write_text(json.dumps(steps))

    train_kosmos.train(cfg, resume=resume, on_step=on_step)
    print(f"DIST_OK rank checked steps {checked}", flush=True)


if __name__ == "__main__":
    main()
