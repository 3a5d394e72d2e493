"""Decoder forward + backward: the SDPA attention path against torchscale's stock path, same weights,
same run.

    python bench/attention.py                                   # CPU default: 4 layers, dim 512, batch 1
    python bench/attention.py --device cuda --dtype bf16 --config configs/kosmos1.yaml --layers 4

For each length: median time of forward + backward of the decoder layers (no embeddings, no output
projection), and the peak memory of tensors allocated during one step (CUDA: max_memory_allocated;
CPU: live tensor storages counted by bench._perf.PeakMemory). Ratios are stock / sdpa: above 1 means the
SDPA path is faster or smaller.

`sdpa+docmask` is the sdpa path with document masking (`decoder.document_mask`: a row of documents of
`--doc-len` tokens, a block-diagonal boolean mask and per-document xPos positions); a last line per
length gives its cost against plain sdpa. On GPU the boolean mask rules out the flash kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._perf import fmt_bytes, peak_memory, time_interleaved  # noqa: E402
from kosmos.config import DecoderConfig, load_config  # noqa: E402
from kosmos.decoder import build_decoder  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_common_args(ap: argparse.ArgumentParser, cpu_layers: int = 4, cpu_dim: int = 512) -> None:
    ap.add_argument("--config", help="YAML config whose decoder is measured (default: a small CPU decoder)")
    ap.add_argument("--layers", type=int, help=f"decoder layers (default {cpu_layers} without --config)")
    ap.add_argument("--dim", type=int, help=f"decoder width (default {cpu_dim} without --config; "
                                             "heads = dim / 64, ffn = 4 * dim)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--compile", action="store_true", help="also measure sdpa with decoder.compile=true")
    ap.add_argument("--doc-len", type=int, default=256,
                    help="document length in the document-masked rows (sdpa+docmask)")


def decoder_overrides(args, small_vocab: int = 1024, cpu_layers: int = 4, cpu_dim: int = 512) -> list[str]:
    """Dotted overrides giving the decoder to measure: --layers/--dim over the --config's decoder, or without
    --config a small CPU decoder (cpu_layers, cpu_dim, small_vocab). Dropout off: both paths do the same
    work."""
    out = ["decoder.dropout=0.0", "decoder.attention_dropout=0.0"]
    layers = args.layers or (None if args.config else cpu_layers)
    dim = args.dim or (None if args.config else cpu_dim)
    if layers:
        out.append(f"decoder.layers={layers}")
    if dim:
        out += [f"decoder.dim={dim}", f"decoder.heads={max(1, dim // 64)}", f"decoder.ffn_dim={4 * dim}"]
    if not args.config:
        out.append(f"decoder.vocab_size={small_vocab}")
    out.append(f"decoder.max_len={max(args.lengths)}")
    return out


def resolve_dtype(args) -> torch.dtype:
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32


def describe(d: DecoderConfig) -> str:
    return (f"decoder {d.layers} layers, dim {d.dim}, {d.heads} heads of {d.head_dim}, ffn {d.ffn_dim}, "
            f"vocab {d.vocab_size}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    args = ap.parse_args(argv)
    dtype, device = resolve_dtype(args), torch.device(args.device)
    base = load_config(args.config, decoder_overrides(args))
    variants = ["torchscale", "sdpa"] + (["sdpa+compile"] if args.compile else []) + ["sdpa+docmask"]

    decoders = {}
    for name in variants:
        d = load_config(args.config, decoder_overrides(args) + [
            f"decoder.attention={name.split('+')[0]}", f"decoder.compile={'compile' in name}",
            f"decoder.document_mask={'docmask' in name}"]).decoder
        torch.manual_seed(0)
        dec = build_decoder(d, torch.nn.Embedding(d.vocab_size, d.dim))
        dec.to(device=device, dtype=dtype).train()
        if decoders:  # the same weights in every variant
            dec.load_state_dict(next(iter(decoders.values())).state_dict())
        decoders[name] = dec

    print(f"# bench/attention.py: {describe(base.decoder)}; batch {args.batch}; {device} {dtype}; "
          f"forward+backward of the decoder layers, median of {args.repeats}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("# ratios are torchscale / sdpa (higher is better for sdpa)")
    header = f"{'length':>6} {'path':>13} {'time (s)':>9} {'peak mem':>11} {'speedup':>8} {'mem ratio':>9}"
    print(header)
    results = {}
    for L in args.lengths:
        g = torch.Generator().manual_seed(L)
        x = torch.randn(args.batch, L, base.decoder.dim, generator=g).to(device=device, dtype=dtype)
        x.requires_grad_(True)
        # documents of --doc-len tokens one after another, as the packer numbers them (1, 2, ...)
        doc_ids = (torch.arange(L, device=device) // args.doc_len + 1).expand(args.batch, L)
        steps = {}
        for name, dec in decoders.items():
            def step(dec=dec, docs=doc_ids if "docmask" in name else None, x=x):
                for p in dec.parameters():
                    p.grad = None
                x.grad = None
                out = dec(x, features_only=True, doc_ids=docs)  # (B, L, D)
                out.float().square().mean().backward()

            steps[name] = step
        times = time_interleaved(steps, device, repeats=args.repeats)
        row = {name: (times[name], peak_memory(step, device)) for name, step in steps.items()}
        t0, m0 = row["torchscale"]
        for name, (t, mem) in row.items():
            print(f"{L:>6} {name:>13} {t:>9.3f} {fmt_bytes(mem):>11} {t0 / t:>7.2f}x {m0 / mem:>8.2f}x",
                  flush=True)
        (ts, ms), (td, md) = row["sdpa"], row["sdpa+docmask"]
        print(f"# {L}: document mask ({args.doc_len}-token documents) costs {td / ts:.2f}x the time and "
              f"{md / ms:.2f}x the memory of plain sdpa", flush=True)
        results[L] = row
    return results


if __name__ == "__main__":
    main()
