"""Benchmark of generation: KV cache vs recomputing the whole context each step.

    python tests/bench/bench_sample.py [--new-tokens 512] [--block-size 1024]

Model: the `small` preset of train.py (random weights: speed does not depend on
them), batch 1, greedy, on this machine's CPU (or a GPU with --device cuda).
Both paths produce the same tokens (checked) and are timed side by side.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def timed_generate(model, prompt, new_tokens, use_cache, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
        if prompt.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    preset = dict(train.DEFAULTS, **train.PRESETS["small"])
    config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size,
                       **{k: preset[k] for k in train.MODEL_KEYS if k != "block_size"})
    torch.manual_seed(0)
    model = GPT(config).to(args.device).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long, device=args.device)
    model.generate(prompt, 8)  # warm up
    print(f"model: {model.num_params() / 1e6:.2f}M parameters ({config.n_layer} layers, {config.n_embd} wide), "
          f"block {config.block_size}, {args.new_tokens} new tokens, batch 1, {args.device}, "
          f"{torch.get_num_threads()} threads\n")
    t_cache, out_cache = timed_generate(model, prompt, args.new_tokens, True, args.repeats)
    t_full, out_full = timed_generate(model, prompt, args.new_tokens, False, args.repeats)
    rows = [
        ("KV cache", f"{t_cache:.2f} s", f"{args.new_tokens / t_cache:,.0f}"),
        ("recompute the context every step", f"{t_full:.2f} s", f"{args.new_tokens / t_full:,.0f}"),
        ("speedup of the KV cache", f"{t_full / t_cache:.1f}x", "target >= 5x"),
        ("same tokens", str(torch.equal(out_cache, out_full)), ""),
    ]
    print(f"| {'generation':34s} | {'time':>8s} | {'tokens/s':>12s} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 14}|")
    for name, t, rate in rows:
        print(f"| {name:34s} | {t:>8s} | {rate:>12s} |")


if __name__ == "__main__":
    main()
