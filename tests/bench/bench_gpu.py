"""Benchmark of the `gpt2` preset's training step on a GPU: tokens/s and MFU of
the same model in several precisions and attention paths, side by side in one run.

    python tests/bench/bench_gpu.py                       # GPT-2 124M, vocab 50304
    python tests/bench/bench_gpu.py --variants bf16-compile-sdpa --steps 20

The step is train.py's own: train.forward_backward over grad_accum micro-batches,
train.clip_gradients, fused AdamW from train.configure_optimizer. Tokens are
random (throughput does not depend on what they say), so no dataset is needed.
The vocabulary defaults to GPT-2's 50257 rounded up to a multiple of 64, as in
nanoGPT: with it the model is GPT-2 small, 124M parameters. MFU counts
model.flops_per_token against the datasheet peak in model.PEAK_FLOPS; the table
also gives a bf16 matrix product measured on the same device, the ceiling that
is reachable in practice. "sdpa" is F.scaled_dot_product_attention with
is_causal=True, as in model.py; the kernels it runs on this device for the
preset's attention shape are printed first (flash attention on an H100 in bf16).
fp32 is true float32 (PyTorch's default: no TF32 matrix units).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train  # noqa: E402
from model import flops_per_token, GPT, GPTConfig, model_flops_utilization, PEAK_FLOPS
from train import autocast_context, clip_gradients, compile_or_fall_back, configure_optimizer, forward_backward

# name -> (dtype, attention, compile)
VARIANTS = {
    "fp32-eager-sdpa": ("float32", "sdpa", False),
    "bf16-eager-explicit": ("bfloat16", "explicit", False),
    "bf16-eager-sdpa": ("bfloat16", "sdpa", False),
    "bf16-compile-sdpa": ("bfloat16", "sdpa", True),
}


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_tflops(device, n=8192, repeats=10):
    """A large bf16 matrix product on random data: the practical ceiling (TFLOP/s)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def sdpa_kernels(device, shape, dtype=torch.bfloat16):
    """Names of the device kernels that one causal F.scaled_dot_product_attention
    forward and backward runs on q, k, v of `shape` (B, H, T, D)."""
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        synchronize(device)
    names = {e.name for e in prof.events() if "attention" in e.name.lower() or "flash" in e.name.lower()
             or "fmha" in e.name.lower()}
    return sorted(names)


