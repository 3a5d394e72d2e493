"""Benchmark the tokenizer against plain SentencePiece, measured in the same run.

    python bench/tokenizer.py

Prints
- encode / decode throughput (MB/s of text) of KosmosTokenizer and of the bare
  SentencePieceProcessor it wraps, on the same documents, and the wrapper's overhead as a ratio;
- training time per MB of corpus for ``build_tokenizer`` (read + sample + train + write) and for
  bare ``SentencePieceTrainer.train`` on the same lines, unigram and BPE;
- reading a corpus that is one long line (LONG_LINE_MB, no newline) into the sample: MB/s and the peak
  memory Python allocated while reading, which stays near READ_PIECE whatever the line's length (issue 22:
  a 280 MB line did not finish in 600 s at 1.4 GB; now ~2 s).

The corpus is the shipped tiny corpus plus generated captions and sentences (no network). Runs in
well under a minute on a 2-core CPU.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kosmos.tokenizer import TINY_CORPUS  # noqa: E402
from kosmos.tokenizer.build import build_tokenizer, sample_lines, train_sentencepiece  # noqa: E402

VOCAB_SIZE = 1000
TRAIN_MB = 2.0  # size of the generated training corpus
LONG_LINE_MB = 64  # the corpus that is one line
REPEATS = 5


def best_of(fn, repeats: int = REPEATS) -> float:
    """Fastest of ``repeats`` timed calls, in seconds (the least disturbed by a noisy machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """The tiny corpus followed by generated captions and sentences, ``megabytes`` in all."""
    sys.path.insert(0, str(TINY_CORPUS.parent))
    import make_tiny_corpus as gen

    rng = random.Random(seed)
    target = int(megabytes * 1e6)
    with open(path, "w", encoding="utf-8") as f:
        size = f.write(TINY_CORPUS.read_text(encoding="utf-8"))
        while size < target:
            line = gen.caption(rng) if rng.random() < 0.5 else gen.sentence(rng)
            size += f.write(line + "\n")


def bench_encode(tok, docs: list[str]) -> None:
    sp = tok._sp  # the bare SentencePieceProcessor: the baseline
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    ids = [tok.encode(d) for d in docs]
    n_tokens = sum(map(len, ids))
    rows = [
        ("encode, one doc per call",
         lambda: [sp.encode(d) for d in docs], lambda: [tok.encode(d) for d in docs]),
        ("encode, one doc per call, bos+eos",
         lambda: [sp.encode(d, add_bos=True, add_eos=True) for d in docs],
         lambda: [tok.encode(d, bos=True, eos=True) for d in docs]),
        ("encode_batch (all threads)",
         lambda: sp.encode(docs, num_threads=-1), lambda: tok.encode_batch(docs)),
        ("decode, one doc per call",
         lambda: [sp.decode(i) for i in ids], lambda: [tok.decode(i) for i in ids]),
    ]
    print(f"encode/decode: {len(docs)} documents, {mb:.2f} MB, {n_tokens} tokens "
          f"({n_tokens / len(docs):.0f} per document), best of {REPEATS}")
    print(f"  {'':36s} {'sentencepiece':>14s} {'KosmosTokenizer':>16s} {'overhead':>9s}")
    for name, base, ours in rows:
        t_base, t_ours = best_of(base), best_of(ours)
        print(f"  {name:36s} {mb / t_base:10.1f} MB/s {mb / t_ours:12.1f} MB/s {t_ours / t_base:8.2f}x")


def bench_training(tmp: Path) -> None:
    corpus = tmp / "corpus.txt"
    make_corpus(corpus, TRAIN_MB)
    mb = corpus.stat().st_size / 1e6
    lines = corpus.read_text(encoding="utf-8").splitlines()
    print(f"training: {mb:.2f} MB corpus, {len(lines)} lines, vocab {VOCAB_SIZE}, one run each")
    print(f"  {'':10s} {'sentencepiece':>16s} {'build_tokenizer':>17s} {'overhead':>9s}")
    for model_type in ("unigram", "bpe"):
        start = time.perf_counter()
        train_sentencepiece(lines, VOCAB_SIZE, model_type=model_type)
        t_base = time.perf_counter() - start
        start = time.perf_counter()
        build_tokenizer([corpus], tmp / model_type, VOCAB_SIZE, model_type=model_type, quiet=True)
        t_ours = time.perf_counter() - start
        print(f"  {model_type:10s} {t_base / mb:11.2f} s/MB {t_ours / mb:12.2f} s/MB {t_ours / t_base:8.2f}x")


def bench_long_line(tmp: Path) -> None:
    import tracemalloc

    corpus = tmp / "one-line.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(LONG_LINE_MB):
            f.write("word " * 200_000)  # 1 MB
    tracemalloc.start()
    start = time.perf_counter()
    _, stats = sample_lines([corpus], 1000, quiet=True)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"one long line: {LONG_LINE_MB} MB in {seconds:.2f} s ({LONG_LINE_MB / seconds:.0f} MB/s, under "
          f"tracemalloc), {stats[0].lines} chunks, peak {peak / 1e6:.1f} MB allocated while reading")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_tokenizer([TINY_CORPUS], tmp / "tiny", VOCAB_SIZE, character_coverage=0.995, quiet=True)
        lines = TINY_CORPUS.read_text(encoding="utf-8").splitlines()
        docs = ["\n".join(lines[i : i + 20]) for i in range(0, len(lines), 20)]
        bench_encode(tok, docs)
        bench_training(tmp)
        bench_long_line(tmp)


if __name__ == "__main__":
    main()
