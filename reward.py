"""
reward.py: a reward model trained on preference pairs.

    python reward.py --config small                  # a 2-core laptop CPU, minutes
    python reward.py --config small --max_iters=500  # any key can be overridden
    python reward.py --config small --resume         # continue out/small/rm/ckpt.pt
    python reward.py --score --ckpt out/small/rm --prompt "What is 3 plus 4?" --response "3 plus 4 is 7."

Reads the SFT checkpoint out/<config>/sft/ckpt.pt (--init: any sft or pretrain
checkpoint) and data/<dataset>/prefs_{train,val}.jsonl (and prefs_ranked_*.jsonl
when prepare_data.py wrote them), writes out/<config>/rm/{ckpt.pt, log.jsonl,
loss.png, accuracy.png}.

The lecture's design: the response is followed by the special <|reward|> token;
the transformer's output at that position goes through a scalar head
(reward.ScalarHeadModel) and every other output is ignored. The labeller said
"chosen is better than rejected", so the loss asks for r_chosen > r_rejected:

    loss = -log sigmoid(r_chosen - r_rejected - margin)     (Bradley-Terry)

A ranking of K responses gives all K-choose-2 (better, worse) pairs, trained
together in one batch (InstructGPT). With lm_coef > 0 (the small preset) the
body also keeps its language-model loss on each prompt's preferred conversation,
which keeps what it needs to judge answers (best_lm_loss). After training, a
bias and scale are stored so that the SFT model's own responses to the PPO
prompts score mean 0, std 1.

The responses of one prompt share the prompt (and a right and a wrong answer
worded alike share nearly everything), so training packs each prompt into one
row: the shared prefix once, then each response's rest, with an attention mask
that lets each token see only its own sequence (collate_shared), and batches
rows of similar packed length (row_length). The rewards, the losses and the
gradients are those of a row per sequence; the step is ~1.55x faster on the
small preset's batches (tests/bench/bench_reward.py).
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bpe
import prepare_data
from train import (append_jsonl, clip_gradients, configure_optimizer, cosine_lr, format_eta, parse_config,
                   pick_device, pick_dtype, plot_curves, read_jsonl_log, rng_state, set_rng_state, StopRequested,
                   training_precision, truncate_log)
from model import (answer_prompts, CheckpointError, clean_state_dict, GPT, GPTConfig, load_checkpoint,
                   model_from_checkpoint, parent_record, save_checkpoint, tokenizer_from_checkpoint)

STAGE = "rm"
INIT_STAGES = ("sft", "pretrain")  # a reward model starts from a language model, never from another rm/ppo

# -----------------------------------------------------------------------------
# Configuration: defaults, then a preset (--config NAME), then --key=value overrides.

DEFAULTS = dict(
    config="default",
    # data and checkpoints
    dataset="tinyworld",        # data/<dataset>/prefs_*.jsonl from prepare_data.py
    data_dir="data",
    init="",                    # "" means out/<config>/sft; a pretrain checkpoint works too
    out_dir="",                 # "" means out/<config>/rm
    # optimisation
    batch_size=32,              # preference pairs per step (a ranked record's pairs are never split)
    sort_window=16,             # batch similar lengths together within windows of this many batches; 1 = off
    share_prefix=True,          # one row per prompt, its responses branching off it (collate_shared): same result, fewer tokens
    max_iters=375,
    learning_rate=3e-4,         # lower than pretraining: the body is already trained
    min_lr_ratio=0.1,
    warmup_iters=30,
    weight_decay=0.0,
    beta1=0.9, beta2=0.95,
    grad_clip=1.0,              # clip the global gradient norm; 0 disables
    margin=0.0,                 # loss = -log sigmoid(r_chosen - r_rejected - margin)
    lm_coef=0.0,                # + lm_coef x next-token loss of each prompt's best sequence (0: the plain design)
    dropout=0.1,                # dropout in the body while training (a few thousand noisy pairs overfit); -1 keeps the init's
    oversample="",              # "task:K,...": pairs of these tasks that differ only in the answer, K times per epoch
    # evaluation, logging
    eval_interval=125, log_interval=25,
    eval_batch_size=64,         # sequences per forward pass when scoring
    stop_at_iter=0,             # stop (and save) after this many iterations; 0 = run to max_iters
    # normalisation: SFT answers to PPO prompts should score mean 0, std 1
    norm_prompts=256,           # how many prompts_ppo prompts (0: no normalisation, bias 0 and scale 1)
    norm_max_new_tokens=64,     # answer length limit (use ppo.py's)
    temperature=1.0,            # sampling temperature of those answers (use ppo.py's)
    # system
    device="auto",              # auto | cpu | cuda | mps
    dtype="auto",               # auto | float32 | bfloat16 | float16
    seed=1337,
)

PRESETS = {
    # seconds, for tests
    "tiny": dict(batch_size=8, max_iters=30, warmup_iters=3, eval_interval=15, log_interval=5,
                 learning_rate=1e-3, lm_coef=1.0, norm_prompts=16, norm_max_new_tokens=8, eval_batch_size=32),
    # a 2-core laptop CPU, after sft.py --config small: 36,000 pairs (tinyworld-prefs36k, built on first
    # use), the right-vs-wrong sums shown 8x as often (the sums are learned late), the LM term (README, stage 5)
    "small": dict(dataset="tinyworld-prefs36k", batch_size=32, max_iters=1800, warmup_iters=30,
                  eval_interval=600, log_interval=25, learning_rate=1e-3, dropout=0.0, lm_coef=1.0,
                  oversample="arithmetic:8", norm_prompts=256, norm_max_new_tokens=64),
    # GPT-2 124M on a GPU, human preferences (InstructGPT: one epoch, lr ~1e-5)
    "gpt2": dict(dataset="hh", batch_size=64, max_iters=1000, warmup_iters=50, eval_interval=200,
                 log_interval=10, learning_rate=1e-5, norm_prompts=512, norm_max_new_tokens=128,
                 eval_batch_size=128),
}


# -----------------------------------------------------------------------------
# The reward model: the GPT body and a scalar head
#
# A linear head maps the final hidden state to one number. The response is followed
# by the <|reward|> token and the reward is the head's output at that position; all
# other outputs are ignored. PPO's critic is the same network reading its output at
# every response position.

class ScalarHeadModel(nn.Module):
    """GPT body + scalar head: ids (B, T) -> one scalar per position (B, T)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        # small outputs at the start, so the first losses are about ln 2 (reward)
        # or about the squared returns (critic), not dominated by a random head
        nn.init.normal_(self.head.weight, mean=0.0, std=0.1 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, hidden=None):
        """hidden: the body's hidden states (B, T, C) of idx when already
        computed (reward.py shares them with its LM loss)."""
        hidden = self.gpt.hidden_states(idx) if hidden is None else hidden
        return self.head(hidden).squeeze(-1).float()


