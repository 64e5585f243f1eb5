"""eval.py: what did each stage buy? Numbers and pictures for every checkpoint.

    python eval.py --config small                        # out/small/{pretrain,sft,rm,ppo}/ckpt.pt
    python eval.py --ckpts=out/small/sft,out/small/ppo   # given checkpoints, files or folders
    python eval.py --scaling=small                       # scaling laws: IsoFLOP runs of train.py, minutes
    python eval.py --scaling=tiny                        # the same study in seconds (tests)

Writes out/<config>/eval/{report.json, report.md, *.png}, each checkpoint on its dataset: loss, bits per byte, cloze
accuracy, greedy answers graded by the simulated labeler, scored by the RM; RM accuracy; PPO vs SFT; alignment tax.
--scaling: train.py runs in out/scaling/<name>/ (resumable), fits, scaling.{json,md}, isoflop.png, optimal.png."""

import collections
import contextlib
import functools
import itertools
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import bpe
import tinyworld
import prepare_data
from model import (answer_prompts, checkpoint_file, CheckpointError, generate_responses, GPT, GPTConfig,
                   load_checkpoint, model_from_checkpoint, quantize_model, QUANTIZE, tokenizer_from_checkpoint,
                   weight_bytes)
import train
from train import (autocast_context, bits_per_byte, check_least, parse_config, pick_device, read_jsonl_log,
                   resolve_dtype, token_byte_lengths)
from reward import pad_right, pair_accuracy, reward_input, scalar_model_from_checkpoint, score_sequences

# -----------------------------------------------------------------------------
# Configuration: defaults, then a preset (--config NAME), then --key=value overrides.

DEFAULTS = dict(
    config="", ckpts="",       # out_root/<config>/{pretrain,sft,rm,ppo}, or these comma-separated files or folders
    out_root="out", data_dir="data", out="",   # out: the report folder; "" means out_root/<config>/eval
    val_tokens=16384,          # tokens of val.bin for loss and bits per byte; 0 = all of it
    max_mc=200, max_prompts=200,   # multiple-choice items (of mc.jsonl, of hellaswag), held-out prompts; 0 = all
    max_pairs=0,               # held-out preference pairs for the reward model; 0 = all, the set reward.py reports on
    kl_prompts=100, max_new_tokens=64, batch_size=32, seed=1337,  # kl_prompts: PPO samples for KL(PPO || SFT), 0 skips
    device="auto", dtype="auto",   # auto | cpu | cuda | mps; auto | float32 | bfloat16 | float16
    quantize="none",           # e.g. int8,int4: every text model again with its weights in those bits, beside float
    few_shot="0,1,3",          # solved examples before each question for a base model (plain text); "" skips
    scaling="", scaling_dataset="tinyworld",  # scaling: a SCALING study's name (tiny, small) instead of a report
)

PRESETS = {  # tiny: seconds, for tests; small: a 2-core CPU; gpt2: a GPU, the whole HellaSwag validation set and more
    "tiny": dict(val_tokens=2048, max_mc=16, max_prompts=16, max_pairs=32, kl_prompts=8, max_new_tokens=16,
                 batch_size=16),
    "small": dict(val_tokens=16384, max_mc=200, max_prompts=200, kl_prompts=100, max_new_tokens=64, batch_size=32),
    "gpt2": dict(val_tokens=2_000_000, max_mc=0, max_prompts=1000, kl_prompts=500, max_new_tokens=128, batch_size=64),
}

STAGES = {"pretrain": "train.py", "sft": "sft.py", "rm": "reward.py", "ppo": "ppo.py"}  # `--config` rows, in order
KL_TEMPERATURE = 1.0       # the KL is that of the policy itself: its samples at temperature 1
PPO_LOG_KEYS = {"proxy": "rm_score", "gold": "gold", "kl": "kl"}   # what ppo.py logs of each iteration's samples


# -----------------------------------------------------------------------------
# Language modelling: loss, bits per byte, and the log-likelihood of a continuation

@torch.no_grad()
def evaluate_loss(model, tokens, batch_size, max_tokens, byte_lengths):
    """Loss (nats/token) and bits per byte of `tokens` (1-D ids) in consecutive windows of block_size: each token is
    predicted once, its context restarting at every window; max_tokens > 0 caps them (whole windows, at least one)."""
    device, T = next(model.parameters()).device, min(model.config.block_size, len(tokens) - 1)
    if T < 1:
        raise ValueError(f"only {len(tokens)} validation tokens: need at least 2")
    n_windows = (len(tokens) - 1) // T
    if max_tokens > 0:
        n_windows = max(1, min(n_windows, max_tokens // T))
    nats, n_bytes = 0.0, 0.0
    for start in range(0, n_windows, batch_size):
        starts = np.arange(start, min(start + batch_size, n_windows))[:, None] * T
        windows = torch.from_numpy(tokens[starts + np.arange(T + 1)].astype(np.int64))  # (B, T + 1)
        x, y = windows[:, :-1].to(device), windows[:, 1:]
        logits, _ = model(x)                                                            # (B, T, V)
        nats += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        n_bytes += byte_lengths[y].sum().item()
    loss = nats / (n_windows * T)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "bpb": bits_per_byte(nats, n_bytes),
            "tokens": n_windows * T}


@torch.no_grad()
def continuation_logprobs(model, prefixes, continuations, batch_size=32):
    """Each continuation's sum of log p(token | all before it) after its prefix; pairs keep their last block_size+1."""
    device, block = next(model.parameters()).device, model.config.block_size
    # batches of similar lengths waste less on padding; the results go back in the pairs' order
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]) + len(continuations[i]))
    out = [0.0] * len(prefixes)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [(list(prefixes[i]) + list(continuations[i]))[-(block + 1):] for i in chunk]
        # the very first token has no context, so it cannot be scored
        n_cont = [min(len(continuations[i]), len(ids) - 1) for i, ids in zip(chunk, seqs)]
        ids, lengths = (t.to(device) for t in pad_right(seqs))
        if ids.size(1) < 2:                              # nothing to predict anywhere in this batch
            continue
        logits, _ = model(ids[:, :-1])                   # (B, T-1, V): position t predicts token t+1
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        # the continuation's tokens sit at positions len-n .. len-1, predicted at len-n-1 .. len-2
        pos, last = torch.arange(logp.size(1), device=device)[None, :], lengths[:, None] - 1   # (1, T-1), (B, 1)
        mask = (pos >= last - torch.tensor(n_cont, device=device)[:, None]) & (pos < last)
        for i, value in zip(chunk, (logp * mask).sum(1).tolist()):
            out[i] = value
    return out


def multiple_choice_accuracy(model, tokenizer, items, batch_size=32):
    """HellaSwag-style accuracy: for each item, the ending likeliest after the document separator (as every pretraining
    document starts) and context, summed ("accuracy") or per token ("accuracy_norm", not favouring short endings)."""
    contexts = [[tokenizer.special_ids[bpe.DOC_SEP]] + tokenizer.encode(item["context"]) for item in items]
    prefixes = [context for context, item in zip(contexts, items) for _ in item["endings"]]
    endings = [tokenizer.encode(ending) for item in items for ending in item["endings"]]
    sums = continuation_logprobs(model, prefixes, endings, batch_size)
    right_sum = right_norm = k = 0
    for item in items:
        n, label = len(item["endings"]), int(item["label"])
        right_sum += int(np.argmax(sums[k:k + n])) == label
        right_norm += int(np.argmax([s / max(1, len(e)) for s, e in zip(sums[k:k + n], endings[k:k + n])])) == label
        k += n
    n_items = max(1, len(items))
    return {"n": len(items), "accuracy": right_sum / n_items, "accuracy_norm": right_norm / n_items}


def kl_on_samples(policy, reference, prompts_ids, responses_ids, batch_size=32):
    """Per-sample KL(policy || reference) on responses sampled from the policy: sum of log p_policy - log p_ref."""
    return [a - b for a, b in zip(continuation_logprobs(policy, prompts_ids, responses_ids, batch_size),
                                  continuation_logprobs(reference, prompts_ids, responses_ids, batch_size))]


