"""
ppo.py: RLHF with PPO. The policy learns to please the reward model while a KL
penalty keeps it close to the SFT model it started from.

    python ppo.py --config small                  # a 2-core laptop CPU, minutes
    python ppo.py --config small --kl_coef=0 --out_dir=out/small/ppo-nokl   # no leash: the RM gets gamed
    python ppo.py --config small --resume         # continue out/small/ppo/ckpt.pt

Reads out/<config>/sft/ckpt.pt (the policy's start and the frozen reference),
out/<config>/rm/ckpt.pt (the reward model, which the critic starts from too) and
data/<dataset>/prompts_ppo.jsonl, prompts_eval.jsonl; writes out/<config>/ppo/
{ckpt.pt, critic.pt, log.jsonl, reward.png, kl.png}. ckpt.pt is a GPT checkpoint
like sft's (stage "ppo"), so sample.py and eval.py load it the same way.

One iteration (Ziegler et al. 2019, InstructGPT 2022):
  1. rollout: sample responses to a batch of prompts (KV cache, temperature, no
     top-k/top-p so the log-probs are the policy's own), stop at <|end|> or at
     max_new_tokens; log-probs of the policy and of the reference, and the
     critic's values, recomputed by one padded forward pass each;
  2. reward: the reward model's normalised score of the whole response on its
     last token, minus beta * (log pi - log pi_ref) on every response token;
  3. advantages: GAE backwards over the response tokens, whitened over the batch;
  4. learn: a few epochs of shuffled minibatches, clipped policy surrogate and
     clipped value loss, one optimizer each, gradient clipping.

What to watch (log.jsonl, reward.png, kl.png): the RM score should rise while the
gold score of the simulated labeler (prepare_data.gold_score, never seen by the
policy) rises with it; rm_agreement is the share of pairs of answers to one
prompt that the RM orders as the labeler does (0.5 = chance). When the RM score
keeps rising but gold falls, the policy is over-optimising the reward model:
more KL (kl_coef) or fewer iterations. --reward_source=gold trains on the
labeler's own score instead: what PPO reaches when the reward is right.

Indexing convention: the padded sequences are ids (B, T) = prompt, response,
padding. Every per-token tensor is (B, T-1) and column t belongs to token t+1,
which the model predicts from tokens <= t: its log-prob, the critic's value of
the state before it, its reward, its advantage and its mask (1 on response
tokens, including the <|end|> token, 0 on the prompt and after the stop).
"""

import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import bpe
import prepare_data
from train import (append_jsonl, clip_gradients, configure_optimizer, format_eta, parse_config, pick_device,
                   pick_dtype, plot_curves, read_jsonl_log, rng_state, set_rng_state, StopRequested,
                   training_precision, truncate_log)
from model import (CheckpointError, clean_state_dict, generate_responses, load_checkpoint, model_from_checkpoint,
                   parent_record, save_checkpoint, tokenizer_from_checkpoint)
from reward import pad_right, scalar_model_from_checkpoint, score_sequences, with_reward_token

STAGE = "ppo"

# -----------------------------------------------------------------------------
# Configuration: defaults, then a preset (--config NAME), then --key=value overrides.

DEFAULTS = dict(
    config="default",
    # inputs and outputs
    dataset="tinyworld",         # prompts from data/<dataset>/prompts_ppo.jsonl, prompts_eval.jsonl
    data_dir="data",
    init_dir="",                 # the SFT checkpoint (policy start, reference); "" = out/<config>/sft
    reward_dir="",               # the reward model checkpoint; "" = out/<config>/rm
    out_dir="",                  # "" = out/<config>/ppo
    # rollouts
    batch_size=16,               # prompts per iteration
    samples_per_prompt=4,        # responses sampled per prompt (contrast between answers to one prompt)
    max_new_tokens=48,           # a response is cut here (and counts as not ended)
    temperature=0.7,             # sampling temperature; log-probs use the same scaling
    gen_batch_size=64,           # rows generated together (equal-length prompts only)
    # reward
    kl_coef=0.05,                # beta: every response token pays beta * (log pi - log pi_ref)
    target_kl=0.0,               # > 0: adapt beta toward this KL per response (Ziegler et al.)
    kl_horizon=10000,            # responses over which an adaptive beta moves by at most ~20%
    kl_estimator="k1",           # k1: log pi - log pi_ref; k3: (r - 1) - log r with r = pi_ref / pi
    no_end_penalty=1.0,          # subtracted from the score of a response cut before <|end|>
    score_clip=0.0,              # clip the normalised score to [-c, c]; 0 disables
    reward_source="rm",          # rm | gold: "gold" rewards the simulated labeler's own score (an
                                 # oracle experiment: what PPO reaches when the reward is right)
    # PPO
    ppo_epochs=4,                # passes over each rollout batch
    minibatch_size=16,           # responses per optimizer step
    clip_range=0.2,              # policy ratio clipped to [1 - c, 1 + c]
    value_clip=0.2,              # values move at most this far from the rollout's; 0 disables
    gamma=1.0, lam=0.95,         # GAE discount and lambda
    learning_rate=3e-5,          # policy
    critic_lr=1e-4,              # critic
    weight_decay=0.0,
    beta1=0.9, beta2=0.95,
    grad_clip=1.0,               # clip each model's global gradient norm; 0 disables
    entropy_coef=0.0,            # bonus for the policy's entropy
    max_iters=100,               # rollout batches
    # evaluation, logging, saving
    eval_interval=0,             # greedy held-out evaluation every this many iterations (0: start and end only)
    eval_prompts=200,            # held-out prompts used (0 = all)
    save_interval=10,
    log_interval=1,
    stop_at_iter=0,              # stop (and save) after this many iterations; 0 = run to max_iters
    # system
    device="auto",               # auto | cpu | cuda | mps
    dtype="auto",                # auto | float32 | bfloat16 | float16 (autocast for the forward passes)
    seed=1337,
)

