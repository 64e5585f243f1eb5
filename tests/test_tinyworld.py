"""Tests for tinyworld.py: the world and its stories, the tasks and the gold
labeler rule by rule (hand-computed values), noisy preference labels, cloze
items and the splits. Offline, no files: the build itself is tested in
test_prepare_data.py."""

import math
import random
import re

import pytest

import tinyworld as T


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
    kinds = dict(T.KIND_WORDS)
    seen = {}
    for kind, words in kinds.items():
        assert len(words) == len(set(words)), f"{kind} has a duplicate word"
        for w in words:
            assert T.tokens_of(w) == [w.lower()], f"{w!r} is not a single lowercase-able word"
            assert w.lower() not in seen, f"{w!r} is both a {seen[w.lower()]} and a {kind}"
            seen[w.lower()] = kind
    assert len(T.OPPOSITE_WORDS) == 2 * len(T.OPPOSITES), "a word appears in two opposite pairs"
    assert all(T.OPPOSITE_OF[T.OPPOSITE_OF[w]] == w for w in T.OPPOSITE_WORDS)


def test_articles_and_plurals():
    assert T.with_article("owl") == "an owl"
    assert T.with_article("dog") == "a dog"
    assert T.with_article("bread") == "some bread"
    assert T.plural("box") == "boxes"
    assert T.plural("sandwich", 3) == "sandwiches"
    assert T.plural("apple", 1) == "apple"
    assert T.plural("kite", 0) == "kites"
    assert T.kind_sentence("dog", "animal") == "A dog is an animal."
    assert T.kind_sentence("park", "place") == "The park is a place."
    assert T.kind_sentence("red", "colour") == "Red is a colour."


def test_story_facts_stay_consistent():
    """Every '<colour> <object>' in a story is the hero's or the friend's
    thing, and the hero's name appears in it."""
    rng = random.Random(5)
    for _ in range(300):
        body, ending, facts = T.make_story_parts(rng)
        text = " ".join(body + [T.fill(ending, facts)])
        toks = T.tokens_of(text)
        things = {(a, b) for a, b in zip(toks, toks[1:]) if a in T.COLOURS and b in T.OBJECTS}
        allowed = {(facts["colour"], facts["object"]), (facts["fcolour"], facts["fobject"])}
        assert things <= allowed, f"inconsistent things {things - allowed} in: {text}"
        assert facts["name"] in text or "children" in text, text


def test_stories_state_true_sums_and_opposites():
    rng = random.Random(6)
    sums = opposites = 0
    for _ in range(600):
        text = T.make_story(rng)
        for a, op, b, c in re.findall(r"(\d+) (plus|minus) (\d+) is (\d+)", text):
            expected = int(a) + int(b) if op == "plus" else int(a) - int(b)
            assert int(c) == expected, text
            sums += 1
        for w, o in re.findall(r"The opposite of (\w+) is (\w+)", text):
            assert T.OPPOSITE_OF[w] == o, text
            opposites += 1
    assert sums > 20 and opposites > 10, "the lessons should appear in the stories"


def test_generate_stories_size_and_seed():
    a = T.generate_stories(1, 0.02)
    size = sum(len(s.encode()) + 1 for s in a)
    assert 20_000 <= size < 22_000, size
    assert T.generate_stories(1, 0.02) == a, "same seed must give the same stories"
    assert T.generate_stories(2, 0.02) != a, "another seed must give other stories"
    quizzes = [s for s in a if "?" in s and "asked" not in s]     # stories ask in dialogue: "... asked the teacher"
    assert abs(len(quizzes) / len(a) - T.QUIZ_SHARE) < 0.1, "about QUIZ_SHARE of the documents are quizzes"
    assert all("\n" not in s for s in a), "a story or a quiz is one paragraph"