# -----------------------------------------------------------------------------
# Chat answers graded by the simulated labeler; the reward model's accuracy; PPO against SFT

def evaluate_chat(model, tokenizer, records, max_new_tokens, batch_size=32):
    """Greedy answers to prompt records -> (tinyworld's grades, [{"prompt", "task", "text", "ended", "gold"}])."""
    texts = answer_prompts(model, tokenizer, [r["prompt"] for r in records], max_new_tokens, batch_size=batch_size)
    answers = [{"prompt": r["prompt"], "task": r.get("task"), "text": text, "ended": ended,
                "gold": tinyworld.gold_score(r, text, ended)} for r, (text, ended) in zip(records, texts)]
    return tinyworld.grade_answers(records, texts), answers


def few_shot_prompt(record, shots):
    """A base model's plain-text prompt: solved examples, then the question, one line as tinyworld's quizzes read."""
    return " ".join([f"{' '.join(s['prompt'].split())} {s['reference_response']}" for s in shots]
                    + [" ".join(record["prompt"].split())])


def few_shot_accuracy(model, tokenizer, records, pool, k, seed, new_tokens=24, batch_size=32):
    """GPT-3's in-context learning: a base model's grades with k solved examples of the same task (from pool, the
    training split, never the question itself) before each question, and the mean number of shots that fit."""
    rng, sep = random.Random(seed * 10 + k), tokenizer.special_ids[bpe.DOC_SEP]
    room, prompts, used = model.config.block_size - new_tokens, [], []
    for record in records:
        same = [s for s in pool if s.get("task") == record.get("task") and s["prompt"] != record["prompt"]]
        shots = rng.sample(same, min(k, len(same)))
        while len(ids := [sep] + tokenizer.encode(few_shot_prompt(record, shots))) > room and shots:
            shots.pop(0)  # a long story question: fewer shots, never a cut one
        prompts.append(ids)
        used.append(len(shots))
    responses = generate_responses(model, prompts, new_tokens, sep, batch_size=batch_size)
    texts = [tokenizer.decode(ids) for ids, _ in responses]
    ends = [re.search(r"[.!?]", text) for text in texts]  # a quiz answers each question in one sentence
    answers = [(text[:end.end()], True) if end else (text, False) for text, end in zip(texts, ends)]
    return dict(tinyworld.grade_answers(records, answers), shots=sum(used) / max(1, len(used)))


def generation_speed(model, tokenizer, device, new_tokens=64, repeats=3):
    """Tokens/s of a greedy continuation (batch 1, KV cache) after a warm-up: the fastest of `repeats` (load slows)."""
    start = torch.tensor([[tokenizer.special_ids[bpe.DOC_SEP]]], device=device)
    new_tokens = min(new_tokens, model.config.block_size - 1)
    model.generate(start, 4, temperature=0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(start, new_tokens, temperature=0)
        times.append(time.perf_counter() - t0)
    return new_tokens / min(times)


def reward_accuracy(rm, tokenizer, records, normalizer=None, batch_size=32):
    """A reward model's pairwise accuracy on held-out preference records, by noisy labels and by gold, ties half."""
    if not records:
        return {"pairs": 0, "accuracy_noisy": None, "accuracy_gold": None, "margin": None, "mean": None, "std": None}
    seqs = [reward_input(tokenizer, r["prompt"], r[side], r.get(f"{side}_ended", True), rm.config.block_size)
            for r in records for side in ("chosen", "rejected")]
    scores = score_sequences(rm, seqs, batch_size, normalizer).double()   # (2N,): chosen, rejected, chosen, ...
    diff = scores[0::2] - scores[1::2]                                    # (N,) chosen - rejected
    # agreeing with gold: chosen above rejected where gold prefers chosen, below where it does not
    signed = [d if r["gold_prefers_chosen"] else -d for d, r in zip(diff.tolist(), records)
              if r.get("gold_prefers_chosen") is not None]
    return {"pairs": len(records), "accuracy_noisy": pair_accuracy(diff),
            "accuracy_gold": pair_accuracy(torch.tensor(signed)) if signed else None,
            "margin": diff.mean().item(), "mean": scores.mean().item(), "std": scores.std(unbiased=False).item()}


def win_rate(gold_a, gold_b):
    """How often a's answer beats b's by gold score, ties counting one half."""
    pairs = list(zip(gold_a, gold_b))
    wins, ties, n = sum(x > y for x, y in pairs), sum(x == y for x, y in pairs), len(pairs)
    return {"n": n, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate": (wins + 0.5 * ties) / n if n else None}


def compare_ppo_sft(rows, models, config, ctx, log=print):
    """Gold win rate of PPO's greedy answers over SFT's, their RM scores, and KL(PPO || SFT) at KL_TEMPERATURE."""
    by_stage = {r["stage"]: r for r in rows if r["status"] == "ok"}
    if missing := [s for s in ("sft", "ppo") if s not in by_stage]:
        return {"status": "skipped", "reason": f"needs both an sft and a ppo checkpoint ({', '.join(missing)} missing)"}
    ppo, sft = by_stage["ppo"], by_stage["sft"]
    if "answers" not in ppo or "answers" not in sft:
        return {"status": "skipped", "reason": "no held-out prompts were answered (see the chat rows)"}
    out = {"status": "ok", "label": ppo["label"],
           "win_rate": win_rate(*([a["gold"] for a in r["answers"]] for r in (ppo, sft))),
           "gold_ppo": ppo["metrics"]["chat"]["gold"], "gold_sft": sft["metrics"]["chat"]["gold"],
           "rm_ppo": ppo.get("rm_score"), "rm_sft": sft.get("rm_score"), "kl": None}
    log(f"{ppo['label']} vs sft: gold win rate {out['win_rate']['win_rate']:.1%} on {out['win_rate']['n']} prompts")
    (policy, tokenizer), reference = models[ppo["label"]], models[sft["label"]][0]
    end, block = tokenizer.special_ids[bpe.END_OF_TURN], policy.config.block_size
    room = block - max(1, min(config["max_new_tokens"], block - 1))  # the prompt tokens generate_responses keeps
    if prompts_ids := [tokenizer.encode_chat(a["prompt"])[0][-room:] for a in ppo["answers"][:config["kl_prompts"]]]:
        t0 = time.time()
        with ctx:
            samples = generate_responses(policy, prompts_ids, config["max_new_tokens"], end, KL_TEMPERATURE,
                                         config["seed"], config["batch_size"])
            kls = kl_on_samples(policy, reference, prompts_ids, [r + [end] * ended for r, ended in samples],
                                config["batch_size"])
        out.update(kl=float(np.mean(kls)), kl_stderr=float(np.std(kls) / math.sqrt(len(kls))), kl_samples=len(kls),
                   kl_temperature=KL_TEMPERATURE)
        log(f"{ppo['label']} vs sft: KL({ppo['label']} || sft) {out['kl']:.3f} +- {out['kl_stderr']:.3f} nats per "
            f"response on {len(kls)} samples ({time.time() - t0:.1f}s)")
    return out


# -----------------------------------------------------------------------------
# One checkpoint: every metric of its kind

def load_eval_data(dataset, data_dir):
    """What data/<dataset>/ offers (tinyworld is built when absent): each part, or None and its reason in "missing"."""
    folder = prepare_data.ensure_prepared(dataset, data_dir)
    data = {"folder": folder, "tokenizer": None, "val": None, "missing": {}}
    fix = f"run `python prepare_data.py --dataset {dataset}`"
    paths = [os.path.join(folder, name) for name in ("meta.json", "val.bin", "tokenizer.json")]
    if all(os.path.exists(p) for p in paths):  # a broken one is a DataError naming the fix
        data.update(val=prepare_data.load_tokens(folder, "val", prepare_data.load_meta(folder)),
                    tokenizer=bpe.Tokenizer.load(paths[2]))
    else:
        data["missing"]["val"] = f"{' or '.join(p for p in paths if not os.path.exists(p))} is missing: {fix}"
    parts = {"mc": os.path.join(folder, "mc.jsonl"), "prompts": os.path.join(folder, "prompts_eval.jsonl"),
             "shots": os.path.join(folder, "sft_train.jsonl"), "prefs": os.path.join(folder, "prefs_val.jsonl"),
             "hellaswag": os.path.join(data_dir, "hellaswag", "mc.jsonl")}
    for part, path in parts.items():
        data[part] = prepare_data.read_jsonl(path) if os.path.exists(path) else None
        if data[part] is None and part not in ("hellaswag", "shots"):  # optional: without them, less is measured
            data["missing"][part] = f"{path} is missing (dataset {dataset!r} has none): {fix}"
    return data


def evaluate_checkpoint(path, label, config, device, ctx, data_cache, log=print, quantize="none"):
    """Every metric that applies to one checkpoint (label None: named by its stage), its text model's weights
    quantized if asked (model.quantize_model) -> (row, model, tokenizer)."""
    file = checkpoint_file(path)
    named, label = label is not None, label or os.path.basename(os.path.normpath(path))
    row = {"label": label, "path": path, "stage": label, "status": "ok", "metrics": {}, "skipped": {}}
    if not os.path.exists(file):
        script = STAGES.get(label)
        fix = f": run `python {script} --config {config['config']}`" if config["config"] and script else ""
        row.update(status="missing", reason=f"{file} does not exist{fix}")
        log(f"{label}: missing ({row['reason']})")
        return row, None, None
    try:
        ckpt = load_checkpoint(file)
        stage, tokenizer = ckpt["stage"], tokenizer_from_checkpoint(ckpt)
        model = (scalar_model_from_checkpoint if stage == "rm" else model_from_checkpoint)(ckpt, device).eval()
    except (CheckpointError, ValueError, KeyError) as e:
        reason = str(e) if isinstance(e, CheckpointError) else f"checkpoint {file} cannot be used ({e})"
        row.update(status="error", reason=reason)
        log(f"{label}: error: {row['reason']}")
        return row, None, None
    algo = ckpt["config"].get("algo", "ppo") if stage == "ppo" else None  # ppo.py --algo=grpo: stage ppo too
    label, dataset = (label if named else algo or stage), (ckpt["config"].get("dataset") or "tinyworld")
    row.update(label=label, stage=stage, algo=algo, file=file, parent=ckpt.get("parent"), dataset=dataset,
               params=sum(p.numel() for p in model.parameters()), reward_norm=ckpt.get("reward_norm"))
    if stage != "rm" and config["quantize"] != "none":  # the figures --quantize compares: size and speed
        model = quantize_model(model, quantize)
        row.update(label=label + ("" if quantize == "none" else f" {quantize}"), quantize=quantize,
                   weight_bytes=weight_bytes(model), tokens_per_s=generation_speed(model, tokenizer, device))
    if dataset not in data_cache:
        data_cache[dataset] = load_eval_data(dataset, config["data_dir"])
    data, metrics = data_cache[dataset], row["metrics"]

    def skip(metric, reason):
        row["skipped"][metric] = reason
        log(f"{row['label']}: {metric} skipped ({reason})")

    def measure(metric, part, fn):  # metrics[metric] = fn(data[part]), or skipped when the dataset lacks it
        if data[part] is None:
            return skip(metric, data["missing"][part])
        t0 = time.time()
        with ctx:
            result = fn(data[part])
        if metric == "chat":  # (grades, answers): the reward model scores the answers later
            result, row["answers"] = result
        metrics[metric] = result
        figures = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))
        log(f"{row['label']}: {metric} {figures} ({time.time() - t0:.1f}s)")
    if stage == "rm":
        for metric in ("val", "mc", "chat"):
            skip(metric, "a 'rm' checkpoint does not generate text")
        measure("rm", "prefs", lambda records: reward_accuracy(model, tokenizer, records[:config["max_pairs"] or None],
                                                               row["reward_norm"], config["batch_size"]))
        return row, model, tokenizer
    if data["val"] is not None and data["tokenizer"].to_dict() != ckpt["tokenizer"]:
        skip("val", f"{data['folder']}/val.bin was tokenized by another tokenizer than this checkpoint's")
    else:
        measure("val", "val", lambda tokens: evaluate_loss(model, tokens, config["batch_size"], config["val_tokens"],
                                                           token_byte_lengths(tokenizer)))
    for metric in ("mc", "hellaswag") if data["hellaswag"] else ("mc",):  # HellaSwag when prepared (run() notes it)
        measure(metric, metric, lambda items: multiple_choice_accuracy(
            model, tokenizer, items[:config["max_mc"] or None], config["batch_size"]))
    measure("chat", "prompts", lambda records: evaluate_chat(
        model, tokenizer, records[:config["max_prompts"] or None], config["max_new_tokens"], config["batch_size"]))
    for k in [int(k) for k in config["few_shot"].split(",") if k] if stage == "pretrain" and data["shots"] else []:
        measure(f"{k}-shot", "prompts", lambda records: few_shot_accuracy(
            model, tokenizer, records[:config["max_prompts"] or None], data["shots"], k, config["seed"]))
    skip("rm", f"a '{stage}' checkpoint has no reward head")
    return row, model, tokenizer