def step_rate(model_config, dtype, do_compile, batch_size, args):
    """Median tokens/s of full optimizer steps (after warm-up), and peak memory in GiB."""
    device = args.device
    device_type = device.split(":")[0]
    torch.manual_seed(0)
    model = GPT(model_config).to(device)
    optimizer = configure_optimizer(model, 6e-4, 0.1, (0.9, 0.95), device_type)
    ctx = autocast_context(device_type, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch_size, model_config.block_size + 1)
    windows = [torch.randint(model_config.vocab_size, shape, device=device, generator=gen) for _ in range(4)]
    batches = [(w[:, :-1], w[:, 1:]) for w in windows]
    if do_compile:
        compiled = compile_or_fall_back(model, batches[0], ctx, mode=args.compile_mode or None)
        if compiled is model:
            raise RuntimeError("torch.compile failed (see the line above): no compiled figure")
        model = compiled
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens_per_step = args.grad_accum * batch_size * model_config.block_size
    rates = []
    for step in range(args.warmup + args.steps):
        micro = [batches[(step + i) % len(batches)] for i in range(args.grad_accum)]
        synchronize(device)
        t0 = time.perf_counter()
        loss = forward_backward(model, micro, ctx)
        clip_gradients(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        synchronize(device)
        if step >= args.warmup:
            rates.append(tokens_per_step / (time.perf_counter() - t0))
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device_type == "cuda" else float("nan")
    return statistics.median(rates), memory


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpt2", help="train.py preset giving the model shape")
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary size (GPT-2: 50257, padded to 50304)")
    parser.add_argument("--batch_size", default="", help="sequences per micro-step, comma-separated for several "
                        "(the preset's by default)")
    parser.add_argument("--grad_accum", type=int, default=4, help="micro-steps per optimizer step")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--compile_mode", default="", help="torch.compile mode, e.g. max-autotune-no-cudagraphs "
                        "(default: torch.compile's default)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    for name in names:
        if name not in VARIANTS:
            sys.exit(f"error: --variants: {name!r} is not one of {', '.join(VARIANTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device here; this benchmark is for a GPU machine "
                 "(--device cpu runs it on the CPU, slowly, with a small --config such as tiny)")
    if args.config not in train.PRESETS:
        sys.exit(f"error: --config {args.config!r} is not a train.py preset: one of {', '.join(train.PRESETS)}")
    config = dict(train.DEFAULTS, **train.PRESETS[args.config])
    try:
        batch_sizes = [int(b) for b in args.batch_size.split(",") if b] or [config["batch_size"]]
    except ValueError:
        sys.exit(f"error: --batch_size {args.batch_size!r}: give whole numbers separated by commas, e.g. 16,32")
    if min(batch_sizes) < 1:
        sys.exit(f"error: --batch_size {args.batch_size!r}: each must be at least 1")
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    peak = next((f for fragment, f in PEAK_FLOPS.items() if fragment in device_name), None)

    ceiling = matmul_tflops(args.device, n=8192 if args.device.startswith("cuda") else 512)
    print(f"device {device_name}, torch {torch.__version__}; datasheet bf16 peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s, measured 8192^3 bf16 matmul {ceiling:.0f} TFLOP/s")
    if args.device.startswith("cuda"):
        head_size = config["n_embd"] // config["n_head"]
        shape = (batch_sizes[0], config["n_head"], config["block_size"], head_size)
        print(f"sdpa kernels for bf16 {shape}: {'; '.join(k[:90] for k in sdpa_kernels(args.device, shape))}")
    # every variant has the same parameters (attention, precision and compile change none)
    n_params = GPT(GPTConfig(vocab_size=args.vocab, **{k: config[k] for k in train.MODEL_KEYS})).num_params()
    rows = []
    for name, batch_size in [(n, b) for b in batch_sizes for n in names]:
        dtype, attention, do_compile = VARIANTS[name]
        model_config = GPTConfig(vocab_size=args.vocab, **dict({k: config[k] for k in train.MODEL_KEYS},
                                                               attention=attention))
        flops_tok = flops_per_token(model_config, n_params)
        t0 = time.time()
        try:
            rate, memory = step_rate(model_config, dtype, do_compile, batch_size, args)
        except torch.OutOfMemoryError:
            rate, memory = float("nan"), float("nan")
        achieved = flops_tok * rate / 1e12
        mfu = model_flops_utilization(flops_tok, rate, device_name) or float("nan")
        rows.append((name, batch_size, n_params, rate, achieved, mfu, achieved / ceiling, memory))
        print(f"{name}, batch {batch_size}: {rate:,.0f} tokens/s, {achieved:.0f} TFLOP/s, MFU {100 * mfu:.1f}%, "
              f"{memory:.1f} GiB peak, {time.time() - t0:.0f} s with warm-up", flush=True)
        torch._dynamo.reset()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    print(f"\n{args.config} shape, {rows[0][2] / 1e6:.1f}M parameters (vocab {args.vocab}), micro-batch "
          f"B x {config['block_size']}, {args.grad_accum} micro-steps per step, compile mode "
          f"{args.compile_mode or 'default'}; median of "
          f"{args.steps} steps after {args.warmup}")
    print(f"| {'variant':20s} | {'B':>3s} | {'tokens/s':>10s} | {'TFLOP/s':>8s} | {'MFU':>6s} | {'of matmul':>9s} | {'memory':>8s} |")
    print(f"|{'-' * 22}|{'-' * 5}|{'-' * 12}|{'-' * 10}|{'-' * 8}|{'-' * 11}|{'-' * 10}|")
    for name, batch_size, _, rate, achieved, mfu, of_matmul, memory in rows:
        print(f"| {name:20s} | {batch_size:>3d} | {rate:>10,.0f} | {achieved:>8.0f} | {100 * mfu:>5.1f}% | {100 * of_matmul:>8.1f}% | "
              f"{memory:>5.1f} GiB |")


if __name__ == "__main__":
    main()
