"""Tests for ppo.py: each piece against an independent slow reference."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import bpe
import model
import ppo
import tinyworld
import prepare_data
from model import (CheckpointError, GPT, GPTConfig, load_checkpoint, model_from_checkpoint, parent_record,
                   save_checkpoint)
from train import read_jsonl_log
from reward import ScalarHeadModel, score_sequences, with_reward_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- fixtures: a small tinyworld build, a tiny SFT model and a tiny reward model -----------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{data_dir, sft, rm, tokenizer}: prompts from a small prepare_data build, a
    2-layer 32-wide GPT saved as an "sft" checkpoint and a reward model beside it."""
    root = tmp_path_factory.mktemp("ppo")
    data_dir = str(root / "data")
    folder = prepare_data.prepare(data_root=data_dir, megabytes=0.08, sft_train=20, sft_val=4, prefs_train=20,
                                  prefs_val=4, prompts_ppo=40, prompts_eval=12, mc=4, quiet=True)
    tokenizer = bpe.Tokenizer.load(os.path.join(folder, "tokenizer.json"))
    args = dict(vocab_size=tokenizer.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    base = dict(model_args=args, tokenizer=tokenizer.to_dict(), config={}, metrics={})
    sft = str(root / "sft" / "ckpt.pt")
    save_checkpoint(dict(base, stage="sft", model=GPT(GPTConfig(**args)).state_dict(), parent=None), sft)
    rm = str(root / "rm" / "ckpt.pt")
    save_checkpoint(dict(base, stage="rm", model=ScalarHeadModel(GPTConfig(**args)).state_dict(),
                         parent=parent_record(sft), reward_norm={"bias": 0.02, "scale": 0.5}), rm)
    return {"data_dir": data_dir, "sft": os.path.dirname(sft), "rm": os.path.dirname(rm), "tokenizer": tokenizer,
            "args": args}


def tiny_config(world, out_dir, **overrides):
    config = dict(ppo.DEFAULTS)
    config.update(ppo.PRESETS["tiny"])
    config.update(config="tiny", data_dir=world["data_dir"], init_dir=world["sft"], reward_dir=world["rm"],
                  out_dir=str(out_dir),
                  dtype="float32")  # as asked: runs compared bit for bit must not choose their precision by timing
    config.update(overrides)
    return config


def tiny_gpt(vocab=50, seed=0, block=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32)).eval()


def tiny_scalar(vocab=50, seed=1, block=32):
    torch.manual_seed(seed)
    model = ScalarHeadModel(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.head.weight.mul_(30.0)  # outputs that differ visibly from position to position
    return model


# --- log-probs and entropy -------------------------------------------------------------------

def test_token_logprobs_match_categorical_log_prob():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    got = ppo.token_logprobs(logits, ids, temperature=0.7)
    assert got.shape == (2, 4)
    for b in range(2):
        for t in range(4):
            want = torch.distributions.Categorical(logits=logits[b, t] / 0.7).log_prob(ids[b, t + 1])
            assert got[b, t].item() == pytest.approx(want.item(), abs=1e-5), (b, t)


def test_entropy_from_logits_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11) * 3
    want = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(ppo.entropy_from_logits(logits), want, atol=1e-5)
    uniform = ppo.entropy_from_logits(torch.zeros(11))
    assert uniform.item() == pytest.approx(math.log(11), abs=1e-5), "uniform over 11 ids: ln 11 nats"


def test_sequence_logprobs_equal_one_prefix_at_a_time():
    model = tiny_gpt()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    logp, entropy = ppo.sequence_logprobs(model, ids, 0.8, with_entropy=True)
    assert logp.shape == entropy.shape == (2, 8)
    with torch.no_grad():
        for t in range(8):  # the slow way: one forward pass per prefix, read its last position
            last = model(ids[:, :t + 1])[0][:, -1] / 0.8
            want = F.log_softmax(last, -1).gather(1, ids[:, t + 1:t + 2]).squeeze(1)
            assert torch.allclose(logp[:, t], want, atol=1e-5), f"position {t}"
            assert torch.allclose(entropy[:, t], torch.distributions.Categorical(logits=last).entropy(), atol=1e-4)
    assert torch.equal(ppo.sequence_logprobs(model, ids, 0.8), logp)


# --- masked statistics ------------------------------------------------------------------------

def masked_example():
    torch.manual_seed(0)
    x = torch.randn(3, 6) * 2 + 1
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.float)
    return x, mask


def test_masked_mean_and_var_equal_dropping_masked_entries():
    x, mask = masked_example()
    kept = x[mask.bool()]
    assert ppo.masked_mean(x, mask).item() == pytest.approx(kept.mean().item(), abs=1e-6)
    assert ppo.masked_var(x, mask).item() == pytest.approx(kept.var(unbiased=False).item(), abs=1e-5)
    assert ppo.masked_mean(x, torch.ones_like(x)).item() == pytest.approx(x.mean().item(), abs=1e-6)


def test_masked_whiten_equals_whitening_the_kept_entries():
    x, mask = masked_example()
    kept = x[mask.bool()]
    want = (kept - kept.mean()) / kept.std(unbiased=False)
    out = ppo.masked_whiten(x, mask)
    assert torch.allclose(out[mask.bool()], want, atol=1e-4)
    assert torch.all(out[~mask.bool()] == 0), "masked-out entries are 0"