PRESETS = {
    # seconds, for tests (any tiny sft/rm checkpoint)
    "tiny": dict(batch_size=8, samples_per_prompt=2, max_new_tokens=12, temperature=1.0, ppo_epochs=2,
                 minibatch_size=8, learning_rate=1e-3, critic_lr=1e-3, max_iters=4, eval_prompts=8, save_interval=2,
                 log_interval=1),
    # a 2-core laptop CPU, after reward.py --config small
    "small": dict(batch_size=16, samples_per_prompt=4, max_new_tokens=40, temperature=0.7, ppo_epochs=4,
                  minibatch_size=16, learning_rate=3e-5, critic_lr=1e-4, kl_coef=0.1, max_iters=60,
                  eval_interval=30, eval_prompts=200, save_interval=15),
    # GPT-2 124M class on one GPU
    "gpt2": dict(batch_size=128, samples_per_prompt=4, max_new_tokens=128, ppo_epochs=4, minibatch_size=64,
                 gen_batch_size=512, learning_rate=1e-5, critic_lr=3e-5, kl_coef=0.05, max_iters=300,
                 eval_interval=50, eval_prompts=0, save_interval=25),
}


# -----------------------------------------------------------------------------
# Log-probs, entropy, masked statistics

def token_logprobs(logits, ids, temperature):
    """logits (B, T, V) of a forward pass over ids (B, T) -> (B, T-1): the
    log-prob of each next token ids[:, t+1] under softmax(logits[:, t] / temperature),
    the distribution the tokens were sampled from."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def entropy_from_logits(logits):
    """logits (..., V) -> entropy (...) of softmax(logits), in nats:
    H = logsumexp(z) - sum_i p_i z_i."""
    logits = logits.float()
    p = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def sequence_logprobs(model, ids, temperature, with_entropy=False):
    """One forward pass over ids (B, T) -> log-probs (B, T-1) of the next tokens
    (and their entropies (B, T-1) with with_entropy). The same convention for
    rollout, reference and training, so that the first PPO ratio is exactly 1.
    The model should be in eval mode: dropout off."""
    logits, _ = model(ids)
    logp = token_logprobs(logits, ids, temperature)
    if with_entropy:
        return logp, entropy_from_logits(logits[:, :-1].float() / temperature)
    return logp


def masked_mean(x, mask):
    """Mean of x over the entries where mask is 1 (x and mask of the same shape)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x, mask):
    """Variance (the biased one, divided by n) of x over the entries where mask is 1."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the masked-in entries; 0 elsewhere. shift_mean=False
    only rescales: the mean is put back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over the masked-in entries: 1 for
    a perfect critic, 0 for one that predicts the mean, negative for worse."""
    var_returns = masked_var(returns, mask)
    return float(1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8))


# -----------------------------------------------------------------------------
# Rewards, advantages, losses

def kl_estimate(logp, ref_logp, estimator="k1"):
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of tokens sampled
    from pi. Both are unbiased: E_pi[estimate] = KL exactly.
    k1: log pi - log pi_ref (can be negative on single tokens);
    k3: (r - 1) - log r with r = pi_ref / pi (never negative, lower variance)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator {estimator!r} is not one of k1, k3")


