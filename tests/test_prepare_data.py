"""Tests for prepare_data.py: every public function against hand-computed
values or an independent check, the tinyworld build end to end (determinism,
split disjointness, train.bin decoding back to train.txt), downloads against a
local HTTP server on 127.0.0.1, and bad inputs. Offline and fast."""

import gzip
import hashlib
import http.server
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import bpe
import prepare_data as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small tinyworld build: seconds, yet every file and every code path.
SMALL = dict(megabytes=0.08, sft_train=80, sft_val=8, prefs_train=80, prefs_val=16, prompts_ppo=40,
             prompts_eval=20, mc=12, prefs_k=3, junk_fraction=0.05, quiet=True)


def build_small(root, **overrides):
    return P.prepare(data_root=str(root), **dict(SMALL, **overrides))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(folder, meta) of one small tinyworld build shared by many tests."""
    out = build_small(tmp_path_factory.mktemp("tw"))
    return out, P.load_meta(out)


def read_split(folder, name):
    return P.read_jsonl(os.path.join(folder, name + ".jsonl"))


def story_record(story="Mia went to the park. Tom went to the beach.", question="Where did Mia go?",
                 reference="park", kind="place"):
    return {"task": "story_qa", "prompt": f"{story}\n{question}", "context": story, "reference": reference,
            "answer_kind": kind, "given": [], "options": []}


ARITH = {"task": "arithmetic", "prompt": "What is 3 plus 4?", "context": "", "reference": "7",
         "answer_kind": "number", "given": [], "options": []}
OPPOSITE = {"task": "opposite", "prompt": "What is the opposite of big?", "context": "", "reference": "small",
            "answer_kind": "opposite", "given": ["big"], "options": []}
CATEGORY = {"task": "category", "prompt": "Which word is an animal: cup, dog, red?", "context": "",
            "reference": "dog", "answer_kind": "option", "given": [], "options": ["cup", "dog", "red"]}


# -----------------------------------------------------------------------------
# The world and its stories

def test_world_word_lists_are_disjoint_and_single_words():
    kinds = dict(P.KIND_WORDS)
    seen = {}
    for kind, words in kinds.items():
        assert len(words) == len(set(words)), f"{kind} has a duplicate word"
        for w in words:
            assert P.tokens_of(w) == [w.lower()], f"{w!r} is not a single lowercase-able word"
            assert w.lower() not in seen, f"{w!r} is both a {seen[w.lower()]} and a {kind}"
            seen[w.lower()] = kind
    assert len(P.OPPOSITE_WORDS) == 2 * len(P.OPPOSITES), "a word appears in two opposite pairs"
    assert all(P.OPPOSITE_OF[P.OPPOSITE_OF[w]] == w for w in P.OPPOSITE_WORDS)


def test_articles_and_plurals():
    assert P.with_article("owl") == "an owl"
    assert P.with_article("dog") == "a dog"
    assert P.with_article("bread") == "some bread"
    assert P.plural("box") == "boxes"
    assert P.plural("sandwich", 3) == "sandwiches"
    assert P.plural("apple", 1) == "apple"
    assert P.plural("kite", 0) == "kites"
    assert P.kind_sentence("dog", "animal") == "A dog is an animal."
    assert P.kind_sentence("park", "place") == "The park is a place."
    assert P.kind_sentence("red", "colour") == "Red is a colour."


def test_story_facts_stay_consistent():
    """Every '<colour> <object>' in a story is the hero's or the friend's
    thing, and the hero's name appears in it."""
    rng = random.Random(5)
    for _ in range(300):
        body, ending, facts = P.make_story_parts(rng)
        text = " ".join(body + [P.fill(ending, facts)])
        toks = P.tokens_of(text)
        things = {(a, b) for a, b in zip(toks, toks[1:]) if a in P.COLOURS and b in P.OBJECTS}
        allowed = {(facts["colour"], facts["object"]), (facts["fcolour"], facts["fobject"])}
        assert things <= allowed, f"inconsistent things {things - allowed} in: {text}"
        assert facts["name"] in text or "children" in text, text


def test_stories_state_true_sums_and_opposites():
    rng = random.Random(6)
    sums = opposites = 0
    for _ in range(600):
        text = P.make_story(rng)
        for a, op, b, c in re.findall(r"(\d+) (plus|minus) (\d+) is (\d+)", text):
            expected = int(a) + int(b) if op == "plus" else int(a) - int(b)
            assert int(c) == expected, text
            sums += 1
        for w, o in re.findall(r"The opposite of (\w+) is (\w+)", text):
            assert P.OPPOSITE_OF[w] == o, text
            opposites += 1
    assert sums > 20 and opposites > 10, "the lessons should appear in the stories"


def test_generate_stories_size_and_seed():
    a = P.generate_stories(1, 0.02)
    size = sum(len(s.encode()) + 1 for s in a)
    assert 20_000 <= size < 22_000, size
    assert P.generate_stories(1, 0.02) == a, "same seed must give the same stories"
    assert P.generate_stories(2, 0.02) != a, "another seed must give other stories"
    quizzes = [s for s in a if "?" in s and "asked" not in s]     # stories ask in dialogue: "... asked the teacher"
    assert abs(len(quizzes) / len(a) - P.QUIZ_SHARE) < 0.1, "about QUIZ_SHARE of the documents are quizzes"
    assert all("\n" not in s for s in a), "a story or a quiz is one paragraph"


def test_make_quiz_uses_only_quiz_keys(monkeypatch):
    made = []  # every task record make_quiz draws, kept or not
    for task, maker in list(P.TASK_MAKERS.items()):
        monkeypatch.setitem(P.TASK_MAKERS, task, lambda rng, maker=maker: made.append(maker(rng)) or made[-1])
    rng = random.Random(21)
    for _ in range(50):
        made.clear()
        quiz = P.make_quiz(rng, 1337)
        used = [r for r in made if P.is_quiz_key(P.record_key(r), 1337)]
        assert 2 <= len(used) <= 4 and "\n" not in quiz
        for r in used:     # each question in order, each followed by one of its concise answers
            question = r["prompt"].replace("\n", " ")
            assert quiz.startswith(question + " "), (quiz, question)
            quiz = quiz[len(question) + 1:]
            answer = next(a for a in r["_concise"] if quiz.startswith(a))
            quiz = quiz[len(answer):].lstrip(" ")
        assert quiz == "", "a quiz must use the quiz keys, and only them"
    keys = [f"key {i}" for i in range(4000)]
    share = sum(P.is_quiz_key(k, 1337) for k in keys) / len(keys)
    assert abs(share - P.QUIZ_KEY_SHARE) < 0.03


def test_add_web_junk_counts():
    stories = P.generate_stories(3, 0.02)
    docs, counts = P.add_web_junk(stories, random.Random(0), 0.14)
    assert sum(counts.values()) == round(0.14 * len(stories))
    assert len(docs) == len(stories) + sum(counts.values())
    assert set(counts) == set(P.JUNK_KINDS) and min(counts.values()) >= 1
    assert sum(P.JUNK_FOOTER in d for d in docs) == counts["footer"]
    assert sum("Lorem ipsum" in d for d in docs) == counts["web_page"]
    assert sum("@example.com" in d for d in docs) == counts["personal_data"]


# -----------------------------------------------------------------------------
# Tasks and demonstrations