def test_explained_variance_against_its_definition():
    x, mask = masked_example()
    returns = x
    values = x * 0.5 + 0.3
    r, v = returns[mask.bool()], values[mask.bool()]
    want = 1 - (r - v).var(unbiased=False) / r.var(unbiased=False)
    assert ppo.explained_variance(values, returns, mask) == pytest.approx(want.item(), abs=1e-5)
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full_like(x, r.mean().item()), returns, mask) == pytest.approx(0.0, abs=1e-5)


# --- rewards and KL ---------------------------------------------------------------------------

def test_kl_penalty_is_the_kl_in_expectation():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = torch.distributions.kl_divergence(torch.distributions.Categorical(p), torch.distributions.Categorical(q))
    # one one-token response per outcome x: its reward is -beta * (log p(x) - log q(x)); E_{x ~ p} summed exactly
    rewards = ppo.kl_penalized_rewards(torch.zeros(4), p.log()[:, None], q.log()[:, None], torch.ones(4, 1), beta=2.0)
    assert (p * rewards[:, 0]).sum().item() == pytest.approx(-2.0 * exact.item(), abs=1e-6)
    assert rewards[0, 0] < 0 < rewards[3, 0], "a single token's estimate can be negative"


def test_kl_penalized_rewards_by_hand():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], dtype=torch.float)
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0], [0.0, 0.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -0.5, -9.0], [0.0, 0.0, -3.0, 0.0, 0.0]])
    score = torch.tensor([2.0, 10.0])
    ended = torch.tensor([True, False])
    r = ppo.kl_penalized_rewards(score, logp, ref, mask, beta=0.1, ended=ended, no_end_penalty=1.0)
    # row 0: -0.1 * (0.5, -1, 0) on the response, score 2 on its last token
    want0 = [0.0, -0.05, 0.1, 2.0, 0.0]
    # row 1: one token: -0.1 * 2, then the score 10 minus 1 for no <|end|>
    want1 = [0.0, 0.0, -0.2 + 9.0, 0.0, 0.0]
    assert torch.allclose(r, torch.tensor([want0, want1]), atol=1e-6), r
    same = ppo.kl_penalized_rewards(score, logp, logp, mask, beta=0.5)
    assert torch.equal(same, torch.tensor([[0, 0, 0, 2.0, 0], [0, 0, 10.0, 0, 0]])), \
        "identical policies: no penalty, only the score on the last response token"


# --- GAE --------------------------------------------------------------------------------------

def brute_force_gae(rewards, values, gamma, lam):
    """One response (lists): A_t = sum_l (gamma lam)^l delta_{t+l}, V after the end = 0."""
    n = len(rewards)
    v = list(values) + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(n)]
    return [sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t)) for t in range(n)]


def gae_example():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 8), torch.randn(3, 8)
    mask = torch.zeros(3, 8)
    mask[0, 2:6] = 1   # prompt, response, padding
    mask[1, 0:8] = 1
    mask[2, 5:6] = 1   # a one-token response
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0), (0.99, 0.0)])
def test_compute_gae_equals_brute_force_loop(gamma, lam):
    rewards, values, mask = gae_example()
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        cols = mask[b].nonzero().squeeze(1).tolist()
        want = brute_force_gae(rewards[b, cols].tolist(), values[b, cols].tolist(), gamma, lam)
        assert adv[b, cols].tolist() == pytest.approx(want, abs=1e-5), f"row {b}"
        assert ret[b, cols].tolist() == pytest.approx([a + v for a, v in zip(want, values[b, cols].tolist())],
                                                      abs=1e-5), "returns = advantages + values"
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_lambda_one_is_reward_to_go_and_lambda_zero_is_td_residual():
    rewards, values, mask = gae_example()
    adv1, _ = ppo.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    adv0, _ = ppo.compute_gae(rewards, values, mask, gamma=1.0, lam=0.0)
    for b in range(3):
        cols = mask[b].nonzero().squeeze(1).tolist()
        r, v = rewards[b, cols].tolist(), values[b, cols].tolist()
        to_go = [sum(r[t:]) - v[t] for t in range(len(r))]
        td = [r[t] + (v[t + 1] if t + 1 < len(r) else 0.0) - v[t] for t in range(len(r))]
        assert adv1[b, cols].tolist() == pytest.approx(to_go, abs=1e-5)
        assert adv0[b, cols].tolist() == pytest.approx(td, abs=1e-5)


# --- losses -----------------------------------------------------------------------------------

def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    torch.manual_seed(0)
    logp, adv = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float)
    loss, clip_fraction, approx_kl = ppo.policy_loss(logp, logp.clone(), adv, mask, 0.2)
    assert loss.item() == pytest.approx(-adv[mask.bool()].mean().item(), abs=1e-6)
    assert clip_fraction == 0.0 and approx_kl == pytest.approx(0.0, abs=1e-7)