def kl_penalized_rewards(score, logp, ref_logp, mask, beta, ended=None, no_end_penalty=0.0, score_clip=0.0,
                         estimator="k1"):
    """Per-token rewards (B, T-1): -beta * KL estimate on every response token,
    plus the sequence's score (B,) on its last response token. The score is
    first clipped to [-score_clip, score_clip] (if > 0), then a response that
    never produced <|end|> (ended False) loses no_end_penalty."""
    mask = mask.float()
    score = score.float()
    if score_clip > 0:
        score = score.clamp(-score_clip, score_clip)
    if ended is not None:
        score = score - no_end_penalty * (~ended.bool()).float()
    rewards = -beta * kl_estimate(logp, ref_logp, estimator) * mask
    # the last response token: the highest column where the mask is 1
    columns = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = (columns * mask).argmax(dim=1)
    rewards[torch.arange(mask.size(0)), last] += score
    return rewards


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation backwards over each row's response.
    rewards, values, mask (B, T) -> advantages, returns (B, T), 0 outside the mask.
        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
    with V and A = 0 after the last response token (the episode has ended). The
    masked-in tokens of a row must be contiguous. returns = A + V: the critic's
    targets, computed from the advantages before any whitening."""
    mask = mask.float()
    values = values.float() * mask
    rewards = rewards.float() * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(rewards.size(0), device=rewards.device)
    next_value = torch.zeros(rewards.size(0), device=rewards.device)
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logp, old_logp, advantages, mask, clip):
    """PPO's clipped surrogate. ratio = pi / pi_old per token;
        loss = mean over response tokens of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip))
    Returns (loss, clip_fraction, approx_kl): the share of tokens where the
    clipped term won (no gradient there), and the k3 estimate of KL(pi_old || pi)."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, float(clip_fraction), float(approx_kl)


def value_loss(values, old_values, returns, mask, clip):
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_clipped - R)^2), where
    V_clipped stays within clip of the rollout's values (clip 0: plain squared error)."""
    loss = (values - returns) ** 2
    if clip > 0:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


class AdaptiveKLController:
    """beta, moved toward a target KL per response after each batch (Ziegler et
    al. 2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon.
    target 0 keeps beta fixed."""

    def __init__(self, init_beta, target=0.0, horizon=10000):
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl, n_steps):
        if self.target <= 0:
            return self.value
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self):
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state):
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), state["horizon"]


# -----------------------------------------------------------------------------
# Rollouts

def prompt_indices(n_prompts, batch_size, it, seed):
    """The prompt indices of iteration `it`: the prompts are walked through in a
    fresh random order each epoch (order of epoch e drawn from seed + e), so the
    position in the data follows from the iteration alone (exact resume)."""
    out = []
    for k in range(it * batch_size, (it + 1) * batch_size):
        epoch, position = divmod(k, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(order[position]))
    return out


def build_sequences(prompts, responses, pad_value=0):
    """prompts, responses: lists of ids (a response includes its <|end|> when it
    ended). -> ids (B, T) right-padded prompt + response, and the response mask
    (B, T-1): column t is 1 when token t+1 belongs to the response."""
    ids, _ = pad_right([list(p) + list(r) for p, r in zip(prompts, responses)], pad_value)
    mask = torch.zeros(ids.size(0), ids.size(1) - 1)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        mask[b, len(p) - 1:len(p) - 1 + len(r)] = 1.0
    return ids, mask


def score_responses(reward_model, prompts, responses, reward_id, normalizer=None, batch_size=64):
    """The reward model's (normalised) score of each response (B,), read at the
    <|reward|> token appended after it, as in reward training."""
    block = reward_model.config.block_size
    seqs = [with_reward_token(p, r, reward_id, block) for p, r in zip(prompts, responses)]
    return score_sequences(reward_model, seqs, batch_size, normalizer)


