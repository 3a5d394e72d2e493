"""One training step of the whole model (images, vision tower, resampler, decoder, loss, backward):
the SDPA attention path against torchscale's stock path, same weights, same batch, same run.

    python bench/train_step.py             # CPU default: configs/tiny.yaml vision, 4-layer dim-512 decoder
    python bench/train_step.py --device cuda --config configs/kosmos1.yaml --layers 4

Each row of the batch is text with one image span per 512 tokens. Ratios are stock / sdpa.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._perf import fmt_bytes, peak_memory, time_interleaved  # noqa: E402
from bench.attention import add_common_args, decoder_overrides, describe, resolve_dtype  # noqa: E402
from kosmos.config import load_config  # noqa: E402

IMAGE, IMAGE_END = 4, 5  # <image>, </image> ids of the project's tokenizer


def make_batch(model, batch: int, length: int, seed: int = 0):
    """ids, image_mask (B, L) and images (N, 3, H, W): random text with an image span every 512 tokens."""
    g = torch.Generator().manual_seed(seed)
    V, n = model.cfg.decoder.vocab_size, model.num_latents
    ids = torch.randint(10, V, (batch, length), generator=g)
    ids[:, 0] = 2  # <s>
    mask = torch.zeros(batch, length, dtype=torch.bool)
    starts = range(16, length - n - 2, 512)
    for s in starts:
        ids[:, s] = IMAGE
        mask[:, s + 1: s + 1 + n] = True
        ids[:, s + 1 + n] = IMAGE_END
    size = model.vision.image_size
    images = torch.randint(0, 256, (batch * len(starts), 3, size, size), generator=g, dtype=torch.uint8)
    return ids, mask, images


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    args = ap.parse_args(argv)
    dtype, device = resolve_dtype(args), torch.device(args.device)
    config = args.config or str(ROOT / "configs" / "tiny.yaml")  # tiny vision tower on CPU
    overrides = decoder_overrides(args, small_vocab=8192)

    from kosmos.model import Kosmos

    models = {}
    variants = ["torchscale", "sdpa"] + (["sdpa+compile"] if args.compile else [])
    for name in variants:
        cfg = load_config(config, overrides + [f"decoder.attention={name.split('+')[0]}",
                                               f"decoder.compile={'compile' in name}"])
        torch.manual_seed(0)
        model = Kosmos(cfg)
        model.to(device=device, dtype=dtype).train()
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict())
        models[name] = model

    model = models["sdpa"]
    v = model.vision
    print(f"# bench/train_step.py: {describe(model.cfg.decoder)}; vision {model.cfg.vision.model_name} "
          f"{v.image_size}px width {v.width}; {model.num_latents} latents per image, one image per 512 "
          f"tokens; "
          f"batch {args.batch}; {device} {dtype}; forward + loss + backward, median of {args.repeats}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("# ratios are torchscale / sdpa (higher is better for sdpa)")
    print(f"{'length':>6} {'path':>13} {'time (s)':>9} {'tok/s':>8} {'peak mem':>11} {'speedup':>8} "
          f"{'mem ratio':>9}")
    results = {}
    for L in args.lengths:
        ids, mask, images = make_batch(model, args.batch, L, seed=L)
        ids, mask, images = ids.to(device), mask.to(device), images.to(device)  # uint8: the model normalises
        steps = {}
        for name, m in models.items():
            def step(m=m, ids=ids, images=images, mask=mask):
                for p in m.parameters():
                    p.grad = None
                m(ids, images, mask, labels=ids).loss.backward()

            steps[name] = step
        times = time_interleaved(steps, device, repeats=args.repeats)
        row = {name: (times[name], peak_memory(step, device)) for name, step in steps.items()}
        t0, m0 = row["torchscale"]
        for name, (t, mem) in row.items():
            print(f"{L:>6} {name:>13} {t:>9.3f} {args.batch * L / t:>8.0f} {fmt_bytes(mem):>11} "
                  f"{t0 / t:>7.2f}x {m0 / mem:>8.2f}x", flush=True)
        results[L] = row
    return results


if __name__ == "__main__":
    main()