def with_reward_token(prompt_ids, response_ids, reward_id, block_size=None):
    """The reward model's input: prompt, response, then <|reward|>. Used the same
    way in reward training, evaluation and PPO scoring. A sequence longer than
    block_size loses its oldest tokens (the reward token is always kept)."""
    ids = list(prompt_ids) + list(response_ids) + [reward_id]
    if block_size is not None and len(ids) > block_size:
        ids = ids[-block_size:]
    return ids


def pad_right(sequences, pad_value=0):
    """Lists of ids -> (ids (B, T_max) long, lengths (B,) long). Padding goes
    after each sequence: under the causal mask it cannot change any earlier
    position's output."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    out = torch.full((len(sequences), int(lengths.max())), pad_value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out, lengths


def read_last(values, lengths):
    """values (B, T), lengths (B,) -> values[b, lengths[b] - 1]: the scalar at
    each sequence's last real token (the <|reward|> token for a reward model)."""
    return values.gather(1, (lengths - 1).to(values.device)[:, None]).squeeze(1)


@torch.no_grad()
def score_sequences(model, sequences, batch_size=64, normalizer=None):
    """Rewards of reward-model inputs (each ending with <|reward|>, from
    with_reward_token) -> (N,) float tensor on the CPU. normalizer: the
    {"bias", "scale"} stored in a reward checkpoint; the result is then
    (raw - bias) / scale."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # batches of similar lengths pad less (2.2x faster on tinyworld's held-out pairs); the order is kept
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    rewards = torch.zeros(len(sequences))
    for start in range(0, len(sequences), batch_size):
        rows = order[start:start + batch_size]
        ids, lengths = pad_right([sequences[i] for i in rows])
        rewards[rows] = read_last(model(ids.to(device)), lengths).cpu()
    model.train(was_training)
    if normalizer is not None:
        rewards = (rewards - normalizer["bias"]) / normalizer["scale"]
    return rewards


def scalar_model_from_checkpoint(ckpt, device="cpu"):
    """The ScalarHeadModel of a reward (or critic) checkpoint, with its weights."""
    try:
        model = ScalarHeadModel(GPTConfig.from_dict(ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise CheckpointError(f"checkpoint weights do not fit a reward model of its model_args ({first})") from None
    return model.to(device)


# -----------------------------------------------------------------------------
# The reward model's input: one function builds it, everywhere

def reward_input(tokenizer, prompt, response, ended=True, block_size=None):
    """prompt and response text -> the ids the reward model reads:
        <|user|> prompt <|end|> <|assistant|> response [<|end|>] <|reward|>
    The chat template of bpe.py, then reward.with_reward_token (which ppo.py
    applies to generated ids directly: the same layout). ended=False: the
    response was cut at a length limit, so it has no end-of-turn token."""
    prompt_ids, response_ids = tokenizer.encode_chat(prompt, response, ended)
    return with_reward_token(prompt_ids, response_ids, tokenizer.special_ids[bpe.REWARD], block_size)


def ranking_pairs(k):
    """All K-choose-2 (better, worse) index pairs of a best-first ranking of k
    responses: (0, 1), (0, 2), ..., (k-2, k-1)."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


# -----------------------------------------------------------------------------
# Data: preference records -> groups, one per prompt
#
# A group is one record: its sequences (reward-model inputs) and its pairs
# (better, worse) as indices into them, with the noiseless verdict of each pair:
#   {"seqs": [ids, ...], "pairs": [(i, j), ...], "gold": [True | False | None, ...]}
# gold True: the gold labeller agrees that i is better; None: no gold label.

def _is_text(value):
    return isinstance(value, str) and value.strip() != ""


