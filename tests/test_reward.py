"""Tests for reward.py: the reward model's input, the pairwise loss, pair batches,
packed rows, the metrics, normalisation, scoring, and whole tiny runs."""

import contextlib
import json
import math
import os
import random
import signal
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import bpe
import prepare_data
import reward
from model import (answer_prompts, CheckpointError, GPT, GPTConfig, load_checkpoint, parent_record, save_checkpoint,
                   tokenizer_from_checkpoint)
from train import read_jsonl_log
from reward import ScalarHeadModel

GOOD = ["yes", "the", "cat", "sat", "on", "mat", "good", "dog"]
BAD = ["no", "red", "ball", "ran", "to", "park", "bad", "with"]


# --- a tiny world: a tokenizer, separable preference pairs, an "sft" checkpoint --------

def pseudo_text(n_words=3000, seed=0):
    rng = random.Random(seed)
    words = GOOD + BAD + ["is", "what", "where", "a", "and"]
    return " ".join(rng.choice(words) for _ in range(n_words)) + " ?."


def separable_pair(rng, i, flip=False):
    """chosen: GOOD words, ended; rejected: BAD words, cut. flip: a noisy label
    (the labeller preferred the worse one), so gold_prefers_chosen is False."""
    good = " ".join(rng.choice(GOOD) for _ in range(rng.randint(2, 6))) + "."
    bad = " ".join(rng.choice(BAD) for _ in range(rng.randint(2, 6)))
    record = {"id": f"p{i}", "task": "toy", "prompt": f"what is {rng.choice(GOOD + BAD)} {i}?",
              "chosen": good, "rejected": bad, "chosen_ended": True, "rejected_ended": False,
              "gold_chosen": 3.0, "gold_rejected": 1.0, "gold_prefers_chosen": True}
    if flip:
        record.update(chosen=bad, rejected=good, chosen_ended=False, rejected_ended=True, gold_chosen=1.0,
                      gold_rejected=3.0, gold_prefers_chosen=False)
    return record


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def tiny_gpt_config(tok, block_size=64):
    return GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32)


def save_lm_checkpoint(path, tok, stage="sft", seed=0):
    torch.manual_seed(seed)
    gpt = GPT(tiny_gpt_config(tok))
    save_checkpoint({"stage": stage, "model_args": asdict(gpt.config), "model": gpt.state_dict(),
                     "tokenizer": tok.to_dict(), "config": {}, "parent": None, "metrics": {}}, str(path))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """root/data/toy/{tokenizer.json, prefs_train.jsonl, prefs_val.jsonl (20% noisy
    labels), prompts_ppo.jsonl}, root/sft/ckpt.pt (a random tiny GPT), the tokenizer."""
    root = tmp_path_factory.mktemp("reward")
    tok = bpe.train_tokenizer(pseudo_text(), 300)
    folder = root / "data" / "toy"
    os.makedirs(folder)
    tok.save(str(folder / "tokenizer.json"))
    rng = random.Random(1)
    write_jsonl(folder / "prefs_train.jsonl", [separable_pair(rng, i) for i in range(240)])
    write_jsonl(folder / "prefs_val.jsonl", [separable_pair(rng, 1000 + i, flip=i % 5 == 0) for i in range(60)])
    write_jsonl(folder / "prompts_ppo.jsonl", [{"prompt": f"where is the {w}?"} for w in GOOD + BAD])
    save_lm_checkpoint(root / "sft" / "ckpt.pt", tok)
    return root, tok


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from several threads, and on a busy 2-core machine
    OpenMP threads waiting for one another make these tests ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(root, out, **overrides):
    config = dict(reward.DEFAULTS)
    config.update(reward.PRESETS["tiny"])
    config.update(config="tiny", data_dir=str(root / "data"), dataset="toy", init=str(root / "sft"),
                  out_dir=str(out), log_interval=1000, dtype="float32",  # not timed: runs are compared
                  device="cpu")  # the normalisation test re-samples on the CPU: same device, same samples
    config.update(overrides)
    return config


def tiny_reward_model(tok, seed=0):
    torch.manual_seed(seed)
    model = ScalarHeadModel(tiny_gpt_config(tok))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # rewards far enough apart to compare
    return model.eval()


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """One tiny run on the separable pairs: (its output folder, the metrics run() returned)."""
    root, _ = world
    out = tmp_path_factory.mktemp("rm_run")
    metrics = reward.run(tiny_config(root, out, max_iters=40, eval_interval=20))
    return out, metrics


# --- the reward model's input ------------------------------------------------------------

def test_reward_input_is_chat_template_then_reward_token(world):
    _, tok = world
    sid = tok.special_ids
    expected = ([sid[bpe.USER]] + tok.encode("what is red?") + [sid[bpe.END_OF_TURN], sid[bpe.ASSISTANT]]
                + tok.encode("the cat.") + [sid[bpe.END_OF_TURN], sid[bpe.REWARD]])
    assert reward.reward_input(tok, "what is red?", "the cat.") == expected
    cut = reward.reward_input(tok, "what is red?", "the cat.", ended=False)
    assert cut == expected[:-2] + [sid[bpe.REWARD]], "a cut response has no end-of-turn token"
    short = reward.reward_input(tok, "what is red?", "the cat.", block_size=5)
    assert short == expected[-5:], "too long: the oldest tokens go, <|reward|> stays last"


# --- records, validation, pairs ------------------------------------------------------------

GOOD_PAIR = {"prompt": "what is red?", "chosen": "a colour.", "rejected": "a dog", "chosen_ended": True,
             "rejected_ended": False, "gold_prefers_chosen": True}