def test_policy_loss_gradient_is_zero_outside_the_clip_range():
    old = torch.zeros(1, 6)
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 0.9]])
    adv = torch.tensor([[1.0, -1.0, -2.0, 3.0, 1.0, -1.0]])
    mask = torch.ones(1, 6)
    logp = ratios.log().requires_grad_(True)
    loss, clip_fraction, _ = ppo.policy_loss(logp, old, adv, mask, 0.2)
    loss.backward()
    # d/dlogp of -A * ratio / n = -A * ratio / n where the unclipped term is the larger one
    unclipped_grad = -adv * ratios / 6
    want = torch.tensor([[0.0, 0.0, unclipped_grad[0, 2], unclipped_grad[0, 3], unclipped_grad[0, 4],
                          unclipped_grad[0, 5]]])
    assert torch.allclose(logp.grad, want, atol=1e-6), logp.grad
    assert clip_fraction == pytest.approx(2 / 6), "tokens 0 and 1 are clipped"
    clipped_loss = (-1.0 * 1.2 + -1.0 * 0.8 * -1 + 2.0 * 1.5 - 3.0 * 0.5 - 1.0 * 1.1 + 1.0 * 0.9) / 6
    assert loss.item() == pytest.approx(clipped_loss, abs=1e-6)


def test_value_loss_against_a_loop():
    values = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    old = torch.tensor([[0.5, 0.0, 2.1, 0.0]])
    returns = torch.tensor([[1.0, 3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    want = 0.0
    for v, o, r in zip(values[0, :3].tolist(), old[0, :3].tolist(), returns[0, :3].tolist()):
        clipped = o + min(max(v - o, -0.2), 0.2)
        want += max((v - r) ** 2, (clipped - r) ** 2)
    assert ppo.value_loss(values, old, returns, mask, 0.2).item() == pytest.approx(0.5 * want / 3, abs=1e-6)
    plain = 0.5 * sum((v - r) ** 2 for v, r in zip([0.0, 1.0, 2.0], [1.0, 3.0, 0.0])) / 3
    assert ppo.value_loss(values, old, returns, mask, 0.0).item() == pytest.approx(plain, abs=1e-6)


# --- rollouts ---------------------------------------------------------------------------------

def test_prompt_indices_walk_each_epoch_in_a_fresh_order():
    epochs = [sum((ppo.prompt_indices(10, 5, it, seed=3) for it in range(2 * e, 2 * e + 2)), []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(10)), "every prompt once per epoch"
    assert epochs[0] != epochs[1], "a new order each epoch"
    assert ppo.prompt_indices(10, 5, 3, seed=3) == epochs[1][5:], "a function of the iteration alone"
    assert ppo.prompt_indices(10, 4, 2, seed=3)[:2] == epochs[0][8:] and len(ppo.prompt_indices(10, 4, 2, 3)) == 4


def test_build_sequences_by_hand():
    ids, mask = ppo.build_sequences([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]], pad_value=0)
    assert ids.tolist() == [[1, 2, 3, 6, 7, 0], [4, 5, 8, 9, 10, 11]]
    # column t is token t + 1: row 0's response is tokens 3, 4 -> columns 2, 3
    assert mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]


def test_score_responses_equals_one_sequence_at_a_time():
    rm = tiny_scalar()
    prompts, responses = [[1, 2, 3], [4], [5, 6]], [[7, 8], [9, 10, 11, 12], []]
    norm = {"bias": 0.3, "scale": 2.0}
    got = ppo.score_responses(rm, prompts, responses, reward_id=49, normalizer=norm, batch_size=2)
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):
            raw = rm(torch.tensor([p + r + [49]]))[0, -1].item()
            assert got[i].item() == pytest.approx((raw - 0.3) / 2.0, abs=1e-5)


def test_forward_in_chunks_equals_one_call():
    ids = torch.arange(21).view(7, 3)
    assert torch.equal(ppo.forward_in_chunks(lambda x: x * 2, ids, 3), ids * 2)
    a, b = ppo.forward_in_chunks(lambda x: (x, x + 1), ids, 2)
    assert torch.equal(a, ids) and torch.equal(b, ids + 1)


def rollout_models(vocab=50):
    return tiny_gpt(vocab, seed=0), tiny_gpt(vocab, seed=5), tiny_scalar(vocab, seed=1), tiny_scalar(vocab, seed=2)


def test_rollout_masks_everything_after_the_stop_token(monkeypatch):
    end, reward = 48, 49
    canned = [([10, 11], True), ([12, 13, 14, 15, 16, 17], False), ([], True), ([20, 21, 22], True)]
    monkeypatch.setattr(ppo, "generate_responses", lambda *args, **kwargs: canned)
    policy, reference, critic, rm = rollout_models()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3]]
    config = dict(ppo.DEFAULTS, max_new_tokens=6, temperature=0.9, minibatch_size=3)
    batch = ppo.rollout(policy, reference, critic, rm, prompts, config, {"end": end, "reward": reward})
    assert batch["ended"].tolist() == [True, False, True, True]
    assert batch["responses"] == [r for r, _ in canned]
    for b, (p, (r, ended)) in enumerate(zip(prompts, canned)):
        response = r + [end] if ended else r
        seq = torch.tensor([p + response])
        cols = list(range(len(p) - 1, len(p) - 1 + len(response)))
        assert batch["mask"][b].nonzero().squeeze(1).tolist() == cols, f"row {b}: the response tokens only"
        assert batch["ids"][b, :len(p) + len(response)].tolist() == p + response
        with torch.no_grad():  # the same numbers from the unpadded sequence alone
            want = {"logp": ppo.sequence_logprobs(policy, seq, 0.9)[0, cols],
                    "ref_logp": ppo.sequence_logprobs(reference, seq, 0.9)[0, cols],
                    "values": critic(seq)[0, :-1][cols]}
        for key, value in want.items():
            assert torch.allclose(batch[key][b, cols], value, atol=1e-5), (b, key)
            outside = torch.ones(batch["mask"].size(1), dtype=torch.bool)
            outside[cols] = False
            assert torch.all(batch[key][b, outside] == 0), f"row {b}: {key} is 0 outside the response"
    want_scores = ppo.score_responses(rm, prompts, [r + [end] if e else r for r, e in canned], reward)
    assert torch.allclose(batch["score"], want_scores)


