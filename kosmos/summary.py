"""Parameter count per component: `python -m kosmos.summary configs/kosmos1.yaml [key=value ...]` (or a
shipped config by name: `kosmos-summary kosmos1`).

The model is built on the meta device, so this costs no memory even for the full 1.6B model.
"""

from __future__ import annotations

import argparse

import torch

from kosmos.config import load_config
from kosmos.model import Kosmos, count_parameters


def human(n: int) -> str:
    """A parameter count in the unit that suits it: 1.674B, 336.5K, 12.3M."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f}B" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(n)


def summarize(cfg) -> dict[str, int]:
    with torch.device("meta"):
        model = Kosmos(cfg)
    return count_parameters(model)


def main(argv: list[str] | None = None) -> dict[str, int]:
    from kosmos.errors import command_name

    ap = argparse.ArgumentParser(prog=command_name("kosmos.summary"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (configs/kosmos1.yaml) or a shipped one's name (kosmos1, "
                                   "tiny)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. decoder.layers=12")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    counts = summarize(cfg)
    d = cfg.decoder
    print(f"{args.config}: decoder {d.layers} layers x {d.dim} (ffn {d.ffn_dim}, {d.heads} heads), "
          f"vocab {d.vocab_size}, vision {cfg.vision.model_name}, {cfg.connector.num_latents} latents/image")
    for name in ("vision", "resampler", "projection", "decoder", "embeddings", "total", "trainable"):
        print(f"  {name:<12} {counts[name]:>15,}  {human(counts[name]):>9}")
    print(f"  decoder with embeddings: {human(counts['decoder'] + counts['embeddings'])}")
    return counts


if __name__ == "__main__":
    from kosmos.errors import run_cli

    raise SystemExit(run_cli(main))
