"""train.py: pretraining, the next-token objective on a corpus of token ids.

    python train.py --config small                  # a 2-core laptop CPU, minutes
    python train.py --config small --max_iters=500  # any key can be overridden
    python train.py --config small --resume         # continue out/small/pretrain/ckpt.pt
    torchrun --standalone --nproc_per_node=8 train.py --config gpt2   # GPUs

Reads data/<dataset>/ from prepare_data.py, writes out/<config>/pretrain/{ckpt.pt, log.jsonl, loss.png}.
The loop, as in nanoGPT: the model predicts token t+1 from tokens <= t in random windows; AdamW with
warmup + cosine decay, gradient accumulation and clipping; evaluate now and then; save a checkpoint.
"""

import contextlib
import gc
import json
import math
import os
import random
import signal
import sys
import time
import types

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import distribute_tensor, DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
import prepare_data
from model import (CheckpointError, clean_state_dict, flops_per_token, GPT, GPTConfig, load_checkpoint, load_weights,
                   model_flops_utilization, save_checkpoint)

STAGE = "pretrain"

# -----------------------------------------------------------------------------
# Configuration: defaults, then a preset (--config NAME), then --key=value overrides.

DEFAULTS = dict(
    config="default", dataset="tinyworld", data_dir="data", out_dir="",  # out_dir "" means out/<config>/pretrain
    n_layer=4, n_head=4, n_embd=128, block_size=256, dropout=0.0, bias=True,  # the model: see model.GPTConfig
    norm="layernorm", mlp="gelu", pos="learned", attention="sdpa",
    # optimisation: batch_size sequences per micro-step and process; grad_accum micro-steps per optimizer
    # step, summed over all processes; cosine decay to min_lr_ratio of the peak; grad_clip 0 never clips
    batch_size=16, grad_accum=1, max_iters=1000, learning_rate=1e-3, min_lr_ratio=0.1, warmup_iters=100,
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    # evaluation, logging, saving; sample_tokens=0: no sample at evaluations; stop_at_iter=0: run to max_iters
    eval_interval=250, eval_iters=20, log_interval=10, sample_tokens=64, stop_at_iter=0,
    # system: device auto | cpu | cuda[:N] | mps; dtype auto | float32 | bfloat16 | float16; deterministic: repeatable
    device="auto", dtype="auto", compile=False, deterministic=True, seed=1337,
    parallel="ddp",  # under torchrun: ddp | fsdp | tp (README, "Past one GPU's memory")
)

PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=40, warmup_iters=5,
                 eval_interval=20, eval_iters=2, log_interval=10, sample_tokens=16, learning_rate=3e-3),  # tests
    # a 2-core laptop CPU in minutes. Three layers: the in-context copying the chat tasks need (rotary
    # positions) appears after fewer tokens than with four at the same cost; block 128 holds every tinyworld
    # document and chat example. Not compiled: a run this short would spend on compiling what compiling saves
    "small": dict(n_layer=3, n_head=4, n_embd=128, block_size=128, batch_size=16, max_iters=1500,
                  warmup_iters=100, eval_interval=375, eval_iters=20, learning_rate=3e-3, pos="rope"),
    # GPT-2 124M on GPUs (8 x 80 GB: 0.5M tokens per step as in the GPT-2 paper); micro-batch 32 keeps an
    # H100 busier than 16 (tests/bench/bench_gpu.py). Speed first: deterministic CUDA kernels not measured here
    "gpt2": dict(dataset="tinystories", n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=32,
                 grad_accum=16, max_iters=5000, learning_rate=6e-4, warmup_iters=300, eval_interval=250,
                 eval_iters=50, log_interval=10, sample_tokens=64, compile=True, deterministic=False),
}

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "norm", "mlp", "pos", "attention")


# -----------------------------------------------------------------------------
# Data

def load_dataset(config):
    """The memmapped train/val token arrays, the tokenizer and meta.json."""
    folder = prepare_data.ensure_prepared(config["dataset"], config["data_dir"])  # builds tinyworld if missing
    meta = prepare_data.load_meta(folder)  # a DataError naming the command if it was never prepared
    data = {split: prepare_data.load_tokens(folder, split, meta) for split in ("train", "val")}
    for split, tokens in data.items():
        if len(tokens) < config["block_size"] + 1:  # one window: block_size inputs and their next tokens
            raise ValueError(f"{os.path.join(folder, split + '.bin')} has {len(tokens)} tokens, fewer than "
                             f"block_size + 1 = {config['block_size'] + 1}: use a smaller --block_size or more data")
    return data, bpe.Tokenizer.load(os.path.join(folder, "tokenizer.json")), meta