def make_pair(tok, record, block_size=64):
    """The pair load_preferences makes of one record."""
    return {"chosen": reward.reward_input(tok, record["prompt"], record["chosen"], record.get("chosen_ended", True),
                                          block_size),
            "rejected": reward.reward_input(tok, record["prompt"], record["rejected"],
                                            record.get("rejected_ended", True), block_size),
            "gold": record.get("gold_prefers_chosen")}


def test_validate_pair_record():
    assert reward.validate_pair_record(dict(GOOD_PAIR)) is None
    assert reward.validate_pair_record({"prompt": "p", "chosen": "a", "rejected": "b"}) is None, "optional fields"
    no_rejected = {k: v for k, v in GOOD_PAIR.items() if k != "rejected"}
    assert reward.validate_pair_record(no_rejected) == "missing field 'rejected'"
    assert "same response" in reward.validate_pair_record({"prompt": "p", "chosen": "a", "rejected": "a"})
    assert reward.validate_pair_record({**GOOD_PAIR, "chosen": 3}).startswith("field 'chosen' must be a string")
    assert "chosen_ended" in reward.validate_pair_record({**GOOD_PAIR, "chosen_ended": "yes"})
    assert "prompt is empty" in reward.validate_pair_record({**GOOD_PAIR, "prompt": " "})
    assert "gold_prefers_chosen" in reward.validate_pair_record({**GOOD_PAIR, "gold_prefers_chosen": 1})
    same_text_other_end = {"prompt": "p", "chosen": "a", "rejected": "a", "chosen_ended": True,
                           "rejected_ended": False}
    assert reward.validate_pair_record(same_text_other_end) is None, "a cut copy is a different input"


def test_load_preferences_makes_pairs_of_reward_inputs(world, tmp_path):
    _, tok = world
    path = tmp_path / "prefs_train.jsonl"
    write_jsonl(path, [GOOD_PAIR, {**GOOD_PAIR, "gold_prefers_chosen": None}, {"prompt": "p", "chosen": "a",
                                                                               "rejected": "b"}])
    pairs = reward.load_preferences(str(path), tok, 64)
    assert pairs[0] == {"chosen": reward.reward_input(tok, "what is red?", "a colour.", True, 64),
                        "rejected": reward.reward_input(tok, "what is red?", "a dog", False, 64), "gold": True}
    assert pairs[1]["gold"] is None and pairs[2]["gold"] is None, "no gold label: None"
    assert pairs[2]["rejected"] == reward.reward_input(tok, "p", "b", True, 64), "ended by default"
    short = reward.load_preferences(str(path), tok, 6)
    assert all(len(p["chosen"]) <= 6 and len(p["rejected"]) <= 6 for p in short), "block_size is applied"


