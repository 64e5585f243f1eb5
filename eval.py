"""
eval.py: what did each stage buy? Numbers and pictures for every checkpoint.

    python eval.py --config small                       # out/small/{pretrain,sft,rm,ppo}/ckpt.pt
    python eval.py --ckpt out/small/sft --ckpt out/small/ppo   # any checkpoints (files or folders)
    python eval.py --config small --max_prompts=50 --device=cuda

Writes out/<config>/eval/{report.json, report.md, *.png} (or --out=FOLDER).
A checkpoint carries its model and tokenizer; the data (val.bin, mc.jsonl,
prompts_eval.jsonl, prefs_val.jsonl) comes from data/<dataset>/, the dataset the
checkpoint was trained on unless --dataset says otherwise.

What is measured, by kind of checkpoint:
  every generative model (pretrain, sft, ppo)
      validation loss, perplexity and bits per byte over consecutive windows of
      val.bin; multiple choice (HellaSwag-style cloze: the log-likelihood of each
      ending given the context, summed and per token) on mc.jsonl, and on
      data/hellaswag when it is prepared; greedy answers to the held-out prompts
      in the chat template, graded by the simulated labeler (task accuracy, gold
      score, end-of-turn rate, length) and scored by the reward model if there is one.
  the reward model (rm)
      pairwise accuracy on held-out preference pairs, against the noisy labels it
      was trained on and against the noiseless (gold) verdict.
  PPO against SFT
      gold win rate on the held-out prompts, reward-model scores, KL(PPO || SFT)
      estimated on PPO samples; from ppo/log.jsonl the proxy (reward model) and
      gold scores against sqrt(KL): the picture of reward over-optimisation.
A checkpoint of the wrong kind for a metric is skipped with a one-line reason; a
missing stage is a "missing" row.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import bpe
import prepare_data
from model import (CheckpointError, generate_responses, load_checkpoint, model_from_checkpoint,
                   tokenizer_from_checkpoint)
from train import (autocast_context, bits_per_byte, parse_config, pick_device, pick_dtype, read_jsonl_log,
                   token_byte_lengths)
from reward import pad_right, scalar_model_from_checkpoint, score_sequences
from reward import reward_input  # the one way a response is laid out for the reward model

# -----------------------------------------------------------------------------
# Configuration: defaults, then a preset (--config NAME), then --key=value overrides.

DEFAULTS = dict(
    config="",                 # evaluate out_root/<config>/{pretrain,sft,rm,ppo}; "" needs --ckpt
    out_root="out",
    out="",                    # report folder; "" means out_root/<config>/eval (out_root/eval with --ckpt only)
    dataset="",                # "" means each checkpoint's own dataset
    data_dir="data",
    val_tokens=16384,          # tokens of val.bin for loss and bits per byte; 0 = all of it
    max_mc=200,                # multiple-choice items (each of mc.jsonl and hellaswag); 0 = all
    max_prompts=200,           # held-out prompts answered by each generative model; 0 = all
    max_pairs=0,               # held-out preference pairs for the reward model; 0 = all, the set reward.py reports on
    kl_prompts=100,            # PPO samples for the KL(PPO || SFT) estimate; 0 skips it
    kl_temperature=1.0,        # the KL is that of the policy itself: sample at temperature 1
    max_new_tokens=64,         # longest answer
    batch_size=32,
    device="auto",             # auto | cpu | cuda | mps
    dtype="auto",              # auto | float32 | bfloat16 | float16
    cpu_threads=1,             # torch threads on a CPU; 0 keeps torch's default (see below)
    seed=1337,
)
# Why one thread: evaluation is mostly small matrix products (answers are decoded one
# token at a time for a few prompts at once). On a 2-core CPU one thread does them
# faster than two, several times faster when another program keeps the other core busy.

PRESETS = {
    # seconds, for tests
    "tiny": dict(val_tokens=2048, max_mc=16, max_prompts=16, max_pairs=32, kl_prompts=8, max_new_tokens=16,
                 batch_size=16),
    # a 2-core CPU, well under a minute for the four stages
    "small": dict(val_tokens=16384, max_mc=200, max_prompts=200, max_pairs=0, kl_prompts=100,
                  max_new_tokens=64, batch_size=32),
    # a GPU: the whole HellaSwag validation set and more of everything
    "gpt2": dict(val_tokens=2_000_000, max_mc=0, max_prompts=1000, max_pairs=0, kl_prompts=500,
                 max_new_tokens=128, batch_size=64),
}

STAGES = ("pretrain", "sft", "rm", "ppo")          # the rows of `--config`, in pipeline order
GENERATIVE_STAGES = ("pretrain", "sft", "ppo")
REWARD_STAGES = ("rm",)
STAGE_SCRIPT = {"pretrain": "train.py", "sft": "sft.py", "rm": "reward.py", "ppo": "ppo.py"}

# Keys read from ppo/log.jsonl (records with "iter"); the first one present is used.
PROXY_KEYS = ("rm_score", "reward", "rm_reward", "score")
GOLD_KEYS = ("gold", "gold_score")
KL_KEYS = ("kl", "kl_ref", "kl_to_ref", "ref_kl")
HELD_OUT_KEYS = ("eval_rm", "eval_gold")   # also drawn per iteration when the log has them


# -----------------------------------------------------------------------------
# Language modelling: loss, perplexity, bits per byte

@torch.no_grad()
def evaluate_loss(model, tokens, batch_size, max_tokens, byte_lengths):
    """Loss over consecutive windows of `tokens` (a 1-D array of ids): window i
    predicts tokens[i*T+1 : i*T+T+1] from tokens[i*T : i*T+T], T = block_size, so
    each token is predicted once, with a context that restarts at every window.
    max_tokens > 0 caps the number of predicted tokens (whole windows, at least one).
    -> {"loss" (nats/token), "perplexity", "bpb" (bits per byte), "tokens"}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    T = min(model.config.block_size, len(tokens) - 1)
    if T < 1:
        raise ValueError(f"only {len(tokens)} validation tokens: need at least 2")
    n_windows = (len(tokens) - 1) // T
    if max_tokens > 0:
        n_windows = max(1, min(n_windows, max_tokens // T))
    nats, n_bytes = 0.0, 0.0
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(start + batch_size, n_windows))
        windows = np.stack([np.asarray(tokens[i * T:i * T + T + 1], dtype=np.int64) for i in rows])
        windows = torch.from_numpy(windows)                        # (B, T + 1)
        x, y = windows[:, :-1].to(device), windows[:, 1:]
        logits, _ = model(x)                                       # (B, T, V)
        nats += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        n_bytes += byte_lengths[y].sum().item()
    model.train(was_training)
    n_tokens = n_windows * T
    loss = nats / n_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bpb": bits_per_byte(nats, n_bytes),
            "tokens": n_tokens}


