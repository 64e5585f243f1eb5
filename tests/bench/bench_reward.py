"""Benchmark of a reward-model training step: a row per sequence (collate) vs a row
per prompt with its responses branching off it (collate_shared, the default).

    python tests/bench/bench_reward.py [--dataset tinyworld] [--oversample arithmetic:8] [--steps 60]

Model: the `small` preset of train.py with random weights (speed does not depend
on them) and the dataset's tokenizer; batches: reward.py's own (32 pairs,
sort_window 16) of the dataset's prefs_train.jsonl, built offline if missing.
Each step is forward, pairwise loss + LM loss and backward (no update, so both
ways see the same weights), the two ways timed alternately on the same batches.
Both give the same loss (checked).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bpe  # noqa: E402
import prepare_data  # noqa: E402
import reward  # noqa: E402
import train  # noqa: E402
from model import GPTConfig, ScalarHeadModel  # noqa: E402


def step_loss(model, groups, share_prefix):
    """reward.py's training loss, with the small preset's lm_coef 1."""
    return reward.training_losses(model, groups, share_prefix, lm_coef=1.0)[0]


def batch_tokens(groups, share_prefix):
    """Tokens of the padded batch, padding included."""
    return (reward.collate_shared(groups) if share_prefix else reward.collate(groups))[0].numel()


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
    groups = reward.load_preferences(train_path, tokenizer, config.block_size)
    if args.oversample:
        groups, _ = reward.oversample_groups(groups, prepare_data.read_jsonl(train_path),
                                             reward.parse_oversample(args.oversample))
    batches = reward.pair_batches(groups, 32, 1337, 0, 16)[:args.steps + 10]
    torch.manual_seed(0)
    model = ScalarHeadModel(config)

    first = [groups[g] for g in batches[0]]
    worst = abs(step_loss(model, first, False).item() - step_loss(model, first, True).item())
    seconds, tokens = {False: 0.0, True: 0.0}, {False: 0, True: 0}
    for step, batch in enumerate(batches):
        batch_groups = [groups[g] for g in batch]
        for shared in ((False, True) if step % 2 else (True, False)):
            t0 = time.perf_counter()
            step_loss(model, batch_groups, shared).backward()
            model.zero_grad(set_to_none=True)
            if step >= 10:
                seconds[shared] += time.perf_counter() - t0
                tokens[shared] += batch_tokens(batch_groups, shared)  # counted outside the timing
    n_pairs = sum(len(groups[g]["pairs"]) for batch in batches[10:] for g in batch)
    print(f"model: small preset ({config.n_layer} layers, {config.n_embd} wide, vocab {config.vocab_size}), "
          f"{args.dataset}{' ' + args.oversample if args.oversample else ''}, {len(batches) - 10} steps of "
          f"32 pairs, {torch.get_num_threads()} threads, cpu\n")
    print(f"| {'training step':33s} | {'ms/step':>8s} | {'pairs/s':>8s} | {'tokens/step':>12s} |")
    print(f"|{'-' * 35}|{'-' * 10}|{'-' * 10}|{'-' * 14}|")
    steps = len(batches) - 10
    for name, shared in (("a row per sequence (collate)", False), ("a row per prompt (collate_shared)", True)):
        print(f"| {name:33s} | {1000 * seconds[shared] / steps:8.1f} | {n_pairs / seconds[shared]:8.0f} | "
              f"{tokens[shared] / steps:12.0f} |")
    print(f"\nspeedup of collate_shared: {seconds[False] / seconds[True]:.2f}x; "
          f"loss difference on the first batch {worst:.1e} (the same model either way)")


if __name__ == "__main__":
    main()