def get_batch(data, block_size, batch_size, generator):
    """batch_size random windows: inputs x and targets y = x shifted by one, each (batch_size, block_size)."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
    windows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    return windows[:, :-1], windows[:, 1:]  # one read per window: x all but its last token, y all but its first


def token_byte_lengths(tokenizer):
    """(vocab_size,) float: UTF-8 bytes of each token id; a special token counts 1 (it stands for a separator)."""
    specials = set(tokenizer.special_ids.values())
    return torch.tensor([1 if i in specials else len(tokenizer.vocab.get(i, b"")) for i in range(tokenizer.vocab_size)],
                        dtype=torch.float64)


def bits_per_byte(total_nats, total_bytes):
    """Summed loss (nats) -> bits per byte: unlike loss per token, comparable across tokenizers."""
    return total_nats / math.log(2) / total_bytes


@torch.no_grad()
def evaluate(model, data, config, byte_lengths, ctx, device):
    """Mean loss and bits per byte of each split on eval_iters fixed batches (own generator: data order untouched)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(config["seed"] + (1 if split == "train" else 2))
        nats, n_bytes = 0.0, 0.0
        for _ in range(config["eval_iters"]):
            x, y = get_batch(data[split], config["block_size"], config["batch_size"], generator)
            with ctx:
                _, loss = model(x.to(device), y.to(device))
            nats += loss.item() * y.numel()
            n_bytes += byte_lengths[y].sum().item()
        out[f"{split}_loss"] = nats / (config["eval_iters"] * y.numel())
        out[f"{split}_bpb"] = bits_per_byte(nats, n_bytes)
    model.train()
    return out


# -----------------------------------------------------------------------------
# The loop's machinery: sft.py, reward.py and ppo.py import these from here

def parse_config(argv, defaults, presets, prog, description=""):
    """`--config NAME --key=value ...` -> (config, flags): `defaults`, the preset NAME, then overrides, each
    a known key parsed as its default's type; flags `--resume`, `--overwrite` apart; a mistake is one ValueError."""
    if "-h" in argv or "--help" in argv:
        print(f"usage: python {prog} --config NAME [--key=value ...] [--resume] [--overwrite]\n\n{description}\n\n"
              f"presets: {', '.join(presets)}\n"
              + "".join(f"  {name}: {', '.join(f'{k}={v}' for k, v in p.items())}\n" for name, p in presets.items())
              + "\nkeys (default):\n" + "".join(f"  --{k}={v!r}\n" for k, v in defaults.items()))
        raise SystemExit(0)
    config, flags, overrides, args = dict(defaults), set(), [], list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--resume", "--overwrite"):
            flags.add(arg[2:])
        elif arg.startswith("--") and ("=" in arg or args and not args[0].startswith("--")):  # --key=value, --key value
            overrides.append(arg[2:].split("=", 1) if "=" in arg else [arg[2:], args.pop(0)])
        else:
            raise ValueError(f"--config needs a preset name: one of {', '.join(presets)}" if arg == "--config" else
                             f"cannot read argument {arg!r}: write --key=value (see --help)")
    preset_name = next((text for key, text in reversed(overrides) if key == "config"), None)  # the last wins
    if preset_name is not None:
        if preset_name not in presets:
            raise ValueError(f"unknown config {preset_name!r}: choose one of {', '.join(presets)}")
        config.update(presets[preset_name], config=preset_name)
    for key, text in ((key.replace("-", "_"), text) for key, text in overrides if key != "config"):
        if key not in defaults:
            close = [k for k in defaults if key in k or k in key]
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see --help for the keys)"
            raise ValueError(f"unknown config key --{key}{hint}")
        # the preset's value, where it has the default's type, parses the text (and is the default named)
        current = config[key] if type(config[key]) is type(defaults[key]) else defaults[key]
        config[key] = convert_value(key, text, current)
    return config, flags


def convert_value(key, text, default):
    """'3' -> 3 when the default is an int, and so on; a clear error otherwise."""
    kind = type(default)
    try:
        if kind is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        value = kind(text) if kind in (int, float) else text
        if kind is float and not math.isfinite(value):  # nan or inf would only fail later, or quietly
            raise ValueError
        return value
    except (KeyError, ValueError):
        raise ValueError(f"--{key}={text!r} is not a valid {kind.__name__} (the default is {default!r})") from None