def test_rollout_with_real_sampling_stops_at_the_end_token():
    policy, reference, critic, rm = rollout_models()
    end = 7
    with torch.no_grad():  # logit(<|end|>) = 0.07 * 32 at every position: LayerNorm's output sums to 0,
        policy.transformer.ln_f.bias.fill_(1.0)     # so w_end . (norm(x) + 1) = 0.07 * n_embd
        policy.transformer.wte.weight[end] = 0.07   # (tied: this is also the output row of <|end|>)
    prompts = [[1, 2, 3]] * 6 + [[4, 5]] * 4
    config = dict(ppo.DEFAULTS, max_new_tokens=10, temperature=1.0, minibatch_size=4)
    batch = ppo.rollout(policy, reference, critic, rm, prompts, config, {"end": end, "reward": 49}, seed=0)
    for b, (p, r, ended) in enumerate(zip(prompts, batch["responses"], batch["ended"].tolist())):
        assert end not in r and (ended or len(r) == 10)
        assert int(batch["mask"][b].sum()) == len(r) + int(ended)
        if ended:
            assert batch["ids"][b, len(p) + len(r)].item() == end
    assert batch["ended"].any() and not batch["ended"].all(), "some responses stopped, some were cut"


# --- GRPO: group-relative advantages, the KL as a loss term ----------------------------------

def test_group_advantages_by_hand():
    score = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0])
    adv = ppo.group_advantages(score, 4)
    # group 1: mean 2, std over the 4 answers sqrt((1 + 1 + 0 + 0) / 4) = sqrt(1/2)
    want = [-1 / math.sqrt(0.5), 1 / math.sqrt(0.5), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(want, abs=1e-5), adv
    assert torch.isfinite(adv).all(), "a group whose answers all score the same: advantage 0, no NaN"
    pairs = ppo.group_advantages(torch.tensor([0.0, 1.0, 4.0, 2.0]), 2)
    assert pairs.tolist() == pytest.approx([-1.0, 1.0, 1.0, -1.0], abs=1e-5), "each pair against itself only"


def test_k3_kl_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, -0.1])
    want = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    assert ppo.k3_kl(logp, ref).tolist() == pytest.approx(want, abs=1e-6)
    assert ppo.k3_kl(logp, ref)[1] == 0.0, "the same log-prob: no divergence"


def test_grpo_loss_is_the_clipped_loss_plus_the_kl_term():
    torch.manual_seed(0)
    logp, old, ref = torch.randn(2, 5) * 0.1 - 1, torch.randn(2, 5) * 0.1 - 1, torch.randn(2, 5) * 0.1 - 1
    adv = ppo.group_advantages(torch.tensor([1.0, 0.0]), 2)[:, None].expand(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float)
    logp[0, 4], ref[1, 0] = -200.0, 0.0  # padding far apart: masked before exp, no overflow
    clipped, clip_fraction, approx_kl = ppo.policy_loss(logp, old, adv, mask, 0.2)
    loss, grpo_fraction, grpo_kl, ref_kl = ppo.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.0)
    assert loss.item() == clipped.item() and (grpo_fraction, grpo_kl) == (clip_fraction, approx_kl), \
        "kl_coef 0: GRPO's loss is PPO's clipped surrogate on the group advantages"
    k3 = [math.exp(r - p) - (r - p) - 1 for p, r, m in zip(logp.flatten().tolist(), ref.flatten().tolist(),
                                                             mask.flatten().tolist()) if m]
    loss, _, _, ref_kl = ppo.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.1)
    assert ref_kl == pytest.approx(sum(k3) / len(k3), abs=1e-6)
    assert loss.item() == pytest.approx(clipped.item() + 0.1 * sum(k3) / len(k3), abs=1e-6)


def test_grpo_groups_repeat_each_prompt_and_advantages_stay_in_their_group(world, tmp_path, monkeypatch):
    seen = []
    real_rollout, real_group = ppo.rollout, ppo.group_advantages

    def recording_rollout(policy, reference, critic, reward_model, prompts, *args, **kwargs):
        assert critic is None, "GRPO has no critic"
        seen.append(prompts)
        return real_rollout(policy, reference, critic, reward_model, prompts, *args, **kwargs)

    def recording_group(score, group_size, *args):
        seen.append(group_size)
        return real_group(score, group_size, *args)

    monkeypatch.setattr(ppo, "rollout", recording_rollout)
    monkeypatch.setattr(ppo, "group_advantages", recording_group)
    config = tiny_config(world, tmp_path / "groups", algo="grpo", samples_per_prompt=3, batch_size=4, max_iters=1,
                         eval_prompts=2)
    ppo.run(config)
    prompts, group_size = seen
    records, _ = ppo.load_prompts(config)
    tokenizer = world["tokenizer"]
    want = [tokenizer.encode_chat(records[i]["prompt"])[0] for i in ppo.prompt_indices(len(records), 4, 0, 1337)]
    assert group_size == 3 and len(prompts) == 12
    assert prompts == [p for p in want for _ in range(3)], "each prompt G times, its answers next to each other"