def test_make_quiz_uses_only_quiz_keys(monkeypatch):
    made = []  # every task record make_quiz draws, kept or not
    for task, maker in list(T.TASK_MAKERS.items()):
        monkeypatch.setitem(T.TASK_MAKERS, task, lambda rng, maker=maker: made.append(maker(rng)) or made[-1])
    rng = random.Random(21)
    for _ in range(50):
        made.clear()
        quiz = T.make_quiz(rng, 1337)
        used = [r for r in made if T.is_quiz_key(T.record_key(r), 1337)]
        assert 2 <= len(used) <= 4 and "\n" not in quiz
        for r in used:     # each question in order, each followed by one of its concise answers
            question = r["prompt"].replace("\n", " ")
            assert quiz.startswith(question + " "), (quiz, question)
            quiz = quiz[len(question) + 1:]
            answer = next(a for a in r["_concise"] if quiz.startswith(a))
            quiz = quiz[len(answer):].lstrip(" ")
        assert quiz == "", "a quiz must use the quiz keys, and only them"
    keys = [f"key {i}" for i in range(4000)]
    share = sum(T.is_quiz_key(k, 1337) for k in keys) / len(keys)
    assert abs(share - T.QUIZ_KEY_SHARE) < 0.03


def test_add_web_junk_counts():
    stories = T.generate_stories(3, 0.02)
    docs, counts = T.add_web_junk(stories, random.Random(0), 0.14)
    assert sum(counts.values()) == round(0.14 * len(stories))
    assert len(docs) == len(stories) + sum(counts.values())
    assert set(counts) == set(T.JUNK_KINDS) and min(counts.values()) >= 1
    assert sum(T.JUNK_FOOTER in d for d in docs) == counts["footer"]
    assert sum("Lorem ipsum" in d for d in docs) == counts["web_page"]
    assert sum("@example.com" in d for d in docs) == counts["personal_data"]


# -----------------------------------------------------------------------------
# Tasks and demonstrations

@pytest.mark.parametrize("task", T.TASKS)
def test_task_records_answers_check_out(task):
    rng = random.Random(7)
    for _ in range(200):
        rec = T.TASK_MAKERS[task](rng)
        assert rec["task"] == task
        assert rec["prompt"] and rec["reference"]
        assert all(T.is_correct(rec, r) for r in rec["_concise"]), rec
        assert not any(T.is_correct(rec, r) for r in rec["_wrong"]), rec
        assert rec["reference_response"] == rec["_concise"][0]
        assert T.gold_score(rec, rec["reference_response"]) == T.GOLD_CORRECT


def test_story_qa_answer_is_in_the_story():
    rng = random.Random(8)
    for _ in range(300):
        rec = T.make_story_qa(rng)
        story, question = rec["prompt"].split("\n")
        assert story == rec["context"]
        assert 2 <= story.count(".") <= 4, story
        assert rec["reference"].lower() in T.tokens_of(story), rec
        assert question.endswith("?")


def test_arithmetic_reference_is_the_sum():
    rng = random.Random(9)
    checked = 0
    for _ in range(300):
        rec = T.make_arithmetic(rng)
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
        rec = T.make_opposite(rng)
        assert rec["reference"] == T.OPPOSITE_OF[rec["given"][0]]
        rec = T.make_category(rng)
        kind = next(k for k in T.CATEGORY_KINDS if f" {k}" in rec["prompt"].replace(":", " ").replace("?", " "))
        assert rec["reference"] in T.CATEGORY_KINDS[kind]
        assert [o for o in rec["options"] if o in T.CATEGORY_KINDS[kind]] == [rec["reference"]], rec


def test_filler_sentences_hold_no_answer_words():
    """Rambling answers must stay correct: their filler names no answer."""
    answer_words = {w.lower() for ws in T.KIND_WORDS.values() for w in ws} | set(T.OPPOSITE_WORDS)
    answer_words |= set(T.NUMBER_WORDS)
    for sentence in T.VERBOSE_OPENERS + T.VERBOSE_CLOSERS + T.QA_REASONING:
        toks = set(T.tokens_of(sentence))
        assert not toks & answer_words, f"{sentence!r} contains {toks & answer_words}"
        assert not any(t.isdigit() for t in toks)