# -----------------------------------------------------------------------------
# Log-likelihood of a continuation: multiple choice, and KL between two policies

@torch.no_grad()
def continuation_logprobs(model, prefixes, continuations, batch_size=32):
    """For each (prefix, continuation) pair of id lists: the sum over the
    continuation's tokens of log p(token | everything before it). A pair longer
    than block_size + 1 loses its oldest (prefix) tokens. -> list of floats."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    block = model.config.block_size
    # batches of similar lengths waste less on padding; the results go back in the pairs' order
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]) + len(continuations[i]))
    out = [0.0] * len(prefixes)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs, n_cont = [], []
        for i in chunk:
            ids = (list(prefixes[i]) + list(continuations[i]))[-(block + 1):]
            seqs.append(ids)
            n_cont.append(min(len(continuations[i]), len(ids) - 1))  # the very first token has no context
        ids, lengths = pad_right(seqs)
        ids = ids.to(device)
        if ids.size(1) < 2:                              # nothing to predict anywhere in this batch
            continue
        logits, _ = model(ids[:, :-1])                   # (B, T-1, V): position t predicts token t+1
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        # the continuation's tokens sit at positions len-n .. len-1, predicted at len-n-1 .. len-2
        pos = torch.arange(logp.size(1), device=device)[None, :]
        lengths, n_cont = lengths.to(device)[:, None], torch.tensor(n_cont, device=device)[:, None]
        mask = (pos >= lengths - n_cont - 1) & (pos < lengths - 1)
        for i, value in zip(chunk, (logp * mask).sum(1).tolist()):
            out[i] = value
    model.train(was_training)
    return out


def choice_logprobs(model, context_ids, choice_ids_list):
    """Sum of log p(choice tokens | context) for each choice of one question."""
    return continuation_logprobs(model, [context_ids] * len(choice_ids_list), choice_ids_list,
                                 batch_size=len(choice_ids_list))


def multiple_choice_accuracy(model, tokenizer, items, batch_size=32, prefix_ids=None):
    """HellaSwag-style accuracy on items {"context", "endings", "label"}: the
    model picks the ending with the highest log-likelihood given the context,
    summed ("accuracy") or per token ("accuracy_norm", which does not favour
    short endings). The context follows prefix_ids (default: the document
    separator, as every pretraining document does). -> {"n", "accuracy", "accuracy_norm"}."""
    if prefix_ids is None:
        prefix_ids = [tokenizer.special_ids[bpe.DOC_SEP]]
    prefixes, endings = [], []
    for item in items:
        context = list(prefix_ids) + tokenizer.encode(item["context"])
        for ending in item["endings"]:
            prefixes.append(context)
            endings.append(tokenizer.encode(ending))
    sums = continuation_logprobs(model, prefixes, endings, batch_size)
    right_sum = right_norm = 0
    k = 0
    for item in items:
        n = len(item["endings"])
        item_sums = sums[k:k + n]
        per_token = [s / max(1, len(e)) for s, e in zip(item_sums, endings[k:k + n])]
        right_sum += int(np.argmax(item_sums)) == int(item["label"])
        right_norm += int(np.argmax(per_token)) == int(item["label"])
        k += n
    n_items = max(1, len(items))
    return {"n": len(items), "accuracy": right_sum / n_items, "accuracy_norm": right_norm / n_items}


def kl_on_samples(policy, reference, prompts_ids, responses_ids, batch_size=32):
    """Per-sample estimate of KL(policy || reference) from responses sampled
    from the policy: sum over response tokens of log p_policy - log p_reference."""
    lp_policy = continuation_logprobs(policy, prompts_ids, responses_ids, batch_size)
    lp_reference = continuation_logprobs(reference, prompts_ids, responses_ids, batch_size)
    return [a - b for a, b in zip(lp_policy, lp_reference)]


# -----------------------------------------------------------------------------
# Chat: answers to held-out prompts, graded by the simulated labeler

def chat_answers(model, tokenizer, prompts, max_new_tokens, temperature=0.0, seed=None, batch_size=32):
    """Answers to prompt texts in the chat template, stopping at end of turn.
    -> [{"prompt_ids", "response_ids", "ended", "text"}]; prompt_ids are the
    ids the model saw (the most recent ones when a prompt is too long), and
    response_ids end with the end-of-turn id when the answer ended."""
    end = tokenizer.special_ids[bpe.END_OF_TURN]
    block = model.config.block_size
    max_new_tokens = max(1, min(max_new_tokens, block - 1))
    prompts_ids = [tokenizer.encode_chat(p)[0][-(block - max_new_tokens):] for p in prompts]
    results = generate_responses(model, prompts_ids, max_new_tokens, end, temperature, seed, batch_size)
    return [{"prompt_ids": p, "response_ids": r + ([end] if ended else []), "ended": ended,
             "text": tokenizer.decode(r)} for p, (r, ended) in zip(prompts_ids, results)]


def evaluate_chat(model, tokenizer, records, max_new_tokens, batch_size=32):
    """Greedy answers to prompt records, graded with prepare_data.grade_answers.
    -> (grades {"n", "accuracy", "gold", "end_rate", "words", "by_task"}, answers)."""
    answers = chat_answers(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, 0.0, None, batch_size)
    for record, a in zip(records, answers):
        a["gold"] = prepare_data.gold_score(record, a["text"], a["ended"])
    return prepare_data.grade_answers(records, [(a["text"], a["ended"]) for a in answers]), answers


# -----------------------------------------------------------------------------
# Reward model: scores and pairwise accuracy

def preference_pairs(records):
    """Preference records -> [(prompt, a, a_ended, b, b_ended, gold_prefers_a)]
    with a the response the (noisy) labeler preferred. Ranked-K records
    ("responses" best first, "ended", "gold") give every pair i < j.
    gold_prefers_a is None when the record has no gold verdict."""
    pairs = []
    for r in records:
        if "responses" in r:
            ended = r.get("ended") or [True] * len(r["responses"])
            gold = r.get("gold")
            for i in range(len(r["responses"])):
                for j in range(i + 1, len(r["responses"])):
                    verdict = None if gold is None else gold[i] > gold[j]
                    pairs.append((r["prompt"], r["responses"][i], ended[i], r["responses"][j], ended[j], verdict))
        else:
            pairs.append((r["prompt"], r["chosen"], r.get("chosen_ended", True), r["rejected"],
                          r.get("rejected_ended", True), r.get("gold_prefers_chosen")))
    return pairs


def pairwise_accuracy(scores_a, scores_b, a_is_better):
    """Share of pairs the scores order as the labels say (a_is_better[i]: True
    if a should score higher); a tie counts one half."""
    if not a_is_better:
        return None
    right = 0.0
    for sa, sb, label in zip(scores_a, scores_b, a_is_better):
        right += 0.5 if sa == sb else float((sa > sb) == bool(label))
    return right / len(a_is_better)


def reward_accuracy(rm, tokenizer, records, normalizer=None, batch_size=32):
    """Held-out pairwise accuracy of a reward model, against the noisy labels it
    was trained on and against the noiseless gold verdict.
    -> {"pairs", "accuracy_noisy", "accuracy_gold", "margin", "mean", "std"}."""
    pairs = preference_pairs(records)
    block = rm.config.block_size
    seqs = []
    for prompt, a, a_ended, b, b_ended, _ in pairs:
        seqs += [reward_input(tokenizer, prompt, a, a_ended, block), reward_input(tokenizer, prompt, b, b_ended, block)]
    scores = score_sequences(rm, seqs, batch_size, normalizer).tolist()
    sa, sb = scores[0::2], scores[1::2]
    gold = [(x, y, g) for x, y, (*_, g) in zip(sa, sb, pairs) if g is not None]
    return {"pairs": len(pairs),
            "accuracy_noisy": pairwise_accuracy(sa, sb, [True] * len(pairs)),
            "accuracy_gold": pairwise_accuracy([g[0] for g in gold], [g[1] for g in gold], [g[2] for g in gold]),
            "margin": float(np.mean(np.subtract(sa, sb))) if pairs else None,
            "mean": float(np.mean(scores)) if scores else None,
            "std": float(np.std(scores)) if scores else None}


def win_rate(gold_a, gold_b):
    """How often a's answer beats b's by gold score, ties counting one half."""
    wins = sum(x > y for x, y in zip(gold_a, gold_b))
    ties = sum(x == y for x, y in zip(gold_a, gold_b))
    n = len(gold_a)
    return {"n": n, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate": (wins + 0.5 * ties) / n if n else None}


# -----------------------------------------------------------------------------
# Data

def load_eval_data(dataset, data_dir):
    """What data/<dataset>/ offers for evaluation: {"folder", "tokenizer",
    "val", "mc", "prompts", "prefs", "missing": {part: reason}}. A missing part
    is None with its reason; the embedded tinyworld is built when absent."""
    folder = prepare_data.ensure_prepared(dataset, data_dir)  # builds tinyworld if missing
    data = {"folder": folder, "tokenizer": None, "val": None, "mc": None, "prompts": None, "prefs": None,
            "missing": {}}
    fix = f"run `python prepare_data.py --dataset {dataset}`"
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        reason = f"dataset {dataset!r} is not prepared ({meta_path} is missing): {fix}"
        data["missing"] = {part: reason for part in ("val", "mc", "prompts", "prefs")}
        return data
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    val_path, tok_path = os.path.join(folder, "val.bin"), os.path.join(folder, "tokenizer.json")
    if os.path.exists(val_path) and os.path.exists(tok_path):
        data["val"] = np.memmap(val_path, dtype=np.dtype(meta.get("dtype", "uint16")), mode="r")
        data["tokenizer"] = bpe.Tokenizer.load(tok_path)
    else:
        data["missing"]["val"] = f"{val_path} or {tok_path} is missing: {fix}"
    for part, name in (("mc", "mc.jsonl"), ("prompts", "prompts_eval.jsonl"), ("prefs", "prefs_val.jsonl")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            data[part] = prepare_data.read_jsonl(path)
        else:
            data["missing"][part] = f"{path} is missing (dataset {dataset!r} has none): {fix} or pass --dataset"
    return data


def _first(records, n):
    """The first n records (all of them when n is 0)."""
    return records if n <= 0 else records[:n]


# -----------------------------------------------------------------------------
# One checkpoint

def evaluate_checkpoint(path, label, config, device, ctx, data_cache, log=print):
    """Every metric that applies to one checkpoint. -> (row, model, tokenizer);
    row = {"label", "path", "stage", "status", "metrics", "skipped": {metric: reason}, ...}.
    A missing file is a "missing" row, an unreadable one an "error" row."""
    row = {"label": label, "path": path, "stage": label, "status": "ok", "metrics": {}, "skipped": {}}
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.exists(file):
        row["status"] = "missing"
        script = STAGE_SCRIPT.get(label, "the stage that writes it")
        row["reason"] = f"{file} does not exist" + (f": run `python {script} --config {config['config']}`"
                                                    if config["config"] and label in STAGE_SCRIPT else "")
        log(f"{label}: missing ({row['reason']})")
        return row, None, None
    try:
        ckpt = load_checkpoint(file)
        stage = ckpt["stage"]
        tokenizer = tokenizer_from_checkpoint(ckpt)
        if stage in REWARD_STAGES:
            model = scalar_model_from_checkpoint(ckpt, device).eval()
        else:
            model = model_from_checkpoint(ckpt, device).eval()
    except (CheckpointError, ValueError, KeyError) as e:
        row["status"] = "error"
        row["reason"] = str(e) if isinstance(e, CheckpointError) else f"checkpoint {file} cannot be used ({e})"
        log(f"{label}: error: {row['reason']}")
        return row, None, None
    row.update(stage=stage, file=file, parent=ckpt.get("parent"), params=sum(p.numel() for p in model.parameters()),
               reward_norm=ckpt.get("reward_norm"))
    dataset = config["dataset"] or ckpt["config"].get("dataset") or "tinyworld"
    row["dataset"] = dataset
    if label in STAGES and label != stage:  # out/C/sft/ holding a pretrain checkpoint, say
        row["note"] = f"the {label} folder holds a '{stage}' checkpoint: it is evaluated as one"
        log(f"{label}: {row['note']}")
    if dataset not in data_cache:
        data_cache[dataset] = load_eval_data(dataset, config["data_dir"])
    data = data_cache[dataset]
    metrics, skipped = row["metrics"], row["skipped"]

    def skip(metric, reason):
        skipped[metric] = reason
        log(f"{label}: {metric} skipped ({reason})")

    def timed(metric, fn):
        t0 = time.time()
        with ctx:
            metrics[metric] = fn()
        return time.time() - t0

    if stage not in GENERATIVE_STAGES:
        reason = (f"a '{stage}' checkpoint does not generate text" if stage in REWARD_STAGES
                  else f"'{stage}' is not a stage eval.py knows ({', '.join(STAGES)})")
        for metric in ("val", "mc", "chat"):
            skip(metric, reason)
    else:
        if data["val"] is None:
            skip("val", data["missing"]["val"])
        elif data["tokenizer"].to_dict() != ckpt["tokenizer"]:
            skip("val", f"{data['folder']}/val.bin was tokenized by another tokenizer than this checkpoint's")
        else:
            dt = timed("val", lambda: evaluate_loss(model, data["val"], config["batch_size"], config["val_tokens"],
                                                    token_byte_lengths(tokenizer)))
            m = metrics["val"]
            log(f"{label}: val loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}, {m['bpb']:.4f} bits/byte "
                f"over {m['tokens']:,} tokens ({dt:.1f}s)")
        if data["mc"] is None:
            skip("mc", data["missing"]["mc"])
        else:
            items = _first(data["mc"], config["max_mc"])
            dt = timed("mc", lambda: multiple_choice_accuracy(model, tokenizer, items, config["batch_size"]))
            m = metrics["mc"]
            log(f"{label}: multiple choice {m['accuracy']:.1%} (per token {m['accuracy_norm']:.1%}) "
                f"on {len(items)} items ({dt:.1f}s)")
        hellaswag = data_cache.get("hellaswag_mc")
        if hellaswag:
            items = _first(hellaswag, config["max_mc"])
            dt = timed("hellaswag", lambda: multiple_choice_accuracy(model, tokenizer, items, config["batch_size"]))
            log(f"{label}: hellaswag {metrics['hellaswag']['accuracy']:.1%} "
                f"(per token {metrics['hellaswag']['accuracy_norm']:.1%}) on {len(items)} items ({dt:.1f}s)")
        if data["prompts"] is None:
            skip("chat", data["missing"]["prompts"])
        else:
            records = _first(data["prompts"], config["max_prompts"])
            t0 = time.time()
            with ctx:
                grades, answers = evaluate_chat(model, tokenizer, records, config["max_new_tokens"],
                                                config["batch_size"])
            metrics["chat"] = grades
            row["answers"] = [{"prompt": r["prompt"], "task": r.get("task"), "text": a["text"], "ended": a["ended"],
                               "gold": a["gold"]} for r, a in zip(records, answers)]
            row["_answers"] = answers
            log(f"{label}: answers to {len(records)} prompts{' (chat template)' if stage == 'pretrain' else ''}: "
                f"accuracy {grades['accuracy']:.1%}, gold {grades['gold']:+.3f}, ended {grades['end_rate']:.0%}, "
                f"{grades['words']:.1f} words ({time.time() - t0:.1f}s)")
    if stage in REWARD_STAGES:
        if data["prefs"] is None:
            skip("rm", data["missing"]["prefs"])
        else:
            records = _first(data["prefs"], config["max_pairs"])
            dt = timed("rm", lambda: reward_accuracy(model, tokenizer, records, ckpt.get("reward_norm"),
                                                     config["batch_size"]))
            m = metrics["rm"]
            gold_text = "n/a" if m["accuracy_gold"] is None else f"{m['accuracy_gold']:.1%}"
            log(f"{label}: pairwise accuracy {m['accuracy_noisy']:.1%} (noisy labels), {gold_text} (gold) "
                f"on {m['pairs']} pairs ({dt:.1f}s)")
    else:
        skip("rm", f"a '{stage}' checkpoint has no reward head")
    return row, model, tokenizer


# -----------------------------------------------------------------------------
# PPO's log: proxy and gold scores against sqrt(KL)

def find_key(records, candidates):
    """The first candidate key with a numeric value in some record, or None."""
    for key in candidates:
        if any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in records):
            return key
    return None


def ppo_log_keys(records):
    """{"proxy", "gold", "kl"}: the log keys read for each (None when absent)."""
    return {"proxy": find_key(records, PROXY_KEYS), "gold": find_key(records, GOLD_KEYS),
            "kl": find_key(records, KL_KEYS)}


def _save_figure(fig, path):
    """Write a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt
    tmp = path + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ppo(records, keys, path):
    """Left: proxy and gold scores and KL per iteration. Right: proxy and gold
    against sqrt(KL to the reference): the proxy keeps rising with KL while the
    gold score stalls or falls when the policy over-optimises the reward model."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = [(f"{name} ({keys[name]})", keys[name]) for name in ("proxy", "gold") if keys[name]]
    series += [(key, key) for key in HELD_OUT_KEYS]
    for label, key in series:
        points = [(r["iter"], r[key]) for r in records if "iter" in r and isinstance(r.get(key), (int, float))]
        if points:
            left.plot(*zip(*points), label=label)
    if keys["kl"]:
        twin = left.twinx()
        points = [(r["iter"], r[keys["kl"]]) for r in records
                  if "iter" in r and isinstance(r.get(keys["kl"]), (int, float))]
        twin.plot(*zip(*points), color="grey", linestyle="--", label=f"KL ({keys['kl']})")
        twin.set_ylabel("KL to reference")
        twin.legend(loc="lower right")
        for name in ("proxy", "gold"):
            key = keys[name]
            points = sorted((math.sqrt(max(0.0, r[keys["kl"]])), r[key]) for r in records
                            if isinstance(r.get(key), (int, float)) and isinstance(r.get(keys["kl"]), (int, float)))
            if points:
                right.plot(*zip(*points), marker=".", label=f"{name} ({key})")
    left.set_xlabel("iteration")
    left.set_title("PPO: scores and KL per iteration")
    left.legend(loc="upper left")
    left.grid(alpha=0.3)
    right.set_xlabel("sqrt(KL to reference)")
    right.set_title("proxy (reward model) vs gold score")
    right.grid(alpha=0.3)
    if right.lines:
        right.legend()
    _save_figure(fig, path)


# -----------------------------------------------------------------------------
# Plots and the report

def plot_loss_curves(logs, path):
    """One panel per stage: every numeric key of its log.jsonl whose name ends in
    "loss", against the iteration. logs: {label: records}."""
    plt = _pyplot()
    logs = {k: v for k, v in logs.items() if v}
    fig, axes = plt.subplots(1, max(1, len(logs)), figsize=(4.5 * max(1, len(logs)), 3.8), squeeze=False)
    for ax, (label, records) in zip(axes[0], logs.items()):
        keys = sorted({k for r in records for k, v in r.items() if k.endswith("loss") and isinstance(v, (int, float))})
        for key in keys:
            points = [(r["iter"], r[key]) for r in records if "iter" in r and isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        ax.set_title(label)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    _save_figure(fig, path)


def accuracy_bars(rows):
    """{measure: {label: value}} of the accuracies to compare across stages."""
    measures = {"multiple choice (per token)": ("mc", "accuracy_norm"), "task accuracy": ("chat", "accuracy"),
                "end-of-turn rate": ("chat", "end_rate"), "RM accuracy (gold)": ("rm", "accuracy_gold")}
    out = {}
    for name, (metric, key) in measures.items():
        values = {r["label"]: r["metrics"][metric][key] for r in rows
                  if r["status"] == "ok" and metric in r["metrics"] and r["metrics"][metric].get(key) is not None}
        if values:
            out[name] = values
    return out


def plot_accuracy(rows, path):
    """Grouped bars: each measure, one bar per stage."""
    plt = _pyplot()
    bars = accuracy_bars(rows)
    labels = [r["label"] for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        xs = [j + i * width for j, m in enumerate(bars) if label in bars[m]]
        ys = [bars[m][label] for m in bars if label in bars[m]]
        if xs:
            ax.bar(xs, ys, width, label=label)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(bars))])
    ax.set_xticklabels(list(bars), fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("accuracy per stage")
    ax.grid(alpha=0.3, axis="y")
    if ax.patches:
        ax.legend()
    _save_figure(fig, path)


def _fmt(value, kind="f3"):
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "signed":
        return f"{value:+.3f}"
    return f"{value:.3f}"


def _table_row(row, comparison):
    """One row of the report table: the cells under TABLE_COLUMNS."""
    if row["status"] != "ok":
        return [row["label"], row["status"] + ": " + row.get("reason", "")] + [""] * (len(TABLE_COLUMNS) - 2)
    m = row["metrics"]
    val, mc, chat, rm = m.get("val", {}), m.get("mc", {}), m.get("chat", {}), m.get("rm", {})
    cmp = comparison if row["stage"] == "ppo" and comparison.get("status") == "ok" else {}
    return [row["label"], _fmt(val.get("loss")), _fmt(val.get("bpb")),
            f"{_fmt(mc.get('accuracy'), 'pct')} / {_fmt(mc.get('accuracy_norm'), 'pct')}" if mc else "-",
            _fmt(chat.get("accuracy"), "pct"), _fmt(chat.get("gold"), "signed"), _fmt(chat.get("end_rate"), "pct"),
            f"{chat['words']:.1f}" if chat else "-", _fmt(row.get("rm_score"), "signed"),
            f"{_fmt(rm.get('accuracy_gold'), 'pct')} / {_fmt(rm.get('accuracy_noisy'), 'pct')}" if rm else "-",
            _fmt(cmp.get("win_rate", {}).get("win_rate"), "pct") if cmp else "-",
            _fmt(cmp.get("kl")) if cmp else "-"]


TABLE_COLUMNS = ["stage", "val loss", "val bits/byte", "mc acc (sum / per token)", "task acc", "gold",
                 "end rate", "words", "RM score", "RM acc (gold / noisy)", "win vs SFT", "KL to SFT"]


def markdown_report(report):
    """report.md: the table (one row per stage), accuracy per task, PPO vs SFT,
    what was skipped and why, the plots."""
    lines = [f"# Evaluation{' of ' + report['config']['config'] if report['config']['config'] else ''}", ""]
    lines += ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_table_row(row, report["ppo_vs_sft"])) + " |")
    lines += ["", "mc: the embedded cloze set, each context after the document separator; task acc, gold, end rate "
              "and words: greedy answers to held-out prompts in the chat template, graded by the simulated labeler; "
              "RM score: the reward model's normalised score of those answers; win vs SFT: gold win rate of PPO's "
              "answer over SFT's, ties one half.", ""]
    tasks = sorted({t for r in report["rows"] if "chat" in r.get("metrics", {})
                    for t in r["metrics"]["chat"]["by_task"]})
    if tasks:
        lines += ["## Task accuracy per task type", "", "| stage | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for r in report["rows"]:
            if "chat" in r.get("metrics", {}):
                by = r["metrics"]["chat"]["by_task"]
                lines.append(f"| {r['label']} | " + " | ".join(_fmt(by[t]["accuracy"], "pct") if t in by else "-"
                                                            for t in tasks) + " |")
        lines.append("")
    hs = [r for r in report["rows"] if "hellaswag" in r.get("metrics", {})]
    if hs:
        lines += ["## HellaSwag", ""] + [f"- {r['label']}: {_fmt(r['metrics']['hellaswag']['accuracy'], 'pct')} "
                                         f"(per token {_fmt(r['metrics']['hellaswag']['accuracy_norm'], 'pct')}) on "
                                         f"{r['metrics']['hellaswag']['n']} items" for r in hs] + [""]
    c = report["ppo_vs_sft"]
    lines += ["## PPO against SFT", ""]
    if c.get("status") == "ok":
        w = c["win_rate"]
        lines.append(f"- gold win rate of PPO over SFT: {_fmt(w['win_rate'], 'pct')} ({w['wins']} wins, "
                     f"{w['ties']} ties, {w['losses']} losses on {w['n']} prompts); mean gold "
                     f"{_fmt(c['gold_ppo'], 'signed')} vs "
                     f"{_fmt(c['gold_sft'], 'signed')}")
        if c.get("rm_ppo") is not None:
            lines.append(f"- reward-model score: PPO {_fmt(c['rm_ppo'], 'signed')}, SFT {_fmt(c['rm_sft'], 'signed')}")
        if c.get("kl") is not None:
            lines.append(f"- KL(PPO || SFT) on {c['kl_samples']} PPO samples (temperature {c['kl_temperature']}): "
                         f"{c['kl']:.3f} nats per response")
    else:
        lines.append(f"- skipped: {c.get('reason')}")
    if report.get("ppo_log"):
        keys = report["ppo_log"]["keys"]
        lines.append(f"- ppo/log.jsonl: {report['ppo_log']['records']} records; keys read: "
                     + ", ".join(f"{k}={v}" for k, v in keys.items()))
    lines.append("")
    skipped = [(r["label"], m, why) for r in report["rows"] for m, why in r.get("skipped", {}).items()]
    if skipped or report["notes"]:
        lines += ["## Skipped", ""] + [f"- {label} {m}: {why}" for label, m, why in skipped]
        lines += [f"- {note}" for note in report["notes"]] + [""]
    if report["plots"]:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in report["plots"]] + [""]
    lines.append(f"Evaluated in {report['time_s']:.1f}s on {report['device']}.")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# The run

def compare_ppo_sft(rows, models, config, ctx, log=print):
    """Gold win rate of PPO's greedy answers over SFT's, their reward-model
    scores, and KL(PPO || SFT) on PPO's samples at kl_temperature."""
    by_stage = {r["stage"]: r for r in rows if r["status"] == "ok"}
    if "ppo" not in by_stage or "sft" not in by_stage:
        missing = [s for s in ("sft", "ppo") if s not in by_stage]
        return {"status": "skipped", "reason": f"needs both an sft and a ppo checkpoint ({', '.join(missing)} missing)"}
    ppo, sft = by_stage["ppo"], by_stage["sft"]
    if "_answers" not in ppo or "_answers" not in sft:
        return {"status": "skipped", "reason": "no held-out prompts were answered (see the chat rows)"}
    out = {"status": "ok",
           "win_rate": win_rate([a["gold"] for a in ppo["_answers"]], [a["gold"] for a in sft["_answers"]]),
           "gold_ppo": ppo["metrics"]["chat"]["gold"], "gold_sft": sft["metrics"]["chat"]["gold"],
           "rm_ppo": ppo.get("rm_score"), "rm_sft": sft.get("rm_score"), "kl": None}
    log(f"ppo vs sft: gold win rate {out['win_rate']['win_rate']:.1%} on {out['win_rate']['n']} prompts")
    policy, reference = models[ppo["label"]][0], models[sft["label"]][0]
    tokenizer = models[ppo["label"]][1]
    prompts = [a["prompt"] for a in _first(ppo["answers"], config["kl_prompts"])] if config["kl_prompts"] > 0 else []
    if prompts:
        t0 = time.time()
        with ctx:
            samples = chat_answers(policy, tokenizer, prompts, config["max_new_tokens"], config["kl_temperature"],
                                   config["seed"], config["batch_size"])
            kls = kl_on_samples(policy, reference, [s["prompt_ids"] for s in samples],
                                [s["response_ids"] for s in samples], config["batch_size"])
        out.update(kl=float(np.mean(kls)), kl_stderr=float(np.std(kls) / math.sqrt(len(kls))), kl_samples=len(kls),
                   kl_temperature=config["kl_temperature"])
        log(f"ppo vs sft: KL(ppo || sft) {out['kl']:.3f} +- {out['kl_stderr']:.3f} nats per response on "
            f"{len(kls)} samples ({time.time() - t0:.1f}s)")
    return out