@pytest.mark.parametrize("task", P.TASKS)
def test_task_records_answers_check_out(task):
    rng = random.Random(7)
    for _ in range(200):
        rec = P.TASK_MAKERS[task](rng)
        assert rec["task"] == task
        assert rec["prompt"] and rec["reference"]
        assert all(P.is_correct(rec, r) for r in rec["_concise"]), rec
        assert not any(P.is_correct(rec, r) for r in rec["_wrong"]), rec
        assert rec["reference_response"] == rec["_concise"][0]
        assert P.gold_score(rec, rec["reference_response"]) == P.GOLD_CORRECT


def test_story_qa_answer_is_in_the_story():
    rng = random.Random(8)
    for _ in range(300):
        rec = P.make_story_qa(rng)
        story, question = rec["prompt"].split("\n")
        assert story == rec["context"]
        assert 2 <= story.count(".") <= 4, story
        assert rec["reference"].lower() in P.tokens_of(story), rec
        assert question.endswith("?")


def test_arithmetic_reference_is_the_sum():
    rng = random.Random(9)
    checked = 0
    for _ in range(300):
        rec = P.make_arithmetic(rng)
        m = re.match(r"What is (\d) (plus|minus) (\d)\?$", rec["prompt"])
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            assert int(rec["reference"]) == (a + b if op == "plus" else a - b)
            checked += 1
        assert 0 <= int(rec["reference"]) <= 18
    assert checked > 10


def test_opposite_and_category_references():
    rng = random.Random(10)
    for _ in range(200):
        rec = P.make_opposite(rng)
        assert rec["reference"] == P.OPPOSITE_OF[rec["given"][0]]
        rec = P.make_category(rng)
        kind = next(k for k in P.CATEGORY_KINDS if f" {k}" in rec["prompt"].replace(":", " ").replace("?", " "))
        assert rec["reference"] in P.CATEGORY_KINDS[kind]
        assert [o for o in rec["options"] if o in P.CATEGORY_KINDS[kind]] == [rec["reference"]], rec


def test_filler_sentences_hold_no_answer_words():
    """Rambling answers must stay correct: their filler names no answer."""
    answer_words = {w.lower() for ws in P.KIND_WORDS.values() for w in ws} | set(P.OPPOSITE_WORDS)
    answer_words |= set(P.NUMBER_WORDS)
    for sentence in P.VERBOSE_OPENERS + P.VERBOSE_CLOSERS + P.QA_REASONING:
        toks = set(P.tokens_of(sentence))
        assert not toks & answer_words, f"{sentence!r} contains {toks & answer_words}"
        assert not any(t.isdigit() for t in toks)


def test_make_demonstration_follows_the_mix():
    rng = random.Random(11)
    rec = P.make_story_qa(rng)
    for mix, quality in [((1, 0, 0), "concise"), ((0, 1, 0), "verbose"), ((0, 0, 1), "wrong")]:
        for _ in range(20):
            text, q = P.make_demonstration(rec, rng, mix)
            assert q == quality
            assert P.is_correct(rec, text) == (quality != "wrong"), text
            if quality == "verbose":
                assert len(P.tokens_of(text)) > len(P.tokens_of(rec["reference_response"])) + 4
    counts = {"concise": 0, "verbose": 0, "wrong": 0}
    for _ in range(3000):
        counts[P.make_demonstration(rec, rng)[1]] += 1
    for quality, share in zip(["concise", "verbose", "wrong"], P.DEMO_MIX):
        assert abs(counts[quality] / 3000 - share) < 0.03, counts


def test_truncate_before_answer():
    assert P.truncate_before_answer("Mia went to the park.", "park") == "Mia went to the"
    assert P.truncate_before_answer("3 plus 4 is 7.", "7") == "3 plus 4 is"
    assert P.truncate_before_answer("Park.", "park") is None
    assert P.truncate_before_answer("Nothing here.", "park") is None


def test_make_candidates_kinds():
    rng = random.Random(12)
    for task in P.TASKS:
        rec = P.TASK_MAKERS[task](rng)
        cands = P.make_candidates(rec, rng)
        kinds = [k for k, _, _ in cands]
        assert set(kinds) <= set(P.CANDIDATE_KINDS)
        by = {k: (t, e) for k, t, e in cands}
        assert by["empty"] == ("", True)
        assert by["repetitive"][1] is False and P.repetition_fraction(by["repetitive"][0]) > 0.3
        assert P.is_correct(rec, by["concise"][0]) and not P.is_correct(rec, by["wrong"][0])
        assert P.is_correct(rec, by["verbose"][0]) and not P.is_correct(rec, by["verbose_wrong"][0])
        # matched pairs differ only in the answer: the same words around it
        assert by["verbose"][0].replace(by["concise"][0], by["wrong"][0]) == by["verbose_wrong"][0]
        assert len(P.tokens_of(by["concise"][0])) == len(P.tokens_of(by["wrong"][0]))
        assert by["copy"][0] == rec["prompt"].split("\n")[-1]
        if "truncated" in by:
            assert by["truncated"][1] is False


# -----------------------------------------------------------------------------
# The gold labeler, rule by rule (hand-computed values)

def test_gold_rule1_empty_is_worst():
    rec = story_record()
    assert P.gold_score(rec, "") == P.GOLD_EMPTY == -3.0
    assert P.gold_score(rec, "  ...  !") == P.GOLD_EMPTY
    worst_nonempty = P.gold_score(rec, "x x x x x x x x x x x x x x x x x x x x x x x x x x x x x", ended=False)
    assert worst_nonempty > P.GOLD_EMPTY


def test_grade_answers_hand_computed():
    story = story_record()
    arith = {"task": "arithmetic", "prompt": "What is 2 plus 3?", "reference": "5", "answer_kind": "number"}
    records = [story, story, arith]
    answers = [("Mia went to the park.", True), ("The beach.", False), ("It is 5.", True)]
    got = P.grade_answers(records, answers)
    golds = [P.gold_score(r, t, e) for r, (t, e) in zip(records, answers)]
    assert got["n"] == 3
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got["gold"] == pytest.approx(sum(golds) / 3)
    assert got["end_rate"] == pytest.approx(2 / 3)
    assert got["words"] == pytest.approx((5 + 2 + 3) / 3)
    assert got["by_task"]["story_qa"]["accuracy"] == pytest.approx(0.5)
    assert got["by_task"]["arithmetic"] == {"n": 1, "accuracy": 1.0, "gold": golds[2], "end_rate": 1.0, "words": 3.0}
    with pytest.raises(ValueError, match="2 records but 1 answers"):
        P.grade_answers(records[:2], answers[:1])


def test_gold_rule2_correctness():
    rec = story_record()
    assert P.gold_score(rec, "Mia went to the park.") == 3.0
    assert P.gold_score(rec, "Mia went to the beach.") == 0.0          # wrong entity
    assert P.gold_score(rec, "The park or the beach.") == 0.0           # two answers is not an answer
    assert P.gold_score(rec, "Where did Mia go?") == 0.0                # copy of the question
    assert P.gold_score(rec, "PARK!") == 3.0                            # case and punctuation do not matter
    assert P.is_correct(rec, "Mia went to the park.") and not P.is_correct(rec, "beach")