# -----------------------------------------------------------------------------
# n-gram overlap with a reference answer (BLEU, ROUGE-L), and how often it orders two answers as the labeler does

def ngram_counts(words, n):
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(candidates, references, max_n=4, smooth=False):
    """Corpus BLEU of word lists, one reference each (Papineni et al. 2002): the geometric mean of the n-gram precisions
    (n = 1..max_n, an n-gram counted at most as often as in its reference) times the brevity penalty exp(1 - r / c)
    if shorter. smooth adds one to the counts for n > 1 (Lin and Och 2004): one short answer need not score 0."""
    matches, totals, c, r = [0] * max_n, [0] * max_n, 0, 0
    for candidate, reference in zip(candidates, references):
        c, r = c + len(candidate), r + len(reference)
        for n in range(1, max_n + 1):  # Counter &: each n-gram's smaller count of the two, the clipping
            matches[n - 1] += sum((ngram_counts(candidate, n) & ngram_counts(reference, n)).values())
            totals[n - 1] += max(0, len(candidate) - n + 1)
    add = [0] + [int(smooth)] * (max_n - 1)
    if c == 0 or any(m + a == 0 for m, a in zip(matches, add)):
        return 0.0
    log_precision = sum(math.log((m + a) / (t + a)) for m, t, a in zip(matches, totals, add)) / max_n
    return (1.0 if c > r else math.exp(1 - r / c)) * math.exp(log_precision)


def rouge_l(candidate, reference):
    """ROUGE-L F1 (Lin 2004): the longest common subsequence of words (in order, gaps allowed) over the lengths."""
    previous = [0] * (len(reference) + 1)
    for word in candidate:  # previous[j]: the LCS of the candidate so far and reference[:j]
        row = [0]
        for j, other in enumerate(reference):
            row.append(previous[j] + 1 if word == other else max(previous[j + 1], row[j]))
        previous = row
    if previous[-1] == 0:
        return 0.0
    precision, recall = previous[-1] / len(candidate), previous[-1] / len(reference)
    return 2 * precision * recall / (precision + recall)


