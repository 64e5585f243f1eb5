"""Tests for eval.py: every metric against a brute-force or hand-computed reference,
missing and wrong-kind checkpoints, the report and the command line."""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bpe
import eval as E
import tinyworld
import prepare_data
from model import GPT, GPTConfig, save_checkpoint
from train import append_jsonl
from reward import ScalarHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = dict(megabytes=0.05, vocab_size=300, sft_train=20, sft_val=8, prefs_train=20, prefs_val=10,
                 prompts_ppo=8, prompts_eval=10, mc=6, quiet=True)


def tiny_gpt(tok, seed, block_size=128):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32)).eval()


def tiny_rm(tok, seed):
    torch.manual_seed(seed)
    rm = ScalarHeadModel(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32))
    torch.nn.init.normal_(rm.head.weight, std=0.5)  # spread the scores so that pairs are ordered
    return rm.eval()


def save_stage(folder, stage, model, tok, **extra):
    ckpt = {"stage": stage, "model_args": asdict(model.config), "model": model.state_dict(),
            "tokenizer": tok.to_dict(), "config": {"dataset": "tinyworld"}, "parent": None, "metrics": {}, **extra}
    os.makedirs(folder, exist_ok=True)
    save_checkpoint(ckpt, os.path.join(folder, "ckpt.pt"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (and much faster when the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny tinyworld build and fake checkpoints of all four stages in out/tiny/."""
    root = tmp_path_factory.mktemp("eval")
    data_root = root / "data"
    prepare_data.prepare(data_root=str(data_root), **TINY_DATA)
    tok = bpe.Tokenizer.load(str(data_root / "tinyworld" / "tokenizer.json"))
    out = root / "out" / "tiny"
    models = {"pretrain": tiny_gpt(tok, 0), "sft": tiny_gpt(tok, 1), "ppo": tiny_gpt(tok, 2), "rm": tiny_rm(tok, 3)}
    for stage in ("pretrain", "sft", "ppo"):
        save_stage(str(out / stage), stage, models[stage], tok)
    save_stage(str(out / "rm"), "rm", models["rm"], tok, reward_norm={"bias": 0.25, "scale": 2.0})
    for i in range(1, 6):
        append_jsonl(str(out / "pretrain" / "log.jsonl"), {"iter": 10 * i, "loss": 5.0 / i, "val_loss": 5.5 / i})
        append_jsonl(str(out / "ppo" / "log.jsonl"), {"iter": i, "rm_score": 0.3 * i, "gold": 1.0 - 0.1 * i ** 2,
                                                      "kl": 0.5 * i * i, "entropy": 2.0})
    return {"root": root, "data_root": str(data_root), "out_root": str(root / "out"), "tok": tok, "models": models,
            "folder": str(data_root / "tinyworld")}


def tiny_config(world, **overrides):
    config = dict(E.DEFAULTS)
    config.update(E.PRESETS["tiny"])
    config.update(config="tiny", out_root=world["out_root"], data_dir=world["data_root"], device="cpu")
    config.update(overrides)
    return config


def brute_logprob(model, prefix, cont):
    """Sum of log p(cont[k] | prefix + cont[:k]) by one forward pass per sequence
    (of the last block_size + 1 tokens when it is longer)."""
    if not cont:
        return 0.0
    keep = model.config.block_size + 1
    prefix = (list(prefix) + list(cont))[-keep:][:-len(cont)]
    ids = list(prefix) + list(cont)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), dim=-1)  # row t predicts ids[t + 1]
    return sum(logp[j - 1, ids[j]].item() for j in range(len(prefix), len(ids)))


# --- language modelling --------------------------------------------------------------

def test_evaluate_loss_matches_window_by_window_cross_entropy(world):
    tok, model = world["tok"], world["models"]["pretrain"]
    tokens = np.arange(1000) * 7 % tok.vocab_size                     # 999 predicted tokens at most
    byte_lengths = torch.tensor([len(tok.decode_bytes([i])) if i < len(tok.token_bytes) else 1
                                 for i in range(tok.vocab_size)], dtype=torch.float64)
    got = E.evaluate_loss(model, tokens, batch_size=3, max_tokens=128 * 5, byte_lengths=byte_lengths)
    nats, n_bytes = 0.0, 0.0
    for i in range(5):                                                # 5 windows of block_size 128
        x = torch.tensor(tokens[i * 128:i * 128 + 128][None], dtype=torch.long)
        y = torch.tensor(tokens[i * 128 + 1:i * 128 + 129][None], dtype=torch.long)
        with torch.no_grad():
            nats += model(x, y)[1].item() * 128
        n_bytes += sum(len(tok.decode_bytes([int(t)])) if int(t) < 256 + len(tok.merges) else 1 for t in y[0])
    assert got["tokens"] == 640, "max_tokens=640 with block_size 128 means 5 whole windows"
    assert got["loss"] == pytest.approx(nats / 640, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nats / 640), rel=1e-5)
    assert got["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    everything = E.evaluate_loss(model, tokens, batch_size=4, max_tokens=0, byte_lengths=byte_lengths)
    assert everything["tokens"] == 7 * 128, "max_tokens=0 reads every whole window of val.bin"


# --- log-likelihoods, multiple choice, KL ----------------------------------------------

def test_continuation_logprobs_match_a_brute_force_loop(world):
    model = world["models"]["pretrain"]
    rng = np.random.default_rng(0)
    prefixes = [list(rng.integers(0, 300, n)) for n in (5, 1, 30, 12)] + [[1, 2, 3]]
    conts = [list(rng.integers(0, 300, n)) for n in (3, 7, 1, 20)] + [[]]
    got = E.continuation_logprobs(model, prefixes, conts, batch_size=2)
    want = [brute_logprob(model, p, c) for p, c in zip(prefixes, conts)]
    assert got == pytest.approx(want, abs=1e-4), "each pair's sum of log p over its continuation tokens"
    assert got[-1] == 0.0, "an empty continuation has log-likelihood 0"
    assert E.continuation_logprobs(model, prefixes, conts, batch_size=5) == pytest.approx(got, abs=1e-4)
    # longer than block_size + 1: the oldest prefix tokens are dropped
    long_prefix, cont = list(rng.integers(0, 300, 200)), [5, 6, 7]
    kept = (long_prefix + cont)[-129:]
    assert len(kept) == 129 and model.config.block_size == 128
    assert E.continuation_logprobs(model, [long_prefix], [cont])[0] == pytest.approx(
        brute_logprob(model, kept[:-3], cont), abs=1e-4)


def test_continuation_logprobs_one_sum_per_choice(world):
    model, tok = world["models"]["pretrain"], world["tok"]
    context = [tok.special_ids[bpe.DOC_SEP]] + tok.encode("The cat sat on the mat.")
    choices = [tok.encode(" It slept."), tok.encode(" A dog ran to the park."), tok.encode(" Yes")]
    got = E.continuation_logprobs(model, [context] * len(choices), choices)
    assert got == pytest.approx([brute_logprob(model, context, c) for c in choices], abs=1e-4)


def uniform_model(tok):
    """A model whose logits are all zero: every token has log p = -log V."""
    model = tiny_gpt(tok, 0)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied to the output head
    return model


def test_multiple_choice_accuracy_hand_computed_with_a_uniform_model(world):
    tok = world["tok"]
    model = uniform_model(tok)
    # uniform: the sum of log p is -n log V, so the ending of fewest tokens wins
    items = [{"context": "A story.", "endings": [" a long long ending", " short", " a b c d e f g"], "label": 1},
             {"context": "Another.", "endings": [" x", " much longer than x"], "label": 0},
             {"context": "Third.", "endings": [" one two three", " four five six seven", " ok"], "label": 0}]
    got = E.multiple_choice_accuracy(model, tok, items, batch_size=2)
    assert got["n"] == 3 and got["accuracy"] == pytest.approx(2 / 3)


def test_multiple_choice_accuracy_sum_and_per_token_by_hand(world, monkeypatch):
    tok = world["tok"]
    items = [{"context": "c", "endings": [" a", " b b b"], "label": 1},
             {"context": "d", "endings": [" a", " b b b"], "label": 0}]
    assert [len(tok.encode(e)) for e in items[0]["endings"]] == [1, 3]
    # sums: item 1 [-2, -3] -> sum picks 0, per token (-2, -1) picks 1;
    #       item 2 [-4, -6] -> sum picks 0, per token (-4, -2) picks 1
    monkeypatch.setattr(E, "continuation_logprobs", lambda model, p, c, batch_size=32: [-2.0, -3.0, -4.0, -6.0])
    got = E.multiple_choice_accuracy(None, tok, items)
    assert got == {"n": 2, "accuracy": 0.5, "accuracy_norm": 0.5}
    items[1]["label"] = 1
    assert E.multiple_choice_accuracy(None, tok, items) == {"n": 2, "accuracy": 0.0, "accuracy_norm": 1.0}


def test_multiple_choice_accuracy_matches_brute_force(world):
    model, tok = world["models"]["pretrain"], world["tok"]
    items = prepare_data.read_jsonl(os.path.join(world["folder"], "mc.jsonl"))
    right = right_norm = 0
    for item in items:
        context = [tok.special_ids[bpe.DOC_SEP]] + tok.encode(item["context"])
        sums = [brute_logprob(model, context, tok.encode(e)) for e in item["endings"]]
        norms = [s / len(tok.encode(e)) for s, e in zip(sums, item["endings"])]
        right += int(np.argmax(sums)) == item["label"]
        right_norm += int(np.argmax(norms)) == item["label"]
    got = E.multiple_choice_accuracy(model, tok, items, batch_size=5)
    assert got["n"] == len(items)
    assert got["accuracy"] == pytest.approx(right / len(items))
    assert got["accuracy_norm"] == pytest.approx(right_norm / len(items))


def test_kl_on_samples_is_the_log_ratio_summed_over_response_tokens(world):
    policy, reference = world["models"]["ppo"], world["models"]["sft"]
    prompts, responses = [[1, 2, 3, 4], [7, 8]], [[10, 11, 12], [13]]
    got = E.kl_on_samples(policy, reference, prompts, responses)
    want = [brute_logprob(policy, p, r) - brute_logprob(reference, p, r) for p, r in zip(prompts, responses)]
    assert got == pytest.approx(want, abs=1e-4)
    assert E.kl_on_samples(policy, policy, prompts, responses) == pytest.approx([0.0, 0.0], abs=1e-6), \
        "KL of a policy to itself is 0"


# --- chat answers ----------------------------------------------------------------------

def greedy_reference(model, prompt_ids, max_new, stop):
    """Greedy decoding one token at a time, no cache."""
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids]))[0][0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == stop:
                break
    return out


def test_evaluate_chat_answers_are_greedy_in_the_chat_template(world):
    model, tok = world["models"]["sft"], world["tok"]
    end = tok.special_ids[bpe.END_OF_TURN]
    records = prepare_data.read_jsonl(os.path.join(world["folder"], "prompts_eval.jsonl"))[:3]
    _, got = E.evaluate_chat(model, tok, records, max_new_tokens=6, batch_size=2)
    for record, answer in zip(records, got):
        assert answer["prompt"] == record["prompt"] and answer["task"] == record["task"]
        want = greedy_reference(model, tok.encode_chat(record["prompt"])[0], 6, end)
        assert answer["ended"] == (end in want)
        assert answer["text"] == tok.decode([t for t in want if t != end])


@pytest.fixture
def ends_at_once(world):
    """Make end of turn the likeliest next token everywhere (a hook on the output head)."""
    end = world["tok"].special_ids[bpe.END_OF_TURN]
    handles = []

    def install(model):
        def push(module, inputs, logits):
            logits = logits.clone()
            logits[..., end] += 1000.0
            return logits
        handles.append(model.lm_head.register_forward_hook(push))
    yield install
    for h in handles:
        h.remove()


def test_evaluate_chat_grades_empty_answers_by_hand(world, ends_at_once):
    model, tok = world["models"]["sft"], world["tok"]
    ends_at_once(model)
    records = prepare_data.read_jsonl(os.path.join(world["folder"], "prompts_eval.jsonl"))[:4]
    grades, answers = E.evaluate_chat(model, tok, records, max_new_tokens=5)
    # every answer is empty and ended: accuracy 0, gold GOLD_EMPTY, end rate 1, 0 words
    assert grades["n"] == 4 and grades["accuracy"] == 0.0 and grades["end_rate"] == 1.0 and grades["words"] == 0
    assert grades["gold"] == pytest.approx(tinyworld.GOLD_EMPTY)
    assert [a["gold"] for a in answers] == [tinyworld.GOLD_EMPTY] * 4
    assert all(a["text"] == "" and a["ended"] for a in answers), "stopped at end of turn, before any text"
    assert sum(g["n"] for g in grades["by_task"].values()) == 4


def test_evaluate_chat_matches_grade_answers(world):
    model, tok = world["models"]["pretrain"], world["tok"]
    records = prepare_data.read_jsonl(os.path.join(world["folder"], "prompts_eval.jsonl"))[:3]
    grades, answers = E.evaluate_chat(model, tok, records, max_new_tokens=8)
    want = tinyworld.grade_answers(records, [(a["text"], a["ended"]) for a in answers])
    assert grades == want
    assert [a["gold"] for a in answers] == [tinyworld.gold_score(r, a["text"], a["ended"])
                                            for r, a in zip(records, answers)]


# --- reward model ----------------------------------------------------------------------

def test_reward_input_is_the_chat_template_then_the_reward_token(world):
    tok = world["tok"]
    sid = tok.special_ids
    want = ([sid[bpe.USER]] + tok.encode("Hi?") + [sid[bpe.END_OF_TURN], sid[bpe.ASSISTANT]] + tok.encode("Hello.")
            + [sid[bpe.END_OF_TURN], sid[bpe.REWARD]])
    assert E.reward_input(tok, "Hi?", "Hello.", True) == want
    assert E.reward_input(tok, "Hi?", "Hello.", False) == want[:-2] + [sid[bpe.REWARD]]
    assert E.reward_input(tok, "Hi?", "Hello.", True, block_size=5) == want[-5:]


def test_reward_accuracy_matches_scoring_each_sequence_alone(world):
    rm, tok = world["models"]["rm"], world["tok"]
    records = prepare_data.read_jsonl(os.path.join(world["folder"], "prefs_val.jsonl"))
    norm = {"bias": 0.25, "scale": 2.0}
    got = E.reward_accuracy(rm, tok, records, norm, batch_size=3)
    no_gold = [{k: v for k, v in r.items() if k != "gold_prefers_chosen"} for r in records]
    assert E.reward_accuracy(rm, tok, no_gold, norm)["accuracy_gold"] is None, "no gold verdict, no gold accuracy"
    assert E.reward_accuracy(rm, tok, no_gold, norm)["accuracy_noisy"] == pytest.approx(got["accuracy_noisy"])
    assert E.reward_accuracy(rm, tok, [], norm)["accuracy_noisy"] is None

    def score(prompt, response, ended):
        ids = E.reward_input(tok, prompt, response, ended, 128)
        with torch.no_grad():
            return (rm(torch.tensor([ids]))[0, -1].item() - 0.25) / 2.0
    a = [score(r["prompt"], r["chosen"], r["chosen_ended"]) for r in records]
    b = [score(r["prompt"], r["rejected"], r["rejected_ended"]) for r in records]
    noisy = sum(x > y for x, y in zip(a, b)) / len(records)
    gold = sum((x > y) == r["gold_prefers_chosen"] for x, y, r in zip(a, b, records)) / len(records)
    assert got["pairs"] == len(records)
    assert got["accuracy_noisy"] == pytest.approx(noisy) and got["accuracy_gold"] == pytest.approx(gold)
    assert got["margin"] == pytest.approx(np.mean(np.subtract(a, b)), abs=1e-5)
    assert got["mean"] == pytest.approx(np.mean(a + b), abs=1e-5)


def test_win_rate_counts_ties_as_half():
    assert E.win_rate([1.0, 2.0, 0.0, 3.0], [0.5, 2.0, 1.0, -1.0]) == {
        "n": 4, "wins": 2, "ties": 1, "losses": 1, "win_rate": 2.5 / 4}
    assert E.win_rate([], [])["win_rate"] is None


# --- data, checkpoints, stages ----------------------------------------------------------

def test_load_eval_data_finds_every_part_and_names_what_is_missing(world, tmp_path):
    data = E.load_eval_data("tinyworld", world["data_root"])
    assert data["missing"] == {}
    assert len(data["val"]) == os.path.getsize(os.path.join(world["folder"], "val.bin")) // 2
    assert len(data["mc"]) == 6 and len(data["prompts"]) == 10 and len(data["prefs"]) == 10
    assert data["tokenizer"].to_dict() == world["tok"].to_dict()
    none = E.load_eval_data("shakespeare", str(tmp_path))
    assert set(none["missing"]) == {"val", "mc", "prompts", "prefs"}
    assert "python prepare_data.py --dataset shakespeare" in none["missing"]["mc"]
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "meta.json").write_text("{}")
    got = E.load_eval_data("partial", str(tmp_path))
    assert got["mc"] is None and "mc.jsonl is missing" in got["missing"]["mc"]


def test_evaluate_checkpoint_skips_metrics_of_the_wrong_kind(world):
    config = tiny_config(world)
    lines = []
    rm_path = os.path.join(world["out_root"], "tiny", "rm", "ckpt.pt")
    row, model, _ = E.evaluate_checkpoint(rm_path, "rm", config, "cpu", torch.no_grad(), {}, lines.append)
    assert row["status"] == "ok" and row["stage"] == "rm" and set(row["metrics"]) == {"rm"}
    assert set(row["skipped"]) == {"val", "mc", "chat"}
    assert "'rm' checkpoint does not generate text" in row["skipped"]["val"]
    assert any("val skipped" in line for line in lines)
    base = os.path.join(world["out_root"], "tiny", "pretrain", "ckpt.pt")
    row, _, _ = E.evaluate_checkpoint(base, "pretrain", config, "cpu", torch.no_grad(), {}, lines.append)
    assert set(row["metrics"]) == {"val", "mc", "chat", "0-shot", "1-shot", "3-shot"}, "few-shot: a base model's"
    assert "no reward head" in row["skipped"]["rm"]
    assert len(row["answers"]) == 10, "every prompt of prompts_eval (10 < max_prompts)"


def test_evaluate_checkpoint_missing_and_unreadable(world, tmp_path):
    config = tiny_config(world)
    row, model, _ = E.evaluate_checkpoint(str(tmp_path / "nope" / "ckpt.pt"), "sft", config, "cpu",
                                          torch.no_grad(), {}, lambda s: None)
    assert row["status"] == "missing" and model is None and "python sft.py --config tiny" in row["reason"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    row, model, _ = E.evaluate_checkpoint(str(bad), "ppo", config, "cpu", torch.no_grad(), {}, lambda s: None)
    assert row["status"] == "error" and model is None and "cannot be read" in row["reason"]


def test_other_tokenizer_skips_val_loss(world, tmp_path):
    text = "completely different text for another tokenizer " * 20
    other = bpe.train_tokenizer(text, 280)
    model = tiny_gpt(other, 5)
    save_stage(str(tmp_path / "x"), "pretrain", model, other)
    row, _, _ = E.evaluate_checkpoint(str(tmp_path / "x" / "ckpt.pt"), "pretrain",
                                      tiny_config(world, max_prompts=2, max_mc=2), "cpu",
                                      torch.no_grad(), {}, lambda s: None)
    assert "another tokenizer" in row["skipped"]["val"] and "mc" in row["metrics"]


def test_stage_paths(world):
    config = tiny_config(world)
    assert E.stage_paths(config) == [(s, os.path.join(world["out_root"], "tiny", s, "ckpt.pt"))
                                     for s in ("pretrain", "sft", "rm", "ppo")]
    assert E.stage_paths(dict(config, ckpts="a,b/ckpt.pt")) == [(None, "a"), (None, "b/ckpt.pt")]


# --- PPO log, plots, report ------------------------------------------------------------

def test_ppo_log_keys():
    records = [{"iter": 1, "rm_score": 0.5, "kl": None}, {"iter": 2, "rm_score": 0.7, "kl": 0.1, "gold": True}]
    assert E.ppo_log_keys(records)["gold"] is None, "a boolean is not a score"
    assert E.ppo_log_keys(records) == {"proxy": "rm_score", "gold": None, "kl": "kl"}
    assert E.ppo_log_keys([]) == {"proxy": None, "gold": None, "kl": None}


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_ppo_with_all_or_some_keys(tmp_path):
    records = [{"iter": i, "rm_score": 0.1 * i, "gold": 1 - 0.01 * i * i, "kl": 0.2 * i} for i in range(1, 8)]
    E.plot_ppo(records, E.ppo_log_keys(records), str(tmp_path / "a.png"))
    assert is_png(tmp_path / "a.png")
    only_reward = [{"iter": i, "rm_score": 0.1 * i} for i in range(3)]
    E.plot_ppo(only_reward, E.ppo_log_keys(only_reward), str(tmp_path / "b.png"))
    assert is_png(tmp_path / "b.png")


def test_plot_loss_curves_and_accuracy(tmp_path):
    logs = {"pretrain": [{"iter": i, "loss": 1 / i, "val_loss": 1.1 / i} for i in range(1, 5)],
            "rm": [{"iter": 1, "loss": 0.6, "accuracy": 0.7}], "sft": []}
    E.plot_loss_curves(logs, str(tmp_path / "loss.png"))
    assert is_png(tmp_path / "loss.png")
    rows = [{"label": "pretrain", "status": "ok", "metrics": {"mc": {"accuracy_norm": 0.3}}},
            {"label": "rm", "status": "ok", "metrics": {"rm": {"accuracy_gold": 0.8}}},
            {"label": "sft", "status": "missing", "metrics": {}}]
    E.plot_accuracy(rows, str(tmp_path / "acc.png"))
    assert is_png(tmp_path / "acc.png")


def test_accuracy_bars_collect_each_measure_per_stage():
    rows = [{"label": "pretrain", "status": "ok", "metrics": {"mc": {"accuracy_norm": 0.3}, "chat": {
                "accuracy": 0.1, "end_rate": 0.0}}},
            {"label": "rm", "status": "ok", "metrics": {"rm": {"accuracy_gold": 0.8}}},
            {"label": "sft", "status": "missing", "metrics": {}}]
    assert E.accuracy_bars(rows) == {"multiple choice (per token)": {"pretrain": 0.3},
                                     "task accuracy": {"pretrain": 0.1}, "end-of-turn rate": {"pretrain": 0.0},
                                     "RM accuracy (gold)": {"rm": 0.8}}


def test_markdown_report_has_one_row_per_stage():
    report = {"config": {"config": "small"}, "device": "cpu", "time_s": 1.0, "notes": ["a note"], "plots": ["x.png"],
              "ppo_log": None, "ppo_vs_sft": {"status": "skipped", "reason": "needs both"},
              "rows": [{"label": "pretrain", "stage": "pretrain", "status": "ok", "skipped": {"rm": "no head"},
                        "metrics": {"val": {"loss": 1.23456, "bpb": 0.5},
                                    "mc": {"accuracy": 0.25, "accuracy_norm": 0.5},
                                    "chat": {"accuracy": 0.1, "gold": -1.5, "end_rate": 0.0, "words": 12.0,
                                             "by_task": {"arithmetic": {"accuracy": 0.2}}}}},
                       {"label": "sft", "stage": "sft", "status": "missing", "reason": "run sft.py"}]}
    md = E.markdown_report(report)
    lines = md.splitlines()
    assert lines[0] == "# Evaluation of small"
    assert lines[2].startswith("| stage | val loss | val bits/byte |")
    assert "| pretrain | 1.235 | 0.500 | 25.0% / 50.0% | 10.0% | -1.500 | 0.0% | 12.0 |" in md
    assert "| sft | missing: run sft.py |" in md
    assert "| pretrain | 20.0% |" in md, "the per-task table"
    assert "- pretrain rm: no head" in md and "- a note" in md and "![x.png](x.png)" in md
    assert "skipped: needs both" in md


def tax_rows(tmp_path):
    """Hand-made rows of a pretrain -> sft -> ppo chain, each with a file on disk that its child names."""
    rows, parent = [], None
    for stage, bpb, cloze in (("pretrain", 0.25, 0.8), ("sft", 0.5, 0.6), ("ppo", 0.3, 0.9)):
        path = tmp_path / stage / "ckpt.pt"
        os.makedirs(path.parent, exist_ok=True)
        path.write_bytes(stage.encode())
        rows.append({"label": stage, "stage": stage, "status": "ok", "file": str(path), "parent": parent,
                     "metrics": {"val": {"bpb": bpb}, "mc": {"accuracy": cloze}}})
        parent = {"path": str(path.resolve()), "sha256": prepare_data.sha256_file(str(path))}
    return rows


def test_alignment_tax_against_the_base_model_of_each_chat_model(tmp_path):
    rows = tax_rows(tmp_path)
    taxes = E.alignment_tax(rows + [{"label": "rm", "stage": "rm", "status": "ok", "file": "x", "metrics": {}}])
    assert set(taxes) == {"sft", "ppo"}, "a tax for each chat model, none for the base or the reward model"
    assert taxes["sft"] == pytest.approx({"base": "pretrain", "bpb_base": 0.25, "bpb": 0.5, "bpb_ratio": 2.0,
                                          "cloze_base": 0.8, "cloze": 0.6, "cloze_change": -0.2})
    assert taxes["ppo"]["base"] == "pretrain", "ppo's base is found through sft"
    assert taxes["ppo"]["bpb_ratio"] == pytest.approx(1.2) and taxes["ppo"]["cloze_change"] == pytest.approx(0.1)
    assert "add it to --ckpts" in E.alignment_tax(rows[1:])["sft"]["reason"], "no base evaluated: said, not guessed"
    (tmp_path / "pretrain" / "ckpt.pt").write_bytes(b"retrained")
    assert "reason" in E.alignment_tax(rows)["sft"], "a base retrained since the tuning is not its base"
    report = {"config": {"config": ""}, "device": "cpu", "time_s": 1.0, "notes": [], "plots": [], "ppo_log": None,
              "ppo_vs_sft": {"status": "skipped", "reason": "-"}, "rows": rows, "alignment_tax": taxes}
    md = E.markdown_report(report)
    assert "| sft | pretrain | 0.250 -> 0.500 | 2.00x | 80.0% -> 60.0% | -20.0 pts |" in md
    E.plot_alignment_tax(taxes, str(tmp_path / "tax.png"))
    assert is_png(tmp_path / "tax.png")
    taxes["sft"].update(cloze_base=None, cloze_change=None)  # a base without cloze items: no cloze bars for it
    E.plot_alignment_tax(taxes, str(tmp_path / "tax2.png"))
    assert is_png(tmp_path / "tax2.png")


# --- the whole run -----------------------------------------------------------------------

def test_run_evaluates_every_stage_and_compares_ppo_with_sft(world):
    hs = os.path.join(world["data_root"], "hellaswag")
    os.makedirs(hs, exist_ok=True)
    prepare_data.write_jsonl(os.path.join(hs, "mc.jsonl"), [
        {"context": "A man sits down.", "endings": [" He eats.", " A dog flies.", " Blue.", " It sings."], "label": 0}])
    threads = torch.get_num_threads()
    try:
        lines = []
        report = E.run(tiny_config(world), log=lines.append)
        assert torch.get_num_threads() == threads, "run() leaves the thread count as it found it"
    finally:
        os.remove(os.path.join(hs, "mc.jsonl"))
    folder = os.path.join(world["out_root"], "tiny", "eval")
    assert [r["label"] for r in report["rows"]] == ["pretrain", "sft", "rm", "ppo"]
    assert all(r["status"] == "ok" for r in report["rows"])
    rows = {r["label"]: r for r in report["rows"]}
    for stage in ("pretrain", "sft", "ppo"):
        assert {"val", "mc", "hellaswag", "chat"} <= set(rows[stage]["metrics"])
        assert rows[stage]["rm_score"] == pytest.approx(np.mean([a["rm_score"] for a in rows[stage]["answers"]]))
    assert rows["rm"]["metrics"]["rm"]["pairs"] == 10
    c = report["ppo_vs_sft"]
    assert c["status"] == "ok"
    assert c["win_rate"] == E.win_rate([a["gold"] for a in rows["ppo"]["answers"]],
                                       [a["gold"] for a in rows["sft"]["answers"]])
    assert c["kl_samples"] == 8 and math.isfinite(c["kl"])
    assert report["ppo_log"]["keys"] == {"proxy": "rm_score", "gold": "gold", "kl": "kl"}
    assert set(report["alignment_tax"]) == {"sft", "ppo"}, "fake checkpoints name no parent: the reason is given"
    for name in ("report.json", "report.md", "loss_curves.png", "accuracy.png", "ppo.png"):
        assert os.path.exists(os.path.join(folder, name)), name
    with open(os.path.join(folder, "report.json")) as f:
        assert json.load(f)["rows"][0]["metrics"]["val"]["loss"] == rows["pretrain"]["metrics"]["val"]["loss"]
    assert any("ppo vs sft: KL" in line for line in lines), "progress lines name each step"
    assert {"0-shot", "1-shot", "3-shot"} <= set(rows["pretrain"]["metrics"]) and "0-shot" not in rows["sft"]["metrics"]
    assert set(report["overlap"]["models"]) == {"sft", "ppo"}
    with open(os.path.join(folder, "report.md")) as f:
        md = f.read()
    assert "## Few-shot prompting" in md and "| pretrain, 3-shot (plain text) |" in md and "## BLEU and ROUGE-L" in md
    with pytest.raises(ValueError, match="--few_shot='1,x': give shot counts separated by commas"):
        E.run(tiny_config(world, few_shot="1,x"), log=lambda s: None)


def test_run_with_only_pretrain_reports_missing_rows(world, tmp_path):
    out_root = tmp_path / "out"
    os.makedirs(out_root / "tiny")
    os.symlink(os.path.join(world["out_root"], "tiny", "pretrain"), out_root / "tiny" / "pretrain")
    report = E.run(tiny_config(world, out_root=str(out_root), max_prompts=2, max_mc=2, val_tokens=128),
                   log=lambda s: None)
    assert [r["status"] for r in report["rows"]] == ["ok", "missing", "missing", "missing"]
    assert report["ppo_vs_sft"]["status"] == "skipped"
    md = (out_root / "tiny" / "eval" / "report.md").read_text()
    assert "| rm | missing:" in md and "python reward.py --config tiny" in md


def test_a_grpo_checkpoint_is_named_by_its_algorithm_and_compared_with_sft(world, tmp_path):
    tiny = os.path.join(world["out_root"], "tiny")
    save_stage(str(tmp_path / "grpo-run"), "ppo", world["models"]["ppo"], world["tok"],
               config={"dataset": "tinyworld", "algo": "grpo"})  # ppo.py --algo=grpo writes a ppo-stage checkpoint
    ckpts = f"{os.path.join(tiny, 'sft')},{tmp_path / 'grpo-run'}"
    report = E.run(tiny_config(world, config="", ckpts=ckpts, out=str(tmp_path / "eval"), max_prompts=4, max_mc=2,
                               val_tokens=128, kl_prompts=2), log=lambda s: None)
    assert [(r["label"], r["stage"], r["algo"]) for r in report["rows"]] == [("sft", "sft", None),
                                                                            ("grpo", "ppo", "grpo")]
    assert report["ppo_vs_sft"]["status"] == "ok" and report["ppo_vs_sft"]["label"] == "grpo"
    assert "## GRPO against SFT" in (tmp_path / "eval" / "report.md").read_text()


def test_parse_args_ckpts_and_errors():
    config = E.parse_args(["--ckpts=a,b", "--max-prompts=5", "--config", "tiny"])
    assert config["ckpts"] == "a,b" and config["max_prompts"] == 5 and config["config"] == "tiny"
    assert [path for _, path in E.stage_paths(config)] == ["a", "b"]
    assert config["max_mc"] == E.PRESETS["tiny"]["max_mc"]
    with pytest.raises(ValueError, match="nothing to evaluate"):
        E.parse_args([])
    with pytest.raises(ValueError, match="unknown config key --ckpt .*ckpts"):
        E.parse_args(["--ckpt", "a"])
    with pytest.raises(ValueError, match="--max_mc=-1 must be at least 0"):
        E.parse_args(["--config", "tiny", "--max_mc=-1"])
    with pytest.raises(ValueError, match="no --resume"):
        E.parse_args(["--config", "tiny", "--resume"])
    with pytest.raises(ValueError, match="unknown config key --max_prompt"):
        E.parse_args(["--config", "tiny", "--max_prompt=3"])


def test_main_exit_codes_and_one_line_errors(world, tmp_path, capsys):
    out = str(tmp_path / "report")
    rm = os.path.join(world["out_root"], "tiny", "rm")
    assert E.main([f"--ckpts={rm}", f"--out={out}", f"--data_dir={world['data_root']}", "--max_pairs=4"]) == 0
    assert os.path.exists(os.path.join(out, "report.md")), "--out names the report folder"
    assert E.main([f"--ckpts={rm}", f"--out_root={tmp_path}", f"--data_dir={world['data_root']}", "--max_pairs=4"]) == 0
    assert os.path.exists(os.path.join(tmp_path, "eval", "report.md")), "out_root/eval without a config"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    capsys.readouterr()
    assert E.main([f"--ckpts={bad}", f"--out={out}", f"--data_dir={world['data_root']}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("eval.py: error: checkpoint") and "cannot be read" in err[0]
    assert E.main(["--config", "tiny", f"--out_root={tmp_path}/none", f"--data_dir={world['data_root']}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eval.py: error: no checkpoint could be evaluated")
    assert E.main(["--config", "nope"]) == 1
    assert capsys.readouterr().err.startswith("eval.py: error: unknown config 'nope'")
    (tmp_path / "afile").write_text("")
    assert E.main([f"--ckpts={rm}", f"--out={tmp_path / 'afile' / 'r'}", f"--data_dir={world['data_root']}",
                   "--max_pairs=4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and err.count("\n") == 1 and "afile/r: " in err, err


def test_command_line_runs_in_a_subprocess(world, tmp_path):
    out = str(tmp_path / "cli")
    proc = subprocess.run([sys.executable, "eval.py", "--config", "tiny", f"--out_root={world['out_root']}",
                           f"--data_dir={world['data_root']}", f"--out={out}", "--max_prompts=2", "--max_mc=2",
                           "--val_tokens=128", "--kl_prompts=2", "--max_new_tokens=4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "eval: pretrain: val loss" in proc.stdout and "eval: done in" in proc.stdout
    assert os.path.exists(os.path.join(out, "report.json"))


def test_generation_speed_times_one_greedy_continuation(world, monkeypatch):
    ticks = iter([10.0, 13.0, 20.0, 22.0, 30.0, 34.0])  # three timed continuations: 3 s, 2 s, 4 s
    monkeypatch.setattr(E.time, "perf_counter", lambda: next(ticks))
    assert E.generation_speed(world["models"]["pretrain"], world["tok"], "cpu", new_tokens=16) == 8.0, "the fastest"
    ticks = iter([0.0, 1.0])
    speed = E.generation_speed(world["models"]["pretrain"], world["tok"], "cpu", new_tokens=10_000, repeats=1)
    assert speed == 127.0, "at most block_size - 1 new tokens"


def test_run_with_quantize_adds_each_text_model_in_8_and_4_bits(world, tmp_path):
    report = E.run(tiny_config(world, out=str(tmp_path / "q"), quantize="int8,int4", max_prompts=4, max_mc=4,
                               val_tokens=256, kl_prompts=2), log=lambda s: None)
    assert [r["label"] for r in report["rows"]] == ["pretrain", "sft", "rm", "ppo"], "the float rows as before"
    assert [r["label"] for r in report["quantized"]] == [f"{s} {q}" for s in ("pretrain", "sft", "ppo")
                                                         for q in ("int8", "int4")]
    rows = {r["label"]: r for r in report["rows"]}
    for q in report["quantized"]:
        base = rows[q["label"].split()[0]]
        assert base["quantize"] == "none" and q["tokens_per_s"] > 0 and {"val", "mc", "chat"} <= set(q["metrics"])
        assert base["weight_bytes"] / q["weight_bytes"] > (2.0 if q["quantize"] == "int8" else 2.5)
        assert q["metrics"]["val"]["bpb"] == pytest.approx(base["metrics"]["val"]["bpb"], rel=0.05)
    md = (tmp_path / "q" / "report.md").read_text()
    assert "## Quantized weights" in md and "| sft | int4 |" in md and "| sft | float32 |" in md
    with pytest.raises(ValueError, match="--quantize='int3' is not one of none, int8, int4"):
        E.run(tiny_config(world, out=str(tmp_path / "bad"), quantize="int8,int3"), log=lambda s: None)


# --- few-shot prompting, BLEU and ROUGE-L ---------------------------------------------------

def test_few_shot_prompt_layout():
    record = {"task": "story_qa", "prompt": "Mia went to the park.\nWhere did Mia go?"}
    shots = [{"prompt": "What is 2 plus 2?", "reference_response": "2 plus 2 is 4."},
             {"prompt": "Tom ate a pear.\nWhat did Tom eat?", "reference_response": "Tom ate a pear."}]
    assert E.few_shot_prompt(record, shots) == ("What is 2 plus 2? 2 plus 2 is 4. Tom ate a pear. What did Tom eat? "
                                                "Tom ate a pear. Mia went to the park. Where did Mia go?")
    assert E.few_shot_prompt(record, []) == "Mia went to the park. Where did Mia go?"


def test_few_shot_accuracy_draws_other_prompts_of_the_task_and_grades_the_first_sentence(world, monkeypatch):
    tok, seen = world["tok"], []
    records = [{"task": "arithmetic", "prompt": f"What is {i} plus 1?", "reference": str(i + 1), "context": "",
                "answer_kind": "number", "given": [], "options": [], "reference_response": f"{i} plus 1 is {i + 1}."}
               for i in range(1, 5)]
    pool = records + [{"task": "category", "prompt": "Which word is a food: car, pear?", "reference_response": "x."}]

    def answer(model, prompts, new_tokens, stop, batch_size=32):
        seen.extend(tok.decode(p[1:]) for p in prompts)
        return [(tok.encode(f"{i + 2}. What is 9 plus 9? 18."), False) for i in range(len(prompts))]

    monkeypatch.setattr(E, "generate_responses", answer)
    grades = E.few_shot_accuracy(world["models"]["pretrain"], tok, records, pool, 3, seed=1)
    for record, prompt in zip(records, seen):
        assert prompt.endswith(record["prompt"]) and prompt.count(record["prompt"]) == 1, "never its own shot"
        assert prompt.count("?") == 4 and "Which word" not in prompt, "3 shots of the same task, then the question"
    assert grades["accuracy"] == 1.0 and grades["shots"] == 3.0, "graded on '{i+2}.' alone, not the 18 after it"


def test_bleu_against_hand_computed_values():
    words = str.split
    assert E.bleu([words("the the the the the the the")], [words("the cat is on the mat")], max_n=1) == \
        pytest.approx(2 / 7), "clipped unigram precision (Papineni et al.'s example)"
    assert E.bleu([words("the cat")], [words("the cat is on the mat")], max_n=2) == pytest.approx(math.exp(1 - 3)), \
        "precisions 1, brevity penalty exp(1 - 6/2)"
    assert E.bleu([words("a b c d e")], [words("a b c d e")]) == pytest.approx(1.0)
    assert E.bleu([words("a b c x e")], [words("a b c d e")]) == 0.0, "no 4-gram in common: 0 without smoothing"
    smoothed = math.exp((math.log(4 / 5) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4)
    assert E.bleu([words("a b c x e")], [words("a b c d e")], smooth=True) == pytest.approx(smoothed)


def test_rouge_l_is_the_lcs_f1():
    assert E.rouge_l("police killed the gunman".split(), "police kill the gunman".split()) == pytest.approx(0.75)
    assert E.rouge_l("the gunman kill police".split(), "police kill the gunman".split()) == pytest.approx(0.5)
    assert E.rouge_l("a b".split(), "c d".split()) == 0.0 and E.rouge_l([], ["a"]) == 0.0


def test_text_overlap_scores_models_and_counts_agreement_with_gold():
    records = [{"reference_response": "Mia went to the park."}, {"reference_response": "4 plus 3 is 7."}]
    answers = {"a": [{"text": "Mia went to the park.", "gold": 2.0}, {"text": "It is 7.", "gold": 1.0}],
               "b": [{"text": "Mia went to the school.", "gold": -1.0}, {"text": "4 plus 3 is 7.", "gold": 1.0}]}
    out = E.text_overlap(answers, records)
    assert out["models"]["a"]["rouge_l"] == pytest.approx((1.0 + E.rouge_l(["it", "is", "7"], "4 plus 3 is 7".split()))
                                                          / 2)
    assert out["pairs"] == 1, "the second prompt's answers tie by gold: not a pair"
    assert out["agree"] == {"bleu": 1, "rouge_l": 1}, "the right answer overlaps the reference more"


# -----------------------------------------------------------------------------
# Scaling laws (--scaling): the FLOP budgeting, the three fits against synthetic truths, the study end to end

def chinchilla_loss(n, d, E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28):
    """Hoffmann et al. 2022's fitted L(N, D): the synthetic truth the fits must recover."""
    return E + A / n ** alpha + B / d ** beta


def test_training_flops_and_iters_for_budget_by_hand():
    assert E.training_flops(1000, 2000) == 12_000_000, "6 N D: 6 * 1000 * 2000"
    assert E.iters_for_budget(1.2e9, 1000, 2000) == 100, "1.2e9 / (6 * 1000 * 2000) steps of 2000 tokens"
    assert E.iters_for_budget(1.26e9, 1000, 2000) == 105 and E.iters_for_budget(1.19e9, 1000, 2000) == 99, "rounded"
    assert E.iters_for_budget(1.0, 1000, 2000) == 1, "a budget below one step still trains one"


def test_plan_scaling_runs_gives_each_budget_its_window_of_sizes_at_6ND():
    study = dict(budgets=(1e9, 3e9), sizes=((1, 2, 16), (2, 2, 32), (2, 4, 48)), per_budget=2, block_size=16,
                 batch_size=4)
    runs = E.plan_scaling_runs(study, vocab_size=100)
    assert [(r["budget"], r["n_layer"], r["n_embd"]) for r in runs] == [(1e9, 1, 16), (1e9, 2, 32), (3e9, 2, 32),
                                                                        (3e9, 2, 48)], "budget i: sizes[i:i + 2]"
    # all parameters, the tied head once: embedding V*E, per layer 12 E^2 + 13 E (attention, MLP, 2 norms), final norm
    assert runs[0]["params"] == 100 * 16 + (12 * 16 * 16 + 13 * 16) + 2 * 16 == 4912
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_embd=48, pos="rope"))
    assert runs[3]["params"] == model.num_params()
    assert runs[0]["max_iters"] == round(1e9 / (6 * 4912 * 64)) and runs[0]["tokens"] == runs[0]["max_iters"] * 64
    for r in runs:
        assert r["flops"] == 6 * r["params"] * r["tokens"]
        assert abs(r["flops"] - r["budget"]) <= 6 * r["params"] * 64 / 2, "within half a step of the budget"
    assert len({r["name"] for r in runs}) == 4 and runs[0]["name"] == "C1e09_L1_E16"


def test_fit_parabola_minimum_recovers_a_known_minimum():
    n = np.geomspace(1e4, 2e5, 5)
    fit = E.fit_parabola_minimum(n, 2.0 + 0.3 * (np.log(n) - np.log(5e4)) ** 2)
    assert fit["n_opt"] == pytest.approx(5e4, rel=1e-6) and fit["loss"] == pytest.approx(2.0) and fit["inside"]
    assert fit["coeffs"] == pytest.approx([0.3, -0.6 * math.log(5e4), 2.0 + 0.3 * math.log(5e4) ** 2])
    beyond = E.fit_parabola_minimum(n, 2.0 + 0.3 * (np.log(n) - np.log(1e6)) ** 2)
    assert beyond["n_opt"] == pytest.approx(1e6) and not beyond["inside"], "a minimum past the largest size"
    concave = E.fit_parabola_minimum(n, 2.0 - 0.3 * (np.log(n) - np.log(5e4)) ** 2)
    assert concave["n_opt"] is None and concave["loss"] is None and not concave["inside"]


def test_fit_power_law_recovers_known_exponents():
    c = np.array([1e11, 3e11, 9e11, 2.7e12])
    assert E.fit_power_law(c, 3.0 * c ** 0.7) == pytest.approx({"a": 3.0, "b": 0.7})
    assert E.fit_power_law(c, 0.02 * c ** 0.5) == pytest.approx({"a": 0.02, "b": 0.5})


def test_fit_chinchilla_loss_recovers_known_exponents():
    runs = E.plan_scaling_runs(E.SCALING["small"], 1580)
    n, d = [r["params"] for r in runs], [r["tokens"] for r in runs]
    fit = E.fit_chinchilla_loss(n, d, [chinchilla_loss(x, y) for x, y in zip(n, d)])
    assert fit["alpha"] == pytest.approx(0.34) and fit["beta"] == pytest.approx(0.28), fit
    assert (fit["E"], fit["A"], fit["B"]) == pytest.approx((1.69, 406.4, 410.7), rel=1e-4) and fit["rmse"] < 1e-6
    assert fit["a"] == pytest.approx(0.28 / 0.62) and fit["b"] == pytest.approx(0.34 / 0.62), "N_opt ~ C^(b/(a+b))"
    assert "need at least 8" in E.fit_chinchilla_loss(n[:5], d[:5], [2.0] * 5)["reason"]
    one_budget = E.plan_scaling_runs(dict(E.SCALING["small"], budgets=(1e11,), per_budget=8), 1580)
    n1, d1 = [r["params"] for r in one_budget], [r["tokens"] for r in one_budget]
    assert "vary together" in E.fit_chinchilla_loss(n1, d1, [chinchilla_loss(x, y) for x, y in zip(n1, d1)])["reason"]
    edge = E.fit_chinchilla_loss(n, d, [chinchilla_loss(x, y, alpha=0.34, beta=0.28) for x, y in zip(n, d)],
                                 grid=np.linspace(0.34, 1.0, 12))
    assert "edge" in edge["reason"], "a best exponent at the grid's end is not reported as a fit"


def test_fit_scaling_laws_recovers_the_optimal_allocation_of_a_known_loss():
    runs = E.plan_scaling_runs(E.SCALING["small"], 1580)
    for r in runs:
        r["val_loss"] = chinchilla_loss(r["params"], r["tokens"])
    fits = E.fit_scaling_laws(runs)
    assert [b["budget"] for b in fits["budgets"]] == list(E.SCALING["small"]["budgets"])
    assert all(b["inside"] for b in fits["budgets"]), "the default study's windows hold this loss's optima"
    # Chinchilla: minimising L(N, C / 6N) gives N_opt ~ C^(beta / (alpha + beta)), D_opt ~ C^(alpha / (alpha + beta))
    assert fits["n_opt_fit"]["b"] == pytest.approx(0.28 / 0.62, abs=0.01)
    assert fits["d_opt_fit"]["b"] == pytest.approx(0.34 / 0.62, abs=0.01)
    for b in fits["budgets"]:
        assert b["d_opt"] == pytest.approx(b["budget"] / (6 * b["n_opt"]))
    assert fits["loss_fit"]["alpha"] == pytest.approx(0.34)
    few = E.fit_scaling_laws(runs[:5])
    assert "n_opt_fit" not in few and "1 of 1 budgets" in few["reason"]


def synthetic_fits(inside=True):
    runs = E.plan_scaling_runs(E.SCALING["small"], 1580)
    for r in runs:
        r.update(val_loss=chinchilla_loss(r["params"], r["tokens"]) if inside else 3.0 - 1e-7 * r["params"],
                 epochs=r["tokens"] / 1e6)
    return runs, E.fit_scaling_laws(runs)


def test_scaling_summary_and_markdown_give_the_exponents_beside_chinchillas():
    runs, fits = synthetic_fits()
    lines = E.scaling_summary(fits)
    assert len(lines) == 4 + 2 and lines[0].startswith("C 1e+11: N_opt ") and "tokens per parameter" in lines[0]
    assert f"C^{fits['n_opt_fit']['b']:.2f}" in lines[4] and "Chinchilla" in lines[4]
    assert lines[5].startswith("L(N, D) = 1.690 + 406 / N^0.34 + 411 / D^0.28")
    text = E.scaling_markdown({"study": "small", "dataset": "tinyworld", "runs": runs, "fits": fits})
    rows = [line for line in text.splitlines() if line.startswith("| 1") or line.startswith("| 2") or
            line.startswith("| 6")]
    assert len(rows) == len(runs) and "![IsoFLOP curves](isoflop.png)" in text and "- C 1e+11" in text
    runs, flat = synthetic_fits(inside=False)
    lines = E.scaling_summary(flat)
    assert "outside the sizes trained" in lines[0] and lines[4].startswith("no power law: 0 of 4 budgets")


def test_plot_isoflop_and_plot_optimal_write_pngs(tmp_path):
    runs, fits = synthetic_fits()
    E.plot_isoflop(runs, fits, str(tmp_path / "isoflop.png"))
    E.plot_optimal(fits, str(tmp_path / "optimal.png"))
    assert is_png(tmp_path / "isoflop.png") and is_png(tmp_path / "optimal.png")
    runs, flat = synthetic_fits(inside=False)  # no minimum anywhere: empty log axes must not fail
    E.plot_isoflop(runs, flat, str(tmp_path / "isoflop2.png"))
    E.plot_optimal(flat, str(tmp_path / "optimal2.png"))
    assert is_png(tmp_path / "isoflop2.png") and is_png(tmp_path / "optimal2.png")


def scaling_config(world, tmp_path):
    return dict(E.DEFAULTS, scaling="tiny", out_root=str(tmp_path / "out"), data_dir=world["data_root"], device="cpu")


def counting_train_run(monkeypatch, stop_first_at=0):
    """train.run, recording each call's config and flags; stop_first_at > 0: the first run stops there (Ctrl-C)."""
    calls, real = [], E.train.run

    def run(config, flags=()):
        calls.append((dict(config), set(flags)))
        return real(dict(config, stop_at_iter=stop_first_at) if len(calls) == 1 else config, flags)
    monkeypatch.setattr(E.train, "run", run)
    return calls


def test_scaling_study_tiny_end_to_end_then_skips_finished_runs(world, tmp_path, monkeypatch):
    calls = counting_train_run(monkeypatch)
    results = E.scaling_study(scaling_config(world, tmp_path), log=lambda text: None)
    study, out = E.SCALING["tiny"], tmp_path / "out" / "scaling" / "tiny"
    assert len(calls) == len(results["runs"]) == len(study["budgets"]) * study["per_budget"]
    for (config, flags), run in zip(calls, results["runs"]):
        assert config["out_dir"] == str(out / run["name"]) and flags == {"overwrite"}
        assert (config["n_layer"], config["n_head"], config["n_embd"]) == (run["n_layer"], run["n_head"], run["n_embd"])
        assert config["max_iters"] == run["max_iters"] == run["tokens"] // (study["batch_size"] * study["block_size"])
        assert config["warmup_iters"] == run["max_iters"] // 20, "the LR schedule scaled to the run's length"
        assert config["eval_interval"] == run["max_iters"] and config["sample_tokens"] == 0
        assert math.isfinite(run["val_loss"]) and run["val_loss"] > 0
        assert (out / run["name"] / "ckpt.pt").exists()
    for name in ("scaling.json", "scaling.md", "isoflop.png", "optimal.png"):
        assert (out / name).exists(), name
    assert is_png(out / "isoflop.png") and is_png(out / "optimal.png")
    saved = json.loads((out / "scaling.json").read_text())
    assert [r["val_loss"] for r in saved["runs"]] == [r["val_loss"] for r in results["runs"]]
    assert "fits" in saved and len(saved["fits"]["budgets"]) == len(study["budgets"])
    # a second invocation trains nothing: every run is read back from its checkpoint
    monkeypatch.setattr(E.train, "run", lambda *a, **k: pytest.fail("train.run called for a finished run"))
    lines = []
    again = E.scaling_study(scaling_config(world, tmp_path), log=lines.append)
    assert [r["val_loss"] for r in again["runs"]] == [r["val_loss"] for r in results["runs"]]
    assert sum("done before" in line for line in lines) == len(results["runs"])


def test_scaling_study_stopped_then_resumed(world, tmp_path, monkeypatch):
    calls = counting_train_run(monkeypatch, stop_first_at=2)
    with pytest.raises(ValueError, match="stopped in run 1 of 6: the same command resumes"):
        E.scaling_study(scaling_config(world, tmp_path), log=lambda text: None)
    assert len(calls) == 1, "the study ends where its run stopped"
    calls = counting_train_run(monkeypatch, stop_first_at=0)
    results = E.scaling_study(scaling_config(world, tmp_path), log=lambda text: None)
    assert calls[0][1] == {"resume"} and all(flags == {"overwrite"} for _, flags in calls[1:])
    assert len(calls) == 6 and all(math.isfinite(r["val_loss"]) for r in results["runs"])


def test_scaling_study_stops_when_ctrl_c_lands_in_a_runs_last_step(world, tmp_path, monkeypatch):
    real = E.train.run

    def signalled_at_the_end(config, flags=()):
        return dict(real(config, flags), stopped=True)  # the run completes, the stop is still asked for
    monkeypatch.setattr(E.train, "run", signalled_at_the_end)
    with pytest.raises(ValueError, match="stopped in run 1 of 6"):
        E.scaling_study(scaling_config(world, tmp_path), log=lambda text: None)


def test_scaling_command_line_and_its_errors(world, tmp_path, capsys, monkeypatch):
    config = E.parse_args(["--scaling=tiny"])
    assert config["scaling"] == "tiny" and config["scaling_dataset"] == "tinyworld", "no --config needed"
    assert E.main(["--scaling=huge"]) == 1
    assert capsys.readouterr().err == "eval.py: error: --scaling='huge' is not a study: choose one of tiny, small\n"
    assert E.main(["--scaling=tiny", f"--out_root={tmp_path}", f"--data_dir={tmp_path}/none",
                   "--scaling_dataset=shakespeare"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: dataset 'shakespeare' is not prepared") and err.count("\n") == 1
    calls = []
    monkeypatch.setattr(E, "scaling_study", lambda config: calls.append(config))
    assert E.main(["--scaling=tiny"]) == 0 and calls[0]["scaling"] == "tiny"