def test_gold_numbers_use_the_last_number():
    assert P.numbers_in("3 plus 4 is seven, not 8") == [3, 4, 7, 8]
    assert P.gold_score(ARITH, "3 plus 4 is 7.") == 3.0
    assert P.gold_score(ARITH, "The answer is seven.") == 3.0
    assert P.gold_score(ARITH, "7 or maybe 8") == 0.0
    assert P.gold_score(ARITH, "What is 3 plus 4?") == 0.0
    assert P.gold_score(ARITH, "I do not know.") == 0.0


def test_gold_given_words_are_not_answers():
    assert P.gold_score(OPPOSITE, "The opposite of big is small.") == 3.0
    assert P.gold_score(OPPOSITE, "Big.") == 0.0
    assert P.gold_score(OPPOSITE, "The opposite of big is cold.") == 0.0
    assert P.gold_score(CATEGORY, "A dog is an animal.") == 3.0
    assert P.gold_score(CATEGORY, "cup, dog, red") == 0.0               # every option at once
    assert P.gold_score(CATEGORY, "The answer is cup.") == 0.0


def test_gold_rule3_length():
    rec = story_record()
    text = "Well I looked at every sentence before answering and so Mia went to the park."
    n = len(P.tokens_of(text))
    assert n == 15
    assert P.gold_score(rec, text) == pytest.approx(3.0 - 0.05 * (15 - 8))   # 2.65
    long_text = " ".join(f"w{i}" for i in range(60)) + " park"
    assert P.gold_score(rec, long_text) == pytest.approx(3.0 - P.LENGTH_PENALTY_MAX)


def test_gold_rule4_end_of_turn():
    rec = story_record()
    assert P.gold_score(rec, "Mia went to the park.", ended=False) == 2.5
    # A response that still holds the end-of-turn string ends there.
    assert P.gold_score(rec, "Mia went to the park.<|end|> beach beach", ended=False) == 3.0


def test_gold_rule5_repetition():
    rec = story_record()
    assert P.repetition_fraction("park park park park park") == pytest.approx(0.75)   # 4 bigrams, 1 distinct
    assert P.repetition_fraction("Mia went to the park.") == 0.0
    assert P.repetition_fraction("park") == 0.0
    assert P.gold_score(rec, "park park park park park") == pytest.approx(3.0 - 0.75)


def test_gold_correct_always_beats_wrong():
    rng = random.Random(13)
    for _ in range(200):
        rec = P.TASK_MAKERS[rng.choice(P.TASKS)](rng)
        scored = [(P.is_correct(rec, t), P.gold_score(rec, t, e), t) for _, t, e in P.make_candidates(rec, rng)]
        right = [g for c, g, t in scored if c]
        wrong = [g for c, g, t in scored if not c and t]
        assert right and min(right) > max(wrong, default=-1e9), scored
        assert min(g for _, g, _ in scored) == P.GOLD_EMPTY


def test_gold_open_tasks_use_word_overlap():
    rec = {"task": "alpaca", "prompt": "Why is the sky blue?", "reference": "The sky is blue because of scattering",
           "answer_kind": "open"}
    assert P.overlap_f1("the sky is blue", "The sky is blue because of scattering") == pytest.approx(2 * 1 * (4 / 7) / (1 + 4 / 7))
    assert P.gold_score(rec, "The sky is blue because of scattering") == 3.0
    assert P.gold_score(rec, "Bananas.") == 0.0
    assert P.is_correct(rec, "the sky is blue because of light scattering")
    no_reference = {"task": "hh", "prompt": "Hi", "reference": None, "answer_kind": "open"}
    assert P.gold_score(no_reference, "Hello there.") == 0.0


def test_gold_never_crashes_on_garbage():
    rng = random.Random(14)
    rec = story_record()
    for _ in range(200):
        text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 80)))
        assert isinstance(P.gold_score(rec, text, ended=rng.random() < 0.5), float)
    assert isinstance(P.gold_score(ARITH, "9" * 5000), float)


# -----------------------------------------------------------------------------
# Preference labels