def text_overlap(answers, records):
    """answers {model: [answer dicts, in records' order]} -> each model's corpus BLEU and mean ROUGE-L against the
    references, and how often smoothed sentence BLEU and ROUGE-L order two answers gold tells apart as gold does."""
    refs = [tinyworld.tokens_of(r["reference_response"]) for r in records]
    words = {m: [tinyworld.tokens_of(a["text"]) for a in answers[m]] for m in answers}
    scores = {m: {"bleu": [bleu([w], [ref], smooth=True) for w, ref in zip(words[m], refs)],
                  "rouge_l": [rouge_l(w, ref) for w, ref in zip(words[m], refs)]} for m in answers}
    out = {"models": {m: {"bleu": bleu(words[m], refs), "rouge_l": sum(scores[m]["rouge_l"]) / max(1, len(refs))}
                      for m in answers}, "pairs": 0, "agree": {"bleu": 0, "rouge_l": 0}}
    for a, b in itertools.combinations(answers, 2):
        for k in range(len(refs)):
            if gold := answers[a][k]["gold"] - answers[b][k]["gold"]:  # only the pairs gold tells apart
                out["pairs"] += 1
                for metric in ("bleu", "rouge_l"):  # a tie of the metric counts as disagreeing
                    out["agree"][metric] += (scores[a][metric][k] - scores[b][metric][k]) * gold > 0
    return out


# -----------------------------------------------------------------------------
# Plots and the report

def _points(records, key, x="iter"):
    """[(record[x], record[key])] of the records where both are numbers (not booleans)."""
    return [(r[x], r[key]) for r in records if all(type(r.get(k)) in (int, float) for k in (x, key))]


def ppo_log_keys(records):
    """{"proxy", "gold", "kl"} -> the ppo/log.jsonl key read for each, None where no record has it."""
    return {name: key if _points(records, key, x=key) else None for name, key in PPO_LOG_KEYS.items()}


@contextlib.contextmanager
def _figure(path, *args, **kwargs):
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")  # no screen needed
    fig, axes = plt.subplots(*args, **kwargs)
    yield axes
    fig.tight_layout()
    prepare_data.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _finish(ax, title, xlabel, legend_loc="best"):
    ax.set(title=title, xlabel=xlabel)
    ax.grid(alpha=0.3, axis="y" if ax.patches else "both")
    if ax.get_legend_handles_labels()[1]:  # only labelled lines and bars have a legend entry
        ax.legend(loc=legend_loc)


def plot_ppo(records, keys, path):
    """Scores and KL per iteration; proxy and gold against sqrt(KL): over-optimised, the proxy rises as gold stalls."""
    with _figure(path, 1, 2, figsize=(11, 4)) as (left, right):
        series = [(f"{name} ({keys[name]})", keys[name]) for name in ("proxy", "gold") if keys[name]]
        for label, key in series + [("eval_rm", "eval_rm"), ("eval_gold", "eval_gold")]:  # + the held-out prompts
            if points := _points(records, key):
                left.plot(*zip(*points), label=label)
        if keys["kl"]:
            twin = left.twinx()
            twin.plot(*zip(*_points(records, keys["kl"])), color="grey", linestyle="--", label=f"KL ({keys['kl']})")
            twin.set_ylabel("KL to reference")
            twin.legend(loc="lower right")
            for label, key in series:
                if points := sorted((math.sqrt(max(0.0, kl)), v) for kl, v in _points(records, key, x=keys["kl"])):
                    right.plot(*zip(*points), marker=".", label=label)
        _finish(left, "PPO: scores and KL per iteration", "iteration", "upper left")
        _finish(right, "proxy (reward model) vs gold score", "sqrt(KL to reference)")


def plot_loss_curves(logs, path):
    """One panel per stage ({label: records}): every numeric key of its log.jsonl ending in "loss", per iteration."""
    logs = {k: v for k, v in logs.items() if v}
    with _figure(path, 1, max(1, len(logs)), figsize=(4.5 * max(1, len(logs)), 3.8), squeeze=False) as axes:
        for ax, (label, records) in zip(axes[0], logs.items()):
            for key in sorted({k for r in records for k in r if k.endswith("loss")}):
                if points := _points(records, key):
                    ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
            _finish(ax, label, "iteration")


def accuracy_bars(rows):
    """{measure: {label: value}} of the accuracies to compare across stages."""
    measures = {"multiple choice (per token)": ("mc", "accuracy_norm"), "task accuracy": ("chat", "accuracy"),
                "end-of-turn rate": ("chat", "end_rate"), "RM accuracy (gold)": ("rm", "accuracy_gold")}
    bars = {name: {r["label"]: r["metrics"][metric][key] for r in rows if r["status"] == "ok"
                   and r["metrics"].get(metric, {}).get(key) is not None} for name, (metric, key) in measures.items()}
    return {name: values for name, values in bars.items() if values}


def plot_accuracy(rows, path):
    """Grouped bars: each measure, one bar per stage."""
    bars, labels = accuracy_bars(rows), [r["label"] for r in rows if r["status"] == "ok"]
    width = 0.8 / max(1, len(labels))
    with _figure(path, figsize=(8, 4)) as ax:
        for i, label in enumerate(labels):
            if xs := [j + i * width for j, m in enumerate(bars) if label in bars[m]]:
                ax.bar(xs, [bars[m][label] for m in bars if label in bars[m]], width, label=label)
        ax.set(xticks=[j + width * (len(labels) - 1) / 2 for j in range(len(bars))], ylim=(0, 1))
        ax.set_xticklabels(list(bars), fontsize=8)
        _finish(ax, "accuracy per stage", "")


def alignment_tax(rows):
    """What each chat model (sft, ppo) paid for chat: bits per byte and cloze accuracy against its pretrained base."""
    by_file = {os.path.abspath(r["file"]): r for r in rows if r["status"] == "ok"}
    sha256 = functools.lru_cache(maxsize=None)(prepare_data.sha256_file)  # a base shared by sft and ppo: read once
    taxes = {}
    for row in [r for r in by_file.values() if r["stage"] in ("sft", "ppo")]:
        base = row
        while base is not None and base["stage"] != "pretrain":
            parent = base.get("parent") or {}
            base = by_file.get(parent.get("path"))
            if base is not None and sha256(base["file"]) != parent.get("sha256"):
                base = None  # retrained since: not the model this one was tuned from
        if base is None or "val" not in base["metrics"] or "val" not in row["metrics"]:
            taxes[row["label"]] = {"reason": "its pretrained base model (or its bits per byte) is not among the "
                                             "evaluated checkpoints: add it to --ckpts"}
            continue
        bpb_base, bpb = base["metrics"]["val"]["bpb"], row["metrics"]["val"]["bpb"]
        cloze_base, cloze = (r["metrics"].get("mc", {}).get("accuracy") for r in (base, row))
        taxes[row["label"]] = {"base": base["label"], "bpb_base": bpb_base, "bpb": bpb, "bpb_ratio": bpb / bpb_base,
                               "cloze_base": cloze_base, "cloze": cloze,
                               "cloze_change": None if cloze is None or cloze_base is None else cloze - cloze_base}
    return taxes


def plot_alignment_tax(taxes, path):
    """Left: val bits per byte of each chat model beside its base model's; right: cloze accuracy, the same."""
    taxes = {label: t for label, t in taxes.items() if "reason" not in t}
    with _figure(path, 1, 2, figsize=(9, 3.8)) as axes:
        for ax, key, title in zip(axes, ("bpb", "cloze"), ("val bits per byte (lower is better)", "cloze accuracy")):
            for i, (label, t) in enumerate(taxes.items()):
                if None not in (t[key], t[key + "_base"]):  # cloze needs both models scored
                    ax.bar(3 * i, t[key + "_base"], color="tab:blue", label="base model" if i == 0 else None)
                    ax.bar(3 * i + 1, t[key], color="tab:orange", label="chat model" if i == 0 else None)
                    ratio = f"{t['bpb_ratio']:.2f}x" if key == "bpb" else f"{100 * t['cloze_change']:+.1f} pts"
                    ax.text(3 * i + 1, t[key], ratio, ha="center", va="bottom", fontsize=8)
            ax.set_xticks([3 * i + j for i in range(len(taxes)) for j in (0, 1)])
            ax.set_xticklabels([n for label, t in taxes.items() for n in (t["base"], label)], fontsize=8)
            ax.margins(y=0.15)  # room above the bars for their labels
            _finish(ax, title, "", legend_loc="lower center")
        axes[0].figure.suptitle("alignment tax: each chat model against its base model", fontsize=10)