def validate_pair_record(record):
    """The problem with a chosen/rejected record as one phrase, or None."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            return f"missing field '{key}'"
        if not isinstance(record[key], str):
            return f"field '{key}' must be a string, got {type(record[key]).__name__}"
    if not record["prompt"].strip():
        return "the prompt is empty"
    for key in ("chosen_ended", "rejected_ended"):
        if not isinstance(record.get(key, True), bool):
            return f"field '{key}' must be true or false"
    if record.get("gold_prefers_chosen") is not None and not isinstance(record["gold_prefers_chosen"], bool):
        return "field 'gold_prefers_chosen' must be true, false or null"
    if record["chosen"] == record["rejected"] and record.get("chosen_ended", True) == record.get("rejected_ended", True):
        return f"chosen and rejected are the same response ({record['chosen'][:40]!r}): a preference needs two"
    return None


def validate_ranked_record(record):
    """The problem with a ranked-K record (responses best first) as one phrase, or None."""
    if not _is_text(record.get("prompt")):
        return "missing or empty field 'prompt'"
    responses = record.get("responses")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        return "field 'responses' must be a list of at least 2 strings, best first"
    k = len(responses)
    ended = record.get("ended", [True] * k)
    if not isinstance(ended, list) or len(ended) != k or not all(isinstance(e, bool) for e in ended):
        return f"field 'ended' must be a list of {k} true/false values"
    gold = record.get("gold")
    if gold is not None and (not isinstance(gold, list) or len(gold) != k
                             or not all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in gold)):
        return f"field 'gold' must be a list of {k} numbers or null"
    if len(set(zip(responses, ended))) < k:
        return "two responses of the ranking are the same"
    return None


def record_to_group(record, tokenizer, block_size):
    """One validated record -> a group (see above). A pair record's chosen is
    index 0, its rejected index 1; a ranked record's responses stay best first."""
    if "responses" in record:
        k = len(record["responses"])
        ended = record.get("ended", [True] * k)
        seqs = [reward_input(tokenizer, record["prompt"], r, e, block_size) for r, e in zip(record["responses"], ended)]
        pairs = ranking_pairs(k)
        gold_scores = record.get("gold")
        gold = [None if gold_scores is None or gold_scores[i] == gold_scores[j] else gold_scores[i] > gold_scores[j]
                for i, j in pairs]
        return {"seqs": seqs, "pairs": pairs, "gold": gold}
    seqs = [reward_input(tokenizer, record["prompt"], record["chosen"], record.get("chosen_ended", True), block_size),
            reward_input(tokenizer, record["prompt"], record["rejected"], record.get("rejected_ended", True),
                         block_size)]
    return {"seqs": seqs, "pairs": [(0, 1)], "gold": [record.get("gold_prefers_chosen")]}


def load_preferences(path, tokenizer, block_size):
    """A prefs_*.jsonl (pairs) or prefs_ranked_*.jsonl (rankings) file -> groups.
    Every record is checked; the first bad one is a DataError naming the file
    and line."""
    groups = []
    for line, record in enumerate(prepare_data.read_jsonl(path), start=1):  # read_jsonl: one record per line
        ranked = "responses" in record
        problem = validate_ranked_record(record) if ranked else validate_pair_record(record)
        if problem:
            kind = "ranked record (prompt, responses best first)" if ranked else "pair (prompt, chosen, rejected)"
            raise prepare_data.DataError(f"{path} line {line}: {problem}; each line must be a preference {kind}")
        groups.append(record_to_group(record, tokenizer, block_size))
    if not groups:
        raise prepare_data.DataError(f"{path} holds no preference records")
    return groups


def load_split(folder, split, tokenizer, block_size):
    """Groups of prefs_<split>.jsonl plus prefs_ranked_<split>.jsonl when it exists."""
    groups = load_preferences(os.path.join(folder, f"prefs_{split}.jsonl"), tokenizer, block_size)
    ranked = os.path.join(folder, f"prefs_ranked_{split}.jsonl")
    if os.path.exists(ranked):
        groups += load_preferences(ranked, tokenizer, block_size)
    return groups


def pack_groups(groups, order, batch_size):
    """Groups in the given order -> batches (lists of group indices) of at most
    batch_size pairs each, a group's pairs never split: a batch is closed when
    the next group would not fit. A group larger than batch_size is a batch alone."""
    batches, current, n_pairs = [], [], 0
    for g in order:
        size = len(groups[g]["pairs"])
        if current and n_pairs + size > batch_size:
            batches.append(current)
            current, n_pairs = [], 0
        current.append(g)
        n_pairs += size
    if current:
        batches.append(current)
    return batches