def pick_device(name="auto"):
    """'auto' -> cuda if present, then Apple mps, then cpu; a device this torch cannot use is a ValueError."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        return next(kind for kind, ok in available.items() if ok)
    if not available.get(name.split(":")[0]):
        raise ValueError(f"--device={name!r} is not available to this torch (it has "
                         f"{', '.join(k for k, ok in available.items() if ok)}): use --device=auto")
    return name


def setup_distributed(config):
    """(rank, world_size, device). Under torchrun: a process per GPU with NCCL, or per CPU with gloo."""
    device = pick_device(config["device"])
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


@contextlib.contextmanager
def deterministic_algorithms(enabled=True):
    """Deterministic kernels in the block (an op without one warns): the same run twice on one machine, same numbers."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs for repeatable GEMMs
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def configure_optimizer(model, learning_rate, weight_decay, betas=(0.9, 0.95), device_type="cpu"):
    """AdamW, fused where available, decaying matrices (weights, embeddings), not biases and gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if any(isinstance(p, DTensor) for p in params):  # sharded (fsdp, tp): the fused kernels take plain tensors only
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=False)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))


def cosine_lr(it, max_lr, warmup_iters, max_iters, min_lr_ratio=0.1):
    """Linear warmup to max_lr over warmup_iters, cosine decay to min_lr_ratio * max_lr at max_iters."""
    min_lr = min_lr_ratio * max_lr
    if it < warmup_iters:
        return max_lr * (it + 1) / warmup_iters
    if it >= max_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def forward_backward(model, micro_batches, ctx, scaler=None):
    """Accumulate gradients over micro-batches [(x, y), ...]; returns the mean loss (a tensor).
    Under DDP, only the last micro-step all-reduces gradients: the others run in no_sync()."""
    total = 0.0
    for i, (x, y) in enumerate(micro_batches):
        with model.no_sync() if isinstance(model, DDP) and i < len(micro_batches) - 1 else contextlib.nullcontext():
            with ctx:
                loss = model(x, y)[1] / len(micro_batches)  # the mean over micro-batches, not the sum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = total + loss.detach()
    return total


def clip_gradients(model, max_norm):
    """Scale all gradients down together to global L2 norm <= max_norm (0: never); the norm before."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if any(isinstance(g, DTensor) for g in grads):  # fsdp, tp: each rank holds pieces of some gradients
        pieces = [g.to_local() for g in grads if isinstance(g, DTensor) and g.placements[0].is_shard()]
        whole = [g.to_local() if isinstance(g, DTensor) else g for g in grads
                 if not (isinstance(g, DTensor) and g.placements[0].is_shard())]
        squares = sum((g.float() ** 2).sum() for g in pieces) + torch.zeros((), device=grads[0].device)
        dist.all_reduce(squares)  # the pieces' squares add up across ranks; a whole gradient counts once
        norm = torch.sqrt(squares + sum((g.float() ** 2).sum() for g in whole))
        if max_norm > 0:
            scale = min(1.0, max_norm / (norm.item() + 1e-6))  # clip_grad_norm_'s rule, one sync a step
            for g in grads:
                g.mul_(scale)
        return norm
    if max_norm <= 0:
        return torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def compile_or_fall_back(model, example_batch, ctx, master=True, mode=None):
    """torch.compile the model, its kernels built now by a pass on example_batch = (x, y) of the training
    shape; where compiling fails (no C++ compiler on a laptop, say) the run goes on uncompiled."""
    compiled = torch.compile(model, mode=mode)
    rng = torch.get_rng_state()  # the dummy pass must not move the random state
    try:
        with ctx:
            loss = compiled(*example_batch)[1]
        loss.backward()
        return compiled
    except Exception as e:  # torch raises many kinds here, all meaning "cannot compile"
        if master:
            print(f"torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]}); "
                  f"training without it")
        return model
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)


def rng_state():
    """Every random state a training run depends on, as checkpoint-safe values."""
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"python": random.getstate(), "torch": torch.get_rng_state(), **cuda}


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def append_jsonl(path, record):
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # a full disk shows when the file is closed, as an error without the file's name
        raise OSError(e.errno, e.strerror, path) from None


