"""
reward.py: a reward model trained on preference pairs.

    python reward.py --config small                  # after sft.py --config small
    python reward.py --config small --max_iters=500  # any key can be overridden
    python reward.py --config small --resume         # continue out/small/rm/ckpt.pt

Reads out/<config>/sft/ckpt.pt (--init: any sft or pretrain checkpoint) and data/<dataset>/
prefs_{train,val}.jsonl, writes out/<config>/rm/{ckpt.pt, log.jsonl, loss.png, accuracy.png}.

The response is followed by the special <|reward|> token; the transformer's output
there goes through a scalar head, every other output is ignored. The labeller said
"chosen is better than rejected", so the loss is -log sigmoid(r_chosen - r_rejected)
(Bradley-Terry). After training, a bias and scale are stored so that the SFT model's
own answers to the PPO prompts score mean 0, std 1.
"""

import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import bpe
import tinyworld
import prepare_data
from model import (answer_prompts, checkpoint_file, CheckpointError, clean_state_dict, GPT, GPTConfig,
                   load_checkpoint, load_weights, model_from_checkpoint, parent_record, tokenizer_from_checkpoint)
from train import (append_jsonl, configure_optimizer, end_run, open_log, optimizer_step, plot_curves, Progress,
                   read_jsonl_log, rng_state, save_run, scheduled_lr, set_rng_state, stage_main, start_run,
                   StopRequested, training_precision)

STAGE = "rm"
SORT_WINDOW = 16  # pair_batches sorts by length within windows of this many batches: less padding, still random

# -----------------------------------------------------------------------------
# Configuration: defaults, then a preset (--config NAME), then --key=value overrides.

DEFAULTS = dict(
    config="default", dataset="tinyworld", data_dir="data",  # data/<dataset>/prefs_*.jsonl from prepare_data.py
    init="", out_dir="",        # "": out/<config>/sft (a pretrain checkpoint works too), out/<config>/rm
    max_iters=375, learning_rate=3e-4, min_lr_ratio=0.1, warmup_iters=30,  # lr: the body is already trained
    weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=1.0, seed=1337, device="auto", dtype="auto",
    lm_coef=0.0,                # + lm_coef x next-token loss of each chosen conversation (0: the plain design)
    dropout=0.1,                # dropout in the body while training (a few thousand noisy pairs overfit)
    oversample="",              # "task:K,...": pairs of these tasks that differ only in the answer, K times per epoch
    eval_interval=125, log_interval=25, eval_batch_size=64,  # eval_batch_size: sequences per forward pass
    batch_size=32, stop_at_iter=0,  # pairs per step; stop (and save) after stop_at_iter iterations (0: max_iters)
    norm_prompts=256, norm_max_new_tokens=64, temperature=1.0,  # normaliser: SFT answers to PPO prompts (0: none)
)

PRESETS = {
    # seconds, for tests
    "tiny": dict(batch_size=8, max_iters=30, warmup_iters=3, eval_interval=15, log_interval=5,
                 learning_rate=1e-3, lm_coef=1.0, norm_prompts=16, norm_max_new_tokens=8, eval_batch_size=32),
    # a 2-core laptop CPU, after sft.py --config small: the right-vs-wrong sums shown 8x as often (judging
    # sums is learned late), and the LM term that keeps what the body needs to judge answers
    "small": dict(max_iters=1800, eval_interval=600, learning_rate=1e-3, dropout=0.0, lm_coef=1.0,
                  oversample="arithmetic:8"),
    # GPT-2 124M on a GPU, human preferences (InstructGPT: one epoch, lr ~1e-5)
    "gpt2": dict(dataset="hh", batch_size=64, max_iters=1000, warmup_iters=50, eval_interval=200, log_interval=10,
                 learning_rate=1e-5, norm_prompts=512, norm_max_new_tokens=128, eval_batch_size=128),
}


# -----------------------------------------------------------------------------
# The reward model: the GPT body and a scalar head, read at <|reward|> (PPO's critic: at every position)