# --- the PPO update ---------------------------------------------------------------------------

def ppo_batch():
    policy, reference, critic, rm = rollout_models()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3], [9, 8], [1, 1, 1]] * 2
    config = dict(ppo.DEFAULTS, max_new_tokens=8, minibatch_size=4, ppo_epochs=2, learning_rate=1e-3,
                  critic_lr=1e-3)
    batch = ppo.rollout(policy, reference, critic, rm, prompts, config, {"end": 48, "reward": 49}, seed=1)
    rewards = ppo.kl_penalized_rewards(batch["score"], batch["logp"], batch["ref_logp"], batch["mask"], 0.05)
    adv, ret = ppo.compute_gae(rewards, batch["values"], batch["mask"])
    return policy, critic, batch, ppo.masked_whiten(adv, batch["mask"]), ret, config


def test_first_ppo_ratio_is_exactly_one():
    policy, critic, batch, adv, ret, config = ppo_batch()
    idx = torch.tensor([5, 0, 11, 2])  # any minibatch: the training forward pass equals the rollout's
    logp = ppo.sequence_logprobs(policy, batch["ids"][idx], config["temperature"])
    ratio = torch.exp((logp - batch["logp"][idx]) * batch["mask"][idx])
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=0, atol=1e-6)
    opt_p = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    stats = ppo.ppo_update(policy, critic, opt_p, opt_c, batch, adv, ret, config, torch.Generator().manual_seed(0))
    assert stats["first_ratio_error"] < 1e-6, "the first minibatch sees the rollout's own policy"
    assert stats["approx_kl"] > 0 and math.isfinite(stats["value_loss"]) and 0 <= stats["clip_frac"] <= 1


def test_ppo_update_lowers_the_losses_it_optimises():
    policy, critic, batch, adv, ret, config = ppo_batch()
    mask = batch["mask"]
    with torch.no_grad():
        v_before = ppo.value_loss(critic(batch["ids"])[:, :-1], batch["values"], ret, mask, 0.0)
    opt_p = torch.optim.SGD(policy.parameters(), lr=0.5)
    opt_c = torch.optim.SGD(critic.parameters(), lr=2e-5)  # small: the critic head is scaled up 30x
    config = dict(config, ppo_epochs=3, minibatch_size=12, grad_clip=0.0, clip_range=0.5, value_clip=0.0)
    ppo.ppo_update(policy, critic, opt_p, opt_c, batch, adv, ret, config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = ppo.sequence_logprobs(policy, batch["ids"], config["temperature"])
        v_after = ppo.value_loss(critic(batch["ids"])[:, :-1], batch["values"], ret, mask, 0.0)
    surrogate = ppo.masked_mean(-adv * torch.exp((logp - batch["logp"]) * mask), mask)
    assert surrogate.item() < -1e-3, "the surrogate -A * ratio went down from -mean(A) = 0"
    assert v_after < v_before


def test_grpo_update_needs_no_critic_and_raises_the_better_answers():
    policy, _, batch, _, _, config = ppo_batch()
    mask = batch["mask"]
    adv = ppo.group_advantages(batch["score"], 2)[:, None] * mask
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    config = dict(config, algo="grpo", kl_loss_coef=0.0, ppo_epochs=3, minibatch_size=12, grad_clip=0.0,
                  clip_range=0.5)
    stats = ppo.ppo_update(policy, None, opt, None, batch, adv, None, config, torch.Generator().manual_seed(0))
    assert "value_loss" not in stats and stats["ref_kl"] >= 0 and math.isfinite(stats["ref_kl"]), stats
    with torch.no_grad():
        logp = ppo.sequence_logprobs(policy, batch["ids"], config["temperature"])
    surrogate = ppo.masked_mean(-adv * torch.exp((logp - batch["logp"]) * mask), mask)
    assert surrogate.item() < -1e-3, "answers above their group's mean gained probability"


def test_clip_gradients_caps_the_global_norm():
    model = tiny_gpt()
    model(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))[1].mul(100).backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert ppo.clip_gradients(model, 0.0) == pytest.approx(norm.item(), rel=1e-4)
    assert ppo.clip_gradients(model, 0.5) == pytest.approx(norm.item(), rel=1e-4)
    after = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert after.item() == pytest.approx(0.5, rel=1e-3)


# --- evaluation and inputs --------------------------------------------------------------------