def test_load_preferences_names_file_and_line_of_a_bad_record(world, tmp_path):
    _, tok = world
    path = tmp_path / "prefs_train.jsonl"
    write_jsonl(path, [GOOD_PAIR, GOOD_PAIR, {"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(prepare_data.DataError, match=r"prefs_train.jsonl line 3: chosen and rejected are the same"):
        reward.load_preferences(str(path), tok, 64)
    write_jsonl(path, [GOOD_PAIR, {"prompt": "p", "chosen": "a"}])
    with pytest.raises(prepare_data.DataError, match=r"line 2: missing field 'rejected'"):
        reward.load_preferences(str(path), tok, 64)
    write_jsonl(path, [])
    with pytest.raises(prepare_data.DataError, match="holds no preference records"):
        reward.load_preferences(str(path), tok, 64)
    with pytest.raises(prepare_data.DataError, match="does not exist"):
        reward.load_preferences(str(tmp_path / "none.jsonl"), tok, 64)



# --- batches ---------------------------------------------------------------------------------

def test_pair_batches_cover_each_pair_once_in_an_order_of_seed_and_epoch():
    lengths = [random.Random(2).randint(3, 60) for _ in range(19)]
    batches = reward.pair_batches(lengths, 8, seed=5, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(19)), "every pair exactly once per epoch"
    assert sorted(len(b) for b in batches) == [3, 8, 8], "batches of batch_size pairs, the rest in one"
    assert reward.pair_batches(lengths, 8, seed=5, epoch=0) == batches, "deterministic"
    assert reward.pair_batches(lengths, 8, seed=5, epoch=1) != batches, "a new order each epoch"
    assert reward.pair_batches(lengths, 8, seed=6, epoch=0) != batches, "the order follows the seed"
    same = reward.pair_batches([7] * 19, 8, seed=5, epoch=0)
    order = torch.randperm(19, generator=torch.Generator().manual_seed(5 * 1000)).tolist()
    assert sorted(same) == sorted([order[:8], order[8:16], order[16:]]), "equal lengths: the drawn order, cut"


def test_pair_batches_sort_by_length_within_windows():
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(400)]

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    sorted_batches = reward.pair_batches(lengths, 10, seed=1, epoch=0)
    order = torch.randperm(400, generator=torch.Generator().manual_seed(1000)).tolist()
    unsorted = [order[i:i + 10] for i in range(0, 400, 10)]  # the same order, cut without sorting
    assert sorted(i for b in sorted_batches for i in b) == list(range(400)) and all(len(b) == 10 for b in sorted_batches)
    assert padded_tokens(sorted_batches) < 0.8 * padded_tokens(unsorted), "less padding"
    window = reward.SORT_WINDOW * 10
    for b in sorted_batches:  # each batch: neighbours in the sorted order of its window of the drawn order
        w = order.index(b[0]) // window
        ranked = sorted(order[w * window:(w + 1) * window], key=lambda i: lengths[i])
        assert b == ranked[ranked.index(b[0]):ranked.index(b[0]) + 10], "a batch is a run of its sorted window"
    firsts = [lengths[b[0]] for b in sorted_batches]
    assert firsts != sorted(firsts), "the batches themselves come in a random order"


def test_differs_only_in_answer_finds_right_wrong_pairs_in_the_same_words():
    same_words = [("Anna has 6 bells now.", "Anna has 7 bells now."),
                  ("Sara has 0 carrots left.", "Sara has 1 carrot left."),       # two words differ
                  ("A purple train.", "A purple drum."),
                  ("Bread is a food.", "A hill is a food."),                     # one word against two
                  ("Okay. It is 4. I hope that helps.", "Okay. It is 5. I hope that helps.")]
    for a, b in same_words:
        assert reward.differs_only_in_answer(a, b) and reward.differs_only_in_answer(b, a), (a, b)
    other = [("It is 4.", "It is 4."),                                              # identical
             ("The answer is", "The answer is 7."),                                 # cut before its answer
             ("It is 4.", "Well, I think the sum of these two numbers must be 4."),  # other words
             ("", "It is 4.")]
    for a, b in other:
        assert not reward.differs_only_in_answer(a, b) and not reward.differs_only_in_answer(b, a), (a, b)
    assert not reward.differs_only_in_answer("a b c d e f.", "a x y z w f.")  # 4 words differ: more than 3
    assert reward.differs_only_in_answer("a b c d e f.", "a x y z w f.", max_words=4)


def test_parse_oversample():
    assert reward.parse_oversample("arithmetic:4,story_qa:2") == {"arithmetic": 4, "story_qa": 2}
    assert reward.parse_oversample("") == {}
    for bad in ["arithmetic", "arithmetic:0", "arithmetic:x", ":3", "arithmetic:-1"]:
        with pytest.raises(ValueError, match="task:K"):
            reward.parse_oversample(bad)


def test_oversample_pairs_repeats_the_answer_only_pairs_of_the_named_tasks():
    records = [{"task": "arithmetic", "chosen": "It is 7.", "rejected": "It is 8."},          # repeated
               {"task": "arithmetic", "chosen": "It is 7.", "rejected": "What is 3 plus 4?"},  # other words
               {"task": "story_qa", "chosen": "A red ball.", "rejected": "A blue ball."},      # repeated
               {"task": "category", "chosen": "Cow is an animal.", "rejected": "Red is an animal."}]
    pairs = [{"chosen": [i], "rejected": [i, 1], "gold": True} for i in range(len(records))]
    out, n = reward.oversample_pairs(pairs, records, {"arithmetic": 3, "story_qa": 2})
    assert n == 3 and len(out) == len(pairs) + 3
    assert out[:len(pairs)] == pairs, "the original pairs come first, in their order"
    assert [p["chosen"][0] for p in out[len(pairs):]] == [0, 0, 2]
    assert reward.oversample_pairs(pairs, records, {})[1] == 0


# --- a pair in one row ------------------------------------------------------------------------

def test_pack_pair_keeps_the_shared_prefix_once_then_each_sequences_rest():
    ids, positions, branches, ends = reward.pack_pair([1, 2, 3, 9], [1, 2, 4, 5, 9])
    assert ids == [1, 2, 3, 9, 4, 5, 9], "prefix [1, 2] once, then [3, 9], then [4, 5, 9]"
    assert positions == [0, 1, 2, 3, 2, 3, 4], "a branch continues the positions of the prefix"
    assert branches == [0, 0, 1, 1, 2, 2, 2] and ends == [3, 6]
    same = reward.pack_pair([1, 2, 9], [1, 2, 9])
    assert same == ([1, 2, 9, 9], [0, 1, 2, 2], [0, 0, 1, 2], [2, 3]), "equal sequences: a branch of one token each"
    assert reward.pack_pair([4, 9], [5, 9])[0] == [4, 9, 5, 9], "nothing shared: the sequences in turn"
    assert reward.pack_pair([1, 2], [1, 2, 3, 9])[0] == [1, 2, 2, 3, 9], "a prefix of the other: still a branch each"


def test_tree_mask_lets_each_token_see_exactly_its_own_sequence_up_to_itself():
    seqs = [[1, 2, 3, 7, 9], [1, 2, 4, 5, 9]]
    ids, positions, branches, _ = reward.pack_pair(*seqs)
    T = len(ids) + 2  # two padding columns, as collate_shared pads
    mask = reward.tree_mask(torch.tensor([positions + [0, 0]]), torch.tensor([branches + [-1, -1]]))
    assert mask.shape == (1, 1, T, T) and mask.dtype == torch.bool
    # the reference: the row indices each sequence occupies, in its order
    shared = branches.count(0)
    members = [list(range(shared)) + [i for i, b in enumerate(branches) if b == s + 1] for s in range(len(seqs))]
    for s, rows in enumerate(members):
        assert [ids[i] for i in rows] == seqs[s], "pack_pair must lay each sequence out in order"
    for q in range(len(ids)):
        for k in range(T):
            expected = any(q in rows and k in rows and rows.index(k) <= rows.index(q) for rows in members)
            assert mask[0, 0, q, k].item() == expected, f"query {q}, key {k}: expected {expected}"
    assert mask[0, 0, len(ids):, len(ids):].all(), "padding sees padding (a query must see something)"


def one_row_per_sequence(model, pairs):
    """The reference layout: every sequence its own right-padded row. Returns
    (r_chosen, r_rejected, LM loss of the chosen sequences)."""
    ids, lengths = reward.pad_right([s for p in pairs for s in (p["chosen"], p["rejected"])])
    hidden = model.gpt.hidden_states(ids)
    rewards = reward.read_last(model(ids, hidden), lengths)
    return rewards[0::2], rewards[1::2], reward.chosen_lm_loss(model, hidden[0::2], ids[0::2], lengths[0::2])


def test_collate_shared_gives_the_rewards_lm_loss_and_gradients_of_a_row_per_sequence(world):
    _, tok = world
    pairs = [make_pair(tok, GOOD_PAIR), make_pair(tok, {**GOOD_PAIR, "rejected": "a colour. no"}),
             make_pair(tok, {**GOOD_PAIR, "prompt": "where is the cat sat on the mat?"})]
    for attention in ("sdpa", "explicit"):
        model = tiny_reward_model(tok)
        for block in model.gpt.transformer.h:
            block.attn.attention = attention
        r_chosen, r_rejected, lm = one_row_per_sequence(model, pairs)
        loss = reward.pairwise_loss(r_chosen, r_rejected) + lm
        expected_grads = torch.autograd.grad(loss, list(model.parameters()))

        ids, positions, mask, ends, chosen_lengths = reward.collate_shared(pairs)
        assert ids.size(0) == 3 and ids.numel() < 2 * 3 * max(len(p["rejected"]) for p in pairs), "fewer tokens"
        assert chosen_lengths.tolist() == [len(p["chosen"]) for p in pairs]
        hidden = model.gpt.hidden_states(ids, positions=positions, attn_mask=mask)
        rewards = model(ids, hidden)
        rows = torch.arange(3)
        r_chosen2, r_rejected2 = rewards[rows, ends[:, 0]], rewards[rows, ends[:, 1]]
        assert torch.allclose(r_chosen2, r_chosen, atol=1e-5) and torch.allclose(r_rejected2, r_rejected, atol=1e-5), \
            f"{attention}: packed rewards differ from one row each"
        assert (ids[rows, ends[:, 0]] == tok.special_ids[bpe.REWARD]).all()
        assert (ids[rows, ends[:, 1]] == tok.special_ids[bpe.REWARD]).all()
        loss2 = reward.pairwise_loss(r_chosen2, r_rejected2) + reward.chosen_lm_loss(model, hidden, ids, chosen_lengths)
        assert torch.allclose(loss2, loss, atol=1e-5), f"{attention}: loss {loss2.item()} vs {loss.item()}"
        for g2, g in zip(torch.autograd.grad(loss2, list(model.parameters())), expected_grads):
            assert torch.allclose(g2, g, atol=1e-5), f"{attention}: gradients differ"


def test_training_losses_are_the_pairwise_plus_lm_loss(world):
    _, tok = world
    model = tiny_reward_model(tok)
    pairs = [make_pair(tok, GOOD_PAIR), make_pair(tok, {**GOOD_PAIR, "chosen": "the cat sat."})]
    r_chosen, r_rejected, lm = one_row_per_sequence(model, pairs)  # the reference, written out
    pair = reward.pairwise_loss(r_chosen, r_rejected)
    loss, pair_loss, lm_loss, diff = reward.training_losses(model, pairs, lm_coef=2.0)
    assert torch.allclose(diff, r_chosen - r_rejected, atol=1e-5)
    assert torch.allclose(pair_loss, pair, atol=1e-5) and torch.allclose(lm_loss, lm, atol=1e-5)
    assert torch.allclose(loss, pair + 2.0 * lm, atol=1e-5), "loss = pair loss + lm_coef x LM loss"
    loss, pair_loss, lm_loss, _ = reward.training_losses(model, pairs, lm_coef=0.0)
    assert lm_loss is None and torch.allclose(loss, pair_loss), "lm_coef 0: the pairwise loss alone"


def test_training_batch_loss_does_not_depend_on_pair_order(world):
    _, tok = world
    model = tiny_reward_model(tok, seed=4)
    rng = random.Random(3)
    pairs = [make_pair(tok, separable_pair(rng, i)) for i in range(6)]
    losses = []
    for order in (pairs, pairs[::-1], pairs[2:] + pairs[:2]):
        with torch.no_grad():
            losses.append(reward.training_losses(model, order, lm_coef=1.0)[0].item())
    assert losses[1] == pytest.approx(losses[0], abs=1e-6) and losses[2] == pytest.approx(losses[0], abs=1e-6)


# --- reading the reward, the loss -------------------------------------------------------------

def test_reward_is_read_at_the_reward_token_whatever_the_padding(world):
    _, tok = world
    model = tiny_reward_model(tok)
    seqs = [reward.reward_input(tok, "what is red?", r) for r in ["a colour.", "no", "the cat sat on the mat."]]
    alone = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])  # each unpadded, last position
    ids, lengths = reward.pad_right(seqs)
    with torch.no_grad():
        together = reward.read_last(model(ids), lengths)
        assert torch.allclose(together, alone, atol=1e-5)
        # more padding, and random tokens after <|reward|>: the same rewards
        noisy = torch.randint(0, tok.vocab_size, (3, ids.size(1) + 9))
        noisy[:, :ids.size(1)] = ids
        for row, n in enumerate(lengths.tolist()):
            noisy[row, n:] = torch.randint(0, tok.vocab_size, (noisy.size(1) - n,))
        assert torch.allclose(reward.read_last(model(noisy), lengths), alone, atol=1e-5)


