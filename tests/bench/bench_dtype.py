"""Benchmark of training precision on this CPU: one training step of the `small`
pretraining model (forward, backward, AdamW) in float32 and in bf16 autocast,
side by side in one run, and what `dtype="auto"` chooses here and what choosing
cost.

    python tests/bench/bench_dtype.py [--steps 3] [--rounds 2]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python tests/bench/bench_dtype.py

The second line makes a CPU with AVX-512 (and native bf16) run torch's and
oneDNN's AVX2 kernels, as a laptop without native bf16 would. bf16 autocast is
timed twice: with attention in float32 (what model.CausalSelfAttention does
under CPU autocast) and with attention in bf16, so that the table shows whether
that trick still pays on this kind of CPU.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train  # noqa: E402
from model import CausalSelfAttention, GPT, GPTConfig
from train import autocast_context, clip_gradients, configure_optimizer


def cpu_description():
    """What decides bf16 speed on a CPU: torch's kernel level, the native bf16 flags."""
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    native = sorted(flags & {"avx512_bf16", "amx_bf16"}) or ["none"]
    forced = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    return (f"torch {torch.__version__}, kernels {torch.backends.cpu.get_cpu_capability()}, native bf16 flags: "
            f"{', '.join(native)}; {torch.get_num_threads()} threads"
            + (f"; forced: {', '.join(f'{k}={v}' for k, v in forced.items())}" if forced else ""))


def step_seconds(model, optimizer, batch, dtype, float32_attention):
    """One whole training step as train.py takes it, timed."""
    CausalSelfAttention.float32_on_cpu = float32_attention
    start = time.perf_counter()
    loss = train.forward_backward(model, [batch], autocast_context("cpu", dtype))
    clip_gradients(model, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small")
    parser.add_argument("--dataset", default="tinyworld")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per way and round, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of all ways")
    args = parser.parse_args()
    config = dict(train.DEFAULTS, **train.PRESETS[args.config], config=args.config, dataset=args.dataset,
                  data_dir=args.data_dir)
    data, tokenizer, _ = train.load_dataset(config)
    torch.manual_seed(config["seed"])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **{k: config[k] for k in train.MODEL_KEYS}))
    optimizer = configure_optimizer(model, config["learning_rate"], config["weight_decay"], (0.9, 0.95), "cpu")
    batch = train.get_batch(data["train"], config["block_size"], config["batch_size"], torch.Generator().manual_seed(0))
    print(f"{cpu_description()}\npreset {args.config}: {model.num_params() / 1e6:.2f}M parameters, batch "
          f"{config['batch_size']} x {config['block_size']}, eager; median of {args.steps} steps after a warm-up, "
          f"{args.rounds} rounds\n")

    # what auto chooses, and what choosing costs (train.py measures on 4 windows before its first step)
    probe = train.get_batch(data["train"], config["block_size"], 4, torch.Generator().manual_seed(0))
    start = time.perf_counter()
    choice, why = train.resolve_dtype("auto", "cpu", lambda c: train.forward_backward(model, [probe], c))
    choose_seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)

    ways = [("float32", "float32", True), ("bf16 autocast, attention in float32", "bfloat16", True),
            ("bf16 autocast, attention in bf16", "bfloat16", False)]
    times = {name: [] for name, _, _ in ways}
    for _ in range(args.rounds):  # alternate, so that a drifting machine affects every way alike
        for name, dtype, float32_attention in ways:
            step_seconds(model, optimizer, batch, dtype, float32_attention)
            times[name] += [step_seconds(model, optimizer, batch, dtype, float32_attention)
                            for _ in range(args.steps)]
    CausalSelfAttention.float32_on_cpu = True

    tokens = batch[0].numel()
    base = statistics.median(times["float32"])
    print(f"| {'precision':38s} | {'ms/step':>8s} | {'tokens/s':>9s} | {'vs float32':>10s} |")
    print(f"|{'-' * 40}|{'-' * 10}|{'-' * 11}|{'-' * 12}|")
    for name, _, _ in ways:
        t = statistics.median(times[name])
        print(f"| {name:38s} | {1000 * t:8.1f} | {tokens / t:9,.0f} | {base / t:9.2f}x |")
    print(f"\nauto chose {choice} ({why}); choosing took {choose_seconds:.2f} s")


if __name__ == "__main__":
    main()
