"""
ppo.py: RLHF with PPO, or GRPO. The policy learns to please the reward model (or a reward a program
verifies) while a KL penalty keeps it close to the SFT model it started from.

    python ppo.py --config small                  # a 2-core laptop CPU, minutes
    python ppo.py --config small --kl_coef=0 --out_dir=out/small/ppo-nokl   # no leash: the RM gets gamed
    python ppo.py --config small --reward_source=gold --out_dir=out/small/ppo-gold   # the oracle reward
    python ppo.py --config small --algo=grpo --reward_source=gold --out_dir=out/small/grpo   # DeepSeek's recipe
    python ppo.py --config small --resume         # continue out/small/ppo/ckpt.pt

Reads out/<config>/sft/ckpt.pt (the policy's start and the frozen reference), out/<config>/rm/ckpt.pt
(the reward model, and the critic's start) and data/<dataset>/prompts_{ppo,eval}.jsonl; writes
out/<config>/ppo/ ckpt.pt (a GPT checkpoint, stage "ppo", with the critic: one file, saved whole), log.jsonl,
reward.png, kl.png.

One iteration (Ziegler et al. 2019, InstructGPT 2022; steps 3-6 of run()):
  1. rollout: sample responses to a batch of prompts (temperature, no top-k/top-p, so the log-probs are
     the policy's own) up to <|end|> or max_new_tokens; the policy's and the reference's log-probs and the
     critic's values, recomputed by one padded forward pass each;
  2. reward: the RM's normalised score of the whole response on its last token, minus
     beta * (log pi - log pi_ref) on every response token;
  3. advantages: GAE backwards over the response tokens, whitened over the batch;
  4. learn: epochs of shuffled minibatches, clipped policy surrogate and clipped value loss.
GRPO (Shao et al. 2024, DeepSeekMath) keeps the rollout and the clipped surrogate but drops the critic:
samples_per_prompt responses to each prompt form a group, and each response's advantage is its reward
against its group's, (r - mean) / std, on every one of its tokens; the KL to the reference is a loss
term (k3 estimate, kl_loss_coef) rather than a penalty inside the reward. Its point is a reward a
program can check (reward_source=gold: the labeler's correctness and style rules).

What to watch (log.jsonl, reward.png, kl.png): the RM score should rise and the simulated labeler's gold
score (tinyworld.gold_score, never seen by the policy) with it; rm_agreement is the share of pairs of
answers to one prompt that the RM orders as the labeler does (0.5 = chance). RM rising while gold falls
is over-optimisation of the reward model: more KL (kl_coef) or fewer iterations. reward_source=gold
shows what PPO reaches when the reward is right.

Indexing: the padded sequences are ids (B, T) = prompt, response, padding. Every per-token tensor is
(B, T-1) and column t belongs to token t+1, predicted from tokens <= t: its log-prob, the critic's value
of the state before it, its reward, advantage and mask (1 on response tokens, <|end|> included).
"""

import os
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import bpe
import tinyworld
import prepare_data
from model import (checkpoint_file, CheckpointError, clean_state_dict, generate_responses, load_checkpoint,
                   load_weights, model_from_checkpoint, nonfinite, parent_record, tokenizer_from_checkpoint)
from train import (append_jsonl, AT_LEAST, check_least, clip_gradients, configure_optimizer, end_run, open_log,
                   plot_curves, Progress, read_jsonl_log, rng_state, save_run, set_rng_state, stage_main, start_run,
                   StopRequested, training_precision)
from reward import pad_right, scalar_model_from_checkpoint, score_sequences, with_reward_token

STAGE = "ppo"

# -----------------------------------------------------------------------------
# Configuration: defaults, then a preset (--config NAME), then --key=value overrides.

