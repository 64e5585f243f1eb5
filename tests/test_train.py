"""Tests for train.py: pretraining, and the loop machinery the later training stages import from it."""

import contextlib
import gc
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import bpe
import model
import prepare_data
import train
from model import GPT, GPTConfig, load_checkpoint
from train import (configure_optimizer, convert_value, cosine_lr, parse_config, pick_device, plot_curves,
                   read_jsonl_log, resolve_dtype)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pseudo_english(n_words, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "park", "with", "red", "ball"]
    sentences = []
    for _ in range(n_words // 6):
        sentences.append(" ".join(rng.choice(words) for _ in range(6)).capitalize() + ".")
    return " ".join(sentences)


def make_dataset(folder, n_words=6000, vocab_size=300):
    """A small prepared dataset in prepare_data.py's layout."""
    os.makedirs(folder, exist_ok=True)
    text = pseudo_english(n_words)
    tok = bpe.train_tokenizer(text, vocab_size)
    tok.save(os.path.join(folder, "tokenizer.json"))
    cut = int(len(text) * 0.9)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        np.array(tok.encode(part), dtype=np.uint16).tofile(os.path.join(folder, f"{split}.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"vocab_size": tok.vocab_size, "dtype": "uint16"}, f)
    return tok


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(str(root / "toy"))
    return str(root)


def free_port():
    with socket.socket() as probe:  # a port that is free right now, not a guessed one
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_config(data_dir, out_dir, **overrides):
    config = dict(train.DEFAULTS)
    config.update(train.PRESETS["tiny"])
    # float32 as asked: runs compared bit for bit must not choose their precision by timing (auto's tests do)
    config.update(config="tiny", data_dir=data_dir, dataset="toy", out_dir=str(out_dir), sample_tokens=0,
                  log_interval=1000, dtype="float32")
    config.update(overrides)
    return config


# --- configuration ----------------------------------------------------------------

def test_parse_config_presets_overrides_and_flags():
    config, flags = parse_config(["--config", "tiny", "--max_iters=7", "--learning_rate", "0.5", "--compile=true",
                                  "--resume"], train.DEFAULTS, train.PRESETS, "train.py")
    assert config["config"] == "tiny" and config["n_embd"] == train.PRESETS["tiny"]["n_embd"]
    assert config["max_iters"] == 7 and config["learning_rate"] == 0.5 and config["compile"] is True
    assert flags == {"resume"}
    assert parse_config([], train.DEFAULTS, train.PRESETS, "train.py")[0] == train.DEFAULTS


def test_parse_config_errors_are_one_line():
    with pytest.raises(ValueError, match=r"unknown config key --max_iter \(did you mean max_iters"):
        parse_config(["--max_iter=3"], train.DEFAULTS, train.PRESETS, "train.py")
    with pytest.raises(ValueError, match="--max_iters='ten' is not a valid int"):
        parse_config(["--max_iters=ten"], train.DEFAULTS, train.PRESETS, "train.py")
    with pytest.raises(ValueError, match="unknown config 'huge'"):
        parse_config(["--config", "huge"], train.DEFAULTS, train.PRESETS, "train.py")
    with pytest.raises(ValueError, match="cannot read argument"):
        parse_config(["stray"], train.DEFAULTS, train.PRESETS, "train.py")


def test_convert_value_types():
    assert convert_value("a", "3", 1) == 3 and convert_value("a", "3", 1.0) == 3.0
    assert convert_value("a", "no", True) is False and convert_value("a", "1", False) is True
    assert convert_value("a", "rope", "learned") == "rope"
    with pytest.raises(ValueError, match="not a valid bool"):
        convert_value("a", "maybe", True)
    with pytest.raises(ValueError, match="not a valid float"):
        convert_value("a", "fast", 1.0)
    for text in ("nan", "inf", "-inf"):  # they would only fail later, or quietly
        with pytest.raises(ValueError, match=f"--a='{text}' is not a valid float"):
            convert_value("a", text, 1.0)


def test_bad_override_names_the_presets_value_as_the_default():
    defaults, presets = {"config": "default", "kl_coef": 0.05}, {"small": {"kl_coef": 0.1}}
    with pytest.raises(ValueError, match=r"--kl_coef='high' is not a valid float \(the default is 0.1\)"):
        parse_config(["--config", "small", "--kl_coef=high"], defaults, presets, "ppo.py")
    with pytest.raises(ValueError, match=r"\(the default is 0.05\)"):
        parse_config(["--kl_coef=high"], defaults, presets, "ppo.py")


def test_help_lists_presets_and_keys(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], train.DEFAULTS, train.PRESETS, "train.py")
    out = capsys.readouterr().out
    assert "presets: tiny, small, gpt2" in out and "--learning_rate" in out


def test_pick_device_and_dtype(monkeypatch):
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") in ("cuda", "mps", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    for name in ("cuda", "cuda:1", "mps", "tpu"):
        with pytest.raises(ValueError, match=f"--device='{name}' is not available to this torch .it has cpu.: use"):
            pick_device(name)
    assert resolve_dtype("auto", "cpu") == ("float32", "auto: nothing to measure")
    assert resolve_dtype("bfloat16", "cpu") == ("bfloat16", "as asked")
    with pytest.raises(ValueError, match="--dtype='fp8' is not one of auto, float32"):
        resolve_dtype("fp8", "cpu")


# --- precision: auto measures, an explicit dtype is kept ----------------------------

class FakeClock:
    """A timer for measure_bf16_speedup: each step advances it by the cost given for
    its precision (bf16 autocast on or off), so the outcome is known in advance."""

    def __init__(self, float32_cost, bf16_cost):
        self.now, self.costs, self.calls = 0.0, {False: float32_cost, True: bf16_cost}, []

    def __call__(self):
        return self.now

    def step(self, ctx):
        with ctx:
            bf16 = torch.is_autocast_enabled("cpu")
        self.calls.append("bfloat16" if bf16 else "float32")
        self.now += self.costs[bf16]


def test_measure_bf16_speedup_is_the_ratio_of_the_fastest_steps():
    clock = FakeClock(float32_cost=1.0, bf16_cost=0.5)
    assert train.measure_bf16_speedup(clock.step, "cpu", repeats=3, timer=clock) == pytest.approx(2.0)
    # a warm-up each, then alternating, so that a drifting machine affects both alike
    assert clock.calls == ["float32", "bfloat16"] + ["float32", "bfloat16"] * 3


def test_measure_bf16_speedup_stops_early_when_bf16_is_emulated():
    clock = FakeClock(float32_cost=1.0, bf16_cost=12.0)  # a CPU without native bf16
    assert train.measure_bf16_speedup(clock.step, "cpu", repeats=3, timer=clock) == pytest.approx(1 / 12)
    assert clock.calls == ["float32", "bfloat16"], "one slow bf16 step decides; no more are paid for"


@pytest.mark.parametrize("bf16_cost, expected", [(12.0, "float32"), (1.5, "float32"), (0.9, "float32"),
                                                 (0.8, "bfloat16"), (0.5, "bfloat16")])
def test_auto_dtype_picks_bf16_only_when_clearly_faster(bf16_cost, expected):
    clock = FakeClock(float32_cost=1.0, bf16_cost=bf16_cost)
    dtype, why = train.resolve_dtype("auto", "cpu", clock.step, timer=clock)
    assert dtype == expected, f"bf16 step {bf16_cost}x float32's time: auto should pick {expected}"
    assert why.startswith("auto:") and f"{1 / bf16_cost:.2f}x" in why


def test_explicit_dtype_is_never_measured_or_overridden():
    def step(ctx):
        raise AssertionError("an explicit --dtype must not be measured")
    for name in ("float32", "bfloat16", "float16"):
        assert train.resolve_dtype(name, "cpu", step) == (name, "as asked")
    with pytest.raises(ValueError, match="--dtype='fp8' is not one of auto, float32"):
        train.resolve_dtype("fp8", "cpu", step)


def test_auto_dtype_on_a_real_model_keeps_the_random_state():
    net = tiny_gpt()
    x = torch.randint(0, 50, (2, 16))
    before = torch.get_rng_state()
    dtype, why = train.resolve_dtype("auto", "cpu", lambda c: train.forward_backward(net, [(x, x)], c))
    assert dtype in ("float32", "bfloat16") and "measured" in why
    assert torch.equal(torch.get_rng_state(), before), "the timed steps must not move the run's random state"


def test_startup_line_log_and_checkpoint_name_the_chosen_dtype(data_dir, tmp_path, monkeypatch, capsys):
    for speedup, expected in ((0.1, "float32"), (1.5, "bfloat16")):
        monkeypatch.setattr(train, "measure_bf16_speedup", lambda *a, s=speedup, **k: s)
        out = tmp_path / expected
        train.run(tiny_config(data_dir, out, max_iters=4, eval_interval=4, dtype="auto"))
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("pretrain:"))
        assert f"{expected} (auto: a bf16 autocast step measured {speedup:.2f}x" in line, line
        first = read_jsonl_log(str(out / "log.jsonl"))[0]
        assert first["dtype"] == expected and first["iter"] == 0
        assert load_checkpoint(str(out / "ckpt.pt"))["config"]["dtype"] == expected


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")  # float16 asked for on a CPU
def test_training_precision_clears_the_timed_gradients_and_builds_context_and_scaler():
    net = tiny_gpt()
    x = torch.randint(0, 50, (2, 16))
    dtype, why, ctx, scaler = train.training_precision(
        "auto", "cpu", net, lambda c: train.forward_backward(net, [(x, x)], c))
    assert dtype in ("float32", "bfloat16") and why.startswith("auto:") and scaler is None
    assert all(p.grad is None for p in net.parameters()), "the timed steps must leave no gradient behind"
    with ctx:
        assert torch.is_autocast_enabled("cpu") == (dtype == "bfloat16")
    dtype, why, ctx, scaler = train.training_precision("float16", "cpu", net, None)
    assert (dtype, why) == ("float16", "as asked") and isinstance(scaler, torch.amp.GradScaler)
    assert train.training_precision("float32", "cpu", net, None)[3] is None


def test_a_resumed_run_may_change_its_precision(data_dir, tmp_path, capsys):
    out = tmp_path / "resumed"
    train.run(tiny_config(data_dir, out, max_iters=6, stop_at_iter=3, eval_interval=100))
    train.run(tiny_config(data_dir, out, max_iters=6, eval_interval=100, dtype="bfloat16"), flags={"resume"})
    assert "bfloat16 (as asked)" in capsys.readouterr().out
    assert [r["dtype"] for r in read_jsonl_log(str(out / "log.jsonl")) if "dtype" in r] == ["float32", "bfloat16"]
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["config"]["dtype"] == "bfloat16" and ckpt["resume"]["iter"] == 6


def _dtype_worker(rank, world, port, path):
    """Each rank measures something else; all must take rank 0's answer."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    clock = FakeClock(float32_cost=1.0, bf16_cost=2.0 if rank == 0 else 0.5)  # rank 1 alone finds bf16 faster
    choice = train.resolve_dtype("auto", "cpu", clock.step, timer=clock)
    torch.save({"choice": choice, "steps": len(clock.calls)}, f"{path}.{rank}")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_auto_dtype_under_torchrun_is_rank_zeros_choice(tmp_path):
    port = free_port()
    path = str(tmp_path / "choice")
    torch.multiprocessing.spawn(_dtype_worker, args=(2, port, path), nprocs=2, join=True)
    rank0, rank1 = torch.load(f"{path}.0"), torch.load(f"{path}.1")
    assert rank0["choice"][0] == rank1["choice"][0] == "float32", "ranks that disagree would run different kernels"
    assert rank0["choice"] == rank1["choice"] and rank1["steps"] == 0, "only rank 0 measures"


def test_no_preset_names_a_dtype():
    import ppo
    import reward
    import sft
    for stage in (train, sft, reward, ppo):
        assert stage.DEFAULTS["dtype"] == "auto", f"{stage.__name__}.py: the default dtype should be auto"
        for name, preset in stage.PRESETS.items():
            assert "dtype" not in preset, f"{stage.__name__}.py preset {name!r} names a dtype"


# --- learning rate, clipping, data -------------------------------------------------

def test_cosine_lr_warmup_peak_and_end():
    assert cosine_lr(0, 1.0, 10, 110) == pytest.approx(0.1)
    assert cosine_lr(9, 1.0, 10, 110) == pytest.approx(1.0), "peak at the end of warmup"
    assert cosine_lr(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert cosine_lr(60, 1.0, 10, 110) == pytest.approx(0.1 + 0.5 * 0.9), "half-way: the cosine is at 0"
    assert cosine_lr(110, 1.0, 10, 110) == pytest.approx(0.1), "ends at 10% of the peak"
    assert cosine_lr(500, 1.0, 10, 110) == pytest.approx(0.1)
    lrs = [cosine_lr(i, 1.0, 10, 110) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "decay is monotone"


def test_clip_gradients_scales_to_max_norm():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    layer(torch.randn(5, 4)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    returned = train.clip_gradients(layer, max_norm=float(norm) / 2)
    assert torch.allclose(returned, norm)
    for g, p in zip(grads, layer.parameters()):
        assert torch.allclose(p.grad, g / 2, atol=1e-5), "every gradient scaled by the same factor"
    assert torch.allclose(train.clip_gradients(layer, 0), norm / 2), "0 disables clipping but reports the norm"


def test_get_batch_windows_are_shifted_slices():
    data = np.arange(100, dtype=np.uint16)
    gen = torch.Generator().manual_seed(0)
    x, y = train.get_batch(data, 8, 5, gen)
    assert x.shape == (5, 8) and x.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert row_x.tolist() == list(range(start, start + 8))
        assert row_y.tolist() == list(range(start + 1, start + 9))
    again = train.get_batch(data, 8, 5, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x), "the same seed gives the same windows"


def test_get_batch_draws_every_valid_window_even_the_last():
    data = np.arange(11, dtype=np.uint16)  # block_size 8: windows of 9 tokens start at 0, 1 or 2
    x, y = train.get_batch(data, 8, 300, torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2}, "the last window (start len - block_size - 1) must be drawn"
    assert int(y.max()) == 10
    one = np.arange(9, dtype=np.uint16)  # exactly block_size + 1 tokens: one window
    x, y = train.get_batch(one, 8, 3, torch.Generator().manual_seed(0))
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3


def test_load_dataset_accepts_a_split_of_one_window(tmp_path):
    tok = make_dataset(str(tmp_path / "toy"))
    n_val = len(np.fromfile(str(tmp_path / "toy" / "val.bin"), dtype=np.uint16))
    config = dict(train.DEFAULTS, dataset="toy", data_dir=str(tmp_path), block_size=n_val - 1)
    data, tokenizer, _ = train.load_dataset(config)
    assert len(data["val"]) == n_val and tokenizer.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match=f"fewer than block_size \\+ 1 = {n_val + 1}"):
        train.load_dataset(dict(config, block_size=n_val))


def test_token_byte_lengths_and_bits_per_byte():
    tok = bpe.Tokenizer(bpe.train_naive("abab abab", 2))
    lengths = train.token_byte_lengths(tok)
    assert lengths.shape == (tok.vocab_size,)
    assert lengths[97] == 1 and lengths[256] == len(tok.token_bytes[256]) and lengths[-1] == 1
    assert train.bits_per_byte(math.log(2) * 10, 5) == pytest.approx(2.0)
    # another BPE's ids (from_vocab): the merge "ab" as id 0, the byte "a" as id 256, one special token
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[0], vocab[97], vocab[256] = b"ab", b"\x00", b"a"
    other = bpe.Tokenizer.from_vocab(vocab, [(b"a", b"b")], special_tokens=["<|s|>"])
    lengths = train.token_byte_lengths(other)
    assert lengths[0] == 2 and lengths[256] == 1 and lengths[other.special_ids["<|s|>"]] == 1, \
        "byte lengths are indexed by the tokenizer's own ids"


# --- one step, accumulation, DDP ----------------------------------------------------

def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))


def test_forward_backward_accumulation_equals_one_big_batch():
    torch.manual_seed(1)
    x, y = torch.randint(0, 50, (8, 16)), torch.randint(0, 50, (8, 16))
    big = tiny_gpt()
    train.forward_backward(big, [(x, y)], contextlib.nullcontext())
    small = tiny_gpt()
    loss = train.forward_backward(small, [(x[:4], y[:4]), (x[4:], y[4:])], contextlib.nullcontext())
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert torch.allclose(loss, big(x, y)[1], atol=1e-6)


def _ddp_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1)
    x, y = torch.randint(0, 50, (8, 16)), torch.randint(0, 50, (8, 16))
    ddp = train.DDP(tiny_gpt())
    mine = [(x[rank * 4:rank * 4 + 2], y[rank * 4:rank * 4 + 2]), (x[rank * 4 + 2:rank * 4 + 4], y[rank * 4 + 2:rank * 4 + 4])]
    train.forward_backward(ddp, mine, contextlib.nullcontext())
    if rank == 0:
        torch.save([p.grad for p in ddp.module.parameters()], path)
    torch.distributed.barrier()  # neither process leaves while the other still talks to it (a gloo abort otherwise)
    del ddp  # before its process group: a DDP wrapper freed afterwards can hang at exit (see train.run)
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    port = free_port()
    path = str(tmp_path / "grads.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, path), nprocs=2, join=True)
    ddp_grads = torch.load(path)
    torch.manual_seed(1)
    x, y = torch.randint(0, 50, (8, 16)), torch.randint(0, 50, (8, 16))
    single = tiny_gpt()
    train.forward_backward(single, [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], contextlib.nullcontext())
    for a, b in zip(single.parameters(), ddp_grads):
        assert torch.allclose(a.grad, b, atol=1e-6), "DDP over 2 processes must equal one process on the global batch"


# --- whole runs ------------------------------------------------------------------------

def test_tiny_run_learns_and_writes_its_files(data_dir, tmp_path):
    out = tmp_path / "run"
    metrics = train.run(tiny_config(data_dir, out, max_iters=60, eval_interval=30))
    ckpt = load_checkpoint(str(out / "ckpt.pt"), stages={"pretrain"})
    assert ckpt["metrics"]["iter"] == 60 and ckpt["parent"] is None
    log = read_jsonl_log(str(out / "log.jsonl"))
    evals = [r for r in log if "val_loss" in r]
    assert evals[0]["val_loss"] < math.log(ckpt["model_args"]["vocab_size"]) - 1.0, "it learned something"
    assert metrics["val_bpb"] > 0 and (out / "loss.png").stat().st_size > 1000
    assert bpe.Tokenizer.from_dict(ckpt["tokenizer"]).vocab_size == ckpt["model_args"]["vocab_size"]


def test_exact_resume_is_bit_for_bit(data_dir, tmp_path):
    common = dict(max_iters=12, eval_interval=100, dropout=0.1, warmup_iters=3)
    train.run(tiny_config(data_dir, tmp_path / "straight", log_interval=1, **common))
    train.run(tiny_config(data_dir, tmp_path / "resumed", log_interval=1, stop_at_iter=6, **common))
    train.run(tiny_config(data_dir, tmp_path / "resumed", log_interval=1, **common), flags={"resume"})
    straight = [r["loss"] for r in read_jsonl_log(str(tmp_path / "straight" / "log.jsonl")) if "loss" in r]
    resumed = [r["loss"] for r in read_jsonl_log(str(tmp_path / "resumed" / "log.jsonl")) if "loss" in r]
    assert len(straight) == 12 and straight == resumed, "N steps == N/2 + resume + N/2, bit for bit"
    a = load_checkpoint(str(tmp_path / "straight"))["model"]
    b = load_checkpoint(str(tmp_path / "resumed"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_autocast_path_on_cpu(data_dir, tmp_path):
    metrics = train.run(tiny_config(data_dir, tmp_path / "bf16", dtype="bfloat16", max_iters=30, eval_interval=30))
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] < 5.0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real_forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 5 and loss is not None:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="loss is nan at iteration 5"):
        train.run(tiny_config(data_dir, out, max_iters=20, eval_interval=2))
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["resume"]["iter"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_weights_that_turn_nan_are_never_saved(data_dir, tmp_path, capsys):
    """A learning rate that blows the weights up: the run stops with one line; the checkpoint on disk is finite."""
    out = tmp_path / "blown"
    argv = ["--config", "tiny", f"--data_dir={data_dir}", "--dataset=toy", f"--out_dir={out}", "--learning_rate=1e6",
            "--eval_interval=1", "--max_iters=6", "--sample_tokens=0", "--dtype=float32"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not finite" in err and "last" in err, err
    saved = torch.load(str(out / "ckpt.pt"), weights_only=True)
    assert model.nonfinite(saved) == [], "the checkpoint kept is the last finite one"


def test_a_full_disk_keeps_the_checkpoint_and_says_so_in_one_line(data_dir, tmp_path):
    out = tmp_path / "full"
    train.run(tiny_config(data_dir, out, max_iters=2, eval_interval=2))
    before = prepare_data.sha256_file(str(out / "ckpt.pt"))

    def small_disk():  # files may grow to 100 kB: the log and the plot fit, the next checkpoint does not
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    argv = ["--config", "tiny", f"--data_dir={data_dir}", "--dataset=toy", f"--out_dir={out}", "--max_iters=4",
            "--resume", "--dtype=float32"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv], capture_output=True, text=True,
                            timeout=120, preexec_fn=small_disk)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"train.py: error: {out / 'ckpt.pt'}: File too large (check that its folder")
    assert prepare_data.sha256_file(str(out / "ckpt.pt")) == before, "what was saved before stays"
    assert not [name for name in os.listdir(out) if ".tmp" in name], "no temporary file is left"


def test_resume_with_weights_of_another_shape_is_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "resized"
    train.run(tiny_config(data_dir, out, max_iters=2, eval_interval=2))
    ckpt = load_checkpoint(str(out))
    ckpt["model"]["transformer.wpe.weight"] = torch.zeros(64, 32)  # a crafted or mixed-up checkpoint
    model.save_checkpoint(ckpt, str(out / "ckpt.pt"))
    argv = ["--config", "tiny", f"--data_dir={data_dir}", "--dataset=toy", f"--out_dir={out}", "--resume",
            "--max_iters=4"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ckpt.pt weights do not fit its model_args" in err, err


def test_claim_folder_refuses_a_running_owner_and_takes_over_a_dead_ones(tmp_path):
    folder = str(tmp_path / "run")
    lock = train.claim_folder(folder)
    assert lock == os.path.join(folder, "run.lock") and open(lock).read() == str(os.getpid())
    assert train.claim_folder(folder) == lock, "this process may claim its own folder again"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(lock, "w") as f:
            f.write(str(sleeper.pid))
        with pytest.raises(ValueError, match=f"is in use by another run .process {sleeper.pid}"):
            train.claim_folder(folder)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert train.claim_folder(folder) == lock and open(lock).read() == str(os.getpid()), "a killed run's is taken over"


def test_a_second_run_on_a_folder_refuses_while_the_first_runs(data_dir, tmp_path, capsys):
    out = tmp_path / "shared"
    os.makedirs(out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the first run
    argv = ["--config", "tiny", f"--data_dir={data_dir}", "--dataset=toy", f"--out_dir={out}", "--max_iters=2",
            "--sample_tokens=0", "--dtype=float32"]
    try:
        (out / "run.lock").write_text(str(sleeper.pid))
        assert train.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is in use by another run (process {sleeper.pid}" in err, err
        assert os.listdir(out) == ["run.lock"], "the refused run wrote nothing"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert train.main(argv) == 0, "a killed run's lock does not stay in the way"
    assert not (out / "run.lock").exists(), "a finished run removes its lock"


def test_a_failed_overwrite_keeps_the_older_runs_log(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "older"
    train.run(tiny_config(data_dir, out, max_iters=4, eval_interval=4, log_interval=1))
    files = {name: (out / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    real_forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, idx, targets=None: (
        lambda logits, loss: (logits, loss * float("nan") if loss is not None and self.training else loss))(
        *real_forward(self, idx, targets)))
    with pytest.raises(FloatingPointError, match="loss is nan at iteration 0"):
        train.run(tiny_config(data_dir, out, max_iters=4, eval_interval=4), flags={"overwrite"})
    assert {name: (out / name).read_bytes() for name in files} == files, "nothing of the older run is lost"
    monkeypatch.setattr(GPT, "forward", real_forward)
    train.run(tiny_config(data_dir, out, max_iters=2, eval_interval=2, log_interval=1), flags={"overwrite"})
    assert [r["iter"] for r in read_jsonl_log(str(out / "log.jsonl")) if "loss" in r] == [1, 2]
    assert not (out / "log.new.jsonl").exists(), "the new run's log took the older one's place at its first save"


def test_resume_refuses_a_rebuilt_tokenizer_and_says_which_options_it_keeps(data_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    root = tmp_path / "data"
    make_dataset(str(root / "toy"))
    train.run(tiny_config(str(root), out, max_iters=2, eval_interval=2))
    capsys.readouterr()
    train.run(tiny_config(str(root), out, max_iters=3, eval_interval=3, n_embd=64), flags={"resume"})
    said = capsys.readouterr().out
    assert "'s own n_embd=32 (not 64): a resumed run may change only max_iters" in said, said
    make_dataset(str(root / "toy"), n_words=5000)  # other text, other merges, the same vocabulary size
    assert bpe.Tokenizer.load(str(root / "toy" / "tokenizer.json")).vocab_size == 300
    with pytest.raises(ValueError, match="tokenizer.json is not the tokenizer .*ckpt.pt learned with"):
        train.run(tiny_config(str(root), out, max_iters=4, eval_interval=4), flags={"resume"})


def test_check_least_names_the_first_key_below_its_least():
    train.check_least({"a": 1, "b": 0, "c": 2}, {"a": 1, "b": 0, "d": 5})  # d: not in the config
    with pytest.raises(ValueError, match="--b=0 must be at least 1"):
        train.check_least({"a": 1, "b": 0, "c": -1}, {"a": 1, "b": 1, "c": 0})


def test_existing_checkpoint_is_not_overwritten_without_a_flag(data_dir, tmp_path):
    out = tmp_path / "keep"
    train.run(tiny_config(data_dir, out, max_iters=4, eval_interval=4))
    before = prepare_data.sha256_file(str(out / "ckpt.pt"))
    with pytest.raises(ValueError, match="already exists: pass --resume"):
        train.run(tiny_config(data_dir, out, max_iters=4))
    assert prepare_data.sha256_file(str(out / "ckpt.pt")) == before
    train.run(tiny_config(data_dir, out, max_iters=4, eval_interval=4), flags={"overwrite"})


def test_main_bad_inputs_give_one_line(data_dir, tmp_path, capsys):
    toy = [f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", "--max_iters=2"]
    for name, change in [("empty", {"train.bin": b""}), ("cut", {"train.bin": b"abc"}),
                         ("garbled", {"meta.json": b"[]"})]:
        shutil.copytree(os.path.join(data_dir, "toy"), tmp_path / "data" / name)
        for file, content in change.items():
            (tmp_path / "data" / name / file).write_bytes(content)
    (tmp_path / "afile").write_text("")
    cases = [
        (["--config", "tiny", "--dataset=empty"] + toy, "train.bin is empty: rerun `python prepare_data.py"),
        (["--config", "tiny", "--dataset=cut"] + toy, "train.bin is cut short: rerun `python prepare_data.py"),
        (["--config", "tiny", "--dataset=garbled"] + toy, "garbled/meta.json: ValueError): run `python prepare_data"),
        (["--config", "tiny", f"--data_dir={data_dir}", "--dataset=toy", f"--out_dir={tmp_path}/afile/x"],
         "afile/x: Not a directory (check that its folder exists"),
        (["--config", "tiny", f"--out_dir={tmp_path}/o", "--batch_size=0"], "--batch_size=0 must be at least 1"),
        (["--config", "tiny", f"--out_dir={tmp_path}/o", "--eval_interval=0"], "--eval_interval=0 must be at least 1"),
        (["--config", "tiny", f"--out_dir={tmp_path}/o", "--log_interval=0"], "--log_interval=0 must be at least 1"),
        (["--config", "tiny", f"--out_dir={tmp_path}/o", "--eval_iters=0"], "--eval_iters=0 must be at least 1"),
        (["--config", "tiny", f"--out_dir={tmp_path}/o", "--grad_accum=0"], "--grad_accum=0 must be at least 1"),
        (["--config", "tiny", f"--out_dir={tmp_path}/o", "--max_iters=-5"], "--max_iters=-5 must be at least 1"),
        (["--config", "tiny", "--learning_rate=nan"], "--learning_rate='nan' is not a valid float"),
        (["--config", "tiny", f"--out_dir={tmp_path}/o", "--device=nodevice"], "--device='nodevice' is not available"),
        (["--config", "tiny", "--dataset=nothing", f"--data_dir={tmp_path}"], "is not prepared"),
        (["--config", "tiny", "--norm=batchnorm"], "norm='batchnorm'"),
        (["--config", "tiny", "--n_embd=33"], "divisible"),
        (["--config", "tiny", "--batch_size=x"], "not a valid int"),
        (["--config", "tiny", f"--data_dir={data_dir}", "--dataset=toy", "--block_size=100000"], "fewer than block_size"),
        (["--config", "tiny", f"--out_dir={tmp_path}/none", "--resume"], "does not exist"),
    ]
    for argv, message in cases:
        assert train.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("train.py: error:") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_and_exits_cleanly(data_dir, tmp_path, sig):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", "tiny", f"--data_dir={data_dir}",
           "--dataset=toy", f"--out_dir={out}", "--max_iters=100000", "--eval_interval=100000",
           "--log_interval=5", "--sample_tokens=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    # the first training step is logged at iteration 5 (the log's first line is the chosen precision)
    while not any("loss" in r for r in read_jsonl_log(str(out / "log.jsonl"))) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "continue with --resume" in output and ("Ctrl-C: finishing" if sig == signal.SIGINT else "SIGTERM") in output
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["resume"]["iter"] >= 5


def test_run_tells_its_caller_it_was_stopped(data_dir, tmp_path, monkeypatch):
    class StopAtOnce(train.StopRequested):  # as if Ctrl-C came during the first step
        def __init__(self):
            super().__init__()
            self.requested = True
    monkeypatch.setattr(train, "StopRequested", StopAtOnce)
    metrics = train.run(tiny_config(data_dir, tmp_path / "stopped", max_iters=50, eval_interval=100))
    assert metrics["stopped"] is True, "a caller running several runs (eval.py --scaling) must stop too"
    assert load_checkpoint(str(tmp_path / "stopped"))["resume"]["iter"] == 1
    monkeypatch.undo()
    assert train.run(tiny_config(data_dir, tmp_path / "whole", max_iters=2, eval_interval=2))["stopped"] is False


# --- logs and plots --------------------------------------------------------------------

def test_jsonl_log_skips_torn_line_and_a_resumed_run_truncates_it(tmp_path):
    path = str(tmp_path / "log.jsonl")
    train.append_jsonl(path, {"iter": 1, "loss": 2.0})
    train.append_jsonl(path, {"iter": 2, "loss": 1.5})
    train.append_jsonl(path, {"iter": 3, "loss": 1.2})
    with open(path, "a") as f:
        f.write('{"iter": 4, "lo')
    assert [r["iter"] for r in read_jsonl_log(path)] == [1, 2, 3]
    run = types.SimpleNamespace(master=True, out_dir=str(tmp_path), resume={}, log_path=path, ckpt_path="c", stage="s")
    train.open_log(run, 2, "resumed", "float32", "as asked")  # resuming at iteration 2
    records = read_jsonl_log(path)
    assert [r["iter"] for r in records] == [1, 2, 2], "the lines after the checkpoint's iteration are forgotten"
    assert records[-1] == {"iter": 2, "dtype": "float32", "dtype_why": "as asked"}, "then the precision is logged"
    assert read_jsonl_log(str(tmp_path / "none.jsonl")) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="/dev/full (a device that is always full) is Linux's")
def test_append_jsonl_on_a_full_disk_names_the_file():
    with pytest.raises(OSError) as full:
        train.append_jsonl("/dev/full", {"iter": 1})
    assert full.value.filename == "/dev/full" and "No space left" in prepare_data.error_line(full.value)


def test_plot_curves_writes_a_png(tmp_path):
    path = str(tmp_path / "loss.png")
    plot_curves([{"iter": i, "loss": 1 / (i + 1)} for i in range(10)], [("loss", "loss")], path, "t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_format_eta():
    assert train.format_eta(5) == "5s" and train.format_eta(75) == "1m15s" and train.format_eta(3725) == "1h02m"


@pytest.mark.slow
def test_compiled_run_saves_clean_keys(data_dir, tmp_path):
    """torch.compile on CPU takes ~30 s, so this one is marked slow."""
    out = tmp_path / "compiled"
    train.run(tiny_config(data_dir, out, max_iters=4, eval_interval=4, compile=True))
    ckpt = load_checkpoint(str(out))
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    model.model_from_checkpoint(ckpt)


def test_compile_warm_up_batch_is_laid_out_like_the_loops(data_dir, tmp_path, monkeypatch):
    """torch.compile builds kernels for the inputs it first sees (shape, strides, which
    ones share memory): a warm-up batch laid out otherwise than the loop's makes the first
    training step build them all again (seen as a 'stride mismatch' recompilation)."""
    seen = {}

    def recording_compile(module, example_batch, ctx, master=True, mode=None):
        seen["warm-up"] = example_batch
        return module

    real_forward_backward = train.forward_backward

    def recording_forward_backward(module, micro_batches, ctx, scaler=None):
        seen.setdefault("loop", micro_batches[0])
        return real_forward_backward(module, micro_batches, ctx, scaler)

    monkeypatch.setattr(train, "compile_or_fall_back", recording_compile)
    monkeypatch.setattr(train, "forward_backward", recording_forward_backward)
    train.run(tiny_config(data_dir, tmp_path / "layout", compile=True, max_iters=2, eval_interval=2))

    def layout(batch):
        x, y = batch
        shared = x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
        return [(t.shape, t.stride(), t.dtype, t.device) for t in batch], shared

    assert layout(seen["warm-up"]) == layout(seen["loop"]), "compile's warm-up batch differs from the loop's"


def test_compile_failure_falls_back_to_eager(data_dir, tmp_path, monkeypatch, capsys):
    def broken_compile(module, **kwargs):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return fail

    monkeypatch.setattr(train.torch, "compile", broken_compile)
    metrics = train.run(tiny_config(data_dir, tmp_path / "fallback", compile=True, max_iters=4, eval_interval=4))
    assert "torch.compile failed (RuntimeError: no C++ compiler found); training without it" in capsys.readouterr().out
    assert math.isfinite(metrics["val_loss"])


# --- optimizer, efficiency figures, deterministic kernels ------------------------------

def machinery_config():
    return GPTConfig(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32)


def test_optimizer_decays_matrices_only():
    torch.manual_seed(0)
    m = GPT(machinery_config())
    opt = configure_optimizer(m, learning_rate=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == m.num_params()
    assert any(p is m.transformer.wte.weight for p in decay["params"])
    assert opt.defaults["fused"] is True


def test_deterministic_algorithms_sets_and_restores_torch_flag():
    assert not torch.are_deterministic_algorithms_enabled(), "tests start without deterministic mode"
    with train.deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled(), "inside, torch must use deterministic kernels"
        assert torch.is_deterministic_algorithms_warn_only_enabled(), "an op without one must warn, not fail"
    assert not torch.are_deterministic_algorithms_enabled(), "the previous setting must come back"
    with pytest.raises(KeyError):
        with train.deterministic_algorithms(True):
            raise KeyError("boom")
    assert not torch.are_deterministic_algorithms_enabled(), "restored after an error too"
    with train.deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled(), "enabled=False changes nothing"


# --- a training run's frame: start, log, step, progress ---------------------------------

def frame_config(tmp_path, **overrides):
    return dict({"device": "cpu", "dtype": "auto", "grad_accum": 1, "max_iters": 10, "stop_at_iter": 0,
                 "learning_rate": 1e-2, "warmup_iters": 2, "min_lr_ratio": 0.1, "seed": 1, "out_dir": ""},
                **overrides)


def test_start_run_checks_resume_overwrite_and_names(tmp_path):
    config = frame_config(tmp_path, stop_at_iter=4)
    run = train.start_run(dict(config), (), "pretrain", str(tmp_path / "a"))
    assert (run.rank, run.world, run.master, run.device, run.device_type) == (0, 1, True, "cpu", "cpu")
    assert run.ckpt_path == str(tmp_path / "a" / "ckpt.pt") and run.log_path == str(tmp_path / "a" / "log.jsonl")
    assert run.end_iter == 4 and run.resume is None, "stop_at_iter ends the run early"
    with pytest.raises(ValueError, match="--dtype='fp8' is not one of"):
        train.start_run(dict(config, dtype="fp8"), (), "pretrain", str(tmp_path / "a"))
    model.save_checkpoint({"stage": "pretrain", "model_args": {}, "model": {}, "tokenizer": {}, "parent": None,
                           "metrics": {}, "config": dict(config, seed=7, max_iters=99),
                           "resume": {"world": 1}}, str(tmp_path / "a" / "ckpt.pt"))
    with pytest.raises(ValueError, match="already exists: pass --resume"):
        train.start_run(dict(config), (), "pretrain", str(tmp_path / "a"))
    resumed_config = dict(config, max_iters=20)
    run = train.start_run(resumed_config, {"resume"}, "pretrain", str(tmp_path / "a"))
    assert run.resume is not None and resumed_config["seed"] == 7, "a resumed run takes its saved keys"
    assert resumed_config["max_iters"] == 20, "but how long it runs is the caller's"
    with pytest.raises(model.CheckpointError, match="'pretrain' checkpoint"):
        train.start_run(dict(config), {"resume"}, "sft", str(tmp_path / "a"))


def test_scheduled_lr_sets_the_cosine_rate():
    m = tiny_gpt()
    opt = configure_optimizer(m, 1.0, 0.0)
    config = {"learning_rate": 1e-2, "warmup_iters": 2, "max_iters": 10, "min_lr_ratio": 0.1}
    for it in (0, 1, 5, 12):
        lr = train.scheduled_lr(opt, it, config)
        assert lr == cosine_lr(it, 1e-2, 2, 10, 0.1)
        assert all(g["lr"] == lr for g in opt.param_groups), "every group gets the rate"


def test_optimizer_step_clips_steps_clears_and_stops_on_nan():
    m = tiny_gpt()
    opt = configure_optimizer(m, 1e-2, 0.0)
    run = types.SimpleNamespace(world=1, ckpt_path="x/ckpt.pt")
    x, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    loss = train.forward_backward(m, [(x, y)], contextlib.nullcontext())
    want_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in m.parameters()))
    before = [p.detach().clone() for p in m.parameters()]
    value, norm = train.optimizer_step(m, opt, loss, None, 0.5, run, 3)
    assert value == pytest.approx(loss.item()) and norm == pytest.approx(want_norm.item(), rel=1e-5)
    assert any(not torch.equal(a, p) for a, p in zip(before, m.parameters())), "the step moves the weights"
    assert all(p.grad is None for p in m.parameters()), "gradients are cleared after the step"
    train.forward_backward(m, [(x, y)], contextlib.nullcontext())
    with pytest.raises(FloatingPointError, match="loss is nan at iteration 7.*x/ckpt.pt is kept"):
        train.optimizer_step(m, opt, torch.tensor(float("nan")), None, 1.0, run, 7)


def test_progress_prints_every_interval_with_rate_and_eta(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    run = types.SimpleNamespace(master=True, world=1, log_path=str(log), ckpt_path="c")
    progress = train.Progress(run, 0, 4, 2, unit="tok")
    for it in range(1, 5):
        progress.update(it, {"loss": 1.0 / it, "lr": 0.1, "grad_norm": 2.0}, 100)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter")]
    assert len(lines) == 2 and "iter      2/4" in lines[0] and "ETA" in lines[0] and "k tok/s" in lines[0]
    records = read_jsonl_log(str(log))
    assert [r["iter"] for r in records] == [2, 4] and records[1]["loss"] == 0.25
    assert all(r["tok_per_s"] > 0 and "time" in r for r in records), "each line is also a log record"


# --- past one GPU's memory: fsdp and tp (2 gloo processes) ------------------------------

def test_qkv_rows_put_each_ranks_heads_together():
    # n_embd 4, 2 ranks: q rows 0-3, k 4-7, v 8-11; rank 0 takes q0 q1 k0 k1 v0 v1, rank 1 the rest
    assert train.qkv_rows(4, 2).tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]
    assert train.qkv_rows(4, 1).tolist() == list(range(12)), "one rank: the order unchanged"


def test_parameter_names_follow_the_optimizers_numbering():
    gpt = tiny_gpt()
    optimizer = configure_optimizer(gpt, 1e-3, 0.1)
    names = train.parameter_names(optimizer, gpt)
    by_name = dict(gpt.named_parameters())
    assert len(names) == len(list(gpt.parameters()))
    assert all(by_name[name] is p for p, name in names)
    assert [p for p, _ in names] == [p for group in optimizer.param_groups for p in group["params"]]


def test_tp_needs_heads_divisible_by_the_processes():
    gpt = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=3, n_embd=12))
    with pytest.raises(ValueError, match="n_head=3 heads across 2 processes"):
        train.shard_model(gpt, "tp", 2, "cpu")


def test_sharded_modes_need_torchrun_and_a_known_name(data_dir, tmp_path):
    with pytest.raises(ValueError, match="start it with torchrun"):
        train.run(tiny_config(data_dir, tmp_path / "tp", parallel="tp"))
    with pytest.raises(ValueError, match="is not one of ddp, fsdp, tp"):
        train.run(tiny_config(data_dir, tmp_path / "zero", parallel="zero3"))


def _sharded_steps(model, batches, parallel, world, rank):
    """Three AdamW steps with clipping over the global batches: fsdp takes this rank's half, tp all of it."""
    optimizer = configure_optimizer(model, 3e-3, 0.1)
    losses = []
    for x, y in batches:
        if parallel == "fsdp":
            share = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            x, y = x[share], y[share]
        loss = train.forward_backward(model, [(x, y)], contextlib.nullcontext())
        train.clip_gradients(model, 0.5)  # the norm of sharded gradients must be the whole model's
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.all_reduce(loss)
        losses.append(loss.item() / world)
    return losses


def _sharded_worker(rank, world, port, path, parallel):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(1)
    batches = [(torch.randint(0, 50, (8, 16)), torch.randint(0, 50, (8, 16))) for _ in range(3)]
    run = types.SimpleNamespace(world=world, master=rank == 0, device="cpu", device_type="cpu", parallel=parallel)
    gpt = train.wrap_model(tiny_gpt(), run, parallel=parallel)
    assert any(isinstance(p, train.DTensor) for p in gpt.parameters()), f"{parallel} sharded nothing"
    losses = _sharded_steps(gpt, batches, parallel, world, rank)
    weights = train.whole_model_state(gpt, run)
    if rank == 0:
        torch.save({"losses": losses, "weights": weights}, path)
    del gpt  # the sharded parameters go before the process group (their hooks hold them in cycles), as in train.run
    gc.collect()
    torch.distributed.barrier()  # neither process leaves while the other still talks to it (a gloo abort otherwise)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("parallel", ["fsdp", "tp"])
def test_sharded_training_matches_one_process(tmp_path, parallel):
    path = str(tmp_path / "sharded.pt")
    torch.multiprocessing.spawn(_sharded_worker, args=(2, free_port(), path, parallel), nprocs=2, join=True)
    sharded = torch.load(path)
    torch.manual_seed(1)
    batches = [(torch.randint(0, 50, (8, 16)), torch.randint(0, 50, (8, 16))) for _ in range(3)]
    single = tiny_gpt()
    losses = _sharded_steps(single, batches, "ddp", 1, 0)
    assert sharded["losses"] == pytest.approx(losses, abs=1e-6), f"{parallel}: the losses of 2 processes differ"
    for name, tensor in single.state_dict().items():
        # float32 sums in another order, then amplified by Adam's division early on: 1e-5, not bit-equal
        assert torch.allclose(sharded["weights"][name], tensor, atol=1e-5), f"{parallel}: {name} differs"


def _run_worker(rank, world, runs):
    for port, config, flags in runs:  # one after another in the same two processes: torch starts once
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        train.run(config, flags)


@pytest.mark.parametrize("parallel", ["fsdp", "tp"])
def test_sharded_run_resumes_bit_for_bit_and_its_checkpoint_loads(data_dir, tmp_path, parallel):
    common = dict(max_iters=6, eval_interval=3, grad_accum=2, log_interval=1, parallel=parallel)
    runs = [(free_port(), tiny_config(data_dir, tmp_path / out, **common, **extra), flags)
            for out, extra, flags in (("straight", {}, set()), ("resumed", {"stop_at_iter": 3}, set()),
                                      ("resumed", {}, {"resume"}))]
    torch.multiprocessing.spawn(_run_worker, args=(2, runs), nprocs=2, join=True)
    logs = [[r["loss"] for r in read_jsonl_log(str(tmp_path / out / "log.jsonl")) if "loss" in r]
            for out in ("straight", "resumed")]
    assert len(logs[0]) == 6 and logs[0] == logs[1], f"{parallel}: a resumed run must continue bit for bit"
    straight, resumed = (load_checkpoint(str(tmp_path / out)) for out in ("straight", "resumed"))
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    one_file = model.model_from_checkpoint(straight)  # whole weights: any stage or sample.py reads them
    assert one_file.generate(torch.zeros((1, 1), dtype=torch.long), 4, temperature=0).shape == (1, 5)
