"""Tests for sample.py: prompt building, chat stopping, the command line."""

import os
import subprocess
import sys
import types

import pytest
import torch

import bpe
import sample
import train
from model import CheckpointError, load_checkpoint, QuantizedLinear, save_checkpoint
from test_train import make_dataset, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny pretrain checkpoint, and copies of it labelled sft and rm."""
    root = tmp_path_factory.mktemp("sample")
    make_dataset(str(root / "data" / "toy"))
    train.run(tiny_config(str(root / "data"), root / "pretrain", max_iters=30, eval_interval=30))
    ckpt = load_checkpoint(str(root / "pretrain"))
    for stage in ("sft", "rm"):
        save_checkpoint({**ckpt, "stage": stage}, str(root / stage / "ckpt.pt"))
    return root


def test_prompt_ids_base_and_chat(checkpoints):
    _, tok, _ = sample.load_for_sampling(str(checkpoints / "pretrain"))
    sid = tok.special_ids
    assert sample.prompt_ids(tok, "the cat", chat=False) == [sid[bpe.DOC_SEP]] + tok.encode("the cat")
    assert sample.prompt_ids(tok, "hi", chat=True) == tok.encode_chat("hi")[0]
    two_turns = sample.prompt_ids(tok, "and now?", chat=True, history=[("hi", "hello")])
    first_p, first_r = tok.encode_chat("hi", "hello")
    assert two_turns == first_p + first_r + tok.encode_chat("and now?")[0]


def test_load_for_sampling_refuses_reward_models(checkpoints):
    with pytest.raises(CheckpointError, match="'rm' checkpoint, which does not generate"):
        sample.load_for_sampling(str(checkpoints / "rm"))
    model, tok, stage = sample.load_for_sampling(str(checkpoints / "sft"))
    assert stage == "sft" and not model.training


def test_generate_text_is_seeded_and_chat_stops_at_end_of_turn(checkpoints):
    model, tok, _ = sample.load_for_sampling(str(checkpoints / "pretrain"))
    ids = sample.prompt_ids(tok, "the cat", chat=False)
    a = sample.generate_text(model, tok, ids, False, num_samples=2, max_new_tokens=10, seed=1)
    assert a == sample.generate_text(model, tok, ids, False, num_samples=2, max_new_tokens=10, seed=1)
    assert len(a) == 2 and all(isinstance(t, str) for t in a)
    # make end of turn the likeliest token after two tokens: chat text must stop there
    end = tok.special_ids[bpe.END_OF_TURN]
    chat_ids = sample.prompt_ids(tok, "hi", chat=True)
    calls = {"n": 0}

    def push_end_of_turn(module, inputs, logits):
        calls["n"] += 1
        if calls["n"] > 2:
            logits = logits.clone()
            logits[..., end] += 100.0
        return logits

    hook = model.lm_head.register_forward_hook(push_end_of_turn)
    try:
        texts = sample.generate_text(model, tok, chat_ids, True, max_new_tokens=10, temperature=0)
    finally:
        hook.remove()
    assert calls["n"] == 3, "generation stops right after the end-of-turn token"
    free = model.generate(torch.tensor([chat_ids]), 2, temperature=0)[0, len(chat_ids):].tolist()
    assert texts == [tok.decode(free)], "the end-of-turn marker is not part of the text"


def test_long_prompt_keeps_its_end(checkpoints):
    model, tok, _ = sample.load_for_sampling(str(checkpoints / "pretrain"))
    ids = list(range(100, 100 + 200))  # longer than block_size 32
    texts = sample.generate_text(model, tok, ids, False, max_new_tokens=5, temperature=0)
    kept = model.generate(torch.tensor([ids[-27:]]), 5, temperature=0)[0, 27:].tolist()
    assert texts == [tok.decode(kept)], "the most recent block_size - 5 tokens of the prompt, then 5 new"


def test_a_long_answer_never_crowds_out_the_prompt(checkpoints):
    model, tok, _ = sample.load_for_sampling(str(checkpoints / "pretrain"))
    ids = list(range(100, 112))  # 12 tokens; block_size 32
    texts = sample.generate_text(model, tok, ids, False, max_new_tokens=150, temperature=0)
    whole = model.generate(torch.tensor([ids]), 20, temperature=0)[0, 12:].tolist()
    assert texts == [tok.decode(whole)], "the whole prompt, then the 20 tokens left in the block"


def test_chat_loop_keeps_history(checkpoints):
    model, tok, _ = sample.load_for_sampling(str(checkpoints / "sft"))
    args = types.SimpleNamespace(max_new_tokens=5, temperature=0.0, top_k=None, top_p=None, seed=0)
    said = []
    inputs = iter(["hello", "again", ""])
    history = sample.chat_loop(model, tok, args, read=lambda _: next(inputs), write=said.append)
    assert [h[0] for h in history] == ["hello", "again"]
    assert sum(line.startswith("model> ") for line in said) == 2


def test_cli_samples_and_rejects_bad_input(checkpoints, capsys):
    assert sample.main(["--ckpt", str(checkpoints / "pretrain"), "--prompt", "the dog", "--num-samples", "2",
                        "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("the dog") == 2
    for argv, message in [
        (["--ckpt", str(checkpoints / "missing")], "does not exist"),
        (["--ckpt", str(checkpoints / "rm")], "does not generate"),
        (["--ckpt", str(checkpoints / "pretrain"), "--interactive"], "needs a chat checkpoint"),
        (["--ckpt", str(checkpoints / "pretrain"), "--top-p", "1.5"], "--top-p"),
        (["--ckpt", str(checkpoints / "pretrain"), "--temperature", "nan"], "--temperature must be a number >= 0"),
        (["--ckpt", str(checkpoints / "pretrain"), "--top-k", "-3"], "--top-k must be at least 1"),
        (["--ckpt", str(checkpoints / "pretrain"), "--prompt-file", str(checkpoints)], f"{checkpoints} is a folder"),
    ]:
        assert sample.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("sample.py: error:") and message in err and err.count("\n") == 1, err


def test_answer_length_and_the_note_when_max_new_tokens_is_cut(checkpoints, capsys):
    assert sample.answer_length(32, 12, 150) == 20 and sample.answer_length(32, 12, 5) == 5
    assert sample.answer_length(32, 40, 150) == 8, "a quarter of the block at least"
    argv = ["--ckpt", str(checkpoints / "pretrain"), "--prompt", "the dog", "--max-new-tokens", "100000"]
    assert sample.main(argv) == 0
    err = capsys.readouterr().err
    assert err.startswith("sample.py: note: --max-new-tokens 100000 cut to ") and "block holds 32 tokens" in err, err


def test_interactive_mode_from_a_pipe(checkpoints):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(checkpoints / "sft"),
                             "--interactive", "--max-new-tokens", "5"], input="hello\n\n", capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "model> " in result.stdout


def test_quantize_loads_the_weights_in_8_or_4_bits(checkpoints, capsys):
    model, _, _ = sample.load_for_sampling(str(checkpoints / "pretrain"), quantize="int4")
    assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.transformer.h[0].mlp.c_fc, QuantizedLinear)
    assert sample.main(["--ckpt", str(checkpoints / "pretrain"), "--prompt", "the dog", "--quantize", "int8",
                        "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("the dog")