def test_rewards_from_given_hidden_states_equal_the_forward(world):
    _, tok = world
    model = tiny_reward_model(tok)
    ids, _ = reward.pad_right([reward.reward_input(tok, "what is red?", r) for r in ["a colour.", "no"]])
    with torch.no_grad():
        assert torch.allclose(model(ids, model.gpt.hidden_states(ids)), model(ids), atol=1e-6)


def test_chosen_lm_loss_is_the_cross_entropy_of_each_rows_first_sequence_before_the_reward_token(world):
    _, tok = world
    model = tiny_reward_model(tok)
    prompts = ["what is red?", "where is the cat?"]
    responses = ["a colour.", "on the mat, the good mat."]
    seqs = [reward.reward_input(tok, p, r) for p, r in zip(prompts, responses)]
    ids, lengths = reward.pad_right(seqs)
    # the reference: each sequence alone, unpadded, through GPT.forward's logits; every
    # token after the first up to the end of turn is a target, <|reward|> is not
    token_losses = []
    for s in seqs:
        assert s[-1] == tok.special_ids[bpe.REWARD] and s[-2] == tok.special_ids[bpe.END_OF_TURN]
        logits = model.gpt(torch.tensor([s]))[0][0]  # GPT.forward: ((1, T, V) logits, None)
        for t in range(1, len(s) - 1):
            token_losses.append(F.cross_entropy(logits[t - 1:t], torch.tensor([s[t]])))
    expected = torch.stack(token_losses).mean()
    got = reward.chosen_lm_loss(model, model.gpt.hidden_states(ids), ids, lengths)
    assert torch.allclose(got, expected, atol=1e-5), f"LM loss {got.item():.5f}, expected {expected.item():.5f}"
    padded = torch.cat([ids, torch.randint(0, tok.vocab_size, (2, 5))], 1)
    again = reward.chosen_lm_loss(model, model.gpt.hidden_states(padded), padded, lengths)
    assert torch.allclose(again, expected, atol=1e-5), "tokens after <|reward|> changed the LM loss"
    short = torch.tensor([[tok.special_ids[bpe.END_OF_TURN], tok.special_ids[bpe.REWARD]]])
    none = reward.chosen_lm_loss(model, model.gpt.hidden_states(short), short, torch.tensor([2]))
    assert none.item() == 0.0 and none.requires_grad, "no target token: a zero loss that still backpropagates"