def test_bradley_terry_prob():
    assert P.bradley_terry_prob(1.0, 1.0, 1.0) == 0.5
    assert P.bradley_terry_prob(1.0, 0.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert P.bradley_terry_prob(0.0, 1.0, 1.0) == pytest.approx(1 - 1 / (1 + math.exp(-1)))
    assert P.bradley_terry_prob(2.0, 0.0, 2.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert P.bradley_terry_prob(1000.0, 0.0, 0.01) == 1.0          # no overflow
    assert P.bradley_terry_prob(0.0, 1000.0, 0.01) == 0.0


def test_noisy_ranking_is_bradley_terry_for_two():
    rng = random.Random(15)
    first = sum(P.noisy_ranking([1.0, 0.0], 1.0, rng) == [0, 1] for _ in range(6000)) / 6000
    assert abs(first - 1 / (1 + math.exp(-1))) < 0.025, first
    golds = [0.5, 3.0, -3.0, 1.0]
    assert P.noisy_ranking(golds, 1e-3, rng) == [1, 3, 0, 2]          # no noise: sorted best first
    assert sorted(P.noisy_ranking(golds, 1.0, rng)) == [0, 1, 2, 3]


def test_make_preference_pair_fields():
    rng = random.Random(16)
    for _ in range(200):
        rec = P.TASK_MAKERS[rng.choice(P.TASKS)](rng)
        pair = P.make_preference_pair(rec, rng)
        assert pair["chosen"] != pair["rejected"] or pair["chosen_ended"] != pair["rejected_ended"]
        assert pair["gold_chosen"] == P.gold_score(rec, pair["chosen"], pair["chosen_ended"])
        assert pair["gold_rejected"] == P.gold_score(rec, pair["rejected"], pair["rejected_ended"])
        assert pair["gold_chosen"] != pair["gold_rejected"]
        assert pair["gold_prefers_chosen"] == (pair["gold_chosen"] > pair["gold_rejected"])
        assert not any(k.startswith("_") for k in pair)


def test_matched_right_wrong_pairs_are_about_half():
    rng = random.Random(19)
    pairs = [P.make_preference_pair(P.TASK_MAKERS[P.TASKS[i % 4]](rng), rng) for i in range(1000)]
    matched = [p for p in pairs if {p["chosen_kind"], p["rejected_kind"]} in ({"concise", "wrong"},
                                                                             {"verbose", "verbose_wrong"})]
    assert abs(len(matched) / len(pairs) - P.MATCHED_PAIR_SHARE) < 0.08, len(matched)


def pairs_at(temperature, n=2500, seed=17):
    rng = random.Random(seed)
    return [P.make_preference_pair(P.TASK_MAKERS[P.TASKS[i % 4]](rng), rng, temperature) for i in range(n)]


def test_label_agreement_looks_human_at_the_default_temperature():
    agreement = P.label_agreement(pairs_at(P.LABEL_TEMPERATURE))
    assert 0.8 <= agreement <= 0.95, agreement
    assert P.label_agreement(pairs_at(0.01, n=500)) > 0.99         # a perfect labeler
    assert abs(P.label_agreement(pairs_at(1000.0, n=1500)) - 0.5) < 0.05   # a coin


def test_make_preference_ranking():
    rng = random.Random(18)
    rec = P.make_story_qa(rng)
    ranked = P.make_preference_ranking(rec, rng, 4, temperature=1e-3)
    assert len(ranked["responses"]) == len(ranked["gold"]) == len(ranked["ended"]) == 4
    assert ranked["gold"] == sorted(ranked["gold"], reverse=True) and len(set(ranked["gold"])) == 4


# -----------------------------------------------------------------------------
# Multiple choice

def test_make_cloze_changes_exactly_one_fact():
    rng = random.Random(19)
    for _ in range(100):
        item = P.make_cloze(rng)
        endings = item["endings"]
        assert len(endings) == 4 and len(set(endings)) == 4 and 0 <= item["label"] < 4
        assert all(e.startswith(" ") for e in endings)
        context = set(P.tokens_of(item["context"]))
        correct = endings[item["label"]].split()
        for i, e in enumerate(endings):
            if i == item["label"]:
                continue
            words = e.split()
            diff = [(a, b) for a, b in zip(correct, words) if a != b]
            assert len(words) == len(correct) and len(diff) == 1, (correct, words)
            right_word, wrong_word = P.tokens_of(diff[0][0])[0], P.tokens_of(diff[0][1])[0]
            assert right_word in context, item
            assert wrong_word not in context, item


# -----------------------------------------------------------------------------
# Splits

def test_split_of_is_deterministic_and_proportional():
    names, weights = ["a", "b", "c"], [1, 2, 7]
    assert P.split_of("hello", 1, names, weights) == P.split_of("hello", 1, names, weights)
    counts = {n: 0 for n in names}
    for i in range(20000):
        counts[P.split_of(f"key{i}", 1, names, weights)] += 1
    for n, w in zip(names, weights):
        assert abs(counts[n] / 20000 - w / 10) < 0.015, counts


def test_build_task_splits_balanced_unique_disjoint():
    sizes = {"prompts_eval": 20, "prompts_ppo": 41, "sft_train": 100}
    splits = P.build_task_splits(3, sizes)
    assert {s: len(v) for s, v in splits.items()} == sizes
    for records in splits.values():
        per_task = [sum(r["task"] == t for r in records) for t in P.TASKS]
        assert max(per_task) - min(per_task) <= 1
    prompts = [r["prompt"] for v in splits.values() for r in v]
    assert len(prompts) == len(set(prompts))
    keys = {s: {P.record_key(r) for r in v} for s, v in splits.items()}
    assert not keys["prompts_eval"] & keys["sft_train"] and not keys["prompts_ppo"] & keys["sft_train"]
    assert not any(P.is_quiz_key(k, 3) for ks in keys.values() for k in ks), "a task key is also a quiz key"
    assert P.build_task_splits(3, sizes) == splits


def test_extra_prefs_train_records_come_after_and_change_nothing_else():
    sizes = {"prompts_eval": 20, "prefs_val": 40, "prefs_train": 60, "sft_train": 80}
    base = P.build_task_splits(5, sizes)
    more = P.build_task_splits(5, sizes, extra_prefs_train=30)
    for split in sizes:
        if split != "prefs_train":
            assert more[split] == base[split], f"{split} changed when extra prefs_train records were asked for"
    assert more["prefs_train"][:60] == base["prefs_train"], "the first prefs_train records must stay the same"
    extra = more["prefs_train"][60:]
    assert len(extra) == 30
    per_task = [sum(r["task"] == t for r in extra) for t in P.TASKS]
    assert max(per_task) - min(per_task) <= 1, per_task
    others = {r["prompt"] for s, v in base.items() for r in v}
    assert not any(r["prompt"] in others for r in extra), "an extra record repeats a prompt of the dataset"
    names, weights = list(sizes), [sizes[s] for s in sizes]
    assert all(P.split_of(P.record_key(r), 5, names, weights) == "prefs_train" for r in extra), \
        "an extra record's key belongs to another split (train and held-out data would share it)"


def test_prefs_extra_build_appends_pairs_and_keeps_every_other_file(small, tmp_path):
    folder, meta = small
    more = build_small(tmp_path, prefs_extra=20)
    for name in os.listdir(folder):
        if name in ("meta.json", "prefs_train.jsonl", "prefs_ranked_train.jsonl"):
            continue
        with open(os.path.join(folder, name), "rb") as a, open(os.path.join(more, name), "rb") as b:
            assert a.read() == b.read(), f"{name} changed with --prefs-extra"
    with open(os.path.join(folder, "prefs_train.jsonl")) as f:
        base_lines = f.readlines()
    with open(os.path.join(more, "prefs_train.jsonl")) as f:
        more_lines = f.readlines()
    assert len(base_lines) == 80 and len(more_lines) == 100
    assert more_lines[:80] == base_lines, "the default pairs must come first, unchanged"
    assert "prefs_extra" not in meta["build"], "a build without extra pairs must record the same arguments as before"
    assert P.load_meta(more)["build"]["prefs_extra"] == 20
    assert P.resolve_config(P.Config(dataset="tinyworld-prefs36k")).prefs_extra == 24000
    with pytest.raises(P.DataError, match="prefs-extra"):
        P.resolve_config(P.Config(dataset="shakespeare", prefs_extra=5))


def test_built_splits_do_not_leak(small):
    folder, _ = small
    files = ["sft_train", "sft_val", "prefs_train", "prefs_val", "prompts_ppo", "prompts_eval"]
    prompts, stories = {}, {}
    for name in files:
        records = read_split(folder, name)
        prompts[name] = {r["prompt"] for r in records}
        stories[name] = {r["context"] for r in records if r["context"]}
        assert len(prompts[name]) == len(records), f"{name} repeats a prompt"
    for i, a in enumerate(files):
        for b in files[i + 1:]:
            assert not prompts[a] & prompts[b], f"a prompt of {a} is also in {b}"
            assert not stories[a] & stories[b], f"a story of {a} is also in {b}"
    with open(os.path.join(folder, "train.txt"), encoding="utf-8") as f:
        train_text = f.read()
    quiz_text = "\n".join(d for d in train_text.split(bpe.DOC_SEP) if "?" in d and "asked" not in d)
    assert quiz_text, "the pretraining text has quizzes"
    for name in files:
        for r in read_split(folder, name):
            assert r["prompt"].replace("\n", " ") not in quiz_text, f"a {name} prompt is in a pretraining quiz"
            assert not r["context"] or r["context"] not in quiz_text, f"a {name} story is in a pretraining quiz"
    mc = read_split(folder, "mc")
    assert len({m["context"] for m in mc}) == len(mc)
    assert not any(m["context"] in train_text for m in mc), "a multiple-choice story is in the pretraining text"


# -----------------------------------------------------------------------------
# Curation

def test_dedup_documents():
    docs, report = P.dedup_documents(["a b", "c", " a b \n", "c", "d"])
    assert docs == ["a b", "c", "d"] and report["removed_docs"] == 2


def test_dedup_lines():
    footer = "Subscribe now for more great stories every week, right here"
    docs, report = P.dedup_lines([f"Story one.\n{footer}", f"Story two.\n{footer}", footer, "Hi\nHi"])
    assert docs == [f"Story one.\n{footer}", "Story two.", "Hi\nHi"]       # short lines are never removed
    assert report["removed_lines"] == 2 and report["removed_docs"] == 1


def test_filter_boilerplate_lines():
    docs, report = P.filter_boilerplate_lines(["A story.\nPlease enable JavaScript to read.", "Privacy Policy",
                                               "Clean text."])
    assert docs == ["A story.", "Clean text."]
    assert report["removed_lines"] == 2 and report["removed_docs"] == 1


def test_quality_filter_reasons():
    good = "Mia went to the park. She played with her red ball."
    docs = [good, "Too short.", "#### 1234 $$$$ %%%% ^^^^ &&&& **** (((( )))) ---- ++++",
            "one two three four five six seven eight with no full stop at all",
            "Lorem ipsum dolor sit amet. Consectetur adipiscing elit. Sed do eiusmod."]
    kept, report = P.quality_filter(docs)
    assert kept == [good]
    assert report["reasons"] == {"too_few_words": 1, "few_letters": 1, "too_few_sentences": 1, "boilerplate": 1}
    assert P.quality_problem(good) is None


def test_shingles_and_jaccard():
    assert P.shingles("A b c d", n=2) == {"a b", "b c", "c d"}
    assert P.shingles("a b", n=5) == {"a b"}
    assert P.shingles("", n=5) == set()
    assert P.jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert P.jaccard(set(), set()) == 1.0


def test_minhash_estimates_jaccard():
    a = {f"s{i}" for i in range(0, 300)}
    b = {f"s{i}" for i in range(100, 400)}        # |A & B| = 200, |A | B| = 400: J = 0.5
    assert P.jaccard(a, b) == 0.5
    est = P.estimated_jaccard(P.minhash_signature(a, 256), P.minhash_signature(b, 256))
    assert abs(est - 0.5) < 0.1, est
    assert P.estimated_jaccard(P.minhash_signature(a), P.minhash_signature(set(a))) == 1.0
    c = {f"t{i}" for i in range(300)}
    assert P.estimated_jaccard(P.minhash_signature(a), P.minhash_signature(c)) < 0.1
    sig = P.minhash_signature(a)
    assert sig.shape == (P.MINHASH_PERMS,) and sig.dtype == np.uint64


def test_near_dedup():
    rng = random.Random(20)
    vocab = [f"word{i}" for i in range(500)]
    a = " ".join(rng.choice(vocab) for _ in range(80))
    words = a.split()
    words[40] = "changed"
    a2 = " ".join(words)                          # one word changed: J = 71/81
    b = " ".join(rng.choice(vocab) for _ in range(80))
    kept, report = P.near_dedup([a, b, a2])
    assert kept == [a, b] and report["removed_docs"] == 1
    kept, _ = P.near_dedup([a, b, a2], threshold=1.0)
    assert kept == [a, b, a2]


def test_redact_pii():
    text = ("Write to mia.reed@example.com or tom_99@mail.example.org, call 555-123-4567, (555) 123-4567 "
            "or +44 20 7946 0958, and ping 192.168.1.20.")
    out, counts = P.redact_pii(text)
    assert out == "Write to [EMAIL] or [EMAIL], call [PHONE], [PHONE] or [PHONE], and ping [IP]."
    assert counts == {"email": 2, "ip": 1, "phone": 3}
    harmless = "3 plus 4 is 7. The file has 1,115,394 bytes. On 2024-01-15 version 1.2.3 came out in 1999."
    assert P.redact_pii(harmless) == (harmless, {"email": 0, "ip": 0, "phone": 0})
    docs, report = P.redact_documents([text, harmless])
    assert report["redacted"] == counts and docs[1] == harmless


def test_curate_removes_the_planted_junk():
    stories = P.generate_stories(4, 0.05)
    docs, planted = P.add_web_junk(stories, random.Random(1), 0.1)
    kept, reports = P.curate(docs, quiet=True)
    text = "\n".join(kept)
    for junk in [P.JUNK_FOOTER, "Lorem ipsum", "@example.com", "192.168.", "$$$", "Privacy policy"]:
        assert junk not in text, f"{junk!r} survived curation"
    assert [r["step"] for r in reports] == ["dedup_documents", "dedup_lines", "filter_boilerplate_lines",
                                           "quality_filter", "near_dedup", "redact_pii"]
    by = {r["step"]: r for r in reports}
    assert by["dedup_documents"]["removed_docs"] == planted["exact_copy"]
    assert by["quality_filter"]["reasons"]["boilerplate"] == planted["web_page"]
    assert by["redact_pii"]["redacted"]["email"] == planted["personal_data"]
    assert len(kept) >= len(stories) - planted["near_copy"] - 3   # real stories survive


# -----------------------------------------------------------------------------
# Tokenization and the build

def test_token_dtype():
    assert P.token_dtype(2048) == np.uint16
    assert P.token_dtype(65536) == np.uint16
    assert P.token_dtype(65537) == np.uint32


def test_split_train_val():
    docs = [f"doc {i}" for i in range(20)]
    train, val = P.split_train_val(docs, 0.1)
    assert train == docs[:18] and val == docs[18:]
    train, val = P.split_train_val(["line one\nline two\nline three\nline four"], 0.3)
    assert train == ["line one\nline two"] and val == ["line three\nline four"]
    with pytest.raises(P.DataError, match="too small"):
        P.split_train_val(["x"], 0.1)


def test_encode_documents_puts_a_separator_after_each():
    tok = bpe.train_tokenizer("the cat sat on the mat " * 20, 300)
    eot = tok.special_ids[bpe.DOC_SEP]
    ids = P.encode_documents(tok, ["the cat", "<|endoftext|> mat"], np.uint16)
    assert ids.dtype == np.uint16
    assert ids.tolist() == tok.encode("the cat") + [eot] + tok.encode("<|endoftext|> mat") + [eot]
    assert ids.tolist().count(eot) == 2, "text that looks like a special token stays text"


def test_chunk_text():
    paragraphs = [f"Paragraph {i}.\n" + "word " * 30 for i in range(40)]
    text = "\n\n".join(paragraphs)
    docs = P.chunk_text(text, target_chars=1000)
    assert len(docs) > 5
    assert "\n\n".join(docs) == text
    assert all(len(d) < 1400 for d in docs)


def test_decoding_train_bin_gives_the_training_text(small):
    folder, meta = small
    tok = bpe.Tokenizer.load(os.path.join(folder, "tokenizer.json"))
    for split in ["train", "val"]:
        ids = np.fromfile(os.path.join(folder, f"{split}.bin"), dtype=meta["dtype"])
        with open(os.path.join(folder, f"{split}.txt"), encoding="utf-8") as f:
            text = f.read()
        assert tok.decode(ids.tolist()) == text
        assert len(ids) == meta[f"{split}_tokens"]
        assert int((ids == meta["eot_id"]).sum()) == meta[f"{split}_docs"] == text.count(bpe.DOC_SEP)
        assert ids[-1] == meta["eot_id"]
        docs = text.split(bpe.DOC_SEP)[:-1]
        assert sum(len(d.encode()) for d in docs) == meta[f"{split}_bytes"]
    # The training text is the curated generated text, independently rebuilt here.
    stories = P.generate_stories(1337, SMALL["megabytes"])
    raw, _ = P.add_web_junk(stories, P.rng_for(1337, "junk"), SMALL["junk_fraction"])
    curated, _ = P.curate(raw, quiet=True)
    train_docs, _ = P.split_train_val(curated, P.DATASETS["tinyworld"]["val_fraction"])
    with open(os.path.join(folder, "train.txt"), encoding="utf-8") as f:
        assert f.read() == "".join(d + bpe.DOC_SEP for d in train_docs)


def test_meta_records_the_build(small):
    folder, meta = small
    assert meta["dataset"] == "tinyworld" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] <= meta["vocab_size_requested"] == 2048
    assert meta["bytes_per_token"] == round(meta["train_bytes"] / (meta["train_tokens"] - meta["train_docs"]), 4)
    assert meta["tokenizer_sha256"] == P.sha256_file(os.path.join(folder, "tokenizer.json"))
    for name, info in meta["files"].items():
        assert P.sha256_file(os.path.join(folder, name)) == info["sha256"]
    assert meta["splits"]["sft_train"]["records"] == SMALL["sft_train"]
    assert 0.6 < meta["label_agreement"] <= 1.0
    assert [r["step"] for r in meta["curation"]][0] == "dedup_documents"
    assert os.path.exists(os.path.join(folder, "prefs_ranked_train.jsonl"))   # prefs_k = 3
    ranked = read_split(folder, "prefs_ranked_train")
    assert all(len(r["responses"]) == 3 for r in ranked)


def test_jsonl_schemas(small):
    folder, _ = small
    task_keys = {"id", "task", "prompt", "context", "reference", "answer_kind", "given", "options", "reference_response"}
    sft = read_split(folder, "sft_train")
    assert all(set(r) == task_keys | {"response", "quality", "gold"} for r in sft)
    assert all(r["gold"] == P.gold_score(r, r["response"]) for r in sft)
    assert all(bpe.END_OF_TURN not in r["response"] and bpe.USER not in r["prompt"] for r in sft)
    prefs = read_split(folder, "prefs_train")
    pair_keys = {"chosen", "rejected", "chosen_ended", "rejected_ended", "chosen_kind", "rejected_kind",
                 "gold_chosen", "gold_rejected", "gold_prefers_chosen"}
    assert all(set(r) == task_keys | pair_keys for r in prefs)
    for name in ["prompts_ppo", "prompts_eval"]:
        assert all(set(r) == task_keys for r in read_split(folder, name))
    assert all(set(r) == {"id", "task", "context", "endings", "label"} for r in read_split(folder, "mc"))


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, small):
    folder, _ = small
    again = build_small(tmp_path / "again")
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f1, open(os.path.join(again, name), "rb") as f2:
            assert f1.read() == f2.read(), f"{name} differs between two builds with the same seed"
    other = build_small(tmp_path / "other", seed=7)
    for name in ["train.txt", "sft_train.jsonl", "prefs_train.jsonl", "mc.jsonl"]:
        with open(os.path.join(folder, name), "rb") as f1, open(os.path.join(other, name), "rb") as f2:
            assert f1.read() != f2.read(), f"{name} is the same with another seed"


