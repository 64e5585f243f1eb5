"""Benchmark of train.py's three ways to spread a model over processes: per rank, the bytes of parameters,
gradients and AdamW's two moments, and the time of a training step, for ddp, fsdp and tp side by side.

    python tests/bench/bench_parallel.py                        # GPT-2 124M shape, 2 CPU processes (gloo)
    python tests/bench/bench_parallel.py --config small --steps 5

Each mode runs in 2 fresh processes (torch.multiprocessing, gloo on the CPU, one thread each) over train.py's
own pieces: wrap_model (DDP, or shard_model), configure_optimizer, forward_backward, clip_gradients. Tokens
are random; ddp and fsdp give each rank half of the global batch, tp gives both ranks all of it. The state
bytes are counted from the tensors each rank holds after a step (a shard's local piece for fsdp and tp);
DDP's gradient buckets, activations and the whole model each rank builds before sharding are not in them,
so the peak resident memory of the process is printed beside them.
"""

import argparse
import contextlib
import os
import resource
import socket
import statistics
import sys
import time
import types

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import train  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def local_bytes(tensors):
    pieces = [t.to_local() if isinstance(t, train.DTensor) else t for t in tensors if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in pieces)


def worker(rank, world, port, args, mode, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    config = dict(train.DEFAULTS, **train.PRESETS[args.config])
    model_config = GPTConfig(vocab_size=args.vocab, **{k: config[k] for k in train.MODEL_KEYS})
    torch.manual_seed(0)
    run = types.SimpleNamespace(world=world, master=rank == 0, device="cpu", device_type="cpu", parallel=mode)
    model = train.wrap_model(GPT(model_config), run, parallel=mode)
    raw = model.module if mode == "ddp" else model
    optimizer = train.configure_optimizer(raw, 6e-4, 0.1)
    rows = args.batch if mode == "tp" else args.batch // world
    gen = torch.Generator().manual_seed(0)  # the same tokens on every rank: what tp needs, harmless for the others
    times = []
    for step in range(args.warmup + args.steps):
        windows = torch.randint(args.vocab, (args.batch, args.tokens + 1), generator=gen)
        mine = windows if mode == "tp" else windows[rank * rows:(rank + 1) * rows]
        dist.barrier()
        start = time.perf_counter()
        train.forward_backward(model, [(mine[:, :-1], mine[:, 1:])], contextlib.nullcontext())
        train.clip_gradients(raw, 1.0)
        optimizer.step()
        state = (local_bytes(raw.parameters()), local_bytes(p.grad for p in raw.parameters()),
                 local_bytes(v for s in optimizer.state.values() for v in s.values()))
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB -> GiB
    gathered = [None] * world
    dist.all_gather_object(gathered, (state, peak_rss, statistics.median(times)))
    if rank == 0:
        results[mode] = gathered
    dist.barrier()
    del model, raw
    dist.destroy_process_group()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpt2", help="train.py preset giving the model shape")
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary size (GPT-2's, padded to 50304)")
    parser.add_argument("--batch", type=int, default=2, help="global batch: sequences per step over all ranks")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence (at most the block size)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    parser.add_argument("--modes", default=",".join(train.PARALLEL), help="comma-separated: ddp, fsdp, tp")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if args.config not in train.PRESETS or any(m not in train.PARALLEL for m in modes):
        sys.exit(f"error: --config is one of {', '.join(train.PRESETS)}; --modes from {', '.join(train.PARALLEL)}")
    world = 2
    results = torch.multiprocessing.Manager().dict()
    started = time.time()
    for mode in modes:
        torch.multiprocessing.spawn(worker, args=(world, free_port(), args, mode, results), nprocs=world, join=True)
    n_params = sum(p.numel() for p in GPT(GPTConfig(vocab_size=args.vocab, **{
        k: dict(train.DEFAULTS, **train.PRESETS[args.config])[k] for k in train.MODEL_KEYS})).parameters())
    print(f"torch {torch.__version__}, {world} CPU processes (gloo, 1 thread each); preset {args.config}: "
          f"{n_params / 1e6:.1f}M parameters (vocab {args.vocab}); global batch {args.batch} x {args.tokens} tokens; "
          f"median of {args.steps} steps after {args.warmup}; {time.time() - started:.0f} s in all\n")
    print("| mode | parameters | gradients | AdamW moments | state per rank | vs ddp | peak RSS | step |")
    print("|------|------------|-----------|---------------|----------------|--------|----------|------|")
    gib, base = 2 ** 30, None
    for mode in modes:
        (params, grads, moments), rss, step = results[mode][0]  # rank 0; rank 1 within a few bytes of it
        total = params + grads + moments
        base = base or (total if mode == "ddp" else None)
        ratio = f"{total / base:.2f}x" if base else "-"
        print(f"| {mode} | {params / gib:.2f} GiB | {grads / gib:.2f} GiB | {moments / gib:.2f} GiB | "
              f"{total / gib:.2f} GiB | {ratio} | {rss:.2f} GiB | {max(s for *_, s in results[mode]):.2f} s |")


if __name__ == "__main__":
    main()