def test_pairwise_loss_hand_values_and_gradient():
    equal = reward.pairwise_loss(torch.tensor([0.3, -2.0]), torch.tensor([0.3, -2.0]))
    assert equal.item() == pytest.approx(math.log(2)), "equal rewards: ln 2"
    assert reward.pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(
        math.log(1 + math.exp(-1)))
    r_c = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    r_r = torch.tensor([1.5, -1.0, -3.0], requires_grad=True)
    reward.pairwise_loss(r_c, r_r).backward()
    expected = -torch.sigmoid(r_r.detach() - r_c.detach()) / 3  # d/dr_chosen of the mean
    assert torch.allclose(r_c.grad, expected, atol=1e-6)
    assert torch.allclose(r_r.grad, -expected, atol=1e-6)
    reference = -F.logsigmoid(r_c.detach() - r_r.detach()).mean()
    assert reward.pairwise_loss(r_c, r_r).item() == pytest.approx(reference.item(), rel=1e-6)


def test_pairwise_loss_is_stable_for_large_gaps():
    big = reward.pairwise_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert big.item() == pytest.approx(400.0), "log(sigmoid(-400)) would be -inf in float32"
    assert reward.pairwise_loss(torch.tensor([200.0]), torch.tensor([-200.0])).item() == pytest.approx(0.0, abs=1e-6)
    r = torch.tensor([-200.0], requires_grad=True)
    reward.pairwise_loss(r, torch.tensor([200.0])).backward()
    assert r.grad.item() == pytest.approx(-1.0)


def test_pair_accuracy_counts_ties_half():
    assert reward.pair_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


# --- evaluation -------------------------------------------------------------------------------

def test_evaluate_matches_a_brute_force_loop_and_ignores_order(world):
    _, tok = world
    model = tiny_reward_model(tok, seed=3)
    rng = random.Random(7)
    pairs = [make_pair(tok, separable_pair(rng, i, flip=i % 3 == 0)) for i in range(9)]
    pairs.append(make_pair(tok, {**GOOD_PAIR, "gold_prefers_chosen": None}))
    metrics = reward.evaluate(model, pairs, batch_size=4)
    right, gold_right, n_gold, diffs, all_rewards = 0.0, 0.0, 0, [], []
    for p in pairs:
        with torch.no_grad():
            r = [model(torch.tensor([s]))[0, -1].item() for s in (p["chosen"], p["rejected"])]
        all_rewards += r
        d = r[0] - r[1]
        diffs.append(d)
        right += d > 0
        if p["gold"] is not None:
            gold_right += (d > 0) == p["gold"]
            n_gold += 1
    n = len(diffs)
    assert metrics["pairs"] == n == 10 and n_gold == 9
    assert metrics["accuracy"] == pytest.approx(right / n)
    assert metrics["gold_accuracy"] == pytest.approx(gold_right / n_gold), "gold accuracy over the pairs with gold"
    assert metrics["margin"] == pytest.approx(sum(diffs) / n, abs=1e-5)
    assert metrics["loss"] == pytest.approx(sum(math.log1p(math.exp(-d)) for d in diffs) / n, abs=1e-5)
    assert metrics["reward_mean"] == pytest.approx(sum(all_rewards) / len(all_rewards), abs=1e-5)
    assert metrics["reward_std"] == pytest.approx(torch.tensor(all_rewards).std().item(), abs=1e-5)
    shuffled = reward.evaluate(model, pairs[::-1], batch_size=3)
    for key in metrics:
        assert shuffled[key] == pytest.approx(metrics[key], abs=1e-5), f"{key} depends on the batch order"
    no_gold = [make_pair(tok, {**GOOD_PAIR, "gold_prefers_chosen": None})]
    assert reward.evaluate(model, no_gold)["gold_accuracy"] is None


# --- normalisation and scoring ---------------------------------------------------------------------