def pair_batches(groups, batch_size, seed, epoch, sort_window=1, lengths=None):
    """One epoch's batches (lists of group indices): the groups in an order drawn
    from (seed, epoch), packed by pack_groups, so chosen and rejected of one
    prompt (or all pairs of a ranking) are always in the same batch.
    sort_window > 1: the shuffled groups are cut into windows of about that many
    batches and sorted by length inside each window, so that a batch holds
    rows of similar length (less padding: the same pairs in less time); the
    batches are then shuffled, so the order of lengths is random too.
    lengths: each group's row length in a batch (row_length); None: its
    longest sequence."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(groups), generator=generator).tolist()
    if sort_window <= 1:
        return pack_groups(groups, order, batch_size)
    if lengths is None:
        lengths = [row_length(g, share_prefix=False) for g in groups]
    windows, current, n_pairs = [], [], 0
    for g in order:
        current.append(g)
        n_pairs += len(groups[g]["pairs"])
        if n_pairs >= sort_window * batch_size:
            windows.append(current)
            current, n_pairs = [], 0
    if current:
        windows.append(current)
    batches = []
    for window in windows:
        window = sorted(window, key=lambda g: lengths[g])  # stable: ties keep the order
        batches += pack_groups(groups, window, batch_size)
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def differs_only_in_answer(a, b, max_words=3):
    """True when two responses are the same words around one short stretch
    (1 to max_words words in each) that differs: a right and a wrong answer in
    the same wording, "Anna has 6 bells now." / "Anna has 7 bells now.". A
    response cut short of its answer (nothing left in its stretch) is not one."""
    wa, wb = a.split(), b.split()
    start = 0
    while start < min(len(wa), len(wb)) and wa[start] == wb[start]:
        start += 1
    end = 0
    while end < min(len(wa), len(wb)) - start and wa[-1 - end] == wb[-1 - end]:
        end += 1
    return 0 < len(wa) - start - end <= max_words and 0 < len(wb) - start - end <= max_words


def parse_oversample(text):
    """"arithmetic:4,story_qa:4" -> {"arithmetic": 4, "story_qa": 4}; "" -> {}."""
    factors = {}
    for part in text.split(","):
        if not part.strip():
            continue
        task, _, k = part.partition(":")
        if not task.strip() or not k.strip().isdigit() or int(k) < 1:
            raise ValueError(f"--oversample={text!r}: give task:K pairs with K a whole number >= 1, "
                             f"e.g. arithmetic:4,story_qa:4")
        factors[task.strip()] = int(k)
    return factors


def oversample_groups(groups, records, factors):
    """The training groups plus K - 1 more copies of each pair record of a task
    in factors ({task: K}) whose chosen and rejected differ only in the answer:
    the pairs that teach whether an answer is right, shown K times per epoch
    (the mix of a batch moves toward them; with 4 of 32 per batch, judging sums
    is learned too late: README, stage 5). records: the prefs_train records in
    the order of groups. Returns (groups, number of copies added)."""
    extra = []
    for group, record in zip(groups, records):
        k = factors.get(record.get("task"), 1)
        if k > 1 and "chosen" in record and differs_only_in_answer(record["chosen"], record["rejected"]):
            extra += [group] * (k - 1)
    return groups + extra, len(extra)


def flatten_groups(groups):
    """Groups -> (seqs, better, worse, gold): every sequence once, and for every
    pair the indices of its better and worse sequence in seqs and its gold
    verdict (True/False, None when unknown)."""
    seqs, better, worse, gold = [], [], [], []
    for group in groups:
        offset = len(seqs)
        seqs += group["seqs"]
        for (i, j), g in zip(group["pairs"], group["gold"]):
            better.append(offset + i)
            worse.append(offset + j)
            gold.append(g)
    return seqs, better, worse, gold


def collate(groups):
    """Groups -> one batch: ids (B, T) padded on the right, lengths (B,), and
    for every pair the rows of its better and worse sequence, better (P,) and
    worse (P,), and its gold verdict (P,) float: 1 agree, 0 disagree, nan unknown.
    Each sequence is in the batch once, however many pairs it is in."""
    seqs, better, worse, gold = flatten_groups(groups)
    ids, lengths = pad_right(seqs)
    gold = [float("nan") if g is None else float(g) for g in gold]
    return ids, lengths, torch.tensor(better), torch.tensor(worse), torch.tensor(gold)


def pack_group(seqs):
    """A group's sequences -> one row that holds their shared prefix (the prompt,
    and for a pair that differs only in the answer nearly all of it) once, then the
    rest of each sequence (its branch), one after the other:
        ids        the row's tokens
        positions  each token's position in its own sequence (a branch continues
                   from the prefix, so every sequence sees its usual positions)
        branches   0 for the prefix, i + 1 for sequence i's branch
        ends       the index in the row of each sequence's last token, <|reward|>
    Sequence 0 is the row's beginning, unchanged: prefix + branch 1. Every branch
    keeps at least the last token, even for equal sequences."""
    shared = min(len(s) for s in seqs) - 1
    for i in range(shared):
        if any(s[i] != seqs[0][i] for s in seqs):
            shared = i
            break
    ids, positions, branches, ends = list(seqs[0][:shared]), list(range(shared)), [0] * shared, []
    for b, s in enumerate(seqs, start=1):
        ids += s[shared:]
        positions += range(shared, len(s))
        branches += [b] * (len(s) - shared)
        ends.append(len(ids) - 1)
    return ids, positions, branches, ends


def row_length(group, share_prefix):
    """The tokens a group takes in a training batch: its one packed row
    (pack_group: the shared prefix once, then each sequence's rest) with
    share_prefix, else its longest sequence (every sequence is a row of that
    length once padded). pair_batches sorts by it."""
    if share_prefix:
        return len(pack_group(group["seqs"])[0])
    return max(len(s) for s in group["seqs"])


def tree_mask(positions, branches):
    """positions, branches (B, T) of packed rows (pack_group; padding has branch
    -1) -> (B, 1, T, T) boolean, True where query q may see key k: k is in the
    prefix or in q's own branch, at or before q's position. This is the causal
    mask of each sequence on its own; a branch never sees another branch, and
    padding sees only padding (never a whole row of False: softmax of nothing)."""
    pos_q, pos_k = positions[:, :, None], positions[:, None, :]        # (B, T, 1), (B, 1, T)
    br_q, br_k = branches[:, :, None], branches[:, None, :]
    same_sequence = (br_k == 0) | (br_k == br_q)
    return (same_sequence & (pos_k <= pos_q))[:, None]                  # (B, 1, T, T)


def collate_shared(groups, device="cpu"):
    """Groups -> one batch with one row per group (pack_group), the prompt
    computed once instead of once per response: the same rewards and LM loss as
    collate, from fewer tokens (README, stage 5). Every tensor is on device (the
    mask, T x T per row, is built there rather than copied). Returns
        ids (B, T), positions (B, T)  right-padded (ids 0, positions 0)
        mask (B, 1, T, T)             tree_mask
        reward_at (N, 2)              (row, index) of each sequence's <|reward|>, in flatten_groups' order
        better (P,), worse (P,)       each pair's sequences, indices into reward_at
        best_lengths (B,)             length of each row's first sequence (the chosen or top-ranked
                                      response), which starts the row: best_lm_loss reads it there"""
    rows = [pack_group(group["seqs"]) for group in groups]
    T = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    positions = torch.zeros(len(rows), T, dtype=torch.long)
    branches = torch.full((len(rows), T), -1, dtype=torch.long)
    reward_at, best_lengths = [], []
    for b, (row_ids, row_positions, row_branches, ends) in enumerate(rows):
        n = len(row_ids)
        ids[b, :n] = torch.tensor(row_ids)
        positions[b, :n] = torch.tensor(row_positions)
        branches[b, :n] = torch.tensor(row_branches)
        reward_at += [(b, e) for e in ends]
        best_lengths.append(ends[0] + 1)
    _, better, worse, _ = flatten_groups(groups)
    ids, positions, branches = ids.to(device), positions.to(device), branches.to(device)
    return (ids, positions, tree_mask(positions, branches), *(torch.tensor(x, device=device) for x in
                                                              (reward_at, better, worse, best_lengths)))


# -----------------------------------------------------------------------------
# The loss and the metrics

def sequence_rewards(model, ids, lengths, hidden=None):
    """ids (B, T), lengths (B,) -> the reward of each sequence (B,): the head's
    output at its last real token, <|reward|>. Padding after it, or anything
    else after it, cannot change it (causal attention). hidden: the body's
    hidden states (B, T, C) of ids when already computed (the training step
    shares them with best_lm_loss)."""
    return read_last(model(ids, hidden), lengths)


def best_rows(groups):
    """Rows (in collate's batch) of each group's best sequence: a pair's chosen
    response, a ranking's first. best_lm_loss reads these."""
    rows, offset = [], 0
    for group in groups:
        rows.append(offset)
        offset += len(group["seqs"])
    return torch.tensor(rows, dtype=torch.long)


def best_lm_loss(model, hidden, ids, lengths, rows):
    """Next-token cross-entropy of the given rows (each prompt's best sequence:
    best_rows) over their prompt, response and end of turn, never <|reward|> or
    padding, read from the body's hidden states (B, T, C) through the tied LM head.

    Why a reward model keeps an LM loss: the pairwise loss alone moves the body
    toward whatever separates its pairs first (style), and what it needs to tell a
    right answer from a wrong one (the facts, reading the question) fades; still
    modelling the preferred conversations keeps it (an SFT-style regulariser, as in
    Yang et al. 2024, "Regularizing hidden states enables learning generalizable
    reward model")."""
    ids, hidden, lengths = ids[rows], hidden[rows], lengths[rows].to(ids.device)  # (P, T), (P, T, C), (P,)
    q = torch.arange(ids.size(1) - 1, device=ids.device)[None, :]  # hidden position q predicts token q + 1
    keep = q + 1 < lengths[:, None] - 1                              # targets before <|reward|>: (P, T - 1)
    if not keep.any():
        return hidden.sum() * 0.0
    logits = model.gpt.lm_head(hidden[:, :-1][keep]).float()        # (N, V): only the kept positions
    return F.cross_entropy(logits, ids[:, 1:][keep])


def pairwise_loss(r_chosen, r_rejected, margin=0.0):
    """Mean of -log sigmoid(r_chosen - r_rejected - margin), written as
    softplus(-(...)): log(sigmoid(x)) underflows to -inf for x below about -100
    in float32, softplus does not. Gradient wrt r_chosen: -sigmoid(-(diff - margin)) / N."""
    return F.softplus(-(r_chosen - r_rejected - margin)).mean()


def pair_accuracy(diff):
    """Share of pairs ranked the labelled way (diff = r_better - r_worse > 0); a tie counts half."""
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def training_losses(model, groups, share_prefix=True, margin=0.0, lm_coef=0.0, device="cpu"):
    """One training batch of groups -> (loss, pair_loss, lm_loss or None, diff):
    loss = pair_loss + lm_coef x lm_loss, diff (P,) = r_better - r_worse of each
    pair. share_prefix: a row per group (collate_shared), else a row per
    sequence (collate); the two give the same values."""
    if share_prefix:
        ids, positions, mask, reward_at, better, worse, lm_lengths = collate_shared(groups, device)
        hidden = model.gpt.hidden_states(ids, positions=positions, attn_mask=mask)  # (B, T, C)
        rewards = model(ids, hidden)[reward_at[:, 0], reward_at[:, 1]]              # (N,) at each <|reward|>
        lm_rows = torch.arange(len(ids), device=device)                             # each row starts with its best
    else:
        ids, lm_lengths, better, worse, _ = collate(groups)
        ids, lm_lengths, better, worse = ids.to(device), lm_lengths.to(device), better.to(device), worse.to(device)
        hidden = model.gpt.hidden_states(ids)                                       # (B, T, C)
        rewards = sequence_rewards(model, ids, lm_lengths, hidden)                  # (B,)
        lm_rows = best_rows(groups).to(device)
    pair_loss = pairwise_loss(rewards[better], rewards[worse], margin)
    lm_loss = best_lm_loss(model, hidden, ids, lm_lengths, lm_rows) if lm_coef > 0 else None
    loss = pair_loss if lm_loss is None else pair_loss + lm_coef * lm_loss
    return loss, pair_loss, lm_loss, rewards[better] - rewards[worse]


@torch.no_grad()
def evaluate(model, groups, batch_size=64, margin=0.0):
    """Metrics of held-out groups:
        loss           pairwise loss against the noisy labels
        accuracy       share of pairs ordered as the noisy labeller ordered them
        gold_accuracy  share ordered as the noiseless gold labeller would (None without gold labels)
        margin         mean r_better - r_worse (better as labelled)
        reward_mean, reward_std   of every sequence's reward
        pairs          number of pairs"""
    seqs, better, worse, gold = flatten_groups(groups)
    rewards = score_sequences(model, seqs, batch_size)  # (N,), eval mode, padding on the right
    diff = rewards[better] - rewards[worse]             # (P,)
    known = [k for k, g in enumerate(gold) if g is not None]
    gold_accuracy = None
    if known:
        # agree with gold: the labelled-better one scores higher when gold agrees with the label, lower otherwise
        signed = torch.where(torch.tensor([gold[k] for k in known]), diff[known], -diff[known])
        gold_accuracy = pair_accuracy(signed)
    return {"loss": pairwise_loss(rewards[better], rewards[worse], margin).item(),
            "accuracy": pair_accuracy(diff), "gold_accuracy": gold_accuracy, "margin": diff.mean().item(),
            "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "pairs": len(better)}


# -----------------------------------------------------------------------------
# Normalisation and scoring

def sample_sft_responses(policy, tokenizer, prompts, max_new_tokens, temperature, seed, batch_size=64):
    """The init (SFT) model's answers to prompts (text) -> [(response text, ended)],
    sampled the way PPO will sample them."""
    return answer_prompts(policy, tokenizer, prompts, max_new_tokens, temperature, seed, batch_size)


def reward_normalizer(rewards):
    """Raw rewards (N,) of SFT answers -> {"bias": mean, "scale": std}, so that
    (raw - bias) / scale has mean 0 and (sample) std 1. A constant reward keeps scale 1."""
    rewards = torch.as_tensor(rewards, dtype=torch.float64)
    bias = rewards.mean().item()
    scale = rewards.std().item() if len(rewards) > 1 else 1.0
    if not math.isfinite(scale) or scale < 1e-8:
        scale = 1.0
    return {"bias": bias, "scale": scale}


def score_responses(model, tokenizer, prompts, responses, ended=None, normalizer=None, batch_size=64):
    """Rewards of responses to prompts (text), (N,) float tensor: the reward at
    <|reward|> of reward_input(...), then (raw - bias) / scale with a normalizer
    (a checkpoint's "reward_norm"). ended: one bool per response (default True).
    `python reward.py --score` and eval.py call this."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ended = [True] * len(responses) if ended is None else ended
    block_size = model.config.block_size
    seqs = [reward_input(tokenizer, p, r, e, block_size) for p, r, e in zip(prompts, responses, ended)]
    return score_sequences(model, seqs, batch_size, normalizer)


def load_reward_model(path, device="cpu"):
    """(ScalarHeadModel in eval mode, tokenizer, reward_norm) of a reward checkpoint (file or folder)."""
    ckpt = load_checkpoint(path, stages={STAGE})
    model = scalar_model_from_checkpoint(ckpt, device).eval()
    normalizer = ckpt.get("reward_norm") or {"bias": 0.0, "scale": 1.0}
    return model, tokenizer_from_checkpoint(ckpt), normalizer


# -----------------------------------------------------------------------------
# The run

def resolve_paths(config):
    """(init checkpoint path, output folder) with the "" defaults filled in."""
    init = config["init"] or os.path.join("out", config["config"], "sft")
    out_dir = config["out_dir"] or os.path.join("out", config["config"], STAGE)
    return init, out_dir


def load_init(path, config_name):
    """The checkpoint a reward model starts from: an sft (or pretrain) one."""
    file = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.exists(file):
        parts = os.path.normpath(path).split(os.sep)  # out/<config>/sft: that config's sft.py run writes it
        sft_config = parts[-2] if len(parts) >= 3 and parts[-3] == "out" and parts[-1] == "sft" else config_name
        raise CheckpointError(f"checkpoint {file} does not exist: run `python sft.py --config {sft_config}` "
                              f"first, or start from another with --init=PATH (an sft or pretrain checkpoint)")
    ckpt = load_checkpoint(file)
    if ckpt["stage"] not in INIT_STAGES:
        raise CheckpointError(f"checkpoint {file} is a '{ckpt['stage']}' checkpoint; a reward model starts from an "
                              f"sft (or pretrain) checkpoint: pass --init=out/{config_name}/sft")
    return ckpt, file


def check_config(config):
    for key in ("batch_size", "sort_window", "max_iters", "eval_interval", "log_interval", "eval_batch_size"):
        if config[key] < 1:
            raise ValueError(f"--{key}={config[key]} must be at least 1")
    if config["lm_coef"] < 0:
        raise ValueError(f"--lm_coef={config['lm_coef']} must be >= 0 (0 turns the LM loss off)")
    if config["norm_prompts"] < 0 or config["norm_max_new_tokens"] < 1 or config["temperature"] < 0:
        raise ValueError("--norm_prompts must be >= 0, --norm_max_new_tokens >= 1 and --temperature >= 0")
    parse_oversample(config["oversample"])


def run(config, flags=()):
    """Train a reward model; returns the final held-out metrics (and reward_norm)."""
    check_config(config)
    device = pick_device(config["device"])
    device_type = "cuda" if device.startswith("cuda") else ("mps" if device.startswith("mps") else "cpu")
    pick_dtype(config["dtype"], device_type)  # a bad name fails before any work

    init_path, out_dir = resolve_paths(config)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    log_path = os.path.join(out_dir, "log.jsonl")
    resume = None
    if "resume" in flags:
        resume = load_checkpoint(ckpt_path, stages={STAGE})
        saved = resume["config"]
        # the run continues with its own config; only run-length and system keys may change
        for key in DEFAULTS:
            if key not in ("max_iters", "stop_at_iter", "device", "dtype", "eval_interval", "log_interval",
                           "eval_batch_size", "out_dir"):
                config[key] = saved.get(key, config[key])
        init_path = resume["parent"]["path"]
    elif os.path.exists(ckpt_path) and "overwrite" not in flags:
        raise ValueError(f"{ckpt_path} already exists: pass --resume to continue it, "
                         f"or --overwrite to start over (it will be replaced)")

    init, init_file = load_init(init_path, config["config"])
    parent = parent_record(init_file)
    if resume is not None and parent["sha256"] != resume["parent"]["sha256"]:
        raise CheckpointError(f"{init_file} changed since {ckpt_path} was started from it: "
                              f"start over with --overwrite")
    tokenizer = tokenizer_from_checkpoint(init)
    model_args = dict(init["model_args"])
    if config["dropout"] >= 0:
        model_args["dropout"] = config["dropout"]
    model_config = GPTConfig.from_dict(model_args)
    folder = prepare_data.ensure_prepared(config["dataset"], config["data_dir"])  # builds tinyworld if missing
    train_groups = load_split(folder, "train", tokenizer, model_config.block_size)
    val_groups = load_split(folder, "val", tokenizer, model_config.block_size)
    train_probe = train_groups[:len(val_groups)]  # a fixed train subset the size of val, to watch overfitting
    n_prompts = len(train_groups)
    if config["oversample"]:
        factors = parse_oversample(config["oversample"])
        train_records = prepare_data.read_jsonl(os.path.join(folder, "prefs_train.jsonl"))
        tasks = sorted({str(r.get("task")) for r in train_records})
        train_groups, n_copies = oversample_groups(train_groups, train_records, factors)
        if n_copies == 0:
            raise ValueError(f"--oversample={config['oversample']!r}: no pair of prefs_train.jsonl has one of these "
                             f"tasks and differs only in the answer; the tasks there: {', '.join(tasks)}")
        unknown = sorted(set(factors) - set(tasks))  # a typo must not pass because another task matched
        if unknown:
            raise ValueError(f"--oversample={config['oversample']!r}: no task {', '.join(unknown)} in "
                             f"prefs_train.jsonl; the tasks there: {', '.join(tasks)}")
        print(f"oversample {config['oversample']}: {n_copies} more copies of the pairs that differ only in "
              f"the answer, per epoch")
    val_pairs = prepare_data.read_jsonl(os.path.join(folder, "prefs_val.jsonl"))
    has_gold = all(r.get("gold_prefers_chosen") is not None for r in val_pairs)
    agreement = prepare_data.label_agreement(val_pairs) if has_gold else None

    # the model: the init checkpoint's GPT as the body, a fresh scalar head
    torch.manual_seed(config["seed"])
    model = ScalarHeadModel(model_config)
    try:
        model.gpt.load_state_dict(init["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {init_file} weights do not fit its model_args "
                              f"({str(e).strip().splitlines()[0][:160]})") from None
    model.to(device)

    def training_step(autocast, groups):
        with autocast:
            loss = training_losses(model, groups, config["share_prefix"], config["margin"], config["lm_coef"],
                                   device)[0]
        loss.backward()

    # precision, measured on a few training groups (before the optimizer exists: no state to disturb)
    dtype, dtype_why, ctx, scaler = training_precision(config["dtype"], device_type, model,
                                                       lambda c: training_step(c, train_groups[:8]))
    optimizer = configure_optimizer(model, config["learning_rate"], config["weight_decay"],
                                    (config["beta1"], config["beta2"]), device_type)
    start_iter, epoch, position = 0, 0, 0  # position: the next batch of this epoch
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["resume"]["optimizer"])
        start_iter = resume["resume"]["iter"]
        epoch, position = resume["resume"]["epoch"], resume["resume"]["position"]
        set_rng_state(resume["resume"]["rng"])
        truncate_log(log_path, start_iter)
        print(f"resuming {ckpt_path} at iteration {start_iter}")
    else:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(log_path):
            os.remove(log_path)

    n_train_pairs = sum(len(g["pairs"]) for g in train_groups)
    print(f"{STAGE}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters from {init_file} "
          f"({init['stage']}); {n_train_pairs} train pairs{' per epoch' if config['oversample'] else ''} "
          f"({n_prompts} prompts), "
          f"{sum(len(g['pairs']) for g in val_groups)} val pairs; {config['batch_size']} pairs/step, "
          f"device {device}, {dtype} ({dtype_why})"
          + (f"; labeller agreement on val {agreement:.3f}" if agreement is not None else ""))
    append_jsonl(log_path, {"iter": start_iter, "dtype": dtype, "dtype_why": dtype_why})

    norm_cache = {}

    def normalise():
        """bias/scale from the init model's answers to PPO prompts (sampled once per run)."""
        if config["norm_prompts"] == 0:
            return {"bias": 0.0, "scale": 1.0, "n": 0}
        if "answers" not in norm_cache:
            records = prepare_data.read_jsonl(os.path.join(folder, "prompts_ppo.jsonl"))
            pick = torch.randperm(len(records), generator=torch.Generator().manual_seed(config["seed"]))
            prompts = [records[i]["prompt"] for i in pick[:config["norm_prompts"]].tolist()]
            rng = torch.get_rng_state()  # building a GPT draws init weights: keep the training RNG untouched
            policy = model_from_checkpoint(init, device)
            torch.set_rng_state(rng)
            with ctx:
                answers = sample_sft_responses(policy, tokenizer, prompts, config["norm_max_new_tokens"],
                                               config["temperature"], config["seed"], config["eval_batch_size"])
            norm_cache["answers"] = (prompts, answers)
        prompts, answers = norm_cache["answers"]
        with ctx:
            raw = score_responses(model, tokenizer, prompts, [a for a, _ in answers], [e for _, e in answers],
                                  batch_size=config["eval_batch_size"])
        return {**reward_normalizer(raw), "n": len(prompts),
                "end_rate": sum(e for _, e in answers) / len(answers)}

    def save(it, metrics):
        norm = normalise()
        checkpoint = {
            "stage": STAGE,
            "model_args": dict(init["model_args"]),  # dropout was a training choice: later stages get the init's
            "model": clean_state_dict(model),
            "tokenizer": tokenizer.to_dict(),
            "config": dict(config, dtype=dtype),  # the precision that ran, not "auto"
            "parent": parent,
            "metrics": metrics,
            "reward_norm": {"bias": norm["bias"], "scale": norm["scale"]},
            "data": {"dataset": config["dataset"], "label_agreement": agreement},
            "resume": {"optimizer": optimizer.state_dict(), "iter": it, "rng": rng_state(),
                       "epoch": epoch, "position": position},
        }
        save_checkpoint(checkpoint, ckpt_path)
        return norm

    def evaluate_all(it):
        with ctx:
            val = evaluate(model, val_groups, config["eval_batch_size"], config["margin"])
            train = evaluate(model, train_probe, config["eval_batch_size"], config["margin"])
        metrics = {"iter": it, **{f"val_{k}": v for k, v in val.items()},
                   "train_loss_eval": train["loss"], "train_accuracy_eval": train["accuracy"],
                   "label_agreement": agreement}
        gold = "" if val["gold_accuracy"] is None else f", vs gold {val['gold_accuracy']:.3f}"
        print(f"eval {it}: val loss {val['loss']:.4f}, accuracy {val['accuracy']:.3f}{gold}, margin "
              f"{val['margin']:.3f}, reward {val['reward_mean']:.3f} +- {val['reward_std']:.3f} | train probe "
              f"accuracy {train['accuracy']:.3f}")
        append_jsonl(log_path, metrics)
        return metrics

    def plot():
        records = read_jsonl_log(log_path)
        plot_curves(records, [("train (per step)", "loss"), ("train", "train_loss_eval"), ("val", "val_loss"),
                              ("LM loss of the preferred sequences (per step)", "lm_loss")],
                    os.path.join(out_dir, "loss.png"), f"reward model losses ({config['config']})")
        plot_curves(records, [("train (per step)", "accuracy"), ("val vs noisy labels", "val_accuracy"),
                              ("val vs gold labels", "val_gold_accuracy"), ("labeller agreement", "label_agreement")],
                    os.path.join(out_dir, "accuracy.png"), f"reward model accuracy ({config['config']})")

    stopper = StopRequested()
    end_iter = config["max_iters"] if config["stop_at_iter"] <= 0 else min(config["stop_at_iter"], config["max_iters"])
    measured = {}  # an oversampled pair is the same group object K times: pack each once
    for g in train_groups:
        if id(g) not in measured:
            measured[id(g)] = row_length(g, config["share_prefix"])
    lengths = [measured[id(g)] for g in train_groups]
    batches = pair_batches(train_groups, config["batch_size"], config["seed"], epoch, config["sort_window"], lengths)
    metrics = evaluate_all(start_iter) if start_iter == 0 else {}
    t_start = time.time()
    t_train = 0.0  # seconds spent in training steps, for the ETA
    it = start_iter
    model.train()
    try:
        while it < end_iter:
            t0 = time.time()
            lr = cosine_lr(it, config["learning_rate"], config["warmup_iters"], config["max_iters"],
                           config["min_lr_ratio"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            if position >= len(batches):  # next epoch, in a new order
                epoch, position = epoch + 1, 0
                batches = pair_batches(train_groups, config["batch_size"], config["seed"], epoch,
                                       config["sort_window"], lengths)
            batch_groups = [train_groups[g] for g in batches[position]]
            position += 1
            with ctx:
                loss, pair_loss, lm_loss, diff = training_losses(model, batch_groups, config["share_prefix"],
                                                                 config["margin"], config["lm_coef"], device)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = clip_gradients(model, config["grad_clip"])
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at iteration {it}: stopping; the last good "
                                         f"checkpoint {ckpt_path} is kept. Try a lower --learning_rate")
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            t_train += time.time() - t0

            if it % config["log_interval"] == 0 or it == end_iter:
                accuracy = pair_accuracy(diff.detach().float())
                per_iter = t_train / (it - start_iter)
                record = {"iter": it, "loss": pair_loss.item(), "accuracy": accuracy, "lr": lr,
                          "grad_norm": float(grad_norm), "epoch": epoch, "time": time.time() - t_start}
                if lm_loss is not None:
                    record["lm_loss"] = lm_loss.item()
                lm_part = f" | lm loss {record['lm_loss']:.3f}" if "lm_loss" in record else ""
                print(f"iter {it:5d}/{end_iter} | loss {record['loss']:.4f}{lm_part} | acc {accuracy:.3f} | "
                      f"lr {lr:.2e} | grad {grad_norm:.2f} | {len(diff) / per_iter:.0f} pairs/s | epoch {epoch} | "
                      f"ETA {format_eta((end_iter - it) * per_iter)}", flush=True)
                append_jsonl(log_path, record)

            at_eval = it % config["eval_interval"] == 0 or it == end_iter
            if at_eval or stopper.requested:
                metrics = evaluate_all(it)
                model.train()
                norm = save(it, metrics)
                plot()
                if stopper.requested:
                    print(f"saved {ckpt_path} at iteration {it}; continue with --resume")
                    break
        if it == start_iter:  # nothing to train (resumed a finished run): still leave a complete checkpoint
            metrics = metrics or evaluate_all(it)
            norm = save(it, metrics)
            plot()
    finally:
        stopper.restore()
    print(f"reward normalisation from {norm['n']} SFT answers to PPO prompts: bias {norm['bias']:.4f}, "
          f"scale {norm['scale']:.4f}" + (f" (end-of-turn rate {norm['end_rate']:.2f})" if norm["n"] else ""))
    print(f"done: {it} iterations in {format_eta(time.time() - t_start)}; checkpoint {ckpt_path}")
    return {**metrics, "reward_norm": {"bias": norm["bias"], "scale": norm["scale"]}}


# -----------------------------------------------------------------------------
# Command line

class _ScoreParser(argparse.ArgumentParser):
    def error(self, message):  # one error line, through main(), instead of usage + exit 2
        raise ValueError(f"--score: {message}")


def score_main(argv):
    """`--score --ckpt PATH --prompt TEXT --response TEXT [--response TEXT ...] [--not-ended]`:
    print the normalised reward (and the raw one) of each response."""
    parser = _ScoreParser(prog="reward.py --score", description="score responses with a reward checkpoint")
    parser.add_argument("--ckpt", required=True, help="a reward checkpoint or its folder (out/C/rm)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--response", required=True, action="append", help="repeat to compare several")
    parser.add_argument("--not-ended", action="store_true", help="the responses were cut (no end-of-turn token)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    model, tokenizer, normalizer = load_reward_model(args.ckpt, pick_device(args.device))
    n = len(args.response)
    ended = [not args.not_ended] * n
    raw = score_responses(model, tokenizer, [args.prompt] * n, args.response, ended)
    normed = (raw - normalizer["bias"]) / normalizer["scale"]
    for response, r, z in zip(args.response, raw.tolist(), normed.tolist()):
        label = f"{response[:50]!r}: " if n > 1 else ""
        print(f"{label}reward {z:+.4f} (raw {r:+.4f}; bias {normalizer['bias']:+.4f}, scale {normalizer['scale']:.4f})")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if "--score" in argv:
            return score_main([a for a in argv if a != "--score"])
        config, flags = parse_config(argv, DEFAULTS, PRESETS, "reward.py", __doc__.strip().splitlines()[0])
        run(config, flags)
    except (ValueError, CheckpointError, FloatingPointError, prepare_data.DataError) as e:
        print(f"reward.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