def read_jsonl_log(path):
    """The records of a log.jsonl, up to a torn last line from a crash."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:  # no log yet: no records
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def plot_curves(records, series, path, title, xlabel="iteration"):
    """An atomically written PNG, a line per (label, key) in `series` from the records with that key."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, key in series:
        points = [(r["iter"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()
    fig.tight_layout()
    prepare_data.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def format_eta(seconds):
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StopRequested:
    """Ctrl-C or SIGTERM (what docker, slurm and Kubernetes send) sets a flag: the loop saves after this step, exits."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.requested:  # a second one: stop now
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name}: finishing this step, "
              f"saving a checkpoint, then exiting (Ctrl-C again to abort)", flush=True)

    def restore(self):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)


# -----------------------------------------------------------------------------
# Precision: bf16 autocast only where it is measured to be faster

# bf16 must win by this much: below it the choice could flip between runs on one machine
BF16_MIN_SPEEDUP = 1.15


def autocast_context(device_type, dtype):
    """Mixed precision: matrix multiplies in bf16/fp16, weights and optimizer state in fp32."""
    return contextlib.nullcontext() if dtype == "float32" else torch.autocast(device_type, getattr(torch, dtype))


def measure_bf16_speedup(step, device_type, repeats=3, timer=time.perf_counter):
    """float32 / bf16 time of step(ctx), a forward and backward of the run's model (> 1: bf16 faster): after a
    warm-up each, alternating (drift hits both), fastest counts; a far slower warm-up (emulation) decides."""
    def timed(dtype):
        wait = getattr(torch, device_type).synchronize if device_type in ("cuda", "mps") else lambda: None
        wait()  # queued GPU kernels must finish inside the timed span (a CPU runs in order)
        start = timer()
        step(autocast_context(device_type, dtype))
        wait()
        return timer() - start
    warm32, warm16 = timed("float32"), timed("bfloat16")
    if warm16 > 3 * warm32:
        return warm32 / warm16
    times = [(timed("float32"), timed("bfloat16")) for _ in range(repeats)]
    return min(t32 for t32, _ in times) / min(t16 for _, t16 in times)


def resolve_dtype(requested, device_type, step=None, timer=time.perf_counter):
    """(dtype, why). 'auto': CUDA bf16 if the card has it, else fp16; elsewhere float32, or bf16 where step(ctx)
    measures >= BF16_MIN_SPEEDUP (a laptop without native bf16 must not emulate it). Ranks take rank 0's answer."""
    if requested not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype={requested!r} is not one of auto, float32, bfloat16, float16")
    if requested != "auto":
        return requested, "as asked"
    if device_type == "cuda":
        return ("bfloat16", "auto: the GPU supports bf16") if torch.cuda.is_bf16_supported() else \
            ("float16", "auto: the GPU has no bf16")
    if step is None:
        return "float32", "auto: nothing to measure"
    choice = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        rng = torch.get_rng_state()  # the timed steps must not move the run's random state (dropout)
        try:
            speedup = measure_bf16_speedup(step, device_type, timer=timer)
            faster = speedup >= BF16_MIN_SPEEDUP
            choice[0] = ("bfloat16" if faster else "float32",
                         f"auto: a bf16 autocast step measured {speedup:.2f}x the speed of float32's"
                         + ("" if faster else f" (bf16 needs {BF16_MIN_SPEEDUP}x)"))
        except RuntimeError as e:  # bf16 autocast not implemented for this device or an op
            choice[0] = ("float32", f"auto: bf16 autocast failed here ({str(e).strip().splitlines()[0][:80]})")
        finally:
            torch.set_rng_state(rng)
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def training_precision(requested, device_type, model, step):
    """(dtype, why, ctx, scaler): resolve_dtype on step(ctx), model's gradients cleared, fp16's scaler or None."""
    dtype, why = resolve_dtype(requested, device_type, step)
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    return dtype, why, autocast_context(device_type, dtype), scaler


# -----------------------------------------------------------------------------
# Past one GPU's memory (under torchrun): sharded data parallel (fsdp) and tensor parallel (tp)

PARALLEL = ("ddp", "fsdp", "tp")


def qkv_rows(n_embd, world):
    """The row order of c_attn's [q; k; v] that puts each rank's heads together, [q_0; k_0; v_0; q_1; ...], so that
    splitting the rows into world equal blocks (column-wise parallel) gives rank r the q, k and v of its heads."""
    return torch.arange(3 * n_embd).view(3, world, n_embd // world).transpose(0, 1).flatten()


def shard_model(model, parallel, world, device_type, dtype="float32"):
    """Split a GPT's weights across the world's ranks, in place; every rank must hold the same whole weights first.
    fsdp (ZeRO-3): each block's parameters split in dim 0, gathered whole just before its forward (and its backward),
    freed after; gradients reduce-scattered to the shards, all the optimizer keeps. tp (Megatron): in every block
    q/k/v and the MLP's input layers split by output features (a rank computes its heads, its hidden units), the
    output projections by input features (partial sums added across ranks); embeddings, norms, head stay whole."""
    config = model.config
    if parallel == "tp" and (config.n_head % world or (4 * config.n_embd) % world):
        raise ValueError(f"--parallel=tp splits the n_head={config.n_head} heads across {world} processes: "
                         f"use a number of processes that divides n_head")
    from torch.distributed.device_mesh import init_device_mesh  # loaded only where a model is sharded
    mesh = init_device_mesh(device_type, (world,))
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        # on a GPU the gathered weights are cast to bf16 for compute, the gradients reduced in float32
        bf16 = device_type == "cuda" and dtype == "bfloat16"
        policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        return fully_shard(model, mesh=mesh, mp_policy=policy)
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module, RowwiseParallel
    rows = qkv_rows(config.n_embd, world)
    inputs = ("c_fc", "c_gate") if config.mlp == "swiglu" else ("c_fc",)
    plan = {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(), "mlp.c_proj": RowwiseParallel(),
            **{f"mlp.{name}": ColwiseParallel() for name in inputs}}
    for block in model.transformer.h:
        with torch.no_grad():
            for p in block.attn.c_attn.parameters():
                p.copy_(p[rows])
        parallelize_module(block, mesh, plan)
    return model


def whole_tensor(tensor, name, run):
    """A tensor as one process holds it: a shard gathered (all ranks take part), c_attn's rows in their own order."""
    if not isinstance(tensor, DTensor):
        return tensor
    whole = tensor.full_tensor()
    if run.parallel == "tp" and "c_attn" in name:  # back to [q; k; v]
        whole = whole[torch.argsort(qkv_rows(whole.size(0) // 3, run.world))]
    return whole


def shard_like(whole, param, name, run):
    """The inverse of whole_tensor: this rank's piece of a whole tensor, laid out like the parameter param."""
    if not isinstance(param, DTensor) or whole.dim() == 0:
        return whole
    if run.parallel == "tp" and "c_attn" in name:
        whole = whole[qkv_rows(whole.size(0) // 3, run.world)]
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements)


def whole_model_state(model, run):
    """The checkpoint's weights: whole tensors under every mode (fsdp and tp gather: call it on all ranks)."""
    return {name: whole_tensor(t, name, run).detach() for name, t in clean_state_dict(model).items()}


def parameter_names(optimizer, model):
    """[(parameter, name)] in the optimizer's order, the order its state_dict numbers them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [(p, names[id(p)]) for group in optimizer.param_groups for p in group["params"]]


def whole_optimizer_state(optimizer, model, run):
    """optimizer.state_dict() with whole tensors, as one process would save it (fsdp and tp gather: all ranks)."""
    state, params = optimizer.state_dict(), parameter_names(optimizer, model)
    moments = {i: {key: whole_tensor(t, params[i][1], run) for key, t in kept.items()}
               for i, kept in state["state"].items()}
    return {"state": moments, "param_groups": state["param_groups"]}


def load_optimizer_state(optimizer, model, state, run):
    """optimizer.load_state_dict of a saved whole state, each tensor cut to this rank's piece of its parameter."""
    params = parameter_names(optimizer, model)
    moments = {i: {key: shard_like(t, *params[i], run) for key, t in kept.items()}
               for i, kept in state["state"].items()}
    optimizer.load_state_dict({"state": moments, "param_groups": state["param_groups"]})


# -----------------------------------------------------------------------------
# One training run's frame, the same in every training stage: start, log, step, save, end

# what a resumed run may change (how long, how often, where, on what); the rest comes from its checkpoint
RESUME_MAY_CHANGE = ("max_iters", "stop_at_iter", "eval_interval", "save_interval", "log_interval", "sample_tokens",
                     "eval_batch_size", "device", "dtype", "compile", "out_dir", "data_dir", "init_dir", "reward_dir",
                     "parallel")
# the least value of each count a training stage may have (a key its config lacks is not checked)
AT_LEAST = dict(max_iters=1, stop_at_iter=0, batch_size=1, grad_accum=1, eval_interval=1, eval_iters=1,
                log_interval=1, save_interval=1, eval_batch_size=1, warmup_iters=0, pretrain_rows=0)


def check_least(config, least):
    """Each key of least that config has must be at least its value there: a ValueError naming the first that is not."""
    for key in [k for k in least if k in config and config[k] < least[k]]:
        raise ValueError(f"--{key}={config[key]} must be at least {least[key]}")


def start_run(config, flags, stage, out_dir, least=AT_LEAST):
    """Before the model: processes, device, checks, --resume or --overwrite. A namespace: stage, rank, world, master,
    device(_type), out_dir, ckpt_path, log_path, lock, end_iter, resume (its config wins but RESUME_MAY_CHANGE)."""
    rank, world, device = setup_distributed(config)
    device_type = device.split(":")[0]
    resolve_dtype(config["dtype"], device_type)  # a bad name fails before any work
    parallel = config.get("parallel", "ddp")
    if parallel not in PARALLEL:
        raise ValueError(f"--parallel={parallel!r} is not one of {', '.join(PARALLEL)}")
    if parallel != "ddp" and "RANK" not in os.environ:
        raise ValueError(f"--parallel={parallel} splits the model across processes: start it with torchrun, e.g. "
                         f"torchrun --standalone --nproc_per_node=2 train.py --parallel={parallel} ...")
    data_ranks = 1 if parallel == "tp" else world  # tp: every rank sees the same batch
    if config.get("grad_accum", 1) % data_ranks:
        raise ValueError(f"grad_accum={config['grad_accum']} must be divisible by the number of processes ({world})")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    resume = load_checkpoint(ckpt_path, stages={stage}) if "resume" in flags else None
    if resume is not None:
        kept = {k: v for k, v in resume["config"].items() if config.get(k, v) != v and k not in RESUME_MAY_CHANGE}
        if kept and rank == 0:  # what the command line or the preset asked for differently, said, not silently dropped
            print(f"resuming with {ckpt_path}'s own {', '.join(f'{k}={v!r}' for k, v in kept.items())} (not "
                  f"{', '.join(repr(config[k]) for k in kept)}): a resumed run may change only "
                  f"{', '.join(k for k in RESUME_MAY_CHANGE if k in config)}")
        config.update(kept)
        if resume["resume"].get("world", world) != world:  # each process's data position is in the checkpoint
            raise ValueError(f"{ckpt_path} was saved by {resume['resume']['world']} process(es): "
                             f"resume it with the same number (now {world})")
    elif os.path.exists(ckpt_path) and "overwrite" not in flags:
        raise ValueError(f"{ckpt_path} already exists: pass --resume to continue it, "
                         f"or --overwrite to start over (it will be replaced)")
    check_least(config, least)
    end_iter = min(config["stop_at_iter"] or config["max_iters"], config["max_iters"])
    return types.SimpleNamespace(stage=stage, rank=rank, world=world, master=rank == 0, device=device,
                                 device_type=device_type, out_dir=out_dir, ckpt_path=ckpt_path, lock=None,
                                 log_path=os.path.join(out_dir, "log.jsonl"), end_iter=end_iter, resume=resume,
                                 parallel=parallel, data_ranks=data_ranks)


def claim_folder(out_dir):
    """out_dir/run.lock, holding this process's id: while that process runs, another run on the folder refuses;
    a killed run's lock (its process gone) is taken over. Returns the lock's path (end_run removes it)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "run.lock")
    while True:
        with contextlib.suppress(FileExistsError), open(path, "x") as f:  # "x": made only if absent, so one run wins
            f.write(str(os.getpid()))
            return path
        owner = None
        with contextlib.suppress(OSError, ValueError), open(path) as f:  # gone meanwhile or not yet written: no owner
            owner = int(f.read())
        if owner not in (None, os.getpid()) and prepare_data.pid_alive(owner):
            raise ValueError(f"{out_dir} is in use by another run (process {owner}, {path}): wait for it to end "
                             f"or give another --out_dir")
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # its run ended without removing it (killed): taken over


def open_log(run, start_iter, summary, dtype, dtype_why):
    """The folder claimed (claim_folder); the start-up line; log.jsonl begun with the precision (cut on resume)."""
    if not run.master:
        return
    run.lock = claim_folder(run.out_dir)
    if run.resume is not None:  # the lines written after the checkpoint we resume from are forgotten
        kept = [r for r in read_jsonl_log(run.log_path) if r.get("iter", 0) <= start_iter]
        prepare_data.write_jsonl(run.log_path, kept)
        print(f"resuming {run.ckpt_path} at iteration {start_iter}")
    else:  # a new run's log sits beside an older run's until its first save_run: a failed start loses nothing
        run.log_path = os.path.join(run.out_dir, "log.new.jsonl" if os.path.exists(run.log_path) else "log.jsonl")
        open(run.log_path, "w").close()
    print(f"{run.stage}: {summary}, {dtype} ({dtype_why})")
    append_jsonl(run.log_path, {"iter": start_iter, "dtype": dtype, "dtype_why": dtype_why})


def save_run(run, checkpoint):
    """save_checkpoint to run.ckpt_path; a new run's first save also puts its log in place of an older run's."""
    save_checkpoint(checkpoint, run.ckpt_path)
    if run.log_path != (log := os.path.join(run.out_dir, "log.jsonl")):
        os.replace(run.log_path, log)
        run.log_path = log


def wrap_model(model, run, compile_batch=None, ctx=None, parallel="ddp", dtype="float32"):
    """The model the loop calls: sharded in place (fsdp, tp: before the optimizer sees its parameters), compiled on
    compile_batch if given, in DDP under torchrun with ddp (even one process)."""
    if parallel != "ddp":
        shard_model(model, parallel, run.world, run.device_type, dtype)
    if compile_batch is not None:
        model = compile_or_fall_back(model, compile_batch, ctx, run.master)
    if dist.is_initialized() and parallel == "ddp":
        model = DDP(model, device_ids=[int(run.device.split(":")[1])] if run.device_type == "cuda" else None)
    return model


def scheduled_lr(optimizer, it, config):
    """Set and return iteration it's learning rate (cosine_lr of the config's keys)."""
    lr = cosine_lr(it, config["learning_rate"], config["warmup_iters"], config["max_iters"], config["min_lr_ratio"])
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(model, optimizer, loss, scaler, grad_clip, run, it):
    """Gradients unscaled, clipped, applied, cleared: (mean loss over ranks, norm before clipping)."""
    if run.world > 1:  # every rank reports the same mean
        dist.all_reduce(loss)
        loss = loss / run.world
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = clip_gradients(model, grad_clip)
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss is {loss_value} at iteration {it}: stopping; the last good checkpoint "
                                 f"{run.ckpt_path} is kept. Try a lower --learning_rate or --dtype=float32")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, float(grad_norm)


class Progress:
    """Every log_interval steps a line and a log record: loss, lr, grad norm, work per second, ETA."""

    def __init__(self, run, start_iter, end_iter, log_interval, unit="tok", flops_per_token=None, device_name=""):
        self.run, self.end_iter, self.log_interval, self.unit = run, end_iter, log_interval, unit
        self.flops_per_token, self.device_name, self.t_start = flops_per_token, device_name, time.time()
        self.pause(start_iter)

    def update(self, it, record, work, note=""):
        """Count this iteration's work; on a logging iteration print and log record with rate and ETA."""
        self.work += work
        if not self.run.master or (it % self.log_interval and it != self.end_iter):
            return
        now = time.time()
        rate = self.work / max(now - self.t_last, 1e-9)
        eta = (self.end_iter - it) * (now - self.t_last) / max(it - self.it_last, 1)
        record = {"iter": it, **record, f"{self.unit}_per_s": rate}
        text = f"{rate / 1e3:.1f}k {self.unit.replace('_', ' ')}/s"
        if self.flops_per_token is not None:
            record["mfu"] = model_flops_utilization(self.flops_per_token, rate / self.run.world, self.device_name)
            text += f" | mfu {100 * record['mfu']:.1f}%" if record["mfu"] is not None else ""
        print(f"iter {it:6d}/{self.end_iter} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | grad "
              f"{record['grad_norm']:.2f} | {text}{' | ' + note if note else ''} | ETA {format_eta(eta)}", flush=True)
        append_jsonl(self.run.log_path, {**record, "time": now - self.t_start})
        self.pause(it)

    def pause(self, it):
        """Restart the throughput clock at iteration it (after an evaluation or a save)."""
        self.t_last, self.it_last, self.work = time.time(), it, 0

    def done(self, it, stopped=False):
        """The last line: how long the run took, or how a stopped one goes on."""
        if self.run.master:
            print(f"saved {self.run.ckpt_path} at iteration {it}; continue with --resume" if stopped else
                  f"done: {it} iterations in {format_eta(time.time() - self.t_start)}; checkpoint {self.run.ckpt_path}")


def end_run(run, stopper):
    """Ctrl-C's handler back, the lock removed, the process group gone (after the caller drops DDP, else gloo hangs)."""
    stopper.restore()
    if run.lock is not None and os.path.exists(run.lock):
        os.remove(run.lock)
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# The run

def run(config, flags=()):
    """Pretrain; returns the metrics of the final evaluation."""
    # 1. processes, device, --resume or --overwrite; bad model options fail before any work
    GPTConfig(**{k: config[k] for k in MODEL_KEYS})
    run = start_run(config, flags, STAGE, config["out_dir"] or os.path.join("out", config["config"], STAGE))
    data, tokenizer, meta = load_dataset(config)
    if run.resume is not None and run.resume["tokenizer"] != tokenizer.to_dict():  # same ids, other tokens
        raise ValueError(f"{os.path.join(config['data_dir'], config['dataset'], 'tokenizer.json')} is not the "
                         f"tokenizer {run.ckpt_path} learned with (was the data rebuilt?): use its data or --overwrite")

    def batch(rows, generator):  # (x, y) on the device: `rows` windows of the train split
        return tuple(t.to(run.device) for t in get_batch(data["train"], config["block_size"], rows, generator))

    # 2. the model (whole on every rank: fsdp and tp shard the same weights), its precision (measured on one
    # micro-batch of the run's own shape), the model the loop calls, and the optimizer over its (sharded) parameters
    torch.manual_seed(config["seed"] + (run.rank if run.parallel == "ddp" else 0))
    model_config = GPTConfig(vocab_size=tokenizer.vocab_size, **{k: config[k] for k in MODEL_KEYS})
    raw_model = GPT(model_config).to(run.device)
    if run.resume is not None:
        load_weights(raw_model, run.resume["model"], run.ckpt_path)
    # timed and compiled on a micro-batch of the loop's shape and layout (x, y: views of one window array): on a
    # smaller one fixed costs hide bf16's gain (the choice flips from run to run), another layout recompiles
    example = batch(config["batch_size"], torch.Generator().manual_seed(0))
    dtype, dtype_why, ctx, scaler = training_precision(config["dtype"], run.device_type, raw_model,
                                                       lambda c: forward_backward(raw_model, [example], c))
    model = wrap_model(raw_model, run, example if config["compile"] else None, ctx, run.parallel, dtype)
    optimizer = configure_optimizer(raw_model, config["learning_rate"], config["weight_decay"],
                                    (config["beta1"], config["beta2"]), run.device_type)
    # per process, so that ranks see other windows; tp's ranks share one batch
    data_gen = torch.Generator().manual_seed(config["seed"] * 1000 + (run.rank if run.parallel != "tp" else 0))
    it = 0
    if run.resume is not None:
        state = run.resume["resume"]
        load_optimizer_state(optimizer, raw_model, state["optimizer"], run)
        data_gen.set_state(state["data_rng"][run.rank])
        set_rng_state(state["rng"])
        it = state["iter"]

    n_params = raw_model.num_params()
    tokens_per_iter = config["grad_accum"] * config["batch_size"] * config["block_size"]
    open_log(run, it, f"{n_params / 1e6:.2f}M parameters, vocab {tokenizer.vocab_size}, dataset {config['dataset']} "
             f"({len(data['train']):,} train tokens), {tokens_per_iter:,} tokens/iter, device {run.device} x{run.world}"
             f"{'' if run.parallel == 'ddp' else ' ' + run.parallel}{', compiled' if config['compile'] else ''}",
             dtype, dtype_why)
    progress = Progress(run, it, run.end_iter, config["log_interval"], "tok", flops_per_token(model_config, n_params),
                        torch.cuda.get_device_name(run.device) if run.device_type == "cuda" else run.device_type)
    byte_lengths, metrics, stopper = token_byte_lengths(tokenizer), {}, StopRequested()
    try:
        while it < run.end_iter:
            # 3. one optimizer step: grad_accum windows in all, each process its share, summed gradients
            lr = scheduled_lr(optimizer, it, config)
            micro_batches = [batch(config["batch_size"], data_gen)
                             for _ in range(config["grad_accum"] // run.data_ranks)]
            loss = forward_backward(model, micro_batches, ctx, scaler)
            loss, grad_norm = optimizer_step(raw_model, optimizer, loss, scaler, config["grad_clip"], run, it)
            it += 1
            progress.update(it, {"loss": loss, "lr": lr, "grad_norm": grad_norm}, tokens_per_iter)

            # 4. now and then: train/val loss and bits per byte, the loss plot, a checkpoint, a sample
            at_eval = it % config["eval_interval"] == 0 or it == run.end_iter
            if at_eval or stopper.requested:
                # the checkpoint holds what an exact resume needs: optimizer, RNG, and every rank's data position
                data_states = [data_gen.get_state()] * run.world
                if run.world > 1:  # every rank takes part; the master saves them all
                    dist.all_gather_object(data_states, data_gen.get_state())
                sharded = run.parallel != "ddp"  # a sharded model's forward and gathers need every rank
                if run.master or sharded:
                    metrics = dict(evaluate(raw_model, data, config, byte_lengths, ctx, run.device), iter=it)
                    weights = whole_model_state(raw_model, run)
                    optimizer_whole = whole_optimizer_state(optimizer, raw_model, run)
                if run.master:
                    print(f"eval {it}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
                          f"val {metrics['val_bpb']:.3f} bits/byte")
                    append_jsonl(run.log_path, metrics)
                    plot_curves(read_jsonl_log(run.log_path), [("train (per step)", "loss"), ("train", "train_loss"),
                                                              ("val", "val_loss")],
                                os.path.join(run.out_dir, "loss.png"), f"pretraining loss ({config['config']})")
                    save_run(run, {"stage": STAGE, "model_args": vars(model_config).copy(),
                                   "model": weights, "tokenizer": tokenizer.to_dict(),
                                   "config": dict(config, dtype=dtype), "parent": None, "metrics": metrics,
                                   "data": {"dataset": config["dataset"], "meta": meta},
                                   "resume": {"optimizer": optimizer_whole, "iter": it, "rng": rng_state(),
                                              "data_rng": data_states, "world": run.world}})
                    if at_eval and config["sample_tokens"] > 0 and not sharded:  # what the model writes now
                        start = torch.tensor([[tokenizer.special_ids[bpe.DOC_SEP]]], device=run.device)
                        with ctx:
                            out = raw_model.generate(start, min(config["sample_tokens"], config["block_size"] - 1),
                                                     temperature=0.8, top_k=50, seed=config["seed"])
                        print("sample:", repr(tokenizer.decode(out[0, 1:].tolist())))
                progress.pause(it)
                if stopper.requested:
                    break
    finally:
        model = raw_model = optimizer = None  # the DDP wrapper and fsdp/tp's shards go before their process group:
        gc.collect()  # the sharded modules' hooks hold them in cycles; freed after it, a gloo process can abort
        end_run(run, stopper)
    progress.done(it, stopper.requested)
    return dict(metrics, stopped=stopper.requested)  # a caller running several (eval.py --scaling) stops too


def stage_main(run, argv, defaults, presets, prog, doc):
    """A stage's command line: its config from argv (sys.argv when None), then run(config, flags). A mistake of
    the user's, or of the machine's (OSError: a read-only folder, a full disk), is one error line and exit status 1."""
    try:
        config, flags = parse_config(sys.argv[1:] if argv is None else argv, defaults, presets, prog,
                                     doc.strip().splitlines()[0])
        with deterministic_algorithms(config.get("deterministic", False)):  # a stage with the key chooses
            run(config, flags)
    except (ValueError, CheckpointError, FloatingPointError, prepare_data.DataError, OSError) as e:
        print(f"{prog}: error: {prepare_data.error_line(e)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    return stage_main(run, argv, DEFAULTS, PRESETS, "train.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