def test_reward_normalizer_mean_zero_std_one():
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0])
    norm = reward.reward_normalizer(raw)
    assert norm["bias"] == pytest.approx(3.0)
    assert norm["scale"] == pytest.approx(math.sqrt((4 + 1 + 0 + 9) / 3)), "sample std"
    z = (raw - norm["bias"]) / norm["scale"]
    assert z.mean().item() == pytest.approx(0.0, abs=1e-6) and z.std().item() == pytest.approx(1.0)
    assert reward.reward_normalizer(torch.tensor([2.0, 2.0]))["scale"] == 1.0, "constant rewards: scale 1"


def test_sft_normalizer_centres_the_sft_answers_and_leaves_the_rng_alone(world):
    root, tok = world
    model = tiny_reward_model(tok, seed=6)
    init = load_checkpoint(str(root / "sft"))
    config = dict(reward.DEFAULTS, norm_prompts=5, norm_max_new_tokens=6, temperature=1.0, seed=3, eval_batch_size=4)
    folder = str(root / "data" / "toy")
    before = torch.get_rng_state()
    norm = reward.sft_normalizer(model, init, tok, folder, config, contextlib.nullcontext(), "cpu")
    assert torch.equal(torch.get_rng_state(), before), "the training RNG is what a resumed run continues from"
    # the reference: the same prompts (drawn from the seed), the SFT model's sampled answers, their rewards
    records = prepare_data.read_jsonl(os.path.join(folder, "prompts_ppo.jsonl"))
    pick = torch.randperm(len(records), generator=torch.Generator().manual_seed(3))[:5].tolist()
    prompts = [records[i]["prompt"] for i in pick]
    policy = GPT(tiny_gpt_config(tok))
    policy.load_state_dict(init["model"])
    answers = answer_prompts(policy.eval(), tok, prompts, 6, 1.0, 3)
    z = reward.score_responses(model, tok, prompts, [a for a, _ in answers], [e for _, e in answers], norm)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-5) and z.std().item() == pytest.approx(1.0, abs=1e-5)
    assert reward.sft_normalizer(model, init, tok, folder, dict(config, norm_prompts=0), None, "cpu") == \
        {"bias": 0.0, "scale": 1.0}, "norm_prompts 0: no normalisation"