class ScalarHeadModel(nn.Module):
    """GPT body + scalar head: ids (B, T) -> one scalar per position (B, T)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        # small outputs at first: the first losses are about ln 2 (reward) or the squared returns (critic)
        nn.init.normal_(self.head.weight, mean=0.0, std=0.1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, hidden=None):
        """hidden: the body's hidden states (B, T, C) of idx, when already computed."""
        hidden = self.gpt.hidden_states(idx) if hidden is None else hidden
        return self.head(hidden).squeeze(-1).float()


def with_reward_token(prompt_ids, response_ids, reward_id, block_size=None):
    """The reward model's input, the same in training, evaluation and PPO: prompt, response, then
    <|reward|>; a sequence longer than block_size loses its oldest tokens."""
    ids = list(prompt_ids) + list(response_ids) + [reward_id]
    return ids[-block_size:] if block_size is not None and len(ids) > block_size else ids


def reward_input(tokenizer, prompt, response, ended=True, block_size=None):
    """Text -> the ids the reward model reads (ended=False: the response was cut at a length limit, no <|end|>):
        <|user|> prompt <|end|> <|assistant|> response [<|end|>] <|reward|>"""
    prompt_ids, response_ids = tokenizer.encode_chat(prompt, response, ended)
    return with_reward_token(prompt_ids, response_ids, tokenizer.special_ids[bpe.REWARD], block_size)


def pad_right(sequences, pad_value=0):
    """Lists of ids -> (ids (B, T), lengths (B,)), padded after the tokens: under the causal mask it changes nothing."""
    out = nn.utils.rnn.pad_sequence([torch.tensor(s, dtype=torch.long) for s in sequences], batch_first=True,
                                    padding_value=pad_value)
    return out, torch.tensor([len(s) for s in sequences], dtype=torch.long)


def read_last(values, lengths):
    """values (B, T), lengths (B,) -> (B,): each sequence's value at its last real token."""
    return values.gather(1, (lengths - 1).to(values.device)[:, None]).squeeze(1)