DEFAULTS = dict(
    config="default",
    # inputs and outputs
    dataset="tinyworld", data_dir="data",   # prompts from data/<dataset>/prompts_{ppo,eval}.jsonl
    init_dir="",                 # the SFT checkpoint (policy start, reference); "" = out/<config>/sft
    reward_dir="",               # the reward model checkpoint; "" = out/<config>/rm
    out_dir="",                  # "" = out/<config>/ppo
    # rollouts
    batch_size=16,               # prompts per iteration
    samples_per_prompt=4,        # responses sampled per prompt (contrast between answers to one prompt)
    max_new_tokens=48,           # a response is cut here (and counts as not ended)
    temperature=0.7,             # sampling temperature; log-probs use the same scaling
    gen_batch_size=64,           # rows generated together (equal-length prompts only)
    kl_coef=0.05,                # beta: every response token pays beta * (log pi - log pi_ref)
    no_end_penalty=1.0,          # subtracted from the score of a response cut before <|end|>
    reward_source="rm",          # rm | gold: the simulated labeler's own score (a verifiable reward)
    algo="ppo",                  # ppo | grpo: group-relative advantages, no critic (samples_per_prompt = G)
    kl_loss_coef=0.04,           # grpo's beta: KL(pi || pi_ref) as a loss term (kl_coef is ppo's, in the reward)
    # PPO
    ppo_epochs=4, minibatch_size=16,   # passes over each rollout batch; responses per optimizer step
    clip_range=0.2,              # policy ratio clipped to [1 - c, 1 + c]
    value_clip=0.2,              # values move at most this far from the rollout's; 0 disables
    gamma=1.0, lam=0.95,         # GAE discount and lambda
    learning_rate=3e-5, critic_lr=1e-4,      # policy, critic (constant)
    weight_decay=0.0, beta1=0.9, beta2=0.95,  # AdamW, both
    grad_clip=1.0,               # clip each model's global gradient norm; 0 disables
    max_iters=100,               # rollout batches
    eval_interval=0,             # greedy held-out evaluation every this many iterations (0: start and end only)
    eval_prompts=200,            # held-out prompts used (0 = all)
    save_interval=10,            # a checkpoint every this many iterations
    log_interval=1,              # a progress line and a log.jsonl record every this many
    stop_at_iter=0,              # stop (and save) after this many iterations; 0 = run to max_iters
    device="auto", dtype="auto", seed=1337,   # dtype: auto | float32 | bfloat16 | float16 (autocast)
)

# the least value of each count (eval_interval 0: evaluate at the start and the end only)
LEAST = dict(AT_LEAST, eval_interval=0, samples_per_prompt=1, max_new_tokens=1, ppo_epochs=1, minibatch_size=1,
             gen_batch_size=1)

PRESETS = {
    # for tests (any tiny sft/rm checkpoint)
    "tiny": dict(batch_size=8, samples_per_prompt=2, max_new_tokens=12, temperature=1.0, ppo_epochs=2,
                 minibatch_size=8, learning_rate=1e-3, critic_lr=1e-3, max_iters=4, eval_prompts=8, save_interval=2),
    # a 2-core laptop CPU, after reward.py --config small
    "small": dict(max_new_tokens=40, kl_coef=0.1, max_iters=60, eval_interval=30, save_interval=15),
    # GPT-2 124M class on one GPU
    "gpt2": dict(batch_size=128, samples_per_prompt=4, max_new_tokens=128, ppo_epochs=4, minibatch_size=64,
                 gen_batch_size=512, learning_rate=1e-5, critic_lr=3e-5, kl_coef=0.05, max_iters=300,
                 eval_interval=50, eval_prompts=0, save_interval=25),
}


# -----------------------------------------------------------------------------
# Per-token arithmetic: log-probs, masked statistics, rewards, advantages, losses

def token_logprobs(logits, ids, temperature):
    """logits (B, T, V) of a forward pass over ids (B, T) -> (B, T-1): the
    log-prob of each next token ids[:, t+1] under softmax(logits[:, t] / temperature),
    the distribution the tokens were sampled from."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def entropy_from_logits(logits):
    """logits (..., V) -> entropy (...) of softmax(logits), in nats: H = logsumexp(z) - sum_i p_i z_i."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def sequence_logprobs(model, ids, temperature, with_entropy=False):
    """One forward pass over ids (B, T) -> log-probs (B, T-1) of the next tokens (and their entropies with
    with_entropy). One convention for rollout, reference and training (in eval mode: dropout off), so the
    first PPO ratio is exactly 1."""
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


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked-in entries; 0 elsewhere."""
    out = (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps)
    return out * mask.to(x.dtype)


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over the masked-in entries: 1 for
    a perfect critic, 0 for one that predicts the mean, negative for worse."""
    return float(1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8))