def test_rerun_reuses_force_rebuilds_new_args_rebuild(tmp_path):
    out = build_small(tmp_path)
    train_bin = os.path.join(out, "train.bin")
    stamp = os.stat(train_bin).st_mtime_ns
    time.sleep(0.01)
    build_small(tmp_path)
    assert os.stat(train_bin).st_mtime_ns == stamp, "same arguments must reuse the files"
    build_small(tmp_path, force=True)
    assert os.stat(train_bin).st_mtime_ns != stamp, "--force must rebuild"
    build_small(tmp_path, prefs_k=2)
    assert not os.path.exists(os.path.join(out, "prefs_ranked_train.jsonl")), "a stale output was left behind"
    assert P.load_meta(out)["build"]["prefs_k"] == 2


def test_no_curation_keeps_the_junk(tmp_path):
    out = build_small(tmp_path, curation=False, sft_train=4, sft_val=4, prefs_train=4, prefs_val=4,
                      prompts_ppo=4, prompts_eval=4, mc=4)
    with open(os.path.join(out, "train.txt"), encoding="utf-8") as f1, open(os.path.join(out, "val.txt"), encoding="utf-8") as f2:
        text = f1.read() + f2.read()
    assert "Lorem ipsum" in text and "@example.com" in text
    assert P.load_meta(out)["curation"] == []