def test_make_demonstration_follows_the_mix():
    rng = random.Random(11)
    rec = T.make_story_qa(rng)
    for mix, quality in [((1, 0, 0), "concise"), ((0, 1, 0), "verbose"), ((0, 0, 1), "wrong")]:
        for _ in range(20):
            text, q = T.make_demonstration(rec, rng, mix)
            assert q == quality
            assert T.is_correct(rec, text) == (quality != "wrong"), text
            if quality == "verbose":
                assert len(T.tokens_of(text)) > len(T.tokens_of(rec["reference_response"])) + 4
    counts = {"concise": 0, "verbose": 0, "wrong": 0}
    for _ in range(3000):
        counts[T.make_demonstration(rec, rng)[1]] += 1
    for quality, share in zip(["concise", "verbose", "wrong"], T.DEMO_MIX):
        assert abs(counts[quality] / 3000 - share) < 0.03, counts


def test_truncate_before_answer():
    assert T.truncate_before_answer("Mia went to the park.", "park") == "Mia went to the"
    assert T.truncate_before_answer("3 plus 4 is 7.", "7") == "3 plus 4 is"
    assert T.truncate_before_answer("Park.", "park") is None
    assert T.truncate_before_answer("Nothing here.", "park") is None


def test_make_candidates_kinds():
    rng = random.Random(12)
    for task in T.TASKS:
        rec = T.TASK_MAKERS[task](rng)
        cands = T.make_candidates(rec, rng)
        kinds = [k for k, _, _ in cands]
        assert set(kinds) <= set(T.CANDIDATE_KINDS)
        by = {k: (t, e) for k, t, e in cands}
        assert by["empty"] == ("", True)
        assert by["repetitive"][1] is False and T.repetition_fraction(by["repetitive"][0]) > 0.3
        assert T.is_correct(rec, by["concise"][0]) and not T.is_correct(rec, by["wrong"][0])
        assert T.is_correct(rec, by["verbose"][0]) and not T.is_correct(rec, by["verbose_wrong"][0])
        # matched pairs differ only in the answer: the same words around it
        assert by["verbose"][0].replace(by["concise"][0], by["wrong"][0]) == by["verbose_wrong"][0]
        assert len(T.tokens_of(by["concise"][0])) == len(T.tokens_of(by["wrong"][0]))
        assert by["copy"][0] == rec["prompt"].split("\n")[-1]
        if "truncated" in by:
            assert by["truncated"][1] is False


# -----------------------------------------------------------------------------
# The gold labeler, rule by rule (hand-computed values)

def test_gold_rule1_empty_is_worst():
    rec = story_record()
    assert T.gold_score(rec, "") == T.GOLD_EMPTY == -3.0
    assert T.gold_score(rec, "  ...  !") == T.GOLD_EMPTY
    worst_nonempty = T.gold_score(rec, "x x x x x x x x x x x x x x x x x x x x x x x x x x x x x", ended=False)
    assert worst_nonempty > T.GOLD_EMPTY


def test_grade_answers_hand_computed():
    story = story_record()
    arith = {"task": "arithmetic", "prompt": "What is 2 plus 3?", "reference": "5", "answer_kind": "number"}
    records = [story, story, arith]
    answers = [("Mia went to the park.", True), ("The beach.", False), ("It is 5.", True)]
    got = T.grade_answers(records, answers)
    golds = [T.gold_score(r, t, e) for r, (t, e) in zip(records, answers)]
    assert got["n"] == 3
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got["gold"] == pytest.approx(sum(golds) / 3)
    assert got["end_rate"] == pytest.approx(2 / 3)
    assert got["words"] == pytest.approx((5 + 2 + 3) / 3)
    assert got["by_task"]["story_qa"]["accuracy"] == pytest.approx(0.5)
    assert got["by_task"]["arithmetic"] == {"n": 1, "accuracy": 1.0, "gold": golds[2], "end_rate": 1.0, "words": 3.0}
    with pytest.raises(ValueError, match="2 records but 1 answers"):
        T.grade_answers(records[:2], answers[:1])