def test_evaluate_grades_greedy_answers(world):
    tokenizer = world["tokenizer"]
    sft = load_checkpoint(world["sft"])
    policy = model_from_checkpoint(sft).eval()
    rm = ppo.critic_from_reward_model(load_checkpoint(world["rm"]))  # any scalar model will do
    records = prepare_data.read_jsonl(os.path.join(world["data_dir"], "tinyworld", "prompts_eval.jsonl"))[:5]
    config = dict(ppo.DEFAULTS, max_new_tokens=6)
    out = ppo.evaluate(policy, rm, tokenizer, records, config)
    end = tokenizer.special_ids[bpe.END_OF_TURN]
    answers, scores = [], []
    for r in records:  # one prompt at a time, greedy, straight from GPT.generate
        ids = tokenizer.encode_chat(r["prompt"])[0]
        row = policy.generate(torch.tensor([ids]), 6, temperature=0.0, stop_token=end)[0, len(ids):].tolist()
        ended = end in row
        response = row[:row.index(end)] if ended else row
        answers.append((tokenizer.decode(response), ended))
        with torch.no_grad():
            scores.append(rm(torch.tensor([ids + response + ([end] if ended else []) +
                                           [tokenizer.special_ids[bpe.REWARD]]]))[0, -1].item())
    want = tinyworld.grade_answers(records, answers)
    assert out["gold"] == pytest.approx(want["gold"]) and out["accuracy"] == want["accuracy"]
    assert out["golds"] == [tinyworld.gold_score(r, t, e) for r, (t, e) in zip(records, answers)]
    assert out["rm"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)


def test_pairwise_agreement_against_listed_pairs():
    scores = [1.0, 0.9, 0.5, 2.0, 1.0, 3.0]
    golds = [3.0, 0.0, 1.0, 0.2, 0.0, 1.0]
    # prompt 1: (0,1) agrees, (0,2) agrees, (1,2) disagrees; prompt 2: (3,4) gold gap 0.2 is skipped,
    # (3,5) agrees, (4,5) agrees
    assert ppo.pairwise_agreement(scores, golds, group_size=3) == pytest.approx(4 / 5)
    assert ppo.pairwise_agreement(scores, golds, group_size=1) is None, "no pairs"


def test_win_rate_counts_ties_as_half():
    assert ppo.win_rate([1.0, 2.0, 0.0, 3.0], [0.0, 2.0, 1.0, 1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert ppo.win_rate([], []) == 0.0


def test_load_prompts_reads_both_files_and_names_bad_ones(world, tmp_path):
    config = dict(ppo.DEFAULTS, data_dir=world["data_dir"], eval_prompts=5)
    train_records, eval_records = ppo.load_prompts(config)
    assert len(train_records) == 40 and len(eval_records) == 5 and all("reference" in r for r in train_records)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "meta.json").write_text("{}")
    (folder / "prompts_ppo.jsonl").write_text(json.dumps({"prompt": ""}) + "\n")
    (folder / "prompts_eval.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(prepare_data.DataError, match="prompts_ppo.jsonl line 1 has no 'prompt'"):
        ppo.load_prompts(dict(config, data_dir=str(tmp_path), dataset="bad"))


def test_critic_starts_as_the_normalised_reward_model(world):
    rm_ckpt = load_checkpoint(world["rm"])
    critic = ppo.critic_from_reward_model(rm_ckpt)
    rm = ppo.scalar_model_from_checkpoint(rm_ckpt)
    seqs = [with_reward_token([1, 2, 3], [4, 5], 7), with_reward_token([9], [10, 11, 12], 7)]
    want = score_sequences(rm, seqs, normalizer=rm_ckpt["reward_norm"])
    with torch.no_grad():
        got = [critic(torch.tensor([s]))[0, -1].item() for s in seqs]
    assert got == pytest.approx(want.tolist(), abs=1e-5)


def test_check_config_rejects_values_that_fail_later():
    ppo.check_config(dict(ppo.DEFAULTS))
    for key, value, message in [("temperature", 0.0, "must be > 0"), ("minibatch_size", 0, "at least 1"),
                                ("clip_range", 1.5, "between 0 and 1"),
                                ("reward_source", "human", "not one of rm, gold"),
                                ("algo", "dpo", "not one of ppo, grpo"), ("samples_per_prompt", 1, "at least 2")]:
        with pytest.raises(ValueError, match=message):
            ppo.check_config(dict(ppo.DEFAULTS, **{"algo": "grpo", key: value}))


def test_resolve_dirs_defaults_follow_the_config_name():
    assert ppo.resolve_dirs(dict(ppo.DEFAULTS, config="small")) == (
        os.path.join("out", "small", "sft"), os.path.join("out", "small", "rm"), os.path.join("out", "small", "ppo"))
    assert ppo.resolve_dirs(dict(ppo.DEFAULTS, init_dir="a", reward_dir="b", out_dir="c")) == ("a", "b", "c")


# --- whole runs -------------------------------------------------------------------------------

def test_auto_dtype_is_measured_named_and_recorded(world, tmp_path, monkeypatch, capsys):
    import train
    calls = []
    # the timed step runs once (it must work), then bf16 "measures" 0.1x
    monkeypatch.setattr(train, "measure_bf16_speedup",
                        lambda step, *a, **k: calls.append(step) or step(contextlib.nullcontext()) or 0.1)
    ppo.run(tiny_config(world, tmp_path / "ppo", max_iters=1, eval_prompts=2, dtype="auto"))
    assert len(calls) == 1, "ppo.py measures one sampling and training step once, before the first iteration"
    assert "float32 (auto: a bf16 autocast step measured 0.10x" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "ppo"))["config"]["dtype"] == "float32"