@torch.no_grad()
def score_sequences(model, sequences, batch_size=64, normalizer=None):
    """Rewards (N,) on the CPU of reward-model inputs; with a checkpoint's {"bias", "scale"}: (raw - bias) / scale."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad less
    rewards = torch.zeros(len(sequences))
    for start in range(0, len(sequences), batch_size):
        rows = order[start:start + batch_size]
        ids, lengths = pad_right([sequences[i] for i in rows])
        rewards[rows] = read_last(model(ids.to(device)), lengths).cpu()
    model.train(was_training)
    return rewards if normalizer is None else (rewards - normalizer["bias"]) / normalizer["scale"]


def scalar_model_from_checkpoint(ckpt, device="cpu"):
    """The ScalarHeadModel of a reward (or critic) checkpoint, with its weights."""
    return model_from_checkpoint(ckpt, device, ScalarHeadModel)


# -----------------------------------------------------------------------------
# The loss and the metrics. A pair (load_preferences) is {"chosen": ids, "rejected": ids,
# "gold": whether the noiseless gold labeller agrees that chosen is better, None: unknown}.

def pairwise_loss(r_chosen, r_rejected):
    """Mean of -log sigmoid(r_chosen - r_rejected), as softplus(-(...)): log(sigmoid(x)) underflows to -inf
    in float32 for large gaps, softplus does not. Gradient wrt r_chosen: -sigmoid(r_rejected - r_chosen) / N."""
    return F.softplus(-(r_chosen - r_rejected)).mean()


def pair_accuracy(diff):
    """Share of pairs ranked the labelled way (diff = r_chosen - r_rejected > 0); a tie counts half."""
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def chosen_lm_loss(model, hidden, ids, lengths):
    """Next-token loss of each row's first sequence (lengths (B,)) before <|reward|>, from hidden (B, T, C) via the
    tied LM head. Why: the pairwise loss alone pulls the body to what separates pairs first (style), and what tells
    right from wrong fades; modelling the chosen text keeps it (Yang et al. 2024, "Regularizing hidden states...")."""
    lengths = lengths.to(ids.device)
    q = torch.arange(ids.size(1) - 1, device=ids.device)[None, :]  # hidden position q predicts token q + 1
    keep = q + 1 < lengths[:, None] - 1                              # targets before <|reward|>: (B, T - 1)
    if not keep.any():
        return hidden.sum() * 0.0
    logits = model.gpt.lm_head(hidden[:, :-1][keep]).float()        # (N, V): only the kept positions
    return F.cross_entropy(logits, ids[:, 1:][keep])


@torch.no_grad()
def evaluate(model, pairs, batch_size=64):
    """Held-out pairs -> loss and accuracy against the noisy labels, gold_accuracy (None without
    gold labels), margin (mean r_chosen - r_rejected), reward_mean, reward_std, pairs."""
    rewards = score_sequences(model, [s for p in pairs for s in (p["chosen"], p["rejected"])], batch_size)
    r_chosen, r_rejected = rewards[0::2], rewards[1::2]  # (P,) each
    diff = r_chosen - r_rejected
    known = [k for k, p in enumerate(pairs) if p["gold"] is not None]
    gold_agrees = torch.tensor([pairs[k]["gold"] for k in known], dtype=torch.bool)  # else chosen should score lower
    return {"loss": pairwise_loss(r_chosen, r_rejected).item(), "accuracy": pair_accuracy(diff),
            "gold_accuracy": pair_accuracy(torch.where(gold_agrees, diff[known], -diff[known])) if known else None,
            "margin": diff.mean().item(), "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0, "pairs": len(pairs)}


# -----------------------------------------------------------------------------
# Data: preference records -> pairs -> batches

def validate_pair_record(record):
    """The problem with a chosen/rejected record as one phrase, or None."""
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(record.get(key), str):
            return f"field '{key}' must be a string" if key in record else f"missing field '{key}'"
    if not record["prompt"].strip():
        return "the prompt is empty"
    if not all(isinstance(record.get(key, True), bool) for key in ("chosen_ended", "rejected_ended")):
        return "fields 'chosen_ended' and 'rejected_ended' must be true or false"
    if not isinstance(record.get("gold_prefers_chosen", False), (bool, type(None))):
        return "field 'gold_prefers_chosen' must be true, false or null"
    if (record["chosen"], record.get("chosen_ended", True)) == (record["rejected"], record.get("rejected_ended", True)):
        return f"chosen and rejected are the same response ({record['chosen'][:40]!r}): a preference needs two"
    return None


def load_preferences(path, tokenizer, block_size):
    """A prefs_*.jsonl file -> pairs; the first bad record is a DataError naming the file and line."""
    pairs = []
    for line, r in enumerate(prepare_data.read_jsonl(path), start=1):
        if problem := validate_pair_record(r):
            raise prepare_data.DataError(f"{path} line {line}: {problem}; each line must be a preference pair "
                                         f"(prompt, chosen, rejected)")
        chosen, rejected = (reward_input(tokenizer, r["prompt"], r[side], r.get(f"{side}_ended", True), block_size)
                            for side in ("chosen", "rejected"))
        pairs.append({"chosen": chosen, "rejected": rejected, "gold": r.get("gold_prefers_chosen")})
    if not pairs:
        raise prepare_data.DataError(f"{path} holds no preference records")
    return pairs


def differs_only_in_answer(a, b, max_words=3):
    """Are two responses the same words around one short stretch (1 to max_words words each)?
    A right and a wrong answer in one wording: "Anna has 6 bells now." / "Anna has 7 bells now."."""
    wa, wb = a.split(), b.split()
    start = len(os.path.commonprefix([wa, wb]))  # commonprefix compares any lists item by item
    end = len(os.path.commonprefix([wa[start:][::-1], wb[start:][::-1]]))
    return 0 < len(wa) - start - end <= max_words and 0 < len(wb) - start - end <= max_words


def parse_oversample(text):
    """"arithmetic:4,story_qa:4" -> {"arithmetic": 4, "story_qa": 4}; "" -> {}."""
    parts = [part.partition(":") for part in text.split(",") if part.strip()]
    if not all(task.strip() and k.strip().isdigit() and int(k) >= 1 for task, _, k in parts):
        raise ValueError(f"--oversample={text!r}: give task:K pairs with K a whole number >= 1, "
                         f"e.g. arithmetic:4,story_qa:4")
    return {task.strip(): int(k) for task, _, k in parts}


def oversample_pairs(pairs, records, factors):
    """(pairs + K - 1 more copies of each pair of a task in factors {task: K} whose responses differ
    only in the answer, the pairs that teach whether an answer is right; the number of copies)."""
    extra = [pair for pair, r in zip(pairs, records) if differs_only_in_answer(r["chosen"], r["rejected"])
             for _ in range(factors.get(r.get("task"), 1) - 1)]
    return pairs + extra, len(extra)


def load_data(config, tokenizer, block_size):
    """The pairs: train (oversampled), val, a train probe the size of val (overfitting?), val's label agreement."""
    folder = prepare_data.ensure_prepared(config["dataset"], config["data_dir"])  # builds tinyworld if missing
    train, val = (load_preferences(os.path.join(folder, f"prefs_{s}.jsonl"), tokenizer, block_size)
                  for s in ("train", "val"))
    records, val_records = (prepare_data.read_jsonl(os.path.join(folder, f"prefs_{s}.jsonl")) for s in ("train", "val"))
    agreement = (tinyworld.label_agreement(val_records)
                 if all(r.get("gold_prefers_chosen") is not None for r in val_records) else None)
    data = {"folder": folder, "val": val, "probe": train[:len(val)], "agreement": agreement}
    if factors := parse_oversample(text := config["oversample"]):
        missing = set(factors) - {r.get("task") for r in records if differs_only_in_answer(r["chosen"], r["rejected"])}
        if missing:  # each task named, a typo too, must have pairs to copy
            raise ValueError(f"--oversample={text!r}: no pair of task {', '.join(sorted(missing))} in "
                             f"prefs_train.jsonl differs only in the answer; the tasks there: "
                             f"{', '.join(sorted({str(r.get('task')) for r in records}))}")
        train, n_copies = oversample_pairs(train, records, factors)
        print(f"oversample {text}: {n_copies} more copies of the pairs that differ only in the answer, per epoch")
    return dict(data, train=train)


