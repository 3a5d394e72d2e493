"""kosmos-serve's throughput: requests/s and tokens/s with 1, 4 and 16 concurrent clients, against one
request at a time, and 16 clients with batching off (--max-batch 1).

    python -m bench.serve                                  # CPU default: tiny vision, 4-layer dim-512 decoder
    python -m bench.serve --checkpoint demo_out/run --requests 64 --max-tokens 32

The server runs in this process (`kosmos.serve.Background`, loopback, a free port) and the clients are
threads using the official `openai` package, each sending greedy `/v1/completions` requests (different
prompts, --max-tokens each) until --requests are answered. tokens/s counts the tokens the answers hold
(usage.completion_tokens). Prints one line per setting and its ratio to one request at a time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WORDS = "a red blue green small large circle square triangle on the left right top bottom of image".split()


def load(args):
    """(model, encoder, description) from --checkpoint, or a random model with the tiny tokenizer."""
    from kosmos.generate import load_for_inference
    from kosmos.sequence import SequenceEncoder

    if args.checkpoint:
        model, enc = load_for_inference(args.checkpoint, device=args.device)
        return model, enc, args.checkpoint
    from bench.attention import decoder_overrides
    from kosmos.config import load_config
    from kosmos.model import Kosmos
    from kosmos.tokenizer import TINY_CORPUS
    from kosmos.tokenizer.build import build_tokenizer

    tok = build_tokenizer([TINY_CORPUS], Path(tempfile.mkdtemp()) / "tok", 1000, character_coverage=0.995,
                          quiet=True)
    shape = SimpleNamespace(layers=args.layers, dim=args.dim, config=None, lengths=[256])
    cfg = load_config(ROOT / "configs" / "tiny.yaml", decoder_overrides(shape))
    torch.manual_seed(0)
    model = Kosmos(cfg).to(args.device).eval()
    d = cfg.decoder
    return model, SequenceEncoder.from_config(cfg, tokenizer=tok), \
        f"random weights, decoder {d.layers} layers dim {d.dim}"


def run(url: str, clients: int, requests: int, max_tokens: int) -> tuple[float, int, int]:
    """(seconds, requests answered, tokens generated) with `clients` threads sharing `requests`."""
    import openai

    left = iter(range(requests))
    lock = threading.Lock()
    tokens = [0]
    done = [0]

    def client() -> None:
        api = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        while True:
            with lock:
                i = next(left, None)
            if i is None:
                return
            prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 + i % 7))
            out = api.completions.create(prompt=prompt, max_tokens=max_tokens, temperature=0, model="bench")
            with lock:
                tokens[0] += out.usage.completion_tokens
                done[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, done[0], tokens[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a checkpoint or run directory (default: a random model)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the random model")
    ap.add_argument("--dim", type=int, default=512, help="decoder width of the random model")
    ap.add_argument("--requests", type=int, default=32, help="requests per setting")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    from kosmos.serve import Background, Limits, create_app

    model, enc, what = load(args)
    print(f"# bench/serve.py: {what}; {args.requests} greedy /v1/completions requests of up to "
          f"{args.max_tokens} tokens per setting; torch threads {torch.get_num_threads()}")
    settings = [("one at a time", 1, 16)] + [(f"{c} clients", c, 16) for c in args.clients] + \
        [(f"{max(args.clients)} clients, no batching", max(args.clients), 1)]
    results, base = {}, None
    for label, clients, max_batch in settings:
        wait = 0 if label == "one at a time" else args.batch_wait_ms
        limits = Limits(max_batch=max_batch, batch_wait_ms=wait)
        with Background(create_app(model, enc, "bench", limits)) as server:
            run(server.url, 1, 2, 4)  # warm up
            seconds, n, tokens = run(server.url, clients, args.requests, args.max_tokens)
            stats = server.server.config.app.state.engine.stats()
        rps, tps = n / seconds, tokens / seconds
        base = base or (rps, tps)
        results[label] = {"requests_per_s": rps, "tokens_per_s": tps, "seconds": seconds,
                          "largest_batch": stats["largest_batch"]}
        print(f"{label:28s} {rps:7.2f} requests/s {tps:9.1f} tokens/s  x{tps / base[1]:5.2f}   "
              f"({n} requests, {tokens} tokens in {seconds:.2f} s; largest batch {stats['largest_batch']})",
              flush=True)
    return results


if __name__ == "__main__":
    main()