def kl_penalized_rewards(score, logp, ref_logp, mask, beta, ended=None, no_end_penalty=0.0):
    """Per-token rewards (B, T-1): -beta * (log pi - log pi_ref) on every response token (the sampled
    tokens' estimate of KL(pi || pi_ref): exact in the mean over pi, though one token's can be negative),
    plus the sequence's score (B,) on its last response token, less no_end_penalty for a response that
    never produced <|end|> (ended False)."""
    mask, score = mask.float(), score.float()
    if ended is not None:
        score = score - no_end_penalty * (~ended.bool()).float()
    rewards = -beta * (logp - ref_logp) * mask
    # the last response token: the highest column where the mask is 1
    columns = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = (columns * mask).argmax(dim=1)
    rewards[torch.arange(mask.size(0)), last] += score
    return rewards


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation backwards over each row's response (contiguous masked-in tokens).
    rewards, values, mask (B, T) -> advantages, returns (B, T), 0 outside the mask.
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    with V and A = 0 after the last response token (the episode has ended). returns = A + V: the
    critic's targets, taken before any whitening of the advantages."""
    mask = mask.float()
    values, rewards = values.float() * mask, rewards.float() * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = next_value = torch.zeros(rewards.size(0), device=rewards.device)
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logp, old_logp, advantages, mask, clip):
    """PPO's clipped surrogate, ratio = pi / pi_old per token:
        loss = mean over response tokens of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip))
    -> (loss, clip_fraction: the share of tokens where the clipped term won (no gradient there),
    approx_kl: the k3 estimate of KL(pi_old || pi))."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
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


def group_advantages(score, group_size, eps=1e-6):
    """GRPO's advantages: score (B,) of B / group_size consecutive groups of answers to one prompt -> (B,)
    (r - mean of its group) / (std of its group + eps), the std over the group's G answers (divided by G).
    A group whose answers all score the same teaches nothing: its advantages are 0."""
    groups = score.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, correction=0, keepdim=True) + eps)).view(-1)


def k3_kl(logp, ref_logp):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's k3): with
    x = log pi_ref - log pi, exp(x) - x - 1 >= 0, unbiased, less noisy than log pi - log pi_ref."""
    x = ref_logp - logp
    return torch.exp(x) - x - 1.0


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip, kl_coef):
    """GRPO's loss: PPO's clipped surrogate (policy_loss) on the group advantages, plus kl_coef times the
    mean k3 KL to the reference over response tokens. -> (loss, clip_fraction, approx_kl, ref_kl)."""
    loss, clip_fraction, approx_kl = policy_loss(logp, old_logp, advantages, mask, clip)
    ref_kl = masked_mean(k3_kl(logp * mask, ref_logp * mask), mask)  # masked first: exp of padding overflows
    return loss + kl_coef * ref_kl, clip_fraction, approx_kl, ref_kl.item()


# -----------------------------------------------------------------------------
# Rollouts

def prompt_indices(n_prompts, batch_size, it, seed):
    """The prompt indices of iteration `it`: each epoch e walks the prompts in a fresh order drawn from
    seed + e, so the position in the data follows from the iteration alone (exact resume)."""
    out = []
    for k in range(it * batch_size, (it + 1) * batch_size):
        epoch, position = divmod(k, n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(order[position]))
    return out


def build_sequences(prompts, responses, pad_value=0):
    """prompts, responses: lists of ids (a response with its <|end|> when it ended). -> ids (B, T)
    right-padded prompt + response, and the response mask (B, T-1): 1 where token t+1 is the response's."""
    ids, _ = pad_right([list(p) + list(r) for p, r in zip(prompts, responses)], pad_value)
    mask = torch.zeros(ids.size(0), ids.size(1) - 1)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        mask[b, len(p) - 1:len(p) - 1 + len(r)] = 1.0
    return ids, mask


def score_responses(reward_model, prompts, responses, reward_id, normalizer=None, batch_size=64):
    """The reward model's (normalised) score (B,) of each response, read at the <|reward|> token after it."""
    block = reward_model.config.block_size
    seqs = [with_reward_token(p, r, reward_id, block) for p, r in zip(prompts, responses)]
    return score_sequences(reward_model, seqs, batch_size, normalizer)


def forward_in_chunks(fn, ids, chunk):
    """fn over row chunks of ids (B, T) -> results concatenated along rows."""
    outs = [fn(ids[i:i + chunk]) for i in range(0, ids.size(0), chunk)]
    return tuple(torch.cat(parts) for parts in zip(*outs)) if isinstance(outs[0], tuple) else torch.cat(outs)