def pair_batches(lengths, batch_size, seed, epoch):
    """One epoch's batches of pair indices (pair i's row: lengths[i] tokens): an order drawn from
    (seed, epoch), sorted by length within each window of SORT_WINDOW batches, the batches shuffled."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window, batches = SORT_WINDOW * batch_size, []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])  # stable: ties keep the order
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# -----------------------------------------------------------------------------
# A pair in one row. Its responses share the prompt (right and wrong answers worded alike share nearly all), so
# training lays the shared prefix out once, then each response's rest, under a mask that lets each token see only
# its own sequence: the same rewards, losses and gradients from fewer tokens. Evaluation keeps a row per sequence.

def pack_pair(chosen, rejected):
    """A pair -> (ids, positions, branches, ends) of one row: the shared prefix, chosen's rest (branch 1),
    rejected's (branch 2); positions in each token's own sequence; ends: where each <|reward|> is."""
    n = len(os.path.commonprefix([chosen[:-1], rejected[:-1]]))  # each keeps its last token in its branch
    ids = list(chosen) + list(rejected[n:])
    positions = list(range(len(chosen))) + list(range(n, len(rejected)))
    branches = [0] * n + [1] * (len(chosen) - n) + [2] * (len(rejected) - n)
    return ids, positions, branches, [len(chosen) - 1, len(ids) - 1]


def tree_mask(positions, branches):
    """positions, branches (B, T) of packed rows (padding: branch -1) -> (B, 1, T, T), True where query q
    sees key k: k in the prefix or q's branch, at or before q's position (padding sees padding)."""
    pos_q, pos_k = positions[:, :, None], positions[:, None, :]        # (B, T, 1), (B, 1, T)
    br_q, br_k = branches[:, :, None], branches[:, None, :]
    return (((br_k == 0) | (br_k == br_q)) & (pos_k <= pos_q))[:, None]  # (B, 1, T, T)


def collate_shared(pairs, device="cpu"):
    """Pairs -> packed rows on device: ids, positions (B, T) right-padded with 0, mask (B, 1, T, T),
    ends (B, 2) of chosen's and rejected's <|reward|>, chosen_lengths (B,) (chosen starts each row)."""
    rows = [pack_pair(p["chosen"], p["rejected"]) for p in pairs]
    ids, positions, branches = (pad_right([r[k] for r in rows], pad)[0].to(device)
                                for k, pad in ((0, 0), (1, 0), (2, -1)))  # padding: position 0, branch -1
    ends = torch.tensor([r[3] for r in rows], device=device)
    return ids, positions, tree_mask(positions, branches), ends, ends[:, 0] + 1


def training_losses(model, pairs, lm_coef=0.0, device="cpu"):
    """A batch, a row per pair -> (pair_loss + lm_coef x lm_loss, pair_loss, lm_loss or None, diff (P,))."""
    ids, positions, mask, ends, chosen_lengths = collate_shared(pairs, device)
    hidden = model.gpt.hidden_states(ids, positions=positions, attn_mask=mask)   # (B, T, C)
    rewards, rows = model(ids, hidden), torch.arange(len(ids), device=device)   # (B, T), (B,)
    r_chosen, r_rejected = rewards[rows, ends[:, 0]], rewards[rows, ends[:, 1]]  # (B,) each, at <|reward|>
    pair_loss = pairwise_loss(r_chosen, r_rejected)
    lm_loss = chosen_lm_loss(model, hidden, ids, chosen_lengths) if lm_coef > 0 else None
    loss = pair_loss if lm_loss is None else pair_loss + lm_coef * lm_loss
    return loss, pair_loss, lm_loss, r_chosen - r_rejected


# -----------------------------------------------------------------------------
# The normaliser, and scoring responses

def reward_normalizer(rewards):
    """Raw rewards (N,) -> {"bias": mean, "scale": sample std} (a constant reward keeps scale 1)."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    scale = rewards.std().item() if len(rewards) > 1 else 1.0
    return {"bias": rewards.mean().item(), "scale": scale if math.isfinite(scale) and scale >= 1e-8 else 1.0}


