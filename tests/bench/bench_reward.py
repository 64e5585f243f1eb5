"""Benchmark of a reward-model training step: a row per sequence (written out here, the
layout reward.py does not use) vs a row per pair, its responses branching off the
shared prefix (reward.collate_shared, what reward.py trains on), and the packed step
in float32 vs bf16 autocast.

    python tests/bench/bench_reward.py [--dataset tinyworld] [--oversample arithmetic:8] [--steps 60]

Model: the `small` preset of train.py with random weights (speed does not depend
on them) and the dataset's tokenizer; batches of 32 pairs of the dataset's
prefs_train.jsonl (built offline if missing), sorted by length within windows of
reward.SORT_WINDOW batches (reward.pair_batches): by the longest sequence for the
first two ways (the same batches), by the packed row for the third (what reward.py
does). The last two ways repeat the third under bf16 autocast: with attention in
float32 (model.CausalSelfAttention.float32_on_cpu, what the stages do on a CPU)
and with attention in bf16 too (the flag off). Each step is forward, pairwise loss
+ LM loss and backward (no update, so every way sees the same weights), the five
ways timed in turn, step by step. The first two give the same loss on the same
batch (checked).
"""

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bpe  # noqa: E402
import prepare_data  # noqa: E402
import reward  # noqa: E402
import train  # noqa: E402
from model import CausalSelfAttention, GPTConfig  # noqa: E402
from reward import ScalarHeadModel  # noqa: E402


def row_per_sequence_loss(model, pairs):
    """The training loss (lm_coef 1, the small preset's) with every sequence its own right-padded row."""
    ids, lengths = reward.pad_right([s for p in pairs for s in (p["chosen"], p["rejected"])])
    hidden = model.gpt.hidden_states(ids)                                  # (2P, T, C)
    rewards = reward.read_last(model(ids, hidden), lengths)                # (2P,): chosen, rejected, ...
    return (reward.pairwise_loss(rewards[0::2], rewards[1::2])
            + reward.chosen_lm_loss(model, hidden[0::2], ids[0::2], lengths[0::2]))


def step_loss(model, pairs, packed):
    return reward.training_losses(model, pairs, lm_coef=1.0)[0] if packed else row_per_sequence_loss(model, pairs)


def batch_tokens(pairs, packed):
    """Tokens of the padded batch, padding included."""
    if packed:
        return reward.collate_shared(pairs)[0].numel()
    return 2 * len(pairs) * max(len(s) for p in pairs for s in (p["chosen"], p["rejected"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="tinyworld")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--oversample", default="", help="as reward.py's --oversample, e.g. arithmetic:8")
    parser.add_argument("--steps", type=int, default=60, help="timed steps each way (after 10 warm-up steps)")
    args = parser.parse_args()
    folder = prepare_data.ensure_prepared(args.dataset, args.data_dir)
    tokenizer = bpe.Tokenizer.load(os.path.join(folder, "tokenizer.json"))
    preset = dict(train.DEFAULTS, **train.PRESETS["small"])
    config = GPTConfig(vocab_size=tokenizer.vocab_size, **{k: preset[k] for k in train.MODEL_KEYS})
    train_path = os.path.join(folder, "prefs_train.jsonl")
    pairs = reward.load_preferences(train_path, tokenizer, config.block_size)
    if args.oversample:
        pairs, _ = reward.oversample_pairs(pairs, prepare_data.read_jsonl(train_path),
                                           reward.parse_oversample(args.oversample))
    longest = [max(len(p["chosen"]), len(p["rejected"])) for p in pairs]
    by_sequence = reward.pair_batches(longest, 32, 1337, 0)[:args.steps + 10]
    rows = [len(reward.pack_pair(p["chosen"], p["rejected"])[0]) for p in pairs]
    by_row = reward.pair_batches(rows, 32, 1337, 0)[:args.steps + 10]
    torch.manual_seed(0)
    model = ScalarHeadModel(config)

    first = [pairs[i] for i in by_sequence[0]]
    worst = abs(step_loss(model, first, False).item() - step_loss(model, first, True).item())
    # (name, packed, batches, dtype, attention in float32): the first two see the same
    # batches, the others reward.py's own
    ways = [("a row per sequence", False, by_sequence, None, True),
            ("a row per pair (collate_shared)", True, by_sequence, None, True),
            ("the same, batches sorted by row", True, by_row, None, True),
            ("the same, bf16, attention in fp32", True, by_row, torch.bfloat16, True),
            ("the same, bf16, attention in bf16", True, by_row, torch.bfloat16, False)]
    n = len(ways)
    seconds, tokens, n_pairs = [0.0] * n, [0] * n, [0] * n
    for step in range(len(by_sequence)):
        for k in [(step + j) % n for j in range(n)]:  # the order rotates: no way always runs first
            name, packed, batches, dtype, float32_attention = ways[k]
            batch = [pairs[i] for i in batches[step]]
            CausalSelfAttention.float32_on_cpu = float32_attention
            autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
            t0 = time.perf_counter()
            with autocast:
                loss = step_loss(model, batch, packed)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if step >= 10:
                seconds[k] += time.perf_counter() - t0
                tokens[k] += batch_tokens(batch, packed)  # counted outside the timing
                n_pairs[k] += len(batch)
    steps = len(by_sequence) - 10
    print(f"model: small preset ({config.n_layer} layers, {config.n_embd} wide, vocab {config.vocab_size}), "
          f"{args.dataset}{' ' + args.oversample if args.oversample else ''}, {steps} steps of "
          f"32 pairs, {torch.get_num_threads()} threads, cpu\n")
    print(f"| {'training step':33s} | {'ms/step':>8s} | {'pairs/s':>8s} | {'tokens/step':>12s} |")
    print(f"|{'-' * 35}|{'-' * 10}|{'-' * 10}|{'-' * 14}|")
    CausalSelfAttention.float32_on_cpu = True
    for k, (name, *_) in enumerate(ways):
        print(f"| {name:33s} | {1000 * seconds[k] / steps:8.1f} | {n_pairs[k] / seconds[k]:8.0f} | "
              f"{tokens[k] / steps:12.0f} |")
    print(f"\nspeedup of collate_shared: {seconds[0] / seconds[1]:.2f}x on the same batches, "
          f"{n_pairs[2] / seconds[2] / (n_pairs[0] / seconds[0]):.2f}x in pairs/s with batches sorted by row; "
          f"loss difference on the first batch {worst:.1e} (the same model either way)")
    print(f"bf16 autocast on the sorted batches: {seconds[2] / seconds[3]:.2f}x faster than float32 with "
          f"attention in float32, {seconds[2] / seconds[4]:.2f}x with attention in bf16 too")


if __name__ == "__main__":
    main()