def test_input_file_builds_a_dataset(tmp_path):
    path = tmp_path / "my_text.txt"
    path.write_text("\n\n".join(f"Speech {i}. The king spoke to the queen about the war." for i in range(300)))
    out = P.prepare(input=str(path), data_root=str(tmp_path / "data"), vocab_size=300, quiet=True)
    assert out == str(tmp_path / "data" / "my_text")
    meta = P.load_meta(out)
    assert meta["source_sha256"] == P.sha256_file(str(path)) and meta["vocab_size"] == 300
    tok = bpe.Tokenizer.load(os.path.join(out, "tokenizer.json"))
    ids = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint16)
    assert "The king spoke to the queen" in tok.decode(ids[:200].tolist())


def test_tokenizer_flag_reuses_a_tokenizer(tmp_path, small):
    folder, meta = small
    path = tmp_path / "t.txt"
    path.write_text("Mia went to the park. Tom went to the beach.\n\n" * 50)
    out = P.prepare(input=str(path), data_root=str(tmp_path), tokenizer=os.path.join(folder, "tokenizer.json"),
                    quiet=True)
    assert P.load_meta(out)["tokenizer_sha256"] == meta["tokenizer_sha256"]


# -----------------------------------------------------------------------------
# JSONL reading

def test_read_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    P.write_jsonl(str(path), [{"a": 1}, {"b": "é"}])
    assert P.read_jsonl(str(path)) == [{"a": 1}, {"b": "é"}]
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    with pytest.raises(P.DataError, match="line 2 is empty"):
        P.read_jsonl(str(path))
    path.write_text('{"a": 1}\n{"b": \n')
    with pytest.raises(P.DataError, match="line 2 is not valid JSON"):
        P.read_jsonl(str(path))
    with pytest.raises(P.DataError, match="does not exist"):
        P.read_jsonl(str(tmp_path / "missing.jsonl"))


# -----------------------------------------------------------------------------
# Downloads, against a local server

class FixtureServer:
    """An HTTP server on 127.0.0.1 serving routes: path -> (mode, body).
    Modes: ok, slow (answers after 2 s), partial (announces more bytes than it
    sends), fail_once (500, then ok), 404 for unknown paths."""

    def __init__(self, routes):
        self.routes = routes
        self.hits = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                mode, body = server.routes.get(self.path, ("missing", b""))
                if mode == "missing" or (mode == "fail_once" and server.hits[self.path] == 1):
                    self.send_response(404 if mode == "missing" else 500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if mode == "slow":
                    time.sleep(2.0)
                try:
                    self.send_response(200)
                    announced = len(body) + (1000 if mode == "partial" else 0)
                    self.send_header("Content-Length", str(announced))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2] if mode == "partial" else body)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (the timeout test)
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv(P.MIRROR_ENV, raising=False)
    servers = []

    def start(routes):
        servers.append(FixtureServer(routes))
        return servers[-1]

    yield start
    for s in servers:
        try:
            s.stop()
        except OSError:
            pass


BODY = b"hello from the fixture server\n" * 100


def leftovers(folder):
    return [n for n in os.listdir(folder) if ".part" in n or ".tmp" in n]