def sft_normalizer(model, init, tokenizer, folder, config, ctx, device):
    """The normaliser PPO reads: reward_normalizer of model's rewards for the init (SFT) model's answers
    to norm_prompts prompts of prompts_ppo.jsonl (drawn from the seed), sampled the way PPO samples."""
    if config["norm_prompts"] == 0:
        return {"bias": 0.0, "scale": 1.0}
    records = prepare_data.read_jsonl(os.path.join(folder, "prompts_ppo.jsonl"))
    pick = torch.randperm(len(records), generator=torch.Generator().manual_seed(config["seed"]))
    prompts = [records[i]["prompt"] for i in pick[:config["norm_prompts"]].tolist()]
    with torch.random.fork_rng(devices=[]):  # building a GPT draws init weights: the training RNG stays as saved
        policy = model_from_checkpoint(init, device)
    with ctx:
        answers = answer_prompts(policy, tokenizer, prompts, config["norm_max_new_tokens"], config["temperature"],
                                 config["seed"], config["eval_batch_size"])
        raw = score_responses(model, tokenizer, prompts, [a for a, _ in answers], [e for _, e in answers],
                              batch_size=config["eval_batch_size"])
    return reward_normalizer(raw)


def score_responses(model, tokenizer, prompts, responses, ended=None, normalizer=None, batch_size=64):
    """Rewards (N,) of responses (text; ended: a bool each, default True) to prompts, normalised with a normalizer."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ended = [True] * len(responses) if ended is None else ended
    seqs = [reward_input(tokenizer, p, r, e, model.config.block_size) for p, r, e in zip(prompts, responses, ended)]
    return score_sequences(model, seqs, batch_size, normalizer)


# -----------------------------------------------------------------------------
# The run

def resolve_paths(config):
    """(init checkpoint path, output folder) with the "" defaults filled in."""
    return (config["init"] or os.path.join("out", config["config"], "sft"),
            config["out_dir"] or os.path.join("out", config["config"], STAGE))


def run(config, flags=()):
    """Train a reward model; returns the final held-out metrics (and reward_norm)."""
    # 1. device, --resume or --overwrite; the language model it starts from (an SFT one, or a base model); the pairs
    init_path, out_dir = resolve_paths(config)
    run = start_run(config, flags, STAGE, out_dir)
    init_file = checkpoint_file(run.resume["parent"]["path"] if run.resume else init_path)
    init, parent = load_checkpoint(init_file, stages={"sft", "pretrain"}), parent_record(init_file)
    if run.resume is not None and parent["sha256"] != run.resume["parent"]["sha256"]:
        raise CheckpointError(f"{init_file} changed since this run began from it: start over with --overwrite")
    tokenizer = tokenizer_from_checkpoint(init)
    model_config = GPTConfig.from_dict(dict(init["model_args"], dropout=config["dropout"]))
    data = load_data(config, tokenizer, model_config.block_size)

    # 2. the init's GPT as the body, a fresh scalar head; the precision, measured before the optimizer exists
    torch.manual_seed(config["seed"])
    model = ScalarHeadModel(model_config)
    load_weights(model.gpt, init["model"], init_file)
    model.to(run.device)  # the head too, not only the body

    def step(ctx):
        with ctx:
            loss = training_losses(model, data["train"][:config["batch_size"]], config["lm_coef"], run.device)[0]
        loss.backward()

    dtype, dtype_why, ctx, scaler = training_precision(config["dtype"], run.device_type, model, step)
    optimizer = configure_optimizer(model, config["learning_rate"], config["weight_decay"],
                                    (config["beta1"], config["beta2"]), run.device_type)
    it, epoch, position = 0, 0, 0  # position: the next batch of this epoch
    if run.resume is not None:
        state = run.resume["resume"]
        load_weights(model, run.resume["model"], run.ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        it, epoch, position = state["iter"], state["epoch"], state["position"]
    agreement = data["agreement"]
    open_log(run, it, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters from {init_file}; "
             f"{len(data['train'])} train pairs per epoch, {len(data['val'])} val pairs (labeller agreement "
             f"{'unknown' if agreement is None else f'{agreement:.3f}'}); device {run.device}", dtype, dtype_why)

    def save(reward_norm=None):  # only the last checkpoint has the reward_norm that PPO reads (step 5)
        save_run(run, {"stage": STAGE, "model_args": dict(init["model_args"]),  # the init's dropout
                       "model": clean_state_dict(model), "tokenizer": tokenizer.to_dict(),
                       "config": dict(config, dtype=dtype), "parent": parent, "metrics": metrics,
                       "data": {"dataset": config["dataset"], "label_agreement": agreement},
                       "resume": {"optimizer": optimizer.state_dict(), "iter": it, "rng": rng_state(),
                                  "epoch": epoch, "position": position},
                       **({} if reward_norm is None else {"reward_norm": reward_norm})})

    lengths = [len(pack_pair(p["chosen"], p["rejected"])[0]) for p in data["train"]]  # batches sort by row
    batches = pair_batches(lengths, config["batch_size"], config["seed"], epoch)
    # the first evaluation; a finished run resumed trains nothing and still writes a full checkpoint
    metrics = report(model, data, ctx, config, run, it) if it == 0 or it >= run.end_iter else {}
    progress = Progress(run, it, run.end_iter, config["log_interval"], "pairs")
    stopper = StopRequested()
    try:
        while it < run.end_iter:
            # 3. one step on a batch of pairs, each pair packed in one row; a new order each epoch
            lr = scheduled_lr(optimizer, it, config)
            if position >= len(batches):
                epoch, position = epoch + 1, 0
                batches = pair_batches(lengths, config["batch_size"], config["seed"], epoch)
            pairs, position = [data["train"][i] for i in batches[position]], position + 1
            with ctx:
                loss, pair_loss, lm_loss, diff = training_losses(model, pairs, config["lm_coef"], run.device)
            (loss if scaler is None else scaler.scale(loss)).backward()
            _, grad_norm = optimizer_step(model, optimizer, loss.detach(), scaler, config["grad_clip"], run, it)
            it += 1
            record = {"loss": pair_loss.item(), "accuracy": pair_accuracy(diff.detach().float()), "lr": lr,
                      "grad_norm": grad_norm, "epoch": epoch} | ({} if lm_loss is None else {"lm_loss": lm_loss.item()})
            progress.update(it, record, len(diff), (f"lm loss {record['lm_loss']:.3f} | " if lm_loss is not None
                                                    else "") + f"acc {record['accuracy']:.3f} | epoch {epoch}")

            # 4. now and then: held-out accuracy against the noisy and the gold labels, a checkpoint, the plots
            if it % config["eval_interval"] == 0 or it == run.end_iter or stopper.requested:
                metrics = report(model, data, ctx, config, run, it)
                if it < run.end_iter and not stopper.requested:  # the last checkpoint is written in step 5
                    save()
                progress.pause(it)
                if stopper.requested:
                    break

        # 5. once, for the saved weights: the normaliser (SFT answers to PPO prompts score mean 0, std 1), the save
        norm = sft_normalizer(model, init, tokenizer, data["folder"], config, ctx, run.device)
        save(norm)
    finally:
        end_run(run, stopper)
    print(f"reward normalisation from {config['norm_prompts']} SFT answers to PPO prompts: bias {norm['bias']:.4f}, "
          f"scale {norm['scale']:.4f}")
    progress.done(it, stopper.requested)
    return {**metrics, "reward_norm": norm}


def report(model, data, ctx, config, run, it):
    """Held-out metrics (val, and the train probe): printed, logged, and plotted once there are steps."""
    with ctx:
        val = evaluate(model, data["val"], config["eval_batch_size"])
        train = evaluate(model, data["probe"], config["eval_batch_size"])
    metrics = {"iter": it, **{f"val_{k}": v for k, v in val.items()}, "train_loss_eval": train["loss"],
               "train_accuracy_eval": train["accuracy"], "label_agreement": data["agreement"]}
    gold = "" if val["gold_accuracy"] is None else f", vs gold {val['gold_accuracy']:.3f}"
    print(f"eval {it}: val loss {val['loss']:.4f}, accuracy {val['accuracy']:.3f}{gold}, margin {val['margin']:.3f}, "
          f"reward {val['reward_mean']:.3f} +- {val['reward_std']:.3f} | train probe accuracy {train['accuracy']:.3f}")
    append_jsonl(run.log_path, metrics)
    if it > 0:
        records, name = read_jsonl_log(run.log_path), config["config"]
        plot_curves(records, [("train (per step)", "loss"), ("train", "train_loss_eval"), ("val", "val_loss"),
                              ("LM loss of the chosen sequences (per step)", "lm_loss")],
                    os.path.join(run.out_dir, "loss.png"), f"reward model losses ({name})")
        plot_curves(records, [("train (per step)", "accuracy"), ("val vs noisy labels", "val_accuracy"),
                              ("val vs gold labels", "val_gold_accuracy"), ("labeller agreement", "label_agreement")],
                    os.path.join(run.out_dir, "accuracy.png"), f"reward model accuracy ({name})")
    return metrics


def main(argv=None):
    return stage_main(run, argv, DEFAULTS, PRESETS, "reward.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