def test_tiny_run_writes_its_checkpoints_logs_and_plots(world, tmp_path):
    out = tmp_path / "run"
    metrics = ppo.run(tiny_config(world, out))
    ckpt = load_checkpoint(str(out / "ckpt.pt"), stages={"ppo"})
    assert ckpt["parent"]["sha256"] == parent_record(os.path.join(world["sft"], "ckpt.pt"))["sha256"]
    assert ckpt["reward_parent"]["sha256"] == parent_record(os.path.join(world["rm"], "ckpt.pt"))["sha256"]
    assert ckpt["resume"]["iter"] == 4 and ckpt["model_args"] == world["args"]
    model_from_checkpoint(ckpt)  # loads like any GPT checkpoint
    ppo.scalar_model_from_checkpoint(ckpt["critic"])  # the critic is saved with the policy, in one file
    assert set(ckpt["critic"]) == {"model_args", "model"} and "critic_optimizer" in ckpt["resume"]
    assert not (out / "critic.pt").exists()
    log = read_jsonl_log(str(out / "log.jsonl"))
    steps = [r for r in log if "rm_score" in r]
    evals = [r for r in log if "eval_gold" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4] and [r["iter"] for r in evals] == [0, 4]
    for key in ("rm_score", "gold", "kl", "entropy", "clip_frac", "approx_kl", "value_loss", "explained_var",
                "resp_len", "end_rate", "loss", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert all(r["rm_agreement"] is None or 0 <= r["rm_agreement"] <= 1 for r in steps)
    assert steps[0]["first_ratio_error"] == 0.0
    assert evals[0]["win_rate"] == 0.5 and "win_rate" in metrics
    for name in ("reward.png", "kl.png"):
        assert (out / name).stat().st_size > 1000


def test_gold_reward_source_rewards_the_labelers_score(world, tmp_path):
    ppo.run(tiny_config(world, tmp_path / "oracle", max_iters=2, kl_coef=0.0, no_end_penalty=0.0,
                        reward_source="gold"))
    steps = [r for r in read_jsonl_log(str(tmp_path / "oracle" / "log.jsonl")) if "rm_score" in r]
    assert all(r["reward"] == pytest.approx(r["gold"], abs=1e-5) for r in steps), \
        "beta 0, no penalty: each response's summed reward is its gold score"


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_exact_resume_is_bit_for_bit(world, tmp_path, algo):
    common = dict(max_iters=4, save_interval=100, algo=algo)
    ppo.run(tiny_config(world, tmp_path / "straight", **common))
    ppo.run(tiny_config(world, tmp_path / "resumed", stop_at_iter=2, **common))
    ppo.run(tiny_config(world, tmp_path / "resumed", **common), flags={"resume"})

    def steps(name):
        return [{k: v for k, v in r.items() if k not in ("time", "tok_per_s")}  # clock readings differ
                for r in read_jsonl_log(str(tmp_path / name / "log.jsonl")) if "rm_score" in r]
    assert len(steps("straight")) == 4 and steps("straight") == steps("resumed"), "2 + resume + 2 == 4"
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "resumed"))
    for part in ("model", "critic") if algo == "ppo" else ("model",):
        x, y = (a["model"], b["model"]) if part == "model" else (a["critic"]["model"], b["critic"]["model"])
        assert all(torch.equal(x[k], y[k]) for k in x), part


def test_resume_refuses_an_older_layout_or_a_parent_of_another_run(world, tmp_path, capsys):
    out = tmp_path / "guarded"
    ppo.run(tiny_config(world, out, max_iters=1))
    ckpt = load_checkpoint(str(out))
    save_checkpoint({k: v for k, v in ckpt.items() if k != "critic"}, str(out / "older" / "ckpt.pt"))
    argv = ["--config", "tiny", f"--data_dir={world['data_dir']}", f"--init_dir={world['sft']}",
            f"--reward_dir={world['rm']}", f"--out_dir={out / 'older'}", "--max_iters=2", "--resume"]
    assert ppo.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an older ppo.py's (its critic apart, in critic.pt" in err, err
    assert ppo.main(argv[:-3] + [f"--out_dir={out}", "--max_iters=2", "--resume"]) == 0, "the new layout resumes"
    other_sft = tmp_path / "other_sft" / "ckpt.pt"
    save_checkpoint(dict(load_checkpoint(world["sft"]), metrics={"changed": 1}), str(other_sft))
    with pytest.raises(CheckpointError, match="changed since the run being resumed"):
        ppo.run(tiny_config(world, out, max_iters=2, init_dir=str(other_sft.parent)), flags={"resume"})