def test_download_success_then_cache_hit_with_server_stopped(tmp_path, serve):
    server = serve({"/f.txt": ("ok", BODY)})
    dest = str(tmp_path / "cache" / "f.txt")
    assert P.download(server.url + "/f.txt", dest, quiet=True) == dest
    with open(dest, "rb") as f:
        assert f.read() == BODY
    assert P.read_checksums(str(tmp_path / "cache")) == {"f.txt": hashlib.sha256(BODY).hexdigest()}
    server.stop()
    assert P.download(server.url + "/f.txt", dest, quiet=True) == dest   # no network needed
    assert server.hits == {"/f.txt": 1}


def test_download_with_pinned_checksum(tmp_path, serve):
    server = serve({"/f.txt": ("ok", BODY)})
    dest = str(tmp_path / "f.txt")
    P.download(server.url + "/f.txt", dest, sha256=hashlib.sha256(BODY).hexdigest(), quiet=True)
    assert os.path.exists(dest) and not os.path.exists(tmp_path / P.CHECKSUMS_FILE)


def test_download_checksum_mismatch_leaves_no_file(tmp_path, serve):
    server = serve({"/f.txt": ("ok", BODY)})
    dest = str(tmp_path / "f.txt")
    with pytest.raises(P.DataError, match="checksum mismatch") as e:
        P.download(server.url + "/f.txt", dest, sha256="0" * 64, quiet=True)
    assert server.url in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(dest) and leftovers(tmp_path) == []


def test_download_404_is_not_retried(tmp_path, serve):
    server = serve({})
    dest = str(tmp_path / "f.txt")
    with pytest.raises(P.DataError) as e:
        P.download(server.url + "/nope.txt", dest, retries=3, backoff=0, quiet=True)
    message = str(e.value)
    assert "HTTP 404" in message and server.url + "/nope.txt" in message and "by hand" in message and dest in message
    assert server.hits == {"/nope.txt": 1}
    assert not os.path.exists(dest) and leftovers(tmp_path) == []


def test_download_timeout(tmp_path, serve):
    server = serve({"/slow.txt": ("slow", BODY)})
    dest = str(tmp_path / "f.txt")
    t0 = time.time()
    with pytest.raises(P.DataError, match="no answer within 0.3 s"):
        P.download(server.url + "/slow.txt", dest, timeout=0.3, retries=2, backoff=0, quiet=True)
    assert time.time() - t0 < 2.0
    assert server.hits == {"/slow.txt": 2}
    assert not os.path.exists(dest) and leftovers(tmp_path) == []


def test_download_partial_transfer(tmp_path, serve):
    server = serve({"/cut.txt": ("partial", BODY)})
    dest = str(tmp_path / "f.txt")
    with pytest.raises(P.DataError, match="could not download"):
        P.download(server.url + "/cut.txt", dest, retries=2, backoff=0, quiet=True)
    assert server.hits == {"/cut.txt": 2}, "a cut transfer is retried"
    assert not os.path.exists(dest) and leftovers(tmp_path) == []


def test_download_retries_after_a_server_error(tmp_path, serve):
    server = serve({"/f.txt": ("fail_once", BODY)})
    dest = str(tmp_path / "f.txt")
    P.download(server.url + "/f.txt", dest, retries=3, backoff=0, quiet=True)
    assert server.hits == {"/f.txt": 2}
    with open(dest, "rb") as f:
        assert f.read() == BODY


def test_download_offline(tmp_path, serve):
    server = serve({})
    url = server.url + "/f.txt"
    server.stop()    # nothing listens on that port any more
    with pytest.raises(P.DataError, match="could not download") as e:
        P.download(url, str(tmp_path / "f.txt"), retries=1, quiet=True)
    assert url in str(e.value) and "by hand" in str(e.value)


def test_download_replaces_a_corrupt_cached_file(tmp_path, serve):
    server = serve({"/f.txt": ("ok", BODY)})
    dest = str(tmp_path / "f.txt")
    P.download(server.url + "/f.txt", dest, quiet=True)
    with open(dest, "wb") as f:
        f.write(b"garbage")
    P.download(server.url + "/f.txt", dest, quiet=True)
    assert server.hits == {"/f.txt": 2}
    with open(dest, "rb") as f:
        assert f.read() == BODY


def test_source_url_mirror(monkeypatch):
    monkeypatch.delenv(P.MIRROR_ENV, raising=False)
    assert P.source_url("shakespeare") == P.SOURCES["shakespeare"]["url"]
    assert P.source_url("alpaca", "http://127.0.0.1:9/m/") == "http://127.0.0.1:9/m/alpaca_data.json"
    monkeypatch.setenv(P.MIRROR_ENV, "http://mirror")
    assert P.source_url("hellaswag") == "http://mirror/hellaswag_val.jsonl"


# -----------------------------------------------------------------------------
# Real corpora through the mirror (fixtures made here, in the real formats)

TINYSTORIES = "\n".join(f"Once upon a time, a girl named Sue{i} had a dog. They played in the sun all day. "
                        f"Sue{i} was happy.\n<|endoftext|>" for i in range(60)).encode()
ALPACA = json.dumps([{"instruction": f"Name a colour number {i}.", "input": "" if i % 2 else "Be brief.",
                      "output": f"Colour {i} is blue." + (" Mail me at bob@example.com." if i == 3 else "")}
                     for i in range(40)] + [{"instruction": "Name a colour number 1.", "input": "", "output": "dup"}]).encode()
HELLASWAG = "\n".join(json.dumps({"ctx": f"A man opens a door {i}.", "endings": ["He walks in.", "It flies.", "Cats.", "No."],
                                  "label": i % 4, "activity_label": "x"}) for i in range(6)).encode()


def hh_line(prompt, chosen, rejected, turns=1):
    head = "".join(f"\n\nHuman: earlier {k}\n\nAssistant: reply {k}" for k in range(turns - 1))
    return json.dumps({"chosen": f"{head}\n\nHuman: {prompt}\n\nAssistant: {chosen}",
                       "rejected": f"{head}\n\nHuman: {prompt}\n\nAssistant: {rejected}"})


HH_TRAIN = gzip.compress("\n".join([hh_line(f"Question {i}?", f"Good answer {i}.", f"Bad {i}.") for i in range(30)]
                                   + [hh_line("Multi?", "a", "b", turns=2)]).encode())
HH_TEST = gzip.compress("\n".join(hh_line(f"Test {i}?", f"Fine {i}.", f"Poor {i}.") for i in range(12)).encode())


def mirror_routes():
    return {"/TinyStories-valid.txt": ("ok", TINYSTORIES), "/alpaca_data.json": ("ok", ALPACA),
            "/hellaswag_val.jsonl": ("ok", HELLASWAG), "/hh-helpful-base-train.jsonl.gz": ("ok", HH_TRAIN),
            "/hh-helpful-base-test.jsonl.gz": ("ok", HH_TEST), "/tinyshakespeare.txt": ("ok", b"Not Shakespeare.\n" * 100)}


def test_parsers_on_hand_examples():
    assert P.split_hh_turns("\n\nHuman: hi there\n\nAssistant: hello") == [("Human", "hi there"), ("Assistant", "hello")]
    assert P.parse_hh(hh_line("Q?", "A.", "B.") + "\n" + hh_line("M?", "a", "b", turns=2)) == \
        [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}]
    assert P.parse_tinystories("One.\n<|endoftext|>\nTwo.\n<|endoftext|>\n") == ["One.", "Two."]
    alpaca = P.parse_alpaca(json.dumps([{"instruction": "Add.", "input": "1 and 2", "output": "3"}]))
    assert alpaca[0]["prompt"] == "Add.\n\n1 and 2" and alpaca[0]["reference"] == "3" and alpaca[0]["response"] == "3"
    mc = P.parse_hellaswag(json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "2"}))
    assert mc == [{"task": "hellaswag", "context": "A man", "endings": [" a", " b", " c", " d"], "label": 2}]
    with pytest.raises(P.DataError, match="not valid JSON"):
        P.parse_alpaca("[{")