@torch.no_grad()
def rollout(policy, reference, critic, reward_model, prompts, config, special, normalizer=None, seed=None,
            ctx=nullcontext()):
    """Sample a response to each prompt (lists of ids) and compute what PPO needs; special: {"end": id,
    "reward": id}; models in eval mode (critic None: GRPO's, values 0). -> a dict: ids (B, T), mask (B, T-1),
    logp / ref_logp / entropy / values (B, T-1) (0 outside the mask), score (B,) normalised, ended (B,) bool,
    responses (no <|end|>)."""
    device, block = next(policy.parameters()).device, policy.config.block_size
    max_new = max(1, min(config["max_new_tokens"], block - 1))
    prompts = [list(p)[-(block - max_new):] for p in prompts]  # as generate_responses keeps them
    with ctx:
        sampled = generate_responses(policy, prompts, max_new, special["end"], config["temperature"], seed,
                                     config["gen_batch_size"])
    ended = torch.tensor([e for _, e in sampled], dtype=torch.bool, device=device)
    with_end = [r + [special["end"]] if e else r for r, e in sampled]
    ids, mask = (t.to(device) for t in build_sequences(prompts, with_end, pad_value=special["end"]))
    temperature, chunk = config["temperature"], config["minibatch_size"]
    with ctx:
        logp, entropy = forward_in_chunks(lambda x: sequence_logprobs(policy, x, temperature, True), ids, chunk)
        ref_logp = forward_in_chunks(lambda x: sequence_logprobs(reference, x, temperature), ids, chunk)
        values = (forward_in_chunks(lambda x: critic(x)[:, :-1].float(), ids, chunk) if critic is not None
                  else torch.zeros_like(logp))
        score = score_responses(reward_model, prompts, with_end, special["reward"], normalizer, chunk)
    return {"ids": ids, "mask": mask, "logp": logp * mask, "ref_logp": ref_logp * mask, "entropy": entropy * mask,
            "values": values * mask, "score": score.to(device), "ended": ended, "responses": [r for r, _ in sampled]}


# -----------------------------------------------------------------------------
# One PPO (or GRPO) update on a rollout batch

def ppo_update(policy, critic, policy_optimizer, critic_optimizer, batch, advantages, returns, config, generator,
               ctx=nullcontext()):
    """ppo_epochs passes of shuffled minibatches over the rollout batch, each a clipped-surrogate step of the
    policy and a clipped-value step of the critic (critic None: GRPO, the loss grpo_loss, no value step).
    -> the means of loss (the policy's), value_loss (ppo) or ref_kl (grpo), clip_frac, approx_kl and
    grad_norm (the policy's, before clipping), and first_ratio_error: the largest |ratio - 1| on the first
    minibatch (0: rollout and training agree)."""
    n, size = batch["ids"].size(0), config["minibatch_size"]
    steps, first_ratio_error = [], None
    for _ in range(config["ppo_epochs"]):
        order = torch.randperm(n, generator=generator).to(batch["ids"].device)
        for start in range(0, n, size):
            idx = order[start:start + size]
            ids, mask = batch["ids"][idx], batch["mask"][idx]
            with ctx:
                logp = sequence_logprobs(policy, ids, config["temperature"])
            if first_ratio_error is None:
                first_ratio_error = float(((logp.detach() - batch["logp"][idx]) * mask).abs().max().exp() - 1.0)
            if critic is None:  # GRPO: the leash to the reference is in the loss
                pg_loss, clip_fraction, approx_kl, ref_kl = grpo_loss(
                    logp, batch["logp"][idx], batch["ref_logp"][idx], advantages[idx], mask, config["clip_range"],
                    config["kl_loss_coef"])
                step = {"ref_kl": ref_kl}
            else:
                pg_loss, clip_fraction, approx_kl = policy_loss(logp, batch["logp"][idx], advantages[idx], mask,
                                                                config["clip_range"])
            policy_optimizer.zero_grad(set_to_none=True)
            pg_loss.backward()
            grad_norm = clip_gradients(policy, config["grad_clip"])
            policy_optimizer.step()

            if critic is not None:
                with ctx:
                    values = critic(ids)[:, :-1].float()
                v_loss = value_loss(values, batch["values"][idx], returns[idx], mask, config["value_clip"])
                critic_optimizer.zero_grad(set_to_none=True)
                v_loss.backward()
                clip_gradients(critic, config["grad_clip"])
                critic_optimizer.step()
                step = {"value_loss": v_loss.item()}
            steps.append({"loss": pg_loss.item(), **step, "clip_frac": clip_fraction, "approx_kl": approx_kl,
                          "grad_norm": float(grad_norm)})
    return {**{k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}, "first_ratio_error": first_ratio_error}


# -----------------------------------------------------------------------------
# Held-out evaluation, the RM's agreement with the labeler; inputs