def test_gold_rule2_correctness():
    rec = story_record()
    assert T.gold_score(rec, "Mia went to the park.") == 3.0
    assert T.gold_score(rec, "Mia went to the beach.") == 0.0          # wrong entity
    assert T.gold_score(rec, "The park or the beach.") == 0.0           # two answers is not an answer
    assert T.gold_score(rec, "Where did Mia go?") == 0.0                # copy of the question
    assert T.gold_score(rec, "PARK!") == 3.0                            # case and punctuation do not matter
    assert T.is_correct(rec, "Mia went to the park.") and not T.is_correct(rec, "beach")


def test_gold_numbers_use_the_last_number():
    assert T.numbers_in("3 plus 4 is seven, not 8") == [3, 4, 7, 8]
    assert T.gold_score(ARITH, "3 plus 4 is 7.") == 3.0
    assert T.gold_score(ARITH, "The answer is seven.") == 3.0
    assert T.gold_score(ARITH, "7 or maybe 8") == 0.0
    assert T.gold_score(ARITH, "What is 3 plus 4?") == 0.0
    assert T.gold_score(ARITH, "I do not know.") == 0.0


def test_gold_given_words_are_not_answers():
    assert T.gold_score(OPPOSITE, "The opposite of big is small.") == 3.0
    assert T.gold_score(OPPOSITE, "Big.") == 0.0
    assert T.gold_score(OPPOSITE, "The opposite of big is cold.") == 0.0
    assert T.gold_score(CATEGORY, "A dog is an animal.") == 3.0
    assert T.gold_score(CATEGORY, "cup, dog, red") == 0.0               # every option at once
    assert T.gold_score(CATEGORY, "The answer is cup.") == 0.0


def test_gold_rule3_length():
    rec = story_record()
    text = "Well I looked at every sentence before answering and so Mia went to the park."
    n = len(T.tokens_of(text))
    assert n == 15
    assert T.gold_score(rec, text) == pytest.approx(3.0 - 0.05 * (15 - 8))   # 2.65
    long_text = " ".join(f"w{i}" for i in range(60)) + " park"
    assert T.gold_score(rec, long_text) == pytest.approx(3.0 - T.LENGTH_PENALTY_MAX)


def test_gold_rule4_end_of_turn():
    rec = story_record()
    assert T.gold_score(rec, "Mia went to the park.", ended=False) == 2.5
    # A response that still holds the end-of-turn string ends there.
    assert T.gold_score(rec, "Mia went to the park.<|end|> beach beach", ended=False) == 3.0


def test_gold_rule5_repetition():
    rec = story_record()
    assert T.repetition_fraction("park park park park park") == pytest.approx(0.75)   # 4 bigrams, 1 distinct
    assert T.repetition_fraction("Mia went to the park.") == 0.0
    assert T.repetition_fraction("park") == 0.0
    assert T.gold_score(rec, "park park park park park") == pytest.approx(3.0 - 0.75)


def test_gold_correct_always_beats_wrong():
    rng = random.Random(13)
    for _ in range(200):
        rec = T.TASK_MAKERS[rng.choice(T.TASKS)](rng)
        scored = [(T.is_correct(rec, t), T.gold_score(rec, t, e), t) for _, t, e in T.make_candidates(rec, rng)]
        right = [g for c, g, t in scored if c]
        wrong = [g for c, g, t in scored if not c and t]
        assert right and min(right) > max(wrong, default=-1e9), scored
        assert min(g for _, g, _ in scored) == T.GOLD_EMPTY


def test_gold_open_tasks_use_word_overlap():
    rec = {"task": "alpaca", "prompt": "Why is the sky blue?", "reference": "The sky is blue because of scattering",
           "answer_kind": "open"}
    assert T.overlap_f1("the sky is blue", "The sky is blue because of scattering") == pytest.approx(2 * 1 * (4 / 7) / (1 + 4 / 7))
    assert T.gold_score(rec, "The sky is blue because of scattering") == 3.0
    assert T.gold_score(rec, "Bananas.") == 0.0
    assert T.is_correct(rec, "the sky is blue because of light scattering")
    no_reference = {"task": "hh", "prompt": "Hi", "reference": None, "answer_kind": "open"}
    assert T.gold_score(no_reference, "Hello there.") == 0.0