def test_score_responses_reads_reward_input_and_normalises(world):
    _, tok = world
    model = tiny_reward_model(tok, seed=5)
    prompts, responses, ended = ["what is red?", "where?"], ["the cat.", "no no"], [True, False]
    raw = reward.score_responses(model, tok, prompts, responses, ended)
    with torch.no_grad():
        expected = [model(torch.tensor([reward.reward_input(tok, p, r, e)]))[0, -1].item()
                    for p, r, e in zip(prompts, responses, ended)]
    assert raw.tolist() == pytest.approx(expected, abs=1e-5)
    normed = reward.score_responses(model, tok, prompts, responses, ended, normalizer={"bias": 0.5, "scale": 2.0})
    assert normed.tolist() == pytest.approx([(e - 0.5) / 2.0 for e in expected], abs=1e-5)
    assert reward.score_responses(model, tok, prompts, responses)[0].item() == pytest.approx(expected[0], abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward.score_responses(model, tok, prompts, responses[:1])


# --- whole runs -----------------------------------------------------------------------------------

def test_auto_dtype_is_measured_named_and_recorded(world, tmp_path, monkeypatch, capsys):
    import train
    calls = []
    monkeypatch.setattr(train, "measure_bf16_speedup", lambda step, *a, **k: calls.append(step) or 0.1)
    reward.run(tiny_config(world[0], tmp_path / "rm", max_iters=2, eval_interval=2, norm_prompts=2,
                           dtype="auto"))
    assert len(calls) == 1, "reward.py measures its own training step once, before the first"
    assert "float32 (auto: a bf16 autocast step measured 0.10x" in capsys.readouterr().out
    assert load_checkpoint(str(tmp_path / "rm"))["config"]["dtype"] == "float32"
    assert read_jsonl_log(str(tmp_path / "rm" / "log.jsonl"))[0]["dtype"] == "float32"


def test_tiny_run_learns_separable_pairs_and_writes_its_files(world, trained):
    root, tok = world
    out, metrics = trained
    assert metrics["val_gold_accuracy"] >= 0.95, metrics
    assert 0.7 <= metrics["val_accuracy"] <= 0.9, "against noisy labels (20% flipped): about 80%"
    ckpt = load_checkpoint(str(out), stages={"rm"})
    assert ckpt["parent"] == parent_record(str(root / "sft" / "ckpt.pt"))
    assert ckpt["model_args"] == load_checkpoint(str(root / "sft"))["model_args"], "training dropout is not saved"
    assert set(ckpt["model"]) == set(ScalarHeadModel(tiny_gpt_config(tok)).state_dict())
    assert ckpt["reward_norm"] == metrics["reward_norm"] and ckpt["reward_norm"]["scale"] > 0
    log = read_jsonl_log(str(out / "log.jsonl"))
    evals = [r for r in log if "val_accuracy" in r]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=0.05), "a fresh small head starts at ln 2"
    for name in ("loss.png", "accuracy.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_stored_normalisation_centres_sft_answers(world, trained):
    """Recompute what run() normalised: the init model's sampled answers to the
    PPO prompts, scored with the trained model, have mean 0 and std 1."""
    root, tok = world
    out, _ = trained
    ckpt = load_checkpoint(str(out), stages={"rm"})
    model, tok2, norm, config = (reward.scalar_model_from_checkpoint(ckpt), tokenizer_from_checkpoint(ckpt),
                                 ckpt["reward_norm"], ckpt["config"])
    prompts_all = [r["prompt"] for r in prepare_data.read_jsonl(str(root / "data" / "toy" / "prompts_ppo.jsonl"))]
    pick = torch.randperm(len(prompts_all), generator=torch.Generator().manual_seed(config["seed"]))
    prompts = [prompts_all[i] for i in pick[:config["norm_prompts"]].tolist()]
    policy = GPT(tiny_gpt_config(tok))
    policy.load_state_dict(load_checkpoint(str(root / "sft"))["model"])
    answers = answer_prompts(policy, tok2, prompts, config["norm_max_new_tokens"], config["temperature"],
                             config["seed"], config["eval_batch_size"])
    z = reward.score_responses(model, tok2, prompts, [a for a, _ in answers], [e for _, e in answers], norm)
    assert len(z) == config["norm_prompts"] == 16
    assert z.mean().item() == pytest.approx(0.0, abs=1e-4) and z.std().item() == pytest.approx(1.0, abs=1e-4)


def test_trained_checkpoint_loads_as_a_reward_model(world, trained):
    root, tok = world
    out, _ = trained
    ckpt = load_checkpoint(str(out / "ckpt.pt"), stages={"rm"})
    assert isinstance(reward.scalar_model_from_checkpoint(ckpt), ScalarHeadModel)
    assert tokenizer_from_checkpoint(ckpt).to_dict() == tok.to_dict()
    with pytest.raises(CheckpointError, match="'sft' checkpoint"):
        load_checkpoint(str(root / "sft"), stages={"rm"})


def test_exact_resume_is_bit_for_bit(world, tmp_path):
    root, _ = world
    common = dict(max_iters=10, eval_interval=100, warmup_iters=2, log_interval=1, batch_size=16)
    reward.run(tiny_config(root, tmp_path / "straight", **common))
    reward.run(tiny_config(root, tmp_path / "resumed", stop_at_iter=5, **common))
    stopped = load_checkpoint(str(tmp_path / "resumed"))
    assert stopped["resume"]["iter"] == 5 and stopped["reward_norm"]["scale"] > 0, "a stopped run is normalised too"
    reward.run(tiny_config(root, tmp_path / "resumed", **common), flags={"resume"})
    straight = [r["loss"] for r in read_jsonl_log(str(tmp_path / "straight" / "log.jsonl")) if "loss" in r]
    resumed = [r["loss"] for r in read_jsonl_log(str(tmp_path / "resumed" / "log.jsonl")) if "loss" in r]
    assert len(straight) == 10 and straight == resumed, "N steps == N/2 + resume + N/2, bit for bit"
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "resumed"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["resume"]["epoch"] == b["resume"]["epoch"] == 0 and a["resume"]["position"] == 10


def test_resume_refuses_an_init_that_changed(world, tmp_path):
    root, tok = world
    save_lm_checkpoint(tmp_path / "sft" / "ckpt.pt", tok)
    common = dict(init=str(tmp_path / "sft"), max_iters=4, eval_interval=100, norm_prompts=0)
    reward.run(tiny_config(root, tmp_path / "rm", stop_at_iter=2, **common))
    save_lm_checkpoint(tmp_path / "sft" / "ckpt.pt", tok, seed=1)  # other weights under the same path
    with pytest.raises(CheckpointError, match="changed since this run began from it"):
        reward.run(tiny_config(root, tmp_path / "rm", **common), flags={"resume"})


def test_epochs_roll_over(world, tmp_path):
    root, _ = world
    reward.run(tiny_config(root, tmp_path / "epochs", max_iters=8, eval_interval=100, batch_size=64,
                           norm_prompts=0))
    ckpt = load_checkpoint(str(tmp_path / "epochs"))
    # 240 pairs in batches of 64: 4 batches per epoch, so 8 steps end at epoch 1, position 4
    assert (ckpt["resume"]["epoch"], ckpt["resume"]["position"]) == (1, 4)
    assert ckpt["reward_norm"] == {"bias": 0.0, "scale": 1.0}, "norm_prompts=0: no normalisation"


def test_existing_checkpoint_is_kept_without_a_flag(world, tmp_path):
    root, _ = world
    out = tmp_path / "keep"
    reward.run(tiny_config(root, out, max_iters=2, eval_interval=2, norm_prompts=0))
    with pytest.raises(ValueError, match="already exists: pass --resume"):
        reward.run(tiny_config(root, out, max_iters=2))
    reward.run(tiny_config(root, out, max_iters=2, eval_interval=2, norm_prompts=0), flags={"overwrite"})


def test_the_whole_model_goes_to_the_device_head_included(world, tmp_path, monkeypatch):
    # a GPU run once crashed at its first evaluation: only the body was moved, the fresh head stayed on the CPU
    moved, module_to = [], torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        moved.append(type(self).__name__)
        return module_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    reward.run(tiny_config(world[0], tmp_path / "rm", max_iters=1, eval_interval=1, norm_prompts=0))
    assert "ScalarHeadModel" in moved, f"reward.run moved only {sorted(set(moved))} to the device, not the head"


def test_init_may_be_pretrain_but_not_rm_or_ppo(world, tmp_path):
    root, tok = world
    save_lm_checkpoint(tmp_path / "pre" / "ckpt.pt", tok, stage="pretrain")
    reward.run(tiny_config(root, tmp_path / "from_pre", init=str(tmp_path / "pre"), max_iters=1, norm_prompts=0))
    parent = load_checkpoint(str(tmp_path / "from_pre"))["parent"]
    assert parent == parent_record(str(tmp_path / "pre" / "ckpt.pt")), "a base model is a body too"
    for stage in ("rm", "ppo"):
        save_lm_checkpoint(tmp_path / stage / "ckpt.pt", tok, stage=stage)
        with pytest.raises(CheckpointError, match=f"is a '{stage}' checkpoint"):
            reward.run(tiny_config(root, tmp_path / f"from_{stage}", init=str(tmp_path / stage)))
    with pytest.raises(CheckpointError, match="does not exist"):
        reward.run(tiny_config(root, tmp_path / "from_none", init=str(tmp_path / "none")))


def test_resolve_paths_defaults():
    config = {**reward.DEFAULTS, "config": "small"}
    assert reward.resolve_paths(config) == (os.path.join("out", "small", "sft"), os.path.join("out", "small", "rm"))
    config.update(init="a/b", out_dir="c")
    assert reward.resolve_paths(config) == ("a/b", "c")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_requested_sets_a_flag_on_ctrl_c_and_sigterm(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stopper = reward.StopRequested()
    try:
        os.kill(os.getpid(), sig)
        assert stopper.requested
    finally:
        stopper.restore()
    assert {s: signal.getsignal(s) for s in before} == before, "both handlers are put back"


# --- the command line --------------------------------------------------------------------------------

def test_main_bad_inputs_give_one_line(world, tmp_path, capsys):
    root, tok = world
    bad_data = tmp_path / "data" / "bad"
    os.makedirs(bad_data)
    write_jsonl(bad_data / "prefs_train.jsonl", [GOOD_PAIR, {"prompt": "p", "chosen": "x", "rejected": "x"}])
    write_jsonl(bad_data / "prefs_val.jsonl", [GOOD_PAIR])
    save_lm_checkpoint(tmp_path / "rm" / "ckpt.pt", tok, stage="rm")
    base = ["--config", "tiny", f"--init={root / 'sft'}", f"--out_dir={tmp_path / 'o'}"]
    cases = [
        (base + [f"--data_dir={tmp_path / 'data'}", "--dataset=bad"],
         "prefs_train.jsonl line 2: chosen and rejected are the same"),
        (base + [f"--data_dir={tmp_path / 'data'}", "--dataset=none"], "prefs_train.jsonl does not exist"),
        (["--config", "tiny", f"--init={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'o1'}"],
         "nothing does not exist"),
        (["--config", "tiny", f"--init={tmp_path / 'rm'}", f"--out_dir={tmp_path / 'o1'}"], "is a 'rm' checkpoint"),
        (["--config", "tiny", "--lm_coef=wide"], "not a valid float"),
        (base + [f"--data_dir={root / 'data'}", "--dataset=toy", "--oversample=arithmetic"], "give task:K pairs"),
        (base + [f"--data_dir={root / 'data'}", "--dataset=toy", "--oversample=arithmetic:4"],
         "no pair of task arithmetic in prefs_train.jsonl differs only in the answer; the tasks there: toy"),
        (base + [f"--data_dir={root / 'data'}", "--dataset=toy", "--oversample=toy:4,arithmetc:4"],
         "no pair of task arithmetc in prefs_train.jsonl differs only in the answer; the tasks there: toy"),
        (["--config", "tiny", f"--out_dir={tmp_path / 'none'}", "--resume"], "does not exist"),
    ]
    for argv, message in cases:
        assert reward.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("reward.py: error:") and message in err and err.count("\n") == 1, err


# --- the scalar head, read at <|reward|> ------------------------------------------------

def head_config():
    return GPTConfig(vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32)


def test_with_reward_token_appends_and_keeps_reward_when_too_long():
    assert reward.with_reward_token([1, 2], [3, 4], 99) == [1, 2, 3, 4, 99]
    assert reward.with_reward_token([1, 2], [3, 4], 99, block_size=3) == [3, 4, 99]


def test_pad_right_and_read_last():
    ids, lengths = reward.pad_right([[1, 2, 3], [4]], pad_value=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and lengths.tolist() == [3, 1]
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    assert reward.read_last(values, lengths).tolist() == pytest.approx([0.3, 0.4])


def test_scalar_head_model_shape_and_small_initial_outputs():
    torch.manual_seed(0)
    rm = reward.ScalarHeadModel(head_config()).eval()
    out = rm(torch.randint(0, 97, (3, 10)))
    assert out.shape == (3, 10) and out.dtype == torch.float32
    assert out.abs().max() < 0.5, "the head starts small (rewards near 0, loss near ln 2)"
    assert rm.head.bias.item() == 0.0


def test_score_sequences_ignores_padding_and_batching():
    torch.manual_seed(0)
    rm = reward.ScalarHeadModel(head_config()).eval()
    seqs = [[1, 2, 3, 96], [4, 5, 96], [7, 8, 9, 10, 11, 96]]
    together = reward.score_sequences(rm, seqs, batch_size=8)
    alone = torch.cat([reward.score_sequences(rm, [s]) for s in seqs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    direct = torch.stack([rm(torch.tensor([s]))[0, -1] for s in seqs]).detach()
    torch.testing.assert_close(together, direct, rtol=1e-5, atol=1e-5)
    norm = reward.score_sequences(rm, seqs, normalizer={"bias": 1.0, "scale": 2.0})
    torch.testing.assert_close(norm, (together - 1.0) / 2.0)


def test_scalar_model_from_checkpoint_round_trip_and_error():
    torch.manual_seed(0)
    rm = reward.ScalarHeadModel(head_config())
    ckpt = {"model_args": vars(rm.config).copy(), "model": rm.state_dict()}
    back = reward.scalar_model_from_checkpoint(ckpt)
    x = torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(back.eval()(x), rm.eval()(x))
    gpt_only = {"model_args": vars(rm.config).copy(), "model": GPT(head_config()).state_dict()}
    with pytest.raises(CheckpointError, match="weights do not fit its model_args .*ScalarHeadModel"):
        reward.scalar_model_from_checkpoint(gpt_only)