def markdown_report(report):
    """report.md: the table (one row per stage), accuracy per task, PPO vs SFT, what was skipped and why, the plots."""
    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)
    pct = functools.partial(fmt, spec=".1%")
    rows, c = report["rows"], report["ppo_vs_sft"]
    columns = ["stage", "val loss", "val bits/byte", "mc acc (sum / per token)", "task acc", "gold", "end rate",
               "words", "RM score", "RM acc (gold / noisy)", "win vs SFT", "KL to SFT"]
    lines = [f"# Evaluation{' of ' + report['config']['config'] if report['config']['config'] else ''}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if row["status"] != "ok":
            cells = [row["label"], row["status"] + ": " + row.get("reason", "")] + [""] * (len(columns) - 2)
        else:
            val, mc, chat, rm = (row["metrics"].get(m, {}) for m in ("val", "mc", "chat", "rm"))
            cmp = c if row["stage"] == "ppo" and c.get("status") == "ok" else {}
            cells = [row["label"], fmt(val.get("loss")), fmt(val.get("bpb")),
                     f"{pct(mc.get('accuracy'))} / {pct(mc.get('accuracy_norm'))}" if mc else "-",
                     pct(chat.get("accuracy")), fmt(chat.get("gold"), "+.3f"), pct(chat.get("end_rate")),
                     f"{chat['words']:.1f}" if chat else "-", fmt(row.get("rm_score"), "+.3f"),
                     f"{pct(rm.get('accuracy_gold'))} / {pct(rm.get('accuracy_noisy'))}" if rm else "-",
                     pct(cmp.get("win_rate", {}).get("win_rate")), fmt(cmp.get("kl"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "mc: the embedded cloze set, each context after the document separator; task acc, gold, end rate "
              "and words: greedy answers to held-out prompts in the chat template, graded by the simulated labeler; "
              "RM score: the reward model's normalised score of those answers; win vs SFT: gold win rate of PPO's "
              "answer over SFT's, ties one half.", ""]
    chats = [(r["label"], r["metrics"]["chat"]["by_task"]) for r in rows if "chat" in r.get("metrics", {})]
    tasks = sorted({t for _, by in chats for t in by})
    if tasks:
        lines += ["## Task accuracy per task type", "", "| stage | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        lines += [f"| {label} | " + " | ".join(pct(by[t]["accuracy"]) if t in by else "-" for t in tasks)
                  + " |" for label, by in chats] + [""]
    if shots := [(f"{r['label']}, {m} (plain text)", g) for r in rows for m, g in r.get("metrics", {}).items()
                 if m.endswith("-shot")]:
        shots += [(f"{r['label']}, chat template, zero-shot", dict(r["metrics"]["chat"], shots=0)) for r in rows
                  if r["stage"] in ("sft", "ppo") and "chat" in r["metrics"]]
        lines += ["## Few-shot prompting", "", "Task accuracy of the base model with k solved examples of the same "
                  "task before each question, no gradient step (GPT-3); the chat models answer zero-shot.", "",
                  "| model | shots used | all | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
        lines += [f"| {label} | {g['shots']:.1f} | {pct(g['accuracy'])} | " + " | ".join(
            pct(g["by_task"][t]["accuracy"]) if t in g["by_task"] else "-" for t in tasks) + " |"
            for label, g in shots] + [""]
    if hs := [(r["label"], r["metrics"]["hellaswag"]) for r in rows if "hellaswag" in r.get("metrics", {})]:
        lines += ["## HellaSwag", ""] + [f"- {label}: {pct(h['accuracy'])} (per token {pct(h['accuracy_norm'])}) on "
                                         f"{h['n']} items" for label, h in hs] + [""]
    if report.get("alignment_tax"):
        lines += ["## Alignment tax", "", "What each chat model lost of its base model's language: val bits per byte "
                  "and cloze accuracy (sum), before -> after.", "", "| model | base | val bits/byte | ratio | cloze "
                  "| change |", "|---|---|---|---|---|---|"]
        for label, t in report["alignment_tax"].items():
            change = "-" if t.get("cloze_change") is None else f"{100 * t['cloze_change']:+.1f} pts"
            lines.append(f"| {label} | - | {t['reason']} | | | |" if "reason" in t else
                         f"| {label} | {t['base']} | {fmt(t['bpb_base'])} -> {fmt(t['bpb'])} | {t['bpb_ratio']:.2f}x "
                         f"| {pct(t['cloze_base'])} -> {pct(t['cloze'])} | {change} |")
        lines.append("")
    if report.get("quantized"):
        lines += ["## Quantized weights", "", "Each text model again with its weights stored in 8 or 4 bits and "
                  "dequantized on the fly (model.quantize_model: int8 one absmax scale per output row, int4 one per "
                  "32 inputs, two values a byte), against its float row; tokens/s: a greedy continuation, batch 1, "
                  "the fastest of 3.", "", "| model | weights | MB | vs float32 | val bits/byte | change | cloze "
                  "| task acc | tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
        for base in [r for r in rows if r.get("quantize") == "none"]:
            for row in [base] + [q for q in report["quantized"] if q.get("path") == base["path"] and "quantize" in q]:
                bpb, base_bpb = (r["metrics"].get("val", {}).get("bpb") for r in (row, base))
                change = "-" if bpb is None or base_bpb is None else f"{100 * (bpb / base_bpb - 1):+.1f}%"
                lines.append(f"| {base['label']} | {row['quantize'].replace('none', 'float32')} | "
                             f"{row['weight_bytes'] / 1e6:.2f} | {base['weight_bytes'] / row['weight_bytes']:.2f}x | "
                             f"{fmt(bpb)} | {change} | {pct(row['metrics'].get('mc', {}).get('accuracy'))} | "
                             f"{pct(row['metrics'].get('chat', {}).get('accuracy'))} | {row['tokens_per_s']:.0f} |")
        lines.append("")
    if o := report.get("overlap"):
        lines += ["## BLEU and ROUGE-L", "", "Each chat model's greedy answers against the stored reference answers "
                  "(words: tinyworld.tokens_of), then how often each metric orders two models' answers to one prompt "
                  "as the gold labeler does, over the pairs the labeler tells apart (a coin: 50%).", "",
                  "| model | BLEU | ROUGE-L |", "|---|---|---|"]
        lines += [f"| {m} | {fmt(v['bleu'])} | {fmt(v['rouge_l'])} |" for m, v in o["models"].items()]
        lines += ["", f"Agreement with the gold labeler on {o['pairs']} pairs: BLEU "
                  f"{pct(o['agree']['bleu'] / max(1, o['pairs']))}, ROUGE-L "
                  f"{pct(o['agree']['rouge_l'] / max(1, o['pairs']))}.", ""]
    lines += [f"## {c.get('label', 'ppo').upper()} against SFT", ""]
    if c.get("status") == "ok":
        w = c["win_rate"]
        lines.append(f"- gold win rate of PPO over SFT: {pct(w['win_rate'])} ({w['wins']} wins, "
                     f"{w['ties']} ties, {w['losses']} losses on {w['n']} prompts); mean gold "
                     f"{fmt(c['gold_ppo'], '+.3f')} vs {fmt(c['gold_sft'], '+.3f')}")
        if c.get("rm_ppo") is not None:
            lines.append(f"- reward-model score: PPO {fmt(c['rm_ppo'], '+.3f')}, SFT {fmt(c['rm_sft'], '+.3f')}")
        if c.get("kl") is not None:
            lines.append(f"- KL(PPO || SFT) on {c['kl_samples']} PPO samples (temperature {c['kl_temperature']}): "
                         f"{c['kl']:.3f} nats per response")
    else:
        lines.append(f"- skipped: {c.get('reason')}")
    if report.get("ppo_log"):
        lines.append(f"- ppo/log.jsonl: {report['ppo_log']['records']} records; keys read: "
                     + ", ".join(f"{k}={v}" for k, v in report["ppo_log"]["keys"].items()))
    skipped = [f"- {r['label']} {m}: {why}" for r in rows for m, why in r.get("skipped", {}).items()]
    skipped += [f"- {note}" for note in report["notes"]]
    lines += [""] + (["## Skipped", ""] + skipped + [""] if skipped else [])
    if report["plots"]:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in report["plots"]] + [""]
    return "\n".join(lines + [f"Evaluated in {report['time_s']:.1f}s on {report['device']}."]) + "\n"


# -----------------------------------------------------------------------------
# Scaling laws: an IsoFLOP study (Chinchilla, Hoffmann et al. 2022) from runs of train.py, and its fits

# --scaling=NAME: compute budgets C (FLOPs) and a ladder of sizes (n_layer, n_head, n_embd); budget i trains
# sizes[i:i + per_budget] (the loss-optimal size grows with C: each budget's window one rung higher)
SCALING = {
    "tiny": dict(budgets=(1.5e8, 3e8), sizes=((1, 2, 16), (1, 2, 24), (2, 2, 32), (2, 4, 48)), per_budget=3,
                 block_size=16, batch_size=4, learning_rate=3e-3, eval_iters=2),  # tests: seconds
    "small": dict(budgets=(1e11, 2.5e11, 6e11, 1.5e12), sizes=((1, 1, 16), (1, 2, 24), (1, 2, 32), (2, 2, 40),
                  (2, 4, 56), (3, 4, 64), (3, 4, 80), (3, 6, 96)), per_budget=5, block_size=64, batch_size=8,
                  learning_rate=3e-3, eval_iters=40),  # a 2-core CPU in minutes
}


def training_flops(n_params, tokens):
    """C = 6 N D: per parameter and token, 2 FLOPs forward (a multiply, an add) and 4 backward."""
    return 6 * n_params * tokens


def iters_for_budget(budget, n_params, tokens_per_iter):
    """The number of optimizer steps whose tokens D bring 6 N D closest to budget (at least one)."""
    return max(1, round(budget / training_flops(n_params, tokens_per_iter)))


def plan_scaling_runs(study, vocab_size):
    """[{name, budget, n_layer, n_head, n_embd, params, max_iters, tokens, flops}]: each budget's window of sizes.
    N counts all parameters, as Chinchilla does (Kaplan leaves out the embeddings): the tied head multiplies by the
    whole embedding table at every token, so 6 N is the training FLOPs per token (attention's 12 L d T aside), and
    at these sizes that table is most of the model."""
    runs, per_iter = [], study["batch_size"] * study["block_size"]
    for i, budget in enumerate(study["budgets"]):
        for n_layer, n_head, n_embd in study["sizes"][i:i + study["per_budget"]]:
            with torch.device("meta"):  # shapes only: no memory, no random draws
                params = GPT(GPTConfig(vocab_size=vocab_size, block_size=study["block_size"], n_layer=n_layer,
                                       n_head=n_head, n_embd=n_embd, pos="rope")).num_params()
            iters = iters_for_budget(budget, params, per_iter)
            runs.append(dict(name=f"C{budget:.3g}_L{n_layer}_E{n_embd}".replace("+", ""), budget=budget,
                             n_layer=n_layer, n_head=n_head, n_embd=n_embd, params=params, max_iters=iters,
                             tokens=iters * per_iter, flops=training_flops(params, iters * per_iter)))
    return runs


def fit_parabola_minimum(params, losses):
    """loss = c2 (ln N)^2 + c1 ln N + c0 by least squares -> {coeffs, n_opt and loss at its minimum (None if it opens
    downward), inside: the minimum lies between the smallest and the largest N}."""
    ln_n = np.log(np.asarray(params, dtype=np.float64))
    c2, c1, c0 = (float(c) for c in np.polyfit(ln_n, losses, 2))
    x = -c1 / (2 * c2) if c2 > 0 else None
    return {"coeffs": [c2, c1, c0], "n_opt": x and math.exp(x), "loss": x and c0 - c1 * c1 / (4 * c2),
            "inside": x is not None and bool(ln_n.min() <= x <= ln_n.max())}


def fit_power_law(x, y):
    """y = a x^b by a straight line through (ln x, ln y) -> {a, b}."""
    b, ln_a = np.polyfit(np.log(x), np.log(y), 1)
    return {"a": float(np.exp(ln_a)), "b": float(b)}


def fit_chinchilla_loss(params, tokens, losses, grid=np.linspace(0.02, 2.0, 100), min_runs=8):
    """Chinchilla's approach 3, L(N, D) = E + A / N^alpha + B / D^beta: linear in E, A, B once the exponents are
    fixed, so least squares at each (alpha, beta) of the grid, the best with E, A, B >= 0 kept -> {E, A, B, alpha,
    beta, rmse, a, b: the exponents of N_opt and D_opt in C it implies}, or {reason} where the runs cannot pin them."""
    n, d, loss = (np.asarray(v, dtype=np.float64) for v in (params, tokens, losses))
    if len(loss) < min_runs:
        return {"reason": f"{len(loss)} runs: its 5 parameters need at least {min_runs}"}
    if abs(np.corrcoef(np.log(n), np.log(d))[0, 1]) > 0.99:  # one budget: D ~ 1/N, the two terms look alike
        return {"reason": "N and D vary together (runs of one compute budget)"}
    alpha, beta = (g.ravel() for g in np.meshgrid(grid, grid, indexing="ij"))  # every pair of the grid: (G,)
    X = np.stack([np.ones((len(alpha), len(n))), n ** -alpha[:, None], d ** -beta[:, None]], axis=2)  # (G, runs, 3)
    scale = X.max(axis=1)  # (G, 3); N^-alpha can be 1e-10: columns of like size
    Xs = X / scale[:, None, :]
    # least squares at every pair at once, through the 3x3 normal equations
    coef = np.linalg.solve(Xs.transpose(0, 2, 1) @ Xs, (Xs.transpose(0, 2, 1) @ loss)[..., None])[..., 0] / scale
    rmse = np.sqrt(np.mean((np.einsum("grk,gk->gr", X, coef) - loss) ** 2, axis=1))
    ok = (coef >= 0).all(axis=1)
    if not ok.any():
        return {"reason": "no exponents of the grid give E, A, B >= 0"}
    i = int(np.flatnonzero(ok)[np.argmin(rmse[ok])])
    best = dict(zip(("E", "A", "B"), coef[i].tolist()), alpha=float(alpha[i]), beta=float(beta[i]), rmse=float(rmse[i]))
    if {best["alpha"], best["beta"]} & {float(grid[0]), float(grid[-1])}:
        return {"reason": "the best exponents lie on the edge of the grid searched"}
    total = best["alpha"] + best["beta"]
    return dict(best, a=best["beta"] / total, b=best["alpha"] / total)


def fit_scaling_laws(runs):
    """Each budget's parabola minimum N_opt(C) and D_opt = C / 6 N_opt; N_opt = a C^b and D_opt = a C^b across the
    budgets whose minimum lies among their sizes (else a reason); L(N, D) over all runs."""
    budgets = []
    for budget in sorted({r["budget"] for r in runs}):
        fit = fit_parabola_minimum(*zip(*[(r["params"], r["val_loss"]) for r in runs if r["budget"] == budget]))
        budgets.append(dict(fit, budget=budget, d_opt=fit["n_opt"] and budget / 6 / fit["n_opt"]))
    used = [b for b in budgets if b["inside"]]
    fits = {"budgets": budgets,
            "loss_fit": fit_chinchilla_loss(*([r[k] for r in runs] for k in ("params", "tokens", "val_loss")))}
    if len(used) < 2:
        return dict(fits, reason=f"{len(used)} of {len(budgets)} budgets have their minimum among their sizes")
    return dict(fits, **{f"{k}_fit": fit_power_law([b["budget"] for b in used], [b[k] for b in used])
                         for k in ("n_opt", "d_opt")})


def scaling_summary(fits):
    """Each budget's loss-optimal size, the fitted exponents beside Chinchilla's: for the log and scaling.md."""
    lines = [f"C {b['budget']:.3g}: " + (f"N_opt {b['n_opt']:,.0f}, D_opt {b['d_opt']:,.0f}, "
             f"{b['d_opt'] / b['n_opt']:.1f} tokens per parameter, val loss {b['loss']:.4f}" if b["inside"] else
             "its minimum lies outside the sizes trained") for b in fits["budgets"]]
    n, d, f = fits.get("n_opt_fit"), fits.get("d_opt_fit"), fits["loss_fit"]
    lines.append(f"no power law: {fits['reason']}, it needs 2" if "reason" in fits else f"N_opt = {n['a']:.3g} C^"
                 f"{n['b']:.2f}, D_opt = {d['a']:.3g} C^{d['b']:.2f} (Chinchilla: both about C^0.5, 20 tokens/param)")
    return lines + [f"L(N, D) not fitted: {f['reason']}" if "reason" in f else f"L(N, D) = {f['E']:.3f} + {f['A']:.3g}"
                    f" / N^{f['alpha']:.2f} + {f['B']:.3g} / D^{f['beta']:.2f} (rms error {f['rmse']:.4f}): N_opt ~ "
                    f"C^{f['a']:.2f}, D_opt ~ C^{f['b']:.2f}"]


def scaling_markdown(results):
    """scaling.md: the runs, the summary (scaling_summary), the plots."""
    lines = [f"# Scaling study {results['study']} on {results['dataset']}", "", "| C (FLOPs) | n_layer | n_embd | N "
             "| iters | D (tokens) | D/N | epochs | val loss |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['budget']:.3g} | {r['n_layer']} | {r['n_embd']} | {r['params']:,} | {r['max_iters']:,} | "
              f"{r['tokens']:,} | {r['tokens'] / r['params']:.1f} | {r['epochs']:.2f} | {r['val_loss']:.4f} |"
              for r in results["runs"]]
    return "\n".join(lines + [""] + [f"- {line}" for line in scaling_summary(results["fits"])]
                     + ["", "![IsoFLOP curves](isoflop.png)", "", "![N_opt and D_opt](optimal.png)", ""])


def plot_isoflop(runs, fits, path):
    """Final val loss against N, one colour per budget: its runs, the fitted parabola, its minimum (a star)."""
    with _figure(path, figsize=(7, 4.5)) as ax:
        for b in fits["budgets"]:
            n, loss = zip(*[(r["params"], r["val_loss"]) for r in runs if r["budget"] == b["budget"]])
            color = ax.plot(n, loss, "o", label=f"C = {b['budget']:.3g} FLOPs")[0].get_color()
            xs = np.geomspace(min(n), max(n), 50)
            ax.plot(xs, np.polyval(b["coeffs"], np.log(xs)), color=color)
            if b["inside"]:
                ax.plot(b["n_opt"], b["loss"], "*", markersize=14, color=color)
        ax.set(xscale="log", ylabel="final val loss (nats/token)")
        _finish(ax, "IsoFLOP curves (a star: the loss-optimal size)", "parameters N")


def plot_optimal(fits, path):
    """N_opt and D_opt against C on log-log axes: the IsoFLOP minima and the fitted power laws."""
    used = [b for b in fits["budgets"] if b["inside"]]
    c = np.array([b["budget"] for b in used])
    with _figure(path, 1, 2, figsize=(10, 4)) as axes:
        for ax, key, name in zip(axes, ("n_opt", "d_opt"), ("N_opt (parameters)", "D_opt (tokens)")):
            ax.plot(c, [b[key] for b in used], "o", label="IsoFLOP minima")
            if fit := fits.get(f"{key}_fit"):
                ax.plot(c, fit["a"] * c ** fit["b"], label=f"{fit['a']:.3g} C^{fit['b']:.2f}")
            if used:  # none: empty axes, the reason in scaling.md
                ax.set(xscale="log", yscale="log", ylabel=name)
            _finish(ax, f"{name.split()[0]} against compute", "compute C (FLOPs)")


def scaling_study(config, log=print):
    """Train each run of the --scaling study not yet done (with train.run), fit, plot, write the files; the results."""
    name, dataset, t_start = config["scaling"], config["scaling_dataset"], time.time()
    folder = name if dataset == "tinyworld" else f"{name}-{dataset}"  # other data: other runs
    out_dir = config["out"] or os.path.join(config["out_root"], "scaling", folder)
    meta = prepare_data.load_meta(prepare_data.ensure_prepared(dataset, config["data_dir"]))
    study, trained, seconds = SCALING[name], 0.0, 0.0
    runs = plan_scaling_runs(study, meta["vocab_size"])
    for k, run in enumerate(runs, 1):
        # train.py's defaults, the run's size and length, the LR schedule fitted to that length (cosine_lr decays
        # over max_iters, warmup a twentieth of it), one evaluation at the end (the same seeded val windows), no sample
        train_config = {**train.DEFAULTS, "config": f"scaling {run['name']}", "dataset": dataset, "pos": "rope",
                        "out_dir": os.path.join(out_dir, run["name"]), "log_interval": max(1, run["max_iters"] // 4),
                        **{key: config[key] for key in ("data_dir", "device", "dtype", "seed")},
                        **{key: run[key] for key in ("n_layer", "n_head", "n_embd", "max_iters")},
                        **{key: study[key] for key in ("block_size", "batch_size", "learning_rate", "eval_iters")},
                        "warmup_iters": run["max_iters"] // 20, "eval_interval": run["max_iters"], "sample_tokens": 0}
        path = os.path.join(train_config["out_dir"], "ckpt.pt")
        saved = load_checkpoint(path, stages={"pretrain"}) if os.path.exists(path) else {"config": {}, "metrics": {}}
        if saved["config"].get("max_iters") == saved["metrics"].get("iter") == run["max_iters"]:  # done before
            log(f"scaling: run {k}/{len(runs)} {run['name']}: done before, val loss {saved['metrics']['val_loss']:.4f}")
        else:  # a run stopped part way resumes, one planned for another length starts over; ETA at this call's rate
            eta = train.format_eta(sum(r["flops"] for r in runs[k - 1:]) * seconds / trained) if trained else "?"
            log(f"scaling: run {k}/{len(runs)} {run['name']}: {run['params']:,} parameters, {run['max_iters']:,} "
                f"iterations, {run['tokens']:,} tokens | study ETA {eta}")
            t0 = time.time()
            with train.deterministic_algorithms(True):
                saved["metrics"] = train.run(train_config, {"resume"} if saved["config"].get("max_iters") ==
                                             run["max_iters"] else {"overwrite"})
            if saved["metrics"]["stopped"] or saved["metrics"].get("iter") != run["max_iters"]:  # saved where it was
                raise ValueError(f"stopped in run {k} of {len(runs)}: the same command resumes the study")
            trained, seconds = trained + run["flops"], seconds + time.time() - t0
        run.update(val_loss=saved["metrics"]["val_loss"], epochs=run["tokens"] / meta["train_tokens"])
    fits = fit_scaling_laws(runs)
    results = {"study": name, "dataset": dataset, "runs": runs, "fits": fits, "time_s": time.time() - t_start}
    plot_isoflop(runs, fits, os.path.join(out_dir, "isoflop.png"))
    plot_optimal(fits, os.path.join(out_dir, "optimal.png"))
    prepare_data.atomic_write(os.path.join(out_dir, "scaling.json"), json.dumps(results, indent=1))
    prepare_data.atomic_write(os.path.join(out_dir, "scaling.md"), scaling_markdown(results))
    log("\n".join(f"scaling: {line}" for line in scaling_summary(fits)) + f"\nscaling: done in "
        f"{train.format_eta(results['time_s'])}: {out_dir}/scaling.md, scaling.json, isoflop.png, optimal.png")
    return results


# -----------------------------------------------------------------------------
# The run

def stage_paths(config):
    """[(label, path)]: the --ckpts checkpoints (label None: named later by their stage), or the config's 4 stages."""
    if config["ckpts"]:
        return [(None, p) for p in config["ckpts"].split(",") if p]
    return [(stage, os.path.join(config["out_root"], config["config"], stage, "ckpt.pt")) for stage in STAGES]


def run(config, log=None):
    """Evaluate every checkpoint, compare them, write report.json, report.md and the plots; return the report."""
    log = log or (lambda text: print(f"eval: {text}", flush=True))
    t_start, device = time.time(), pick_device(config["device"])
    settings = [q for q in config["quantize"].split(",") if q != "none"]
    for setting in [q for q in settings if q not in QUANTIZE]:
        raise ValueError(f"--quantize={setting!r} is not one of {', '.join(QUANTIZE)} (comma-separated)")
    if not re.fullmatch(r"(\d+(,\d+)*)?", config["few_shot"]):
        raise ValueError(f"--few_shot={config['few_shot']!r}: give shot counts separated by commas, e.g. 0,1,3")
    device_type, threads = device.split(":")[0], torch.get_num_threads()
    ctx = autocast_context(device_type, resolve_dtype(config["dtype"], device_type)[0])
    torch.set_num_threads(1 if device_type == "cpu" else threads)  # token-by-token decoding: 1 CPU thread beats 2
    torch.manual_seed(config["seed"])
    notes, data_cache, rows, models = [], {}, [], {}
    hellaswag = os.path.join(config["data_dir"], "hellaswag", "mc.jsonl")
    if not os.path.exists(hellaswag):
        notes.append(f"hellaswag: {hellaswag} is not prepared (`python prepare_data.py --dataset hellaswag` "
                     f"downloads it), so only the embedded cloze set was used")
    try:
        # 1. every checkpoint, each metric of its kind
        for label, path in stage_paths(config):
            row, model, tokenizer = evaluate_checkpoint(path, label, config, device, ctx, data_cache, log)
            if row["label"] in models:  # two --ckpts of one stage
                row["label"] = f"{row['label']} ({path})"
            rows.append(row)
            models[row["label"]] = (model, tokenizer)
        # 2. with --quantize: each text model again, its weights in 8 or 4 bits, for the table beside its float row
        quantized = [evaluate_checkpoint(r["path"], r["label"], config, device, ctx, data_cache, log, setting)[0]
                     for r in rows if r["status"] == "ok" and r["stage"] != "rm" for setting in settings]
        # 3. the reward model scores every model's answers
        rm_row = next((r for r in rows if r["status"] == "ok" and r["stage"] == "rm"), None)
        for row in [r for r in rows if "answers" in r]:
            if rm_row is None:
                row["skipped"]["rm_score"] = "no reward model to score the answers"
                continue
            (rm, rm_tok), answers = models[rm_row["label"]], row["answers"]
            with ctx:
                seqs = [reward_input(rm_tok, a["prompt"], a["text"], a["ended"], rm.config.block_size) for a in answers]
                scores = score_sequences(rm, seqs, config["batch_size"], rm_row["reward_norm"])
            row["rm_score"] = float(scores.mean())
            for a, score in zip(answers, scores.tolist()):
                a["rm_score"] = score
            log(f"{row['label']}: reward-model score of its answers {row['rm_score']:+.3f}")
        # 4. PPO against SFT; the chat models' answers by n-gram overlap with the references
        comparison = compare_ppo_sft(rows, models, config, ctx, log)
        if comparison["status"] != "ok":
            log(f"ppo vs sft skipped ({comparison['reason']})")
        chats = [r for r in rows if r["stage"] in ("sft", "ppo") and "answers" in r]
        chats = [r for r in chats if r["dataset"] == chats[0]["dataset"]]  # one set of prompts and references
        overlap = text_overlap({r["label"]: r["answers"] for r in chats}, data_cache[chats[0]["dataset"]]["prompts"][
            :config["max_prompts"] or None]) if chats else None
    finally:
        torch.set_num_threads(threads)  # leave the process as it was (a test, a notebook)
    # 5. the plots: every stage's log, the accuracies, PPO's log, the alignment tax
    out_dir, plots = config["out"] or os.path.join(config["out_root"], config["config"], "eval"), []
    os.makedirs(out_dir, exist_ok=True)  # an unwritable folder fails here, named, before any plot is drawn
    logs = {r["label"]: read_jsonl_log(os.path.join(os.path.dirname(r["file"]), "log.jsonl"))
            for r in rows if r["status"] == "ok"}
    ppo_records = next((logs[r["label"]] for r in rows if r["status"] == "ok" and r["stage"] == "ppo"), None)
    ppo_log = {"records": len(ppo_records), "keys": ppo_log_keys(ppo_records)} if ppo_records else None
    if ppo_log and not any(ppo_log["keys"].values()):
        notes.append(f"ppo/log.jsonl has none of the keys {tuple(PPO_LOG_KEYS.values())}: no PPO plot")
    taxes = alignment_tax(rows)
    for name, wanted, plot in (  # each figure: is there anything to draw, and how
            ("loss_curves.png", any(logs.values()), lambda p: plot_loss_curves(logs, p)),
            ("accuracy.png", accuracy_bars(rows), lambda p: plot_accuracy(rows, p)),
            ("ppo.png", ppo_log and any(ppo_log["keys"].values()), lambda p: plot_ppo(ppo_records, ppo_log["keys"], p)),
            ("alignment_tax.png", any("reason" not in t for t in taxes.values()),
             lambda p: plot_alignment_tax(taxes, p))):
        if wanted:
            plot(os.path.join(out_dir, name))
            plots.append(name)
    # 6. report.json and report.md
    report = {"config": dict(config), "device": device, "rows": rows, "ppo_vs_sft": comparison, "ppo_log": ppo_log,
              "alignment_tax": taxes, "quantized": quantized, "overlap": overlap, "notes": notes, "plots": plots,
              "time_s": time.time() - t_start}
    prepare_data.atomic_write(os.path.join(out_dir, "report.json"), json.dumps(report, indent=1))
    prepare_data.atomic_write(os.path.join(out_dir, "report.md"), markdown_report(report))
    log(f"done in {report['time_s']:.1f}s: {out_dir}/report.md, report.json, {', '.join(plots) or 'no plots'}")
    return report


def parse_args(argv):
    """`--config NAME --key=value ...` as in the training stages -> the config, checked."""
    config, flags = parse_config(argv, DEFAULTS, PRESETS, "eval.py", __doc__.strip().splitlines()[0])
    if flags:
        raise ValueError(f"eval.py has no --{'/--'.join(sorted(flags))}: it rewrites its report every run")
    if config["scaling"] and config["scaling"] not in SCALING:
        raise ValueError(f"--scaling={config['scaling']!r} is not a study: choose one of {', '.join(SCALING)}")
    if not config["ckpts"] and not config["config"] and not config["scaling"]:
        raise ValueError("nothing to evaluate: give --config NAME (the stages in out/NAME/) or --ckpts=PATH,PATH")
    check_least(config, dict(val_tokens=0, max_mc=0, max_prompts=0, max_pairs=0, kl_prompts=0, max_new_tokens=1,
                             batch_size=1))
    return config


def main(argv=None):
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
        if config["scaling"]:
            scaling_study(config)
            return 0
        report = run(config)
    except (ValueError, CheckpointError, FloatingPointError, prepare_data.DataError, OSError) as e:
        print(f"eval.py: error: {prepare_data.error_line(e)}", file=sys.stderr)
        return 1
    errors = [r["reason"] for r in report["rows"]
              if r["status"] == "error" or (config["ckpts"] and r["status"] == "missing")]
    if all(r["status"] != "ok" for r in report["rows"]):
        errors.append("no checkpoint could be evaluated" + ("" if config["ckpts"] else f" in {config['out_root']}/"
                      f"{config['config']}: run `python train.py --config {config['config']}` first"))
    for error in errors:
        print(f"eval.py: error: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
