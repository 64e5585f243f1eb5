"""Benchmark of bpe.py: trainers and encoders measured side by side in one run.

    python tests/bench/bench_bpe.py [--input FILE] [--quick]

Corpus: ../shared/data/tinyshakespeare.txt when it exists (1.1 MB), else --input,
else a generated corpus of the same size. --quick trains the naive trainer for
fewer merges (the speedup is then measured on those merges only).
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bpe  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "tinyshakespeare.txt")


def generated_corpus(n_bytes, seed=0):
    """Pseudo-English of about n_bytes, for machines without the real file."""
    rng = random.Random(seed)
    syllables = ["the", "an", "er", "in", "on", "at", "es", "or", "ti", "ng", "st", "re", "ha", "ou", "is"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    out, size = [], 0
    while size < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + rng.choice(".,;!?") + "\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def best_of(n, fn):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=None)
    parser.add_argument("--quick", action="store_true", help="naive trainer for 32 merges only")
    args = parser.parse_args()
    if args.input:
        name, text = args.input, bpe.read_text_file(args.input)
    elif os.path.exists(SHARED):
        name, text = "tinyshakespeare.txt", bpe.read_text_file(SHARED)
    else:
        name, text = "generated corpus", generated_corpus(1_115_394)
    n_bytes = len(text.encode("utf-8"))
    print(f"corpus: {name}, {n_bytes:,} bytes; pattern gpt4; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cpus\n")

    rows = []
    merges_512 = 512 - bpe.min_vocab_size()
    naive_merges = 32 if args.quick else merges_512
    print(f"naive trainer, {naive_merges} merges (slow, about a minute per hundred merges)...", flush=True)
    t_naive, m_naive = best_of(1, lambda: bpe.train_naive(text, naive_merges))
    t_fast_same, m_fast_same = best_of(3, lambda: bpe.train_fast(text, naive_merges))
    rows.append((f"train naive, {naive_merges} merges (vocab {naive_merges + 261})", f"{t_naive:.2f} s", ""))
    rows.append((f"train fast, {naive_merges} merges (vocab {naive_merges + 261})", f"{t_fast_same:.3f} s", ""))
    rows.append(("  fast vs naive speedup", f"{t_naive / t_fast_same:.0f}x", ">= 100x"))
    rows.append(("  merges identical", str(m_naive == m_fast_same), "True"))
    t_4096, m_4096 = best_of(3, lambda: bpe.train_fast(text, 4096 - bpe.min_vocab_size()))
    rows.append(("train fast, vocab 4096", f"{t_4096:.2f} s", "<= 5 s"))

    tok = bpe.Tokenizer(m_4096, "gpt4")
    bare = tok.to_tiktoken()
    tok.encode("warm up")
    bare.encode_ordinary("warm up")
    t_ours, ids_ours = best_of(5, lambda: tok.encode(text))
    t_bare, ids_bare = best_of(5, lambda: bare.encode_ordinary(text))
    t_ref, ids_ref = best_of(1, lambda: tok.encode_reference(text))
    rows.append(("encode, Tokenizer.encode (tiktoken path)", f"{n_bytes / t_ours / 1e6:.1f} MB/s", ">= 10 MB/s"))
    rows.append(("encode, bare tiktoken.Encoding", f"{n_bytes / t_bare / 1e6:.1f} MB/s", ""))
    rows.append(("  ours / bare", f"{t_bare / t_ours:.2f}", ">= 0.90"))
    rows.append(("encode, encode_reference (pure Python)", f"{n_bytes / t_ref / 1e6:.2f} MB/s", ""))
    rows.append(("  ids identical (ours, bare, reference)", str(ids_ours == ids_bare == ids_ref), "True"))
    rows.append(("  round trip decode(encode(text)) == text", str(tok.decode(ids_ours) == text), "True"))
    rows.append(("  bytes per token, vocab 4096", f"{n_bytes / len(ids_ours):.2f}", ""))

    width = max(len(r[0]) for r in rows)
    print(f"\n| {'measure'.ljust(width)} | {'figure':>12} | {'target':>10} |")
    print(f"|{'-' * (width + 2)}|{'-' * 14}|{'-' * 12}|")
    for what, figure, target in rows:
        print(f"| {what.ljust(width)} | {figure:>12} | {target:>10} |")


if __name__ == "__main__":
    main()
