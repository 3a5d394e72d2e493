"""Evaluation throughput, same run: captioning with beam search against greedy, and zero-shot
classification ranking with the prompt's KV cache against without it.

    python bench/eval.py                          # CPU default: tiny vision, 4-layer dim-512 decoder
    python bench/eval.py --device cuda --config configs/kosmos1.yaml --images 32 --classes 1000

Captioning: --images prompts "<image> An image of" (the text as 3 random tokens: random weights, no
tokenizer), --new-tokens new tokens each by greedy decoding and by beam search with --beams beams. No eos
id is set, so every sequence runs the full length in both. Prints images/s of each and their ratio.

Classification: every image against --classes class names (random ids, 1 to 4 tokens) after
"<image> The photo of the" (4 random tokens), scored by their length-normalised log-likelihood
(kosmos.eval.ranking.continuation_logprobs) with the prompt prefilled once and its cache reused, and with
every prompt + name sequence run whole (use_cache=False). Prints images/s of each and their ratio; both
must rank the names alike (asserted: same order up to ties within float tolerance).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._perf import time_interleaved  # noqa: E402
from bench.attention import DTYPES, decoder_overrides, describe, resolve_dtype  # noqa: E402
from kosmos.config import load_config  # noqa: E402


def same_ranking(a: list[float], b: list[float], tol: float) -> bool:
    """Whether scores `b` rank like `a`: along a's order b never rises by more than `tol` (ties within
    float tolerance may swap), and no score differs by more than `tol`."""
    order = sorted(range(len(a)), key=lambda k: -a[k])
    return (all(b[order[k]] >= b[order[k + 1]] - tol for k in range(len(order) - 1))
            and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config of the model (default: tiny vision, a small CPU decoder)")
    ap.add_argument("--layers", type=int, help="decoder layers (default 4 without --config)")
    ap.add_argument("--dim", type=int, help="decoder width (default 512 without --config)")
    ap.add_argument("--images", type=int, default=8, help="images per batch (captioning and ranking)")
    ap.add_argument("--new-tokens", type=int, default=20, help="caption tokens generated per image")
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--classes", type=int, default=100, help="class names ranked per image")
    ap.add_argument("--batch-size", type=int, default=64, help="candidate rows per forward pass in ranking")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    args = ap.parse_args(argv)
    args.lengths = [512]  # max_len for decoder_overrides: prompts here are short
    dtype, device = resolve_dtype(args), torch.device(args.device)

    from kosmos.eval.ranking import continuation_logprobs
    from kosmos.generate import GenerationConfig, Prompt, generate
    from kosmos.model import Kosmos

    config = args.config or str(ROOT / "configs" / "tiny.yaml")
    cfg = load_config(config, decoder_overrides(args, small_vocab=8192))
    torch.manual_seed(0)
    model = Kosmos(cfg)
    model.to(device=device, dtype=dtype).eval()

    rng = random.Random(0)
    V, n = cfg.decoder.vocab_size, model.num_latents
    size = model.vision.image_size
    images = torch.randint(0, 256, (args.images, 3, size, size), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)

    def prompts(n_text: int) -> list[Prompt]:
        text = [rng.randrange(10, V) for _ in range(n_text)]  # the same text after every image
        ids = [2, 4] + [0] * n + [5] + text  # <s> <image> slots </image> text
        mask = [False, False] + [True] * n + [False] * (1 + n_text)
        return [Prompt(ids=ids, image_mask=mask, images=images[i:i + 1]) for i in range(args.images)]

    caption_prompts, class_prompts = prompts(3), prompts(4)
    names = [[rng.randrange(10, V) for _ in range(rng.randint(1, 4))] for _ in range(args.classes)]
    print(f"# bench/eval.py: {describe(cfg.decoder)}; {args.images} images of {size}px ({n} slots each); "
          f"{device} {dtype}; torch {torch.__version__}, {torch.get_num_threads()} threads")

    # -- captioning: beam search against greedy, the same number of steps (no eos)
    greedy = GenerationConfig(max_new_tokens=args.new_tokens)
    beam = GenerationConfig(max_new_tokens=args.new_tokens, num_beams=args.beams)
    outs = {}

    def caption(name, gen):
        return lambda: outs.__setitem__(name, generate(model, caption_prompts, gen))

    times = time_interleaved({"greedy": caption("greedy", greedy), "beam": caption("beam", beam)}, device,
                             repeats=args.repeats)
    assert all(len(o) == args.new_tokens for o in outs["greedy"] + outs["beam"])  # no eos: full length
    cap = {k: args.images / t for k, t in times.items()}
    beam_cost = times["beam"] / times["greedy"]
    print(f"captioning, {args.new_tokens} new tokens, no eos: greedy {cap['greedy']:.2f} images/s, "
          f"beam {args.beams} {cap['beam']:.2f} images/s; beam / greedy time: {beam_cost:.2f}x")

    # -- classification: the cached prompt against whole sequences
    scores = {}

    def rank(name, use_cache):
        def run():
            got = continuation_logprobs(model, class_prompts, [names] * args.images, use_cache=use_cache,
                                        batch_size=args.batch_size)
            scores[name] = [[s / k for s, k in row] for row in got]  # length-normalised
        return run

    times = time_interleaved({"uncached": rank("uncached", False), "cached": rank("cached", True)}, device,
                             repeats=args.repeats)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    same = all(same_ranking(a, b, tol) for a, b in zip(scores["cached"], scores["uncached"], strict=True))
    assert same, "the cached and uncached rankings differ"
    top1 = sum(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
               for a, b in zip(scores["cached"], scores["uncached"], strict=True))
    cls = {k: args.images / t for k, t in times.items()}
    speedup = times["uncached"] / times["cached"]
    print(f"ranking {args.classes} names (1-4 tokens), {args.batch_size} rows per pass: uncached "
          f"{cls['uncached']:.2f} images/s, cached {cls['cached']:.2f} images/s; cached / uncached: "
          f"{speedup:.2f}x; same ranking: yes (top-1 equal for {top1}/{args.images})")
    return {"captioning": cap, "beam_cost": beam_cost, "ranking": cls, "speedup": speedup,
            "same_ranking": same}


if __name__ == "__main__":
    main()