def forward_in_chunks(fn, ids, chunk):
    """fn over row chunks of ids (B, T) -> results concatenated along rows."""
    outs = [fn(ids[i:i + chunk]) for i in range(0, ids.size(0), chunk)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


@torch.no_grad()
def rollout(policy, reference, critic, reward_model, prompts, config, special, normalizer=None, seed=None,
            ctx=None):
    """Sample a response to each prompt (lists of ids) and compute what PPO needs.
    special: {"end": <|end|> id, "reward": <|reward|> id}. Returns a dict:
        ids (B, T), mask (B, T-1), logp / ref_logp / entropy / values (B, T-1)
        (0 outside the mask), score (B,) normalised RM score, ended (B,) bool,
        responses [ids without <|end|>].
    Every forward pass runs with dropout off on the same padded batch."""
    ctx = ctx if ctx is not None else nullcontext()
    device = next(policy.parameters()).device
    block = policy.config.block_size
    max_new = max(1, min(config["max_new_tokens"], block - 1))
    prompts = [list(p)[-(block - max_new):] for p in prompts]  # as generate_responses keeps them
    with ctx:
        sampled = generate_responses(policy, prompts, max_new, special["end"], config["temperature"], seed,
                                     config["gen_batch_size"])
    responses = [r for r, _ in sampled]
    ended = torch.tensor([e for _, e in sampled], dtype=torch.bool)
    with_end = [r + [special["end"]] if e else r for r, e in sampled]
    ids, mask = build_sequences(prompts, with_end, pad_value=special["end"])
    ids, mask = ids.to(device), mask.to(device)
    for m in (policy, reference, critic, reward_model):
        m.eval()
    temperature, chunk = config["temperature"], config["minibatch_size"]
    with ctx:
        logp, entropy = forward_in_chunks(lambda x: sequence_logprobs(policy, x, temperature, True), ids, chunk)
        ref_logp = forward_in_chunks(lambda x: sequence_logprobs(reference, x, temperature), ids, chunk)
        values = forward_in_chunks(lambda x: critic(x)[:, :-1].float(), ids, chunk)
        score = score_responses(reward_model, prompts, with_end, special["reward"], normalizer, chunk)
    return {"ids": ids, "mask": mask, "logp": logp * mask, "ref_logp": ref_logp * mask,
            "entropy": entropy * mask, "values": values * mask, "score": score.to(device),
            "ended": ended.to(device), "prompts": prompts, "responses": responses}


# -----------------------------------------------------------------------------
# One PPO update on a rollout batch

def ppo_update(policy, critic, policy_optimizer, critic_optimizer, batch, advantages, returns, config, generator,
               ctx=None):
    """ppo_epochs passes of shuffled minibatches over the rollout batch: a
    clipped-surrogate step of the policy and a clipped-value step of the critic
    per minibatch. Returns the mean statistics, and first_ratio_error: the
    largest |ratio - 1| on the first minibatch (0: rollout and training agree)."""
    ctx = ctx if ctx is not None else nullcontext()
    n, size = batch["ids"].size(0), config["minibatch_size"]
    sums, steps, first_ratio_error = {}, 0, None
    for _ in range(config["ppo_epochs"]):
        order = torch.randperm(n, generator=generator).to(batch["ids"].device)
        for start in range(0, n, size):
            idx = order[start:start + size]
            ids, mask = batch["ids"][idx], batch["mask"][idx]
            with ctx:
                logp, entropy = sequence_logprobs(policy, ids, config["temperature"], with_entropy=True)
            if first_ratio_error is None:
                first_ratio_error = float(((logp.detach() - batch["logp"][idx]) * mask).abs().max().exp() - 1.0)
            pg_loss, clip_fraction, approx_kl = policy_loss(logp, batch["logp"][idx], advantages[idx], mask,
                                                            config["clip_range"])
            mean_entropy = masked_mean(entropy, mask)
            loss = pg_loss - config["entropy_coef"] * mean_entropy
            policy_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(policy, config["grad_clip"])
            policy_optimizer.step()

            with ctx:
                values = critic(ids)[:, :-1].float()
            v_loss = value_loss(values, batch["values"][idx], returns[idx], mask, config["value_clip"])
            critic_optimizer.zero_grad(set_to_none=True)
            v_loss.backward()
            clip_gradients(critic, config["grad_clip"])
            critic_optimizer.step()

            step = {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "clip_frac": clip_fraction,
                    "approx_kl": approx_kl}
            for k, v in step.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
    stats = {k: v / steps for k, v in sums.items()}
    stats["first_ratio_error"] = first_ratio_error
    return stats


# -----------------------------------------------------------------------------
# Held-out evaluation

@torch.no_grad()
def evaluate(policy, reward_model, tokenizer, records, config, normalizer=None, ctx=None):
    """Greedy answers to held-out prompt records, graded by the simulated labeler
    (prepare_data.grade_answers) and scored by the reward model. Returns the
    grade dict plus "rm" (mean normalised score), and per-prompt "golds" and "rms"."""
    ctx = ctx if ctx is not None else nullcontext()
    end_id = tokenizer.special_ids[bpe.END_OF_TURN]
    block = policy.config.block_size
    max_new = max(1, min(config["max_new_tokens"], block - 1))
    prompts = [tokenizer.encode_chat(r["prompt"])[0][-(block - max_new):] for r in records]
    with ctx:
        answers = generate_responses(policy, prompts, max_new, end_id, temperature=0.0,
                                     batch_size=config["gen_batch_size"])
        with_end = [r + [end_id] if e else r for r, e in answers]
        rms = score_responses(reward_model, prompts, with_end, tokenizer.special_ids[bpe.REWARD], normalizer,
                              config["minibatch_size"])
    texts = [(tokenizer.decode(r), e) for r, e in answers]
    out = prepare_data.grade_answers(records, texts)
    out["rm"] = float(rms.mean()) if len(records) else 0.0
    out["golds"] = [prepare_data.gold_score(rec, t, e) for rec, (t, e) in zip(records, texts)]
    out["rms"] = rms.tolist()
    return out


def pairwise_agreement(scores, golds, group_size, min_gap=0.5):
    """How well the reward model ranks the policy's own samples: among pairs of
    responses to the same prompt (consecutive groups of group_size) whose gold
    scores differ by more than min_gap, the share the reward model orders as the
    gold labeler does. 0.5 is chance; None when no pair qualifies."""
    agree = total = 0
    for start in range(0, len(scores), group_size):
        for i in range(start, start + group_size):
            for j in range(i + 1, start + group_size):
                if abs(golds[i] - golds[j]) > min_gap:
                    total += 1
                    agree += (scores[i] > scores[j]) == (golds[i] > golds[j])
    return agree / total if total else None


def win_rate(golds, base_golds):
    """Share of prompts where golds beats base_golds (a tie counts half)."""
    if not golds:
        return 0.0
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(golds, base_golds))
    return wins / len(golds)