@torch.no_grad()
def evaluate(policy, reward_model, tokenizer, records, config, normalizer=None, ctx=nullcontext()):
    """Greedy answers to held-out prompt records, graded by the simulated labeler (tinyworld.grade_answers)
    and scored by the reward model: the grade dict plus "rm" (mean score), per-prompt "golds" and "rms"."""
    end_id, block = tokenizer.special_ids[bpe.END_OF_TURN], policy.config.block_size
    max_new = max(1, min(config["max_new_tokens"], block - 1))
    prompts = [tokenizer.encode_chat(r["prompt"])[0][-(block - max_new):] for r in records]
    with ctx:
        answers = generate_responses(policy, prompts, max_new, end_id, temperature=0.0,
                                     batch_size=config["gen_batch_size"])
        with_end = [r + [end_id] if e else r for r, e in answers]
        rms = score_responses(reward_model, prompts, with_end, tokenizer.special_ids[bpe.REWARD], normalizer,
                              config["minibatch_size"])
    texts = [(tokenizer.decode(r), e) for r, e in answers]
    return dict(tinyworld.grade_answers(records, texts), rm=float(rms.mean()) if len(records) else 0.0,
                golds=[tinyworld.gold_score(rec, t, e) for rec, (t, e) in zip(records, texts)], rms=rms.tolist())


def pairwise_agreement(scores, golds, group_size, min_gap=0.5):
    """How well the RM ranks the policy's own samples: among pairs of responses to one prompt (consecutive
    groups of group_size) whose gold scores differ by more than min_gap, the share the RM orders as the
    labeler does. 0.5 is chance; None when no pair qualifies."""
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
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(golds, base_golds))
    return wins / len(golds) if golds else 0.0


def load_prompts(config):
    """(prompts_ppo records, prompts_eval records: the first eval_prompts, 0 = all), checked for a prompt."""
    folder = prepare_data.ensure_prepared(config["dataset"], config["data_dir"])  # builds tinyworld if missing
    splits = []
    for name in ("prompts_ppo.jsonl", "prompts_eval.jsonl"):
        path = os.path.join(folder, name)
        records = prepare_data.read_jsonl(path)
        if not records:
            raise prepare_data.DataError(f"{path} has no records: rebuild it with `python prepare_data.py "
                                         f"--dataset {config['dataset']} --force`")
        for i, r in enumerate(records):
            if not isinstance(r.get("prompt"), str) or not r["prompt"]:
                raise prepare_data.DataError(f"{path} line {i + 1} has no 'prompt' text")
        splits.append(records)
    return splits[0], splits[1][:config["eval_prompts"]] if config["eval_prompts"] > 0 else splits[1]


def critic_from_reward_model(rm_ckpt, device="cpu"):
    """The critic's start: the reward model with its normaliser folded into the head, so that it reads the
    normalised score at <|reward|> and every output is on the scale of the rewards it will predict."""
    critic = scalar_model_from_checkpoint(rm_ckpt, device)
    norm = rm_ckpt["reward_norm"]
    with torch.no_grad():
        critic.head.weight.div_(norm["scale"])
        critic.head.bias.sub_(norm["bias"]).div_(norm["scale"])
    return critic


def check_config(config):
    """Values that would only fail later, checked before any work."""
    if config["temperature"] <= 0:
        raise ValueError(f"temperature={config['temperature']} must be > 0: PPO needs sampling log-probs")
    check_least(config, LEAST)
    if config["reward_source"] not in ("rm", "gold"):
        raise ValueError(f"reward_source={config['reward_source']!r} is not one of rm, gold")
    if config["algo"] not in ("ppo", "grpo"):
        raise ValueError(f"algo={config['algo']!r} is not one of ppo, grpo")
    if config["algo"] == "grpo" and config["samples_per_prompt"] < 2:
        raise ValueError(f"samples_per_prompt={config['samples_per_prompt']} must be at least 2 for grpo: "
                         f"an answer is only judged against the others to its prompt")
    if not 0 < config["clip_range"] < 1:
        raise ValueError(f"clip_range={config['clip_range']} must be between 0 and 1")


# -----------------------------------------------------------------------------
# The run's pieces: inputs, resume, a step to time, a log record, plots

def resolve_dirs(config):
    base = os.path.join("out", config["config"])
    return (config["init_dir"] or os.path.join(base, "sft"), config["reward_dir"] or os.path.join(base, "rm"),
            config["out_dir"] or os.path.join(base, STAGE))