def test_gold_never_crashes_on_garbage():
    rng = random.Random(14)
    rec = story_record()
    for _ in range(200):
        text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 80)))
        assert isinstance(T.gold_score(rec, text, ended=rng.random() < 0.5), float)
    assert isinstance(T.gold_score(ARITH, "9" * 5000), float)


# -----------------------------------------------------------------------------
# Preference labels

def test_bradley_terry_prob():
    assert T.bradley_terry_prob(1.0, 1.0, 1.0) == 0.5
    assert T.bradley_terry_prob(1.0, 0.0, 1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert T.bradley_terry_prob(0.0, 1.0, 1.0) == pytest.approx(1 - 1 / (1 + math.exp(-1)))
    assert T.bradley_terry_prob(2.0, 0.0, 2.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert T.bradley_terry_prob(1000.0, 0.0, 0.01) == 1.0          # no overflow
    assert T.bradley_terry_prob(0.0, 1000.0, 0.01) == 0.0


def test_make_preference_pair_fields():
    rng = random.Random(16)
    for _ in range(200):
        rec = T.TASK_MAKERS[rng.choice(T.TASKS)](rng)
        pair = T.make_preference_pair(rec, rng)
        assert pair["chosen"] != pair["rejected"] or pair["chosen_ended"] != pair["rejected_ended"]
        assert pair["gold_chosen"] == T.gold_score(rec, pair["chosen"], pair["chosen_ended"])
        assert pair["gold_rejected"] == T.gold_score(rec, pair["rejected"], pair["rejected_ended"])
        assert pair["gold_chosen"] != pair["gold_rejected"]
        assert pair["gold_prefers_chosen"] == (pair["gold_chosen"] > pair["gold_rejected"])
        assert not any(k.startswith("_") for k in pair)


def test_matched_right_wrong_pairs_are_about_half():
    rng = random.Random(19)
    pairs = [T.make_preference_pair(T.TASK_MAKERS[T.TASKS[i % 4]](rng), rng) for i in range(1000)]
    matched = [p for p in pairs if {p["chosen_kind"], p["rejected_kind"]} in ({"concise", "wrong"},
                                                                             {"verbose", "verbose_wrong"})]
    assert abs(len(matched) / len(pairs) - T.MATCHED_PAIR_SHARE) < 0.08, len(matched)


def pairs_at(temperature, n=2500, seed=17):
    rng = random.Random(seed)
    return [T.make_preference_pair(T.TASK_MAKERS[T.TASKS[i % 4]](rng), rng, temperature) for i in range(n)]


def test_label_agreement_looks_human_at_the_default_temperature():
    agreement = T.label_agreement(pairs_at(T.LABEL_TEMPERATURE))
    assert 0.8 <= agreement <= 0.95, agreement
    assert T.label_agreement(pairs_at(0.01, n=500)) > 0.99         # a perfect labeler
    assert abs(T.label_agreement(pairs_at(1000.0, n=1500)) - 0.5) < 0.05   # a coin


# -----------------------------------------------------------------------------
# Multiple choice

def test_make_cloze_changes_exactly_one_fact():
    rng = random.Random(19)
    for _ in range(100):
        item = T.make_cloze(rng)
        endings = item["endings"]
        assert len(endings) == 4 and len(set(endings)) == 4 and 0 <= item["label"] < 4
        assert all(e.startswith(" ") for e in endings)
        context = set(T.tokens_of(item["context"]))
        correct = endings[item["label"]].split()
        for i, e in enumerate(endings):
            if i == item["label"]:
                continue
            words = e.split()
            diff = [(a, b) for a, b in zip(correct, words) if a != b]
            assert len(words) == len(correct) and len(diff) == 1, (correct, words)
            right_word, wrong_word = T.tokens_of(diff[0][0])[0], T.tokens_of(diff[0][1])[0]
            assert right_word in context, item
            assert wrong_word not in context, item


# -----------------------------------------------------------------------------
# Splits

def test_split_of_is_deterministic_and_proportional():
    names, weights = ["a", "b", "c"], [1, 2, 7]
    assert T.split_of("hello", 1, names, weights) == T.split_of("hello", 1, names, weights)
    counts = {n: 0 for n in names}
    for i in range(20000):
        counts[T.split_of(f"key{i}", 1, names, weights)] += 1
    for n, w in zip(names, weights):
        assert abs(counts[n] / 20000 - w / 10) < 0.015, counts


def test_build_task_splits_balanced_unique_disjoint():
    sizes = {"prompts_eval": 20, "prompts_ppo": 41, "sft_train": 100}
    splits = T.build_task_splits(3, sizes)
    assert {s: len(v) for s, v in splits.items()} == sizes
    for records in splits.values():
        per_task = [sum(r["task"] == t for r in records) for t in T.TASKS]
        assert max(per_task) - min(per_task) <= 1
    prompts = [r["prompt"] for v in splits.values() for r in v]
    assert len(prompts) == len(set(prompts))
    keys = {s: {T.record_key(r) for r in v} for s, v in splits.items()}
    assert not keys["prompts_eval"] & keys["sft_train"] and not keys["prompts_ppo"] & keys["sft_train"]
    assert not any(T.is_quiz_key(k, 3) for ks in keys.values() for k in ks), "a task key is also a quiz key"
    assert T.build_task_splits(3, sizes) == splits


def test_prefs_train_beyond_the_first_round_comes_after_and_changes_nothing_else(monkeypatch):
    monkeypatch.setattr(T, "PREFS_TRAIN_FIRST", 60)
    sizes = {"prompts_eval": 20, "prefs_val": 40, "prefs_train": 60, "sft_train": 80}
    base = T.build_task_splits(5, sizes)
    more = T.build_task_splits(5, dict(sizes, prefs_train=90))
    for split in sizes:
        if split != "prefs_train":
            assert more[split] == base[split], f"{split} changed when more prefs_train records were asked for"
    assert more["prefs_train"][:60] == base["prefs_train"], "the first prefs_train records must stay the same"
    extra = more["prefs_train"][60:]
    assert len(extra) == 30
    per_task = [sum(r["task"] == t for r in extra) for t in T.TASKS]
    assert max(per_task) - min(per_task) <= 1, per_task
    others = {r["prompt"] for s, v in base.items() for r in v}
    assert not any(r["prompt"] in others for r in extra), "a later record repeats a prompt of the dataset"
    names, weights = list(sizes), [sizes[s] for s in sizes]
    assert all(T.split_of(T.record_key(r), 5, names, weights) == "prefs_train" for r in extra), \
        "a later record's key belongs to another split (train and held-out data would share it)"
    assert T.SPLIT_SIZES["prefs_train"] == 36000 and T.PREFS_TRAIN_FIRST == 60


def test_build_instruction_sets_records():
    sizes = {"prompts_eval": 8, "prompts_ppo": 8, "prefs_val": 8, "prefs_train": 12, "sft_val": 4, "sft_train": 12}
    sets = T.build_instruction_sets(9, sizes, mc=6)
    assert {name: len(v) for name, v in sets.items()} == dict(sizes, mc=6)
    task_keys = {"task", "prompt", "context", "reference", "answer_kind", "given", "options", "reference_response"}
    for name in ["sft_train", "sft_val"]:
        for r in sets[name]:
            assert set(r) == task_keys | {"response", "quality", "gold"}
            assert r["gold"] == T.gold_score(r, r["response"])
            assert T.is_correct(r, r["response"]) == (r["quality"] != "wrong"), r
    for name in ["prefs_train", "prefs_val"]:
        assert all(r["gold_prefers_chosen"] == (r["gold_chosen"] > r["gold_rejected"]) for r in sets[name])
    assert all(set(r) == task_keys for name in ["prompts_ppo", "prompts_eval"] for r in sets[name])
    assert len({m["context"] for m in sets["mc"]}) == 6, "cloze items must have distinct stories"
    assert T.build_instruction_sets(9, sizes, mc=6) == sets, "same seed, same records"