def test_tiny_grpo_run_keeps_no_critic_and_resumes_only_as_grpo(world, tmp_path, capsys):
    out = tmp_path / "grpo"
    metrics = ppo.run(tiny_config(world, out, algo="grpo", max_iters=2, reward_source="gold"))
    ckpt = load_checkpoint(str(out), stages={"ppo"})
    assert ckpt["config"]["algo"] == "grpo" and ckpt["critic"] is None and ckpt["resume"]["critic_optimizer"] is None
    model_from_checkpoint(ckpt)  # loads like any GPT checkpoint
    steps = [r for r in read_jsonl_log(str(out / "log.jsonl")) if "rm_score" in r]
    assert [r["iter"] for r in steps] == [1, 2] and "win_rate" in metrics
    assert all(r["explained_var"] is None and "value_loss" not in r and math.isfinite(r["ref_kl"]) for r in steps)
    argv = ["--config", "tiny", f"--data_dir={world['data_dir']}", f"--init_dir={world['sft']}",
            f"--reward_dir={world['rm']}", f"--out_dir={out}", "--max_iters=3", "--resume"]
    capsys.readouterr()
    assert ppo.main(argv) == 0, "resumed without --algo: the run's own grpo"
    assert "algo='grpo'" in capsys.readouterr().out
    ckpt = load_checkpoint(str(out))
    assert ckpt["resume"]["iter"] == 3 and ckpt["critic"] is None and ckpt["config"]["algo"] == "grpo"
    older = dict(ckpt, config={k: v for k, v in ckpt["config"].items() if k != "algo"})  # before --algo: ppo
    save_checkpoint(older, str(tmp_path / "older" / "ckpt.pt"))
    assert ppo.main(argv[:-3] + [f"--out_dir={tmp_path / 'older'}", "--max_iters=4", "--resume", "--algo=grpo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a ppo run: resume it with --algo=ppo" in err, err


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_tiny_ppo_raises_a_trivially_learnable_reward(world, tmp_path, monkeypatch, algo):
    """The reward: the share of response tokens that are one particular token X.
    The tiny policy starts with P(X) of about 5% at every position; PPO must
    raise the reward several-fold within seconds."""
    sft = load_checkpoint(world["sft"])
    x_id = 5
    policy = model_from_checkpoint(sft)
    with torch.no_grad():  # logit(X) = k * n_embd everywhere: LayerNorm's output sums to 0
        policy.transformer.ln_f.bias.fill_(1.0)
        policy.transformer.wte.weight[x_id] = 4.2 / 32
    save_checkpoint(dict(sft, model=policy.state_dict()), str(tmp_path / "sft" / "ckpt.pt"))

    def share_of_x(reward_model, prompts, responses, reward_id, normalizer=None, batch_size=64):
        return torch.tensor([sum(1.0 for t in r if t == x_id) / max(1, len(r)) for r in responses])

    monkeypatch.setattr(ppo, "score_responses", share_of_x)
    ppo.run(tiny_config(world, tmp_path / "learn", init_dir=str(tmp_path / "sft"), max_iters=10, kl_coef=0.0,
                        kl_loss_coef=0.0, learning_rate=3e-3, ppo_epochs=4, save_interval=100, eval_prompts=2,
                        algo=algo))
    scores = [r["rm_score"] for r in read_jsonl_log(str(tmp_path / "learn" / "log.jsonl")) if "rm_score" in r]
    first, last = sum(scores[:2]) / 2, sum(scores[-2:]) / 2
    assert last > 3 * first and last > 0.2, f"reward went from {first:.3f} to {last:.3f}"


def test_main_bad_inputs_give_one_line(world, tmp_path, capsys):
    base = ["--config", "tiny", f"--data_dir={world['data_dir']}"]
    cases = [
        (base + [f"--init_dir={tmp_path}/none", f"--reward_dir={world['rm']}", f"--out_dir={tmp_path}/a"],
         "does not exist"),
        (base + [f"--init_dir={world['rm']}", f"--reward_dir={world['rm']}", f"--out_dir={tmp_path}/b"],
         "is a 'rm' checkpoint"),
        (base + [f"--init_dir={world['sft']}", f"--reward_dir={world['sft']}", f"--out_dir={tmp_path}/c"],
         "is a 'sft' checkpoint"),
        (base + ["--temperature=0"], "must be > 0"),
        (base + ["--kl_coef=high"], "not a valid float"),
        (base + [f"--out_dir={tmp_path}/none", "--resume"], "does not exist"),
    ]
    for argv, message in cases:
        assert ppo.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("ppo.py: error:") and message in err and err.count("\n") == 1, err


def test_weights_that_turn_nan_stop_the_run_and_the_checkpoint_stays_finite(world, tmp_path, monkeypatch):
    real_update = ppo.ppo_update
    calls = []

    def blows_up_at_the_third(policy, critic, *args, **kwargs):
        stats = real_update(policy, critic, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(critic.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(ppo, "ppo_update", blows_up_at_the_third)
    out = tmp_path / "blown"
    with pytest.raises(FloatingPointError, match="critic.* is not finite after iteration 3: stopping; the last good"):
        ppo.run(tiny_config(world, out, max_iters=4, save_interval=2))
    saved = torch.load(str(out / "ckpt.pt"), weights_only=True)
    assert saved["resume"]["iter"] == 2 and model.nonfinite(saved) == []


def test_existing_checkpoint_is_not_overwritten_without_a_flag(world, tmp_path):
    out = tmp_path / "keep"
    ppo.run(tiny_config(world, out, max_iters=1))
    with pytest.raises(ValueError, match="already exists: pass --resume"):
        ppo.run(tiny_config(world, out, max_iters=1))
    ppo.run(tiny_config(world, out, max_iters=1), flags={"overwrite"})


def test_ctrl_c_saves_and_exits_cleanly(world, tmp_path):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, os.path.join(ROOT, "ppo.py"), "--config", "tiny", f"--data_dir={world['data_dir']}",
           f"--init_dir={world['sft']}", f"--reward_dir={world['rm']}", f"--out_dir={out}", "--max_iters=100000",
           "--save_interval=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    log = out / "log.jsonl"
    while time.time() < deadline and not (log.exists() and "rm_score" in log.read_text()):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "continue with --resume" in output
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["resume"]["iter"] >= 1
    assert "critic" in ckpt, "the critic is saved with the policy"
