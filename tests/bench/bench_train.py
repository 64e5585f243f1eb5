"""Benchmark of pretraining throughput: train.py's loop against a plain
nanoGPT-style loop on the same model, the same data and the same batch, measured
side by side in one run.

    python tests/bench/bench_train.py [--config small] [--iters 60] [--dataset tinyworld]

The plain loop is the few lines every tutorial writes: fp32, torch.optim.AdamW
with its default implementation, loss.backward(), clip, step. train.py adds what
its preset chooses (autocast precision, fused AdamW, compile).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train  # noqa: E402
from model import GPT, GPTConfig
from train import read_jsonl_log


def plain_loop_tokens_per_s(config, data, vocab_size, iters, warmup):
    """The reference: a plain fp32 training loop, timed per iteration."""
    torch.manual_seed(config["seed"])
    model = GPT(GPTConfig(vocab_size=vocab_size, **{k: config[k] for k in train.MODEL_KEYS}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], betas=(0.9, 0.95),
                                  weight_decay=config["weight_decay"])
    gen = torch.Generator().manual_seed(0)
    rates = []
    for it in range(warmup + iters):
        t0 = time.perf_counter()
        x, y = train.get_batch(data["train"], config["block_size"], config["batch_size"], gen)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        if it >= warmup:
            rates.append(x.numel() / (time.perf_counter() - t0))
    return statistics.median(rates)


def train_py_tokens_per_s(config, iters, warmup, out_dir):
    """train.run itself, logging every iteration; the median rate after warm-up."""
    run_config = dict(config, max_iters=warmup + iters, log_interval=1, eval_interval=10 ** 9,
                      eval_iters=1, sample_tokens=0, out_dir=out_dir)
    # an eval happens at the last iteration; it is excluded from the per-step rates
    train.run(run_config, flags={"overwrite"})
    rates = [r["tok_per_s"] for r in read_jsonl_log(os.path.join(out_dir, "log.jsonl")) if "tok_per_s" in r]
    return statistics.median(rates[warmup:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--dataset", default="tinyworld")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both loops")
    parser.add_argument("--out-dir", default="out/bench/train")
    args = parser.parse_args()
    config = dict(train.DEFAULTS, **train.PRESETS[args.config], config=args.config, dataset=args.dataset,
                  data_dir=args.data_dir)
    data, tokenizer, _ = train.load_dataset(config)
    n_params = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **{k: config[k] for k in train.MODEL_KEYS})).num_params()
    print(f"preset {args.config}: {n_params / 1e6:.2f}M parameters, batch {config['batch_size']} x "
          f"{config['block_size']}, dtype {config['dtype']}, compile {config['compile']}; dataset {args.dataset}; "
          f"{torch.get_num_threads()} threads; median of {args.iters} iterations after {args.warmup} warm-up, {args.rounds} rounds\n")
    # alternate the two loops, so that a machine that speeds up or slows down
    # during the run (shared cores, heat) affects both alike
    ours_rounds, plain_rounds = [], []
    for _ in range(args.rounds):
        plain_rounds.append(plain_loop_tokens_per_s(config, data, tokenizer.vocab_size, args.iters, args.warmup))
        ours_rounds.append(train_py_tokens_per_s(config, args.iters, args.warmup, args.out_dir))
    print("rounds (plain, train.py):", ", ".join(f"({p:,.0f}, {o:,.0f})" for p, o in zip(plain_rounds, ours_rounds)))
    ours, plain = statistics.median(ours_rounds), statistics.median(plain_rounds)
    print(f"\n| {'training loop':44s} | {'tokens/s':>10s} |")
    print(f"|{'-' * 46}|{'-' * 12}|")
    print(f"| {'plain nanoGPT-style loop (fp32, AdamW)':44s} | {plain:>10,.0f} |")
    label = f"train.py ({config['dtype']}, fused AdamW{', compiled' if config['compile'] else ''})"
    print(f"| {label:44s} | {ours:>10,.0f} |")
    print(f"| {'speedup (target >= 1.25x)':44s} | {ours / plain:>9.2f}x |")


if __name__ == "__main__":
    main()