# -----------------------------------------------------------------------------
# Inputs

def load_prompts(config):
    """(prompts_ppo records, prompts_eval records) of the dataset."""
    folder = prepare_data.ensure_prepared(config["dataset"], config["data_dir"])  # builds tinyworld if missing
    train_records = prepare_data.read_jsonl(os.path.join(folder, "prompts_ppo.jsonl"))
    eval_records = prepare_data.read_jsonl(os.path.join(folder, "prompts_eval.jsonl"))
    for name, records in (("prompts_ppo.jsonl", train_records), ("prompts_eval.jsonl", eval_records)):
        path = os.path.join(folder, name)
        if not records:
            raise prepare_data.DataError(f"{path} has no records: rebuild it with `python prepare_data.py "
                                         f"--dataset {config['dataset']} --force`")
        for i, r in enumerate(records):
            if not isinstance(r.get("prompt"), str) or not r["prompt"]:
                raise prepare_data.DataError(f"{path} line {i + 1} has no 'prompt' text")
    if config["eval_prompts"] > 0:
        eval_records = eval_records[:config["eval_prompts"]]
    return train_records, eval_records


def critic_from_reward_model(rm_ckpt, device="cpu"):
    """The critic's start: the reward model, with its normaliser folded into the
    head, so that its output at the <|reward|> position is the normalised score
    and every output is on the scale of the rewards it will predict."""
    critic = scalar_model_from_checkpoint(rm_ckpt, device)
    norm = rm_ckpt.get("reward_norm")
    if norm is not None:
        with torch.no_grad():
            critic.head.weight.div_(norm["scale"])
            critic.head.bias.sub_(norm["bias"]).div_(norm["scale"])
    return critic


def check_config(config):
    """Values that would only fail later, checked before any work."""
    if config["temperature"] <= 0:
        raise ValueError(f"temperature={config['temperature']} must be > 0: PPO needs the sampling "
                         f"distribution's log-probs (greedy decoding has none)")
    for key in ("batch_size", "samples_per_prompt", "max_new_tokens", "ppo_epochs", "minibatch_size",
                "gen_batch_size", "save_interval", "log_interval"):
        if config[key] < 1:
            raise ValueError(f"{key}={config[key]} must be at least 1")
    if config["kl_estimator"] not in ("k1", "k3"):
        raise ValueError(f"kl_estimator={config['kl_estimator']!r} is not one of k1, k3")
    if config["reward_source"] not in ("rm", "gold"):
        raise ValueError(f"reward_source={config['reward_source']!r} is not one of rm, gold")
    if not 0 < config["clip_range"] < 1:
        raise ValueError(f"clip_range={config['clip_range']} must be between 0 and 1")


# -----------------------------------------------------------------------------
# The run

def resolve_dirs(config):
    base = os.path.join("out", config["config"])
    return (config["init_dir"] or os.path.join(base, "sft"), config["reward_dir"] or os.path.join(base, "rm"),
            config["out_dir"] or os.path.join(base, STAGE))