def load_parents(init_dir, reward_dir, resume=None):
    """(SFT checkpoint, reward checkpoint, {"parent", "reward_parent"}: each one's {"path", "sha256"}, as
    ckpt.pt stores them). A resumed run must find both files unchanged."""
    sft, rm = load_checkpoint(init_dir, stages={"sft"}), load_checkpoint(reward_dir, stages={"rm"})
    sft_path, rm_path = checkpoint_file(init_dir), checkpoint_file(reward_dir)
    parents = {"parent": parent_record(sft_path), "reward_parent": parent_record(rm_path)}
    if resume is not None and any(resume[k]["sha256"] != parents[k]["sha256"] for k in parents):
        raise CheckpointError(f"{sft_path} or {rm_path} changed since the run being resumed was started from "
                              f"them: start over with --overwrite")
    if "reward_norm" not in rm:
        raise CheckpointError(f"reward checkpoint {rm_path} has no 'reward_norm': rerun reward.py to write it")
    if rm["model_args"]["vocab_size"] != sft["model_args"]["vocab_size"]:
        raise CheckpointError(f"{rm_path} (vocab {rm['model_args']['vocab_size']}) and {sft_path} (vocab "
                              f"{sft['model_args']['vocab_size']}) do not share a tokenizer")
    return sft, rm, parents


def restore(run, policy, critic, policy_optimizer, critic_optimizer):
    """Continue the run being resumed (run.resume, its ckpt.pt: the policy and the critic, saved as one file):
    weights, optimizer states, RNG (critic None: GRPO's). -> (iteration, the SFT model's held-out evaluation)."""
    if "critic" not in run.resume:
        raise CheckpointError(f"{run.ckpt_path} is an older ppo.py's (its critic apart, in critic.pt, which a crash "
                              f"could leave out of step): start over with --overwrite")
    algo, saved_algo = "ppo" if critic is not None else "grpo", run.resume["config"].get("algo", "ppo")
    if algo != saved_algo:
        raise CheckpointError(f"{run.ckpt_path} is a {saved_algo} run: resume it with --algo={saved_algo}, or start "
                              f"over with --overwrite")
    state = run.resume["resume"]
    load_weights(policy, run.resume["model"], run.ckpt_path)
    policy_optimizer.load_state_dict(state["optimizer"])
    if critic is not None:
        load_weights(critic, run.resume["critic"]["model"], run.ckpt_path)
        critic_optimizer.load_state_dict(state["critic_optimizer"])
    set_rng_state(state["rng"])
    return state["iter"], state["sft_eval"]


def sample_and_backward(policy, prompts, config, end_id, autocast):
    """A little of both halves of an iteration, to time a precision: sampling, a forward and a backward."""
    with autocast:
        sampled = generate_responses(policy, prompts, 8, end_id, config["temperature"], config["seed"])
        ids, _ = build_sequences(prompts, [r for r, _ in sampled], pad_value=end_id)
        loss = sequence_logprobs(policy, ids.to(next(policy.parameters()).device), config["temperature"]).sum()
    loss.backward()


def iteration_record(batch, golds, reward, returns, stats, config):
    """One iteration's log record: the rollout's figures (KL summed per response; reward (B,): each response's
    whole reward), the critic's explained variance (returns None: no critic), the update's statistics."""
    mask = batch["mask"]
    return {"lr": config["learning_rate"], **stats, "rm_score": float(batch["score"].mean()),
            "gold": float(golds.mean()), "kl": float(((batch["logp"] - batch["ref_logp"]) * mask).sum(1).mean()),
            "reward": float(reward.mean()), "entropy": float(masked_mean(batch["entropy"], mask)),
            "explained_var": None if returns is None else explained_variance(batch["values"], returns, mask),
            "resp_len": float(mask.sum(1).mean()), "end_rate": float(batch["ended"].float().mean()),
            "rm_agreement": pairwise_agreement(batch["score"].tolist(), golds.tolist(), config["samples_per_prompt"])}


def plot_progress(run, config):
    """reward.png (RM and gold scores, sampled and held-out) and kl.png."""
    records, algo = read_jsonl_log(run.log_path), config["algo"].upper()
    beta = config["kl_coef"] if config["algo"] == "ppo" else config["kl_loss_coef"]
    plot_curves(records, [("RM score (sampled)", "rm_score"), ("gold (sampled)", "gold"),
                          ("RM score (held-out, greedy)", "eval_rm"), ("gold (held-out, greedy)", "eval_gold")],
                os.path.join(run.out_dir, "reward.png"), f"{algo} reward and gold score ({config['config']})")
    plot_curves(records, [("KL(policy || SFT) per response", "kl")], os.path.join(run.out_dir, "kl.png"),
                f"{algo} KL to the SFT model ({config['config']}, beta {beta})")


