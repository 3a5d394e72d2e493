"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) by tests/test_watchdog.py: trains
configs/tiny.yaml with the overrides given. With `--extra-reduce STEP` first, rank 1 makes one all-reduce more
than rank 0 in its stop-flag check after step STEP (a collective that no other rank joins): the watchdog
(train.collective_timeout) must end the run."""

import sys
from pathlib import Path

import train_kosmos  # the checkout's: the test puts it on PYTHONPATH
from kosmos import checkpoint as ck
from kosmos.config import load_config


def main():
    args, extra = sys.argv[1:], None
    if args[:1] == ["--extra-reduce"]:
        extra, args = int(args[1]), args[2:]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", args)
    steps = []
    any_rank = ck.StopFlag.any_rank

    def asymmetric(self, acc):
        if acc.process_index == 1 and steps and steps[-1] == extra:
            any_rank(self, acc)  # one more than rank 0
        return any_rank(self, acc)

    ck.StopFlag.any_rank = asymmetric
    train_kosmos.train(cfg, progress=False,
                       on_step=lambda acc, state, model, samples: steps.append(state.step))
    print("HANG_CHECK_DONE", flush=True)


if __name__ == "__main__":
    main()