def run(config, flags=()):
    """Train the policy with PPO; returns the metrics of the final evaluation."""
    check_config(config)
    device = pick_device(config["device"])
    device_type = device.split(":")[0]
    pick_dtype(config["dtype"], device_type)  # a bad name fails before any work
    init_dir, reward_dir, out_dir = resolve_dirs(config)
    ckpt_path, critic_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "critic.pt")
    log_path = os.path.join(out_dir, "log.jsonl")

    resume = critic_resume = None
    if "resume" in flags:
        resume = load_checkpoint(ckpt_path, stages={STAGE})
        critic_resume = load_checkpoint(critic_path, stages={"critic"})
        if critic_resume["resume"]["iter"] != resume["resume"]["iter"]:
            raise CheckpointError(f"{critic_path} is at iteration {critic_resume['resume']['iter']} but {ckpt_path} "
                                  f"at {resume['resume']['iter']}: they were not saved together; start over "
                                  f"with --overwrite")
        # the run continues with its own config; only run-length and system keys may change
        for key in DEFAULTS:
            if key not in ("max_iters", "stop_at_iter", "device", "dtype", "eval_interval", "save_interval",
                           "log_interval", "out_dir", "init_dir", "reward_dir", "data_dir"):
                config[key] = resume["config"].get(key, config[key])
    elif os.path.exists(ckpt_path) and "overwrite" not in flags:
        raise ValueError(f"{ckpt_path} already exists: pass --resume to continue it, "
                         f"or --overwrite to start over (it will be replaced)")

    sft_ckpt = load_checkpoint(init_dir, stages={"sft"})
    rm_ckpt = load_checkpoint(reward_dir, stages={"rm"})
    sft_path, rm_path = (os.path.join(d, "ckpt.pt") if os.path.isdir(d) else d for d in (init_dir, reward_dir))
    sft_record, rm_record = parent_record(sft_path), parent_record(rm_path)
    if resume is not None and (resume["parent"]["sha256"] != sft_record["sha256"]
                               or resume["reward_parent"]["sha256"] != rm_record["sha256"]):
        raise CheckpointError(f"{sft_path} or {rm_path} changed since {ckpt_path} was started from them: "
                              f"start over with --overwrite")
    if "reward_norm" not in rm_ckpt:
        raise CheckpointError(f"reward checkpoint {rm_path} has no 'reward_norm': rerun reward.py to write it")
    tokenizer = tokenizer_from_checkpoint(sft_ckpt)
    if rm_ckpt["model_args"]["vocab_size"] != sft_ckpt["model_args"]["vocab_size"]:
        raise CheckpointError(f"{rm_path} (vocab {rm_ckpt['model_args']['vocab_size']}) and {sft_path} (vocab "
                              f"{sft_ckpt['model_args']['vocab_size']}) do not share a tokenizer")
    special = {"end": tokenizer.special_ids[bpe.END_OF_TURN], "reward": tokenizer.special_ids[bpe.REWARD]}
    normalizer = rm_ckpt["reward_norm"]
    train_records, eval_records = load_prompts(config)

    torch.manual_seed(config["seed"])
    policy = model_from_checkpoint(sft_ckpt, device).eval()     # eval mode throughout: dropout off
    reference = model_from_checkpoint(sft_ckpt, device).eval().requires_grad_(False)
    reward_model = scalar_model_from_checkpoint(rm_ckpt, device).eval().requires_grad_(False)
    critic = critic_from_reward_model(rm_ckpt, device).eval()

    def sample_and_backward(autocast, prompts):
        """A little of both halves of an iteration: sampling, then a forward and backward pass."""
        with autocast:
            sampled = generate_responses(policy, prompts, 8, special["end"], config["temperature"], config["seed"])
            ids, _ = build_sequences(prompts, [r for r, _ in sampled], pad_value=special["end"])
            loss = sequence_logprobs(policy, ids.to(device), config["temperature"]).sum()
        loss.backward()

    # precision, measured on a few prompts (before the optimizers exist: no state to disturb)
    probe = [tokenizer.encode_chat(r["prompt"])[0][-(policy.config.block_size - 8):] for r in train_records[:8]]
    dtype, dtype_why, ctx, _ = training_precision(config["dtype"], device_type, policy,
                                                  lambda c: sample_and_backward(c, probe))
    policy_optimizer = configure_optimizer(policy, config["learning_rate"], config["weight_decay"],
                                           (config["beta1"], config["beta2"]), device_type)
    critic_optimizer = configure_optimizer(critic, config["critic_lr"], config["weight_decay"],
                                           (config["beta1"], config["beta2"]), device_type)
    kl_controller = AdaptiveKLController(config["kl_coef"], config["target_kl"], config["kl_horizon"])
    start_iter, sft_eval = 0, None
    if resume is not None:
        policy.load_state_dict(resume["model"])
        critic.load_state_dict(critic_resume["model"])
        policy_optimizer.load_state_dict(resume["resume"]["optimizer"])
        critic_optimizer.load_state_dict(critic_resume["resume"]["optimizer"])
        kl_controller.load_state_dict(resume["resume"]["kl_controller"])
        set_rng_state(resume["resume"]["rng"])
        start_iter, sft_eval = resume["resume"]["iter"], resume["resume"]["sft_eval"]
        truncate_log(log_path, start_iter)
        print(f"resuming {ckpt_path} at iteration {start_iter}")
    else:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(log_path):
            os.remove(log_path)

    n_responses = config["batch_size"] * config["samples_per_prompt"]
    print(f"{STAGE}: policy {policy.num_params() / 1e6:.2f}M parameters from {sft_path}, reward model "
          f"{rm_path}; {len(train_records)} prompts, {n_responses} responses/iter, {config['ppo_epochs']} epochs "
          f"of minibatch {config['minibatch_size']}, beta {kl_controller.value}, device {device}, "
          f"{dtype} ({dtype_why})")
    append_jsonl(log_path, {"iter": start_iter, "dtype": dtype, "dtype_why": dtype_why})

    def run_eval(it):
        nonlocal sft_eval
        result = evaluate(policy, reward_model, tokenizer, eval_records, config, normalizer, ctx)
        if sft_eval is None:  # the first evaluation is of the SFT model itself
            sft_eval = {"golds": result["golds"], "rms": result["rms"], "gold": result["gold"], "rm": result["rm"],
                        "accuracy": result["accuracy"]}
        record = {"iter": it, "eval_gold": result["gold"], "eval_rm": result["rm"],
                  "eval_accuracy": result["accuracy"], "eval_end_rate": result["end_rate"],
                  "eval_words": result["words"], "win_rate": win_rate(result["golds"], sft_eval["golds"]),
                  "sft_gold": sft_eval["gold"], "sft_rm": sft_eval["rm"], "sft_accuracy": sft_eval["accuracy"]}
        append_jsonl(log_path, record)
        print(f"eval {it}: gold {record['eval_gold']:.3f} (SFT {sft_eval['gold']:.3f}), accuracy "
              f"{record['eval_accuracy']:.3f} (SFT {sft_eval['accuracy']:.3f}), RM {record['eval_rm']:.3f} "
              f"(SFT {sft_eval['rm']:.3f}), win rate vs SFT {record['win_rate']:.3f}, end rate "
              f"{record['eval_end_rate']:.2f}, {record['eval_words']:.1f} words")
        return record

    def save(it, metrics):
        base = {"tokenizer": tokenizer.to_dict(), "config": dict(config, dtype=dtype), "metrics": metrics}
        critic_ckpt = dict(base, stage="critic", model_args=dict(rm_ckpt["model_args"]),
                           model=clean_state_dict(critic), parent=rm_record,
                           resume={"optimizer": critic_optimizer.state_dict(), "iter": it})
        save_checkpoint(critic_ckpt, critic_path)   # the critic first: ckpt.pt names the iteration
        ckpt = dict(base, stage=STAGE, model_args=dict(sft_ckpt["model_args"]), model=clean_state_dict(policy),
                    parent=sft_record, reward_parent=rm_record,
                    resume={"optimizer": policy_optimizer.state_dict(), "iter": it, "rng": rng_state(),
                            "kl_controller": kl_controller.state_dict(), "sft_eval": sft_eval,
                            "prompt_position": it * config["batch_size"]})
        save_checkpoint(ckpt, ckpt_path)

    def plot():
        records = read_jsonl_log(log_path)
        plot_curves(records, [("RM score (sampled)", "rm_score"), ("gold (sampled)", "gold"),
                              ("RM score (held-out, greedy)", "eval_rm"), ("gold (held-out, greedy)", "eval_gold")],
                    os.path.join(out_dir, "reward.png"), f"PPO reward and gold score ({config['config']})")
        plot_curves(records, [("KL(policy || SFT) per response", "kl")], os.path.join(out_dir, "kl.png"),
                    f"PPO KL to the SFT model ({config['config']}, beta {config['kl_coef']})")

    end_iter = config["max_iters"] if config["stop_at_iter"] <= 0 else min(config["stop_at_iter"], config["max_iters"])
    metrics = {}
    if resume is None:
        metrics = run_eval(0)
    stopper = StopRequested()
    t_start = time.time()
    it = start_iter
    try:
        while it < end_iter:
            t0 = time.time()
            # 1. rollout: samples_per_prompt responses to each prompt of this iteration's batch
            chosen = [train_records[i] for i in prompt_indices(len(train_records), config["batch_size"], it,
                                                               config["seed"])]
            chosen = [r for r in chosen for _ in range(config["samples_per_prompt"])]
            prompts = [tokenizer.encode_chat(r["prompt"])[0] for r in chosen]
            batch = rollout(policy, reference, critic, reward_model, prompts, config, special, normalizer,
                            seed=config["seed"] * 1_000_003 + it * 10_007, ctx=ctx)
            mask = batch["mask"]
            texts = [tokenizer.decode(r) for r in batch["responses"]]
            golds = torch.tensor([prepare_data.gold_score(rec, t, bool(e))
                                  for rec, t, e in zip(chosen, texts, batch["ended"])])

            # 2. rewards: RM score on the last token, KL penalty on every token
            score = batch["score"] if config["reward_source"] == "rm" else golds.to(mask.device)
            rewards = kl_penalized_rewards(score, batch["logp"], batch["ref_logp"], mask,
                                           kl_controller.value, batch["ended"], config["no_end_penalty"],
                                           config["score_clip"], config["kl_estimator"])
            # 3. advantages over the response tokens; returns before whitening
            advantages, returns = compute_gae(rewards, batch["values"], mask, config["gamma"], config["lam"])
            advantages = masked_whiten(advantages, mask)

            # 4. learn
            generator = torch.Generator().manual_seed(config["seed"] + 7919 * (it + 1))
            stats = ppo_update(policy, critic, policy_optimizer, critic_optimizer, batch, advantages, returns,
                               config, generator, ctx)

            kl_per_response = (kl_estimate(batch["logp"], batch["ref_logp"], config["kl_estimator"]) * mask).sum(1)
            beta = kl_controller.value
            kl_controller.update(float(kl_per_response.mean()), n_responses)
            it += 1

            record = {"iter": it, "rm_score": float(batch["score"].mean()), "gold": float(golds.mean()),
                      "kl": float(kl_per_response.mean()), "beta": beta,
                      "reward": float((rewards * mask).sum(1).mean()),
                      "entropy": float(masked_mean(batch["entropy"], mask)),
                      "explained_var": explained_variance(batch["values"], returns, mask),
                      "resp_len": float(mask.sum(1).mean()), "end_rate": float(batch["ended"].float().mean()),
                      "rm_agreement": pairwise_agreement(batch["score"].tolist(), golds.tolist(),
                                                         config["samples_per_prompt"]),
                      **stats, "time": time.time() - t_start}
            append_jsonl(log_path, record)
            if it % config["log_interval"] == 0 or it == end_iter:
                seconds = time.time() - t0
                eta = (time.time() - t_start) / (it - start_iter) * (end_iter - it)
                agreement = "" if record["rm_agreement"] is None else f" | agree {record['rm_agreement']:.2f}"
                print(f"iter {it:4d}/{end_iter} | rm {record['rm_score']:+.3f} | gold {record['gold']:+.3f} | "
                      f"kl {record['kl']:.3f} | beta {beta:.3f} | ent {record['entropy']:.2f} | clip "
                      f"{record['clip_frac']:.3f} | vloss {record['value_loss']:.3f} | ev "
                      f"{record['explained_var']:+.2f} | len {record['resp_len']:.1f} | end "
                      f"{record['end_rate']:.2f}{agreement} | {seconds:.1f}s | ETA {format_eta(eta)}", flush=True)

            at_eval = (config["eval_interval"] > 0 and it % config["eval_interval"] == 0) or it == end_iter
            if at_eval:
                metrics = run_eval(it)
            if at_eval or stopper.requested or it % config["save_interval"] == 0:
                metrics = dict(metrics, iter=it, kl=record["kl"], rm_score=record["rm_score"], gold=record["gold"])
                save(it, metrics)
                plot()
            if stopper.requested:
                print(f"saved {ckpt_path} at iteration {it}; continue with --resume")
                break
    finally:
        stopper.restore()
    if it == end_iter and start_iter == end_iter:
        print(f"{ckpt_path} is already at iteration {it}: raise --max_iters to continue")
    print(f"done: {it} iterations in {format_eta(time.time() - t_start)}; checkpoint {ckpt_path}")
    return metrics


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, flags = parse_config(argv, DEFAULTS, PRESETS, "ppo.py", __doc__.strip().splitlines()[0])
        check_config(config)
        run(config, flags)
    except (ValueError, CheckpointError, FloatingPointError, prepare_data.DataError) as e:
        print(f"ppo.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