def test_prepare_tinystories_then_rebuild_from_the_cache_offline(tmp_path, serve):
    server = serve(mirror_routes())
    out = P.prepare(dataset="tinystories", data_root=str(tmp_path), mirror=server.url, vocab_size=300, quiet=True)
    meta = P.load_meta(out)
    assert meta["train_docs"] + meta["val_docs"] == 60
    assert meta["source_sha256"] == hashlib.sha256(TINYSTORIES).hexdigest()
    tok = bpe.Tokenizer.load(os.path.join(out, "tokenizer.json"))
    assert tok.decode(np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16).tolist()).endswith("Sue59 was happy.<|endoftext|>")
    server.stop()
    P.prepare(dataset="tinystories", data_root=str(tmp_path), mirror=server.url, vocab_size=300, quiet=True, force=True)


def test_prepare_shakespeare_rejects_a_wrong_file(tmp_path, serve):
    server = serve(mirror_routes())
    with pytest.raises(P.DataError, match="checksum mismatch"):
        P.prepare(dataset="shakespeare", data_root=str(tmp_path), mirror=server.url, quiet=True)
    assert not os.path.exists(tmp_path / "downloads" / "tinyshakespeare.txt")


def test_prepare_alpaca_hh_hellaswag(tmp_path, serve):
    server = serve(mirror_routes())
    common = dict(data_root=str(tmp_path), mirror=server.url, quiet=True)
    out = P.prepare(dataset="alpaca", prompts_eval=5, prompts_ppo=5, sft_val=5, **common)
    splits = {n: read_split(out, n) for n in ["sft_train", "sft_val", "prompts_ppo", "prompts_eval"]}
    assert {n: len(v) for n, v in splits.items()} == {"sft_train": 25, "sft_val": 5, "prompts_ppo": 5, "prompts_eval": 5}
    prompts = [r["prompt"] for v in splits.values() for r in v]
    assert len(prompts) == len(set(prompts)) == 40, "duplicate prompts removed, none shared by two splits"
    text = json.dumps(splits)
    assert "bob@example.com" not in text and "[EMAIL]" in text
    out = P.prepare(dataset="hh", prompts_eval=4, prompts_ppo=10, **common)
    prefs = read_split(out, "prefs_train")
    assert len(prefs) == 20 and len(read_split(out, "prefs_val")) == 8 and len(read_split(out, "prompts_eval")) == 4
    assert all(r["chosen"].startswith("Good answer") and r["gold_prefers_chosen"] is None for r in prefs)
    assert not {r["prompt"] for r in prefs} & {r["prompt"] for r in read_split(out, "prompts_ppo")}
    assert "Multi?" not in json.dumps(prefs)
    out = P.prepare(dataset="hellaswag", **common)
    mc = read_split(out, "mc")
    assert len(mc) == 6 and mc[1]["label"] == 1 and mc[0]["endings"][0] == " He walks in."


# -----------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit, nothing lost

def run_main(argv, capsys):
    code = P.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_bad_inputs_give_one_clear_line(tmp_path, capsys):
    root = str(tmp_path / "data")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02binary\xff" * 10)
    cases = [
        (["--input", str(tmp_path / "missing.txt")], "does not exist"),
        (["--input", str(empty)], "is empty"),
        (["--input", str(binary)], "binary"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--vocab-size", "100"], "--vocab-size 100 is too small"),
        (["--demo-mix", "0.5,0.5,0.5"], "--demo-mix"),
        (["--tokenizer", str(tmp_path / "none.json")], "does not exist"),
    ]
    for argv, expected in cases:
        code, err = run_main(argv + ["--data-root", root], capsys)
        assert code == 1, argv
        assert err.count("\n") == 0 and expected in err and err.startswith("prepare_data.py: error:"), (argv, err)
        assert "Traceback" not in err
    assert not os.path.exists(root), "a bad input must not create or touch anything"


def test_bad_input_keeps_an_existing_build(tmp_path, capsys):
    out = build_small(tmp_path, sft_train=4, sft_val=4, prefs_train=4, prefs_val=4, prompts_ppo=4,
                      prompts_eval=4, mc=4)
    before = {n: P.sha256_file(os.path.join(out, n)) for n in os.listdir(out)}
    code, err = run_main(["--data-root", str(tmp_path), "--vocab-size", "10", "--force"], capsys)
    assert code == 1 and "too small" in err
    assert {n: P.sha256_file(os.path.join(out, n)) for n in os.listdir(out)} == before


def test_command_line_exit_code_and_help(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--dataset", "nope",
                        "--data-root", str(tmp_path)], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "unknown dataset 'nope'" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--megabytes" in r.stdout and "--no-curation" in r.stdout


def write_meta_with_build(folder, build):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as f:
        json.dump({"format_version": P.FORMAT_VERSION, "build": build, "files": {}}, f)


def test_default_build_differences_names_each_changed_argument(tmp_path):
    folder = str(tmp_path / "tinyworld")
    default = P.build_args(P.resolve_config(P.Config(dataset="tinyworld", out=folder)), "generated")
    assert default["prefs_train"] == P.SPLIT_SIZES["prefs_train"]
    write_meta_with_build(folder, default)
    assert P.default_build_differences(folder) == [], "a default build differs from the defaults"
    write_meta_with_build(folder, {**default, "prefs_train": 7, "megabytes": 0.5})
    assert sorted(P.default_build_differences(folder)) == [
        "megabytes 0.5 (default 4.0)", f"prefs_train 7 (default {P.SPLIT_SIZES['prefs_train']})"]


def test_ensure_prepared_builds_missing_tinyworld_and_notes_other_builds(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(P, "prepare", lambda **kw: calls.append(kw))
    root = str(tmp_path)
    folder = P.ensure_prepared("tinyworld", root)
    assert folder == os.path.join(root, "tinyworld")
    assert calls == [{"dataset": "tinyworld", "data_root": root}], "a missing tinyworld must be built"
    assert P.ensure_prepared("shakespeare", root) == os.path.join(root, "shakespeare")
    assert P.ensure_prepared("toy", root) == os.path.join(root, "toy")
    assert len(calls) == 1, "only the embedded generated dataset is built implicitly (others need a download)"
    capsys.readouterr()
    default = P.build_args(P.resolve_config(P.Config(dataset="tinyworld", out=folder)), "generated")
    write_meta_with_build(folder, {**default, "prefs_train": 4000})
    assert P.ensure_prepared("tinyworld", root) == folder
    out = capsys.readouterr().out
    assert len(calls) == 1, "an existing folder built with other arguments must never be rebuilt silently"
    assert out.count("\n") == 1 and "prefs_train 4000" in out and "python prepare_data.py" in out, out
    write_meta_with_build(folder, default)
    P.ensure_prepared("tinyworld", root)
    assert capsys.readouterr().out == "", "a default build needs no note"