def stage_paths(config, ckpts):
    """[(label, path)]: the given checkpoints (label None: named later by their
    stage), or the ckpt.pt of each of the four stage folders of the config."""
    if ckpts:
        return [(None, p) for p in ckpts]
    return [(stage, os.path.join(config["out_root"], config["config"], stage, "ckpt.pt")) for stage in STAGES]


def report_folder(config):
    """Where report.json, report.md and the plots go."""
    if config["out"]:
        return config["out"]
    if config["config"]:
        return os.path.join(config["out_root"], config["config"], "eval")
    return os.path.join(config["out_root"], "eval")


def run(config, ckpts=None, log=None):
    """Evaluate, write report.json, report.md and the plots; return the report."""
    log = log or (lambda text: print(f"eval: {text}", flush=True))
    t_start = time.time()
    device = pick_device(config["device"])
    device_type = device.split(":")[0]
    threads = torch.get_num_threads()
    if device_type == "cpu" and config["cpu_threads"] > 0:
        torch.set_num_threads(config["cpu_threads"])
    try:
        return evaluate_all(config, ckpts, device, log, t_start)
    finally:
        torch.set_num_threads(threads)  # leave the process as it was (a test, a notebook)


def evaluate_all(config, ckpts, device, log, t_start):
    """The body of run: every checkpoint, the cross-stage comparisons, the files."""
    device_type = device.split(":")[0]
    ctx = autocast_context(device_type, pick_dtype(config["dtype"], device_type))
    torch.manual_seed(config["seed"])
    out_dir = report_folder(config)
    data_cache = {}
    hellaswag_path = os.path.join(config["data_dir"], "hellaswag", "mc.jsonl")
    notes = []
    if os.path.exists(hellaswag_path):
        data_cache["hellaswag_mc"] = prepare_data.read_jsonl(hellaswag_path)
    else:
        notes.append(f"hellaswag: {hellaswag_path} is not prepared (`python prepare_data.py --dataset hellaswag` "
                     f"downloads it), so only the embedded cloze set was used")
    rows, models = [], {}
    for label, path in stage_paths(config, ckpts):
        if label is None:  # --ckpt: named by the stage it holds
            try:
                label = load_checkpoint(path)["stage"]
            except CheckpointError:
                label = os.path.basename(os.path.normpath(path))
            if label in [r["label"] for r in rows]:
                label = f"{label} ({path})"
        row, model, tokenizer = evaluate_checkpoint(path, label, config, device, ctx, data_cache, log)
        rows.append(row)
        if model is not None:
            models[label] = (model, tokenizer)

    # the reward model scores every model's answers
    rm_row = next((r for r in rows if r["status"] == "ok" and r["stage"] in REWARD_STAGES), None)
    for row in rows:
        if "_answers" not in row:
            continue
        if rm_row is None:
            row["skipped"]["rm_score"] = "no reward model to score the answers"
            continue
        rm, rm_tok = models[rm_row["label"]]
        with ctx:
            seqs = [reward_input(rm_tok, a["prompt"], a["text"], a["ended"], rm.config.block_size)
                    for a in row["answers"]]
            scores = score_sequences(rm, seqs, config["batch_size"], rm_row.get("reward_norm"))
        row["rm_score"] = float(scores.mean())
        for a, s in zip(row["answers"], scores.tolist()):
            a["rm_score"] = s
        log(f"{row['label']}: reward-model score of its answers {row['rm_score']:+.3f}")
    comparison = compare_ppo_sft(rows, models, config, ctx, log)
    if comparison["status"] != "ok":
        log(f"ppo vs sft skipped ({comparison['reason']})")

    # pictures
    os.makedirs(out_dir, exist_ok=True)
    plots = []
    logs = {r["label"]: read_jsonl_log(os.path.join(os.path.dirname(r["file"]), "log.jsonl"))
            for r in rows if r["status"] == "ok"}
    if any(logs.values()):
        plot_loss_curves(logs, os.path.join(out_dir, "loss_curves.png"))
        plots.append("loss_curves.png")
    if accuracy_bars(rows):
        plot_accuracy(rows, os.path.join(out_dir, "accuracy.png"))
        plots.append("accuracy.png")
    ppo_log = None
    ppo_row = next((r for r in rows if r["status"] == "ok" and r["stage"] == "ppo"), None)
    if ppo_row is not None and logs.get(ppo_row["label"]):
        records = logs[ppo_row["label"]]
        keys = ppo_log_keys(records)
        ppo_log = {"records": len(records), "keys": keys}
        if keys["proxy"] or keys["gold"] or keys["kl"]:
            plot_ppo(records, keys, os.path.join(out_dir, "ppo.png"))
            plots.append("ppo.png")
        else:
            notes.append(f"ppo/log.jsonl has none of the keys {PROXY_KEYS + GOLD_KEYS + KL_KEYS}: no PPO plot")

    for row in rows:
        row.pop("_answers", None)
    report = {"config": dict(config), "device": device, "rows": rows, "ppo_vs_sft": comparison, "ppo_log": ppo_log,
              "notes": notes, "plots": plots, "time_s": time.time() - t_start}
    with open(os.path.join(out_dir, "report.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(os.path.join(out_dir, "report.json.tmp"), os.path.join(out_dir, "report.json"))
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(report))
    log(f"done in {report['time_s']:.1f}s: {out_dir}/report.md, report.json, {', '.join(plots) or 'no plots'}")
    return report


def parse_args(argv):
    """-> (config, ckpts). `--ckpt PATH` may repeat; everything else is
    `--config NAME --key=value` as in the training stages."""
    ckpts, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--ckpt":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError("--ckpt needs a checkpoint file or folder")
            ckpts.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--ckpt="):
            ckpts.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if "-h" in rest or "--help" in rest:
        print(__doc__.strip().split("\n\n")[1] + "\n")  # the usage lines, then parse_config lists the keys
    config, flags = parse_config(rest, DEFAULTS, PRESETS, "eval.py", __doc__.strip().splitlines()[0])
    if flags:
        raise ValueError(f"eval.py has no --{'/--'.join(sorted(flags))}: it rewrites its report every run")
    if not ckpts and not config["config"]:
        raise ValueError("nothing to evaluate: give --config NAME (the stages in out/NAME/) or --ckpt PATH")
    for key in ("val_tokens", "max_mc", "max_prompts", "max_pairs", "kl_prompts"):
        if config[key] < 0:
            raise ValueError(f"--{key}={config[key]} must be 0 (all) or more")
    if config["max_new_tokens"] < 1 or config["batch_size"] < 1 or config["kl_temperature"] <= 0:
        raise ValueError("--max_new_tokens and --batch_size must be at least 1 and --kl_temperature positive")
    return config, ckpts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, ckpts = parse_args(argv)
        report = run(config, ckpts)
    except (ValueError, CheckpointError, prepare_data.DataError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 1
    errors = [r for r in report["rows"] if r["status"] == "error" or (ckpts and r["status"] == "missing")]
    for r in errors:
        print(f"eval.py: error: {r['reason']}", file=sys.stderr)
    if all(r["status"] != "ok" for r in report["rows"]):
        print("eval.py: error: no checkpoint could be evaluated"
              + (f" in {config['out_root']}/{config['config']}: run `python train.py --config {config['config']}` first"
                 if not ckpts else ""), file=sys.stderr)
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