# -----------------------------------------------------------------------------
# The run

def run(config, flags=()):
    """Train the policy with PPO (or GRPO); returns the metrics of the final evaluation."""
    # 1. the device, --resume or --overwrite (one process: the loop is not split across ranks);
    #    the SFT and reward checkpoints, the prompts
    check_config(config)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("ppo.py runs in one process: start it with python, not torchrun")
    init_dir, reward_dir, out_dir = resolve_dirs(config)
    run = start_run(config, flags, STAGE, out_dir, LEAST)
    sft_ckpt, rm_ckpt, parents = load_parents(init_dir, reward_dir, run.resume)
    tokenizer = tokenizer_from_checkpoint(sft_ckpt)
    special = {"end": tokenizer.special_ids[bpe.END_OF_TURN], "reward": tokenizer.special_ids[bpe.REWARD]}
    train_records, eval_records = load_prompts(config)

    # 2. the policy and the frozen reference start as the SFT model, the critic (PPO's) as the reward model;
    #    all in eval mode throughout (dropout off: rollout and training compute the same log-probs).
    #    Precision is measured on a few prompts, before the optimizers exist (no state to disturb)
    torch.manual_seed(config["seed"])
    policy = model_from_checkpoint(sft_ckpt, run.device).eval()
    reference = model_from_checkpoint(sft_ckpt, run.device).eval().requires_grad_(False)
    reward_model = scalar_model_from_checkpoint(rm_ckpt, run.device).eval().requires_grad_(False)
    critic = critic_from_reward_model(rm_ckpt, run.device).eval() if config["algo"] == "ppo" else None
    probe = [tokenizer.encode_chat(r["prompt"])[0][-(policy.config.block_size - 8):] for r in train_records[:8]]
    dtype, dtype_why, ctx, _ = training_precision(config["dtype"], run.device_type, policy, lambda c: (
        sample_and_backward(policy, probe, config, special["end"], c)))
    adamw = dict(weight_decay=config["weight_decay"], betas=(config["beta1"], config["beta2"]),
                 device_type=run.device_type)  # the same for both
    policy_optimizer = configure_optimizer(policy, config["learning_rate"], **adamw)
    critic_optimizer = configure_optimizer(critic, config["critic_lr"], **adamw) if critic is not None else None
    start_iter, sft_eval = 0, None
    if run.resume is not None:
        start_iter, sft_eval = restore(run, policy, critic, policy_optimizer, critic_optimizer)
    beta = config["kl_coef"] if critic is not None else config["kl_loss_coef"]
    open_log(run, start_iter, f"{config['algo']}: policy {policy.num_params() / 1e6:.2f}M parameters from {init_dir}, "
             f"reward {config['reward_source']} ({reward_dir}); {len(train_records)} prompts, {config['batch_size']} x "
             f"{config['samples_per_prompt']} responses/iter, {config['ppo_epochs']} epochs of minibatch "
             f"{config['minibatch_size']}, beta {beta}, device {run.device}", dtype, dtype_why)

    def run_eval(it):  # greedy answers to held-out prompts; the first evaluation is the SFT model's own
        nonlocal sft_eval
        result = evaluate(policy, reward_model, tokenizer, eval_records, config, rm_ckpt["reward_norm"], ctx)
        sft_eval = sft_eval or {k: result[k] for k in ("golds", "rms", "gold", "rm", "accuracy")}
        record = {"iter": it, **{f"eval_{k}": result[k] for k in ("gold", "rm", "accuracy", "end_rate", "words")},
                  "win_rate": win_rate(result["golds"], sft_eval["golds"]),
                  **{f"sft_{k}": sft_eval[k] for k in ("gold", "rm", "accuracy")}}
        append_jsonl(run.log_path, record)
        print(f"eval {it}: gold {result['gold']:.3f}, accuracy {result['accuracy']:.3f}, RM {result['rm']:.3f}, win "
              f"rate vs SFT {record['win_rate']:.3f} (SFT: gold {sft_eval['gold']:.3f}, accuracy "
              f"{sft_eval['accuracy']:.3f}, RM {sft_eval['rm']:.3f}), end rate {result['end_rate']:.2f}")
        return record

    metrics = run_eval(0) if run.resume is None else {}
    progress = Progress(run, start_iter, run.end_iter, config["log_interval"], "tok")
    stopper = StopRequested()
    it = start_iter
    try:
        while it < run.end_iter:
            # 3. rollout: samples_per_prompt responses to each prompt of this iteration's batch, and the
            #    simulated labeler's gold score of each (the policy never sees it, unless reward_source=gold)
            indices = prompt_indices(len(train_records), config["batch_size"], it, config["seed"])
            chosen = [train_records[i] for i in indices for _ in range(config["samples_per_prompt"])]
            prompts = [tokenizer.encode_chat(r["prompt"])[0] for r in chosen]
            batch = rollout(policy, reference, critic, reward_model, prompts, config, special, rm_ckpt["reward_norm"],
                            seed=config["seed"] * 1_000_003 + it * 10_007, ctx=ctx)
            mask = batch["mask"]
            golds = torch.tensor([tinyworld.gold_score(rec, tokenizer.decode(r), bool(e))
                                  for rec, r, e in zip(chosen, batch["responses"], batch["ended"])])

            score = batch["score"] if config["reward_source"] == "rm" else golds.to(mask.device)
            if critic is not None:
                # 4. PPO's rewards: the score on the last response token, the KL penalty on every response token
                rewards = kl_penalized_rewards(score, batch["logp"], batch["ref_logp"], mask, config["kl_coef"],
                                               batch["ended"], config["no_end_penalty"])
                # 5. advantages by GAE with the critic, whitened; the critic's targets are taken before whitening
                advantages, returns = compute_gae(rewards, batch["values"], mask, config["gamma"], config["lam"])
                advantages, reward = masked_whiten(advantages, mask), (rewards * mask).sum(1)
            else:
                # 4. GRPO's reward: the score alone (its KL term is in the loss), less the same penalty for no end
                reward = score - config["no_end_penalty"] * (~batch["ended"]).float()
                # 5. each answer against the other answers to its prompt, on every one of its tokens; no critic
                advantages = group_advantages(reward, config["samples_per_prompt"])[:, None] * mask
                returns = None

            # 6. learn: a few epochs of shuffled minibatches (their order a function of the iteration: exact resume)
            generator = torch.Generator().manual_seed(config["seed"] + 7919 * (it + 1))
            stats = ppo_update(policy, critic, policy_optimizer, critic_optimizer, batch, advantages, returns,
                               config, generator, ctx)
            if bad := nonfinite({"policy": policy.state_dict(), "critic": critic and critic.state_dict(), **stats}):
                raise FloatingPointError(f"{bad[0]} is not finite after iteration {it + 1}: stopping; the last good "
                                         f"checkpoint {run.ckpt_path} is kept. Try lower --learning_rate/--critic_lr")
            it += 1
            record = iteration_record(batch, golds, reward, returns, stats, config)
            progress.update(it, record, int(mask.sum()), f"rm {record['rm_score']:+.3f} | gold {record['gold']:+.3f} | "
                            f"kl {record['kl']:.3f} | len {record['resp_len']:.1f} | end {record['end_rate']:.2f}")

            # 7. now and then: a held-out evaluation, the checkpoint (policy and critic in one file), the plots
            at_eval = (config["eval_interval"] > 0 and it % config["eval_interval"] == 0) or it == run.end_iter
            if at_eval:
                metrics = run_eval(it)
            if at_eval or stopper.requested or it % config["save_interval"] == 0:
                metrics = dict(metrics, iter=it, kl=record["kl"], rm_score=record["rm_score"], gold=record["gold"])
                save_run(run, {"stage": STAGE, "model_args": dict(sft_ckpt["model_args"]),
                               "model": clean_state_dict(policy), "tokenizer": tokenizer.to_dict(),
                               "config": dict(config, dtype=dtype), "metrics": metrics, **parents,
                               "critic": None if critic is None else {"model_args": dict(rm_ckpt["model_args"]),
                                                                      "model": clean_state_dict(critic)},
                               "resume": {"optimizer": policy_optimizer.state_dict(), "iter": it, "rng": rng_state(),
                                          "critic_optimizer": None if critic is None else critic_optimizer.state_dict(),
                                          "sft_eval": sft_eval,
                                          "prompt_position": it * config["batch_size"]}})
                plot_progress(run, config)
                progress.pause(it)
            if stopper.requested:
                break
    finally:
        end_run(run, stopper)
    if start_iter == run.end_iter:
        print(f"{run.ckpt_path} is already at iteration {it}: raise --max_iters to continue")
    progress.done(it, stopper.requested)
    return metrics


def main(argv=None):
    return stage_main(run, argv, DEFAULTS, PRESETS, "ppo.py", __doc__)


if __name__ == "__main__":
    sys.exit(main())
