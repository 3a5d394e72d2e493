"""Generation with the KV cache against without it (each step recomputes the whole sequence), same run.

    python bench/generate.py                         # CPU default: tiny vision, 4-layer dim-512 decoder
    python bench/generate.py --device cuda --config configs/kosmos1.yaml --new-tokens 256

Greedy decoding of --new-tokens tokens after a prompt of one image and --prompt-tokens text tokens.
Prints tokens/s of each, their ratio, and the median time per token over the first and the last 16
steps: with the cache it stays about flat, without it grows with the sequence. Both must produce the
same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._perf import synchronize  # noqa: E402
from bench.attention import DTYPES, decoder_overrides, describe, resolve_dtype  # noqa: E402
from kosmos.config import load_config  # noqa: E402


def image_prompt(model, prompt_tokens: int, seed: int = 0):
    """A prompt of one random image and `prompt_tokens` random text tokens: `<s> <image> slots </image>
    text` (random weights: no tokenizer needed)."""
    from kosmos.generate import Prompt

    g = torch.Generator().manual_seed(seed)
    n = model.num_latents
    text = torch.randint(10, model.cfg.decoder.vocab_size, (prompt_tokens,), generator=g).tolist()
    ids = [2, 4] + [0] * n + [5] + text  # <s> <image> slots </image> text
    mask = [False, False] + [True] * n + [False] * (1 + len(text))
    size = model.vision.image_size
    return Prompt(ids=ids, image_mask=mask,
                  images=torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8))


class DecoderCalls:
    """Times each call of the model's decoder while active (`with clock:`): the prefill, then one call per
    new token (beam search: one per step for all beams), from hooks on the module that generate() itself
    calls, the device synchronised before and after each call. `times` holds the last block's calls."""

    def __init__(self, model, device) -> None:
        self.model, self.device = model, device
        self.stamps: list[float] = []
        self._hooks: list = []

    def _stamp(self, *_) -> None:
        synchronize(self.device)  # device->host sync: the step's kernels are done
        self.stamps.append(time.perf_counter())

    def __enter__(self) -> DecoderCalls:
        self.stamps = []
        self._hooks = [self.model.decoder.register_forward_pre_hook(self._stamp),
                       self.model.decoder.register_forward_hook(self._stamp)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps[::2], self.stamps[1::2], strict=False)]


def token_costs(calls: list[float], window: int) -> dict[str, float]:
    """From the decoder calls' times (prefill first): the prefill's ms and the median ms per token over the
    first and the last `window` new tokens (medians: robust to load spikes)."""
    steps = calls[1:]
    w = max(1, min(window, len(steps)))
    return {"prefill_ms": 1e3 * calls[0], "start_ms": 1e3 * statistics.median(steps[:w]),
            "end_ms": 1e3 * statistics.median(steps[-w:])}



def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config of the model (default: tiny vision, a small CPU decoder)")
    ap.add_argument("--layers", type=int, help="decoder layers (default 4 without --config)")
    ap.add_argument("--dim", type=int, help="decoder width (default 512 without --config)")
    ap.add_argument("--attention", choices=["sdpa", "torchscale"], default="sdpa")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="text tokens after the image in the prompt")
    ap.add_argument("--window", type=int, default=16, help="steps averaged for the start/end time per token")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    args = ap.parse_args(argv)
    args.lengths = [args.prompt_tokens + args.new_tokens + 128]  # max_len for decoder_overrides
    dtype, device = resolve_dtype(args), torch.device(args.device)

    from kosmos.generate import GenerationConfig, generate
    from kosmos.model import Kosmos

    config = args.config or str(ROOT / "configs" / "tiny.yaml")
    overrides = decoder_overrides(args, small_vocab=8192) + [f"decoder.attention={args.attention}"]
    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = Kosmos(cfg)
    model.to(device=device, dtype=dtype).eval()

    prompt = image_prompt(model, args.prompt_tokens)
    n, ids = model.num_latents, prompt.ids
    clock = DecoderCalls(model, device)

    print(f"# bench/generate.py: {describe(cfg.decoder)}; attention {args.attention}; prompt of 1 image "
          f"({n} slots) + {args.prompt_tokens} text tokens = {len(ids)}; {args.new_tokens} new tokens, "
          f"greedy; "
          f"{device} {dtype}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    gen = GenerationConfig(max_new_tokens=args.new_tokens)
    generate(model, [prompt], GenerationConfig(max_new_tokens=4))  # warm-up
    results, outputs = {}, {}
    for name, use_cache in (("uncached", False), ("cached", True)):
        gen.use_cache = use_cache
        with clock:
            t0 = time.perf_counter()
            outputs[name] = generate(model, [prompt], gen)[0]
            total = time.perf_counter() - t0
        results[name] = {"tok_s": len(outputs[name]) / total, **token_costs(clock.times, args.window),
                         "total_s": total}
    w = min(args.window, len(clock.times) - 1)
    print(f"{'':>9} {'tok/s':>8} {'prefill ms':>10} {'ms/token first ' + str(w):>18} "
          f"{'ms/token last ' + str(w):>17} {'last/first':>10}")
    for name, r in results.items():
        print(f"{name:>9} {r['tok_s']:>8.1f} {r['prefill_ms']:>10.1f} {r['start_ms']:>18.2f} "
              f"{r['end_ms']:>17.2f} {r['end_ms'] / r['start_ms']:>9.2f}x")
    speedup = results["cached"]["tok_s"] / results["uncached"]["tok_s"]
    same = outputs["cached"] == outputs["uncached"]
    print(f"cached / uncached tokens/s: {speedup:.2f}x; same tokens: {'yes' if same else 'NO'} "
          f"({len(outputs['cached'])} tokens)")
    return {"results": results, "speedup": speedup, "same": same}


if __name__ == "__main__":
    main()
