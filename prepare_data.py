"""
prepare_data.py: the data of every stage, from raw text to preference pairs.

Every later stage learns from the files this script writes into data/NAME/:

    tokenizer.json          the BPE tokenizer (bpe.py), trained on train.txt
    train.bin, val.bin      token ids (uint16, or uint32 for vocabularies above
                            65,536), every document followed by <|endoftext|>
    train.txt, val.txt      the same text, to read with your own eyes
    meta.json               what was built, from what, with which arguments
    sft_train/val.jsonl     prompt/response demonstrations       (sft.py)
    prefs_train/val.jsonl   prompt, chosen, rejected             (reward.py)
    prompts_ppo.jsonl       prompts with references              (ppo.py)
    prompts_eval.jsonl      held-out prompts with references     (eval.py)
    mc.jsonl                4-way multiple choice, HellaSwag-style (eval.py)

Two kinds of data, both first class:

1. tinyworld (the default, `python prepare_data.py`): a small world generated
   here from a seed, offline and byte-for-byte reproducible. Children, animals,
   toys, colours, places, food and feelings, told in simple stories whose facts
   stay consistent inside a story, small enough that a model of a few million
   parameters learns it on a laptop CPU in minutes; some documents are quizzes
   that drill the world's facts. Its instruction tasks (story questions, small
   sums, opposites, "which word is an animal") have answers a program can
   check, which lets `gold_score` play the human labeler: it scores any
   response, rule by rule, and its noisy verdicts (Bradley-Terry) become the
   preference pairs of the reward model.

2. Real corpora, downloaded once with `download` and parsed into the same files:
   tinyshakespeare and TinyStories (pretraining), Alpaca (SFT), Anthropic HH-RLHF
   (preferences), HellaSwag (multiple choice); or any text file with --input.

Raw pretraining text goes through curation, as the lectures teach it: exact
de-duplication of documents and of repeated lines, boilerplate lines, C4-style
quality filters, MinHash near-duplicate removal and privacy redaction. tinyworld
plants a little "web junk" in its raw text (copies, boilerplate, e-mail
addresses...) so that every step has something to remove.

Read top to bottom: configuration, the world and its stories, the tasks and the
gold labeler, preference pairs, splits, downloads and parsers, curation,
tokenization, the build, the command line.
"""

import argparse
import dataclasses
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import zlib

import numpy as np
import requests

import bpe

# -----------------------------------------------------------------------------
# Configuration

FORMAT_VERSION = 2                # bump when the files' layout or content rules change
DATA_ROOT = "data"                # every dataset lives in DATA_ROOT/NAME/
DOWNLOAD_DIR = "downloads"        # raw downloads are cached in DATA_ROOT/downloads/
CHECKSUMS_FILE = "checksums.json" # sha256 recorded on first download (unpinned files)
MIRROR_ENV = "STAGEGPT_MIRROR"    # base URL that replaces every source's host (tests, offline mirrors)

# The datasets this script knows. "vocab_size" is the default BPE vocabulary:
#  tinyworld 2048, a ceiling: its closed vocabulary (a few hundred words) is used
#    up after about 1300 merges, where BPE stops (~1580 ids, nearly every word a
#    single token, ~3.9 bytes/token); the embedding table stays small (1580 x 128
#    = 0.2M parameters) for a 1-3M-parameter model.
#  shakespeare 1024: 1.1 MB is little text; at 1024 ids it already encodes at
#    ~2.6 bytes/token, and every merge is still seen hundreds of times. Larger
#    vocabularies mostly add rare tokens a small model cannot learn from 1 MB.
#  tinystories 2048: simple English with a larger vocabulary than tinyworld, ~19
#    MB of it; 2048 ids keep the embedding table of a small model at ~0.25M.
#  --input FILE uses 1024, like shakespeare (a single local text of unknown size).
DATASETS = {
    "tinyworld":   {"kind": "generated", "vocab_size": 2048, "val_fraction": 0.05},
    # tinyworld with 24,000 more preference pairs (36,000), every other file byte-identical:
    # what reward.py's small preset needs to judge sums (README, stage 5)
    "tinyworld-prefs36k": {"kind": "generated", "vocab_size": 2048, "val_fraction": 0.05, "prefs_extra": 24000},
    "shakespeare": {"kind": "pretrain", "sources": ["shakespeare"], "vocab_size": 1024, "val_fraction": 0.10},
    "tinystories": {"kind": "pretrain", "sources": ["tinystories"], "vocab_size": 2048, "val_fraction": 0.05},
    "alpaca":      {"kind": "sft", "sources": ["alpaca"]},
    "hh":          {"kind": "prefs", "sources": ["hh_train", "hh_test"]},
    "hellaswag":   {"kind": "mc", "sources": ["hellaswag"]},
}
INPUT_VOCAB_SIZE = 1024
INPUT_VAL_FRACTION = 0.10

# Where the real corpora come from. sha256 is pinned where known; the others are
# recorded on first download and checked from then on.
SOURCES = {
    "shakespeare": {
        "url": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "filename": "tinyshakespeare.txt",
        "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",  # 1,115,394 bytes
    },
    "tinystories": {
        "url": "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
        "filename": "TinyStories-valid.txt",
        "sha256": None,
    },
    "alpaca": {
        "url": "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
        "filename": "alpaca_data.json",
        "sha256": None,
    },
    "hh_train": {
        "url": "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/train.jsonl.gz",
        "filename": "hh-helpful-base-train.jsonl.gz",
        "sha256": None,
    },
    "hh_test": {
        "url": "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/test.jsonl.gz",
        "filename": "hh-helpful-base-test.jsonl.gz",
        "sha256": None,
    },
    "hellaswag": {
        "url": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
        "filename": "hellaswag_val.jsonl",
        "sha256": None,
    },
}
DOWNLOAD_TIMEOUT_S = 30.0
DOWNLOAD_RETRIES = 3
DOWNLOAD_BACKOFF_S = 1.0          # waits 1 s, 2 s, 4 s ... between tries

# Text chunks: long single texts (shakespeare, --input) are cut at blank lines
# into documents of about this many characters, so that curation and the
# train/val split have documents to work with.
CHUNK_CHARS = 4000

# Quizzes: a share of the pretraining documents are question-answer drills in
# the tasks' own formats (the world's knowledge and the copying skill the tasks
# need). They use only the quiz share of task keys, which no task split ever uses.
QUIZ_SHARE = 0.30          # share of pretraining documents that are quizzes
QUIZ_KEY_SHARE = 0.25      # share of task keys (stories, prompts) reserved for quizzes

# Difficulty of story questions: how often a second child appears, and how often
# that child has a fact of the asked kind (then the answer must be read from the
# right sentence, not just from the only word of its kind).
QA_SECOND_CHILD = 0.8
QA_SAME_KIND = 0.8

# Sizes of the tinyworld instruction splits (records); each split holds the four
# task types in equal numbers.
SPLIT_SIZES = {
    "prompts_eval": 200,   # held-out prompts with references (eval.py)
    "prompts_ppo": 1000,   # prompts for RLHF rollouts (ppo.py)
    "prefs_val": 1000,     # held-out preference pairs (reward.py): +-1.3% on an accuracy near 80%
    "prefs_train": 12000,  # preference pairs (reward.py): judging whether an answer is right is
                           # learned from fresh pairs, not from more epochs over few (README, stage 5)
    "sft_val": 200,        # held-out demonstrations (sft.py)
    "sft_train": 4000,     # demonstrations (sft.py)
}
MC_SIZE = 400              # multiple-choice cloze items
# Sizes for the real instruction datasets (the rest of Alpaca goes to sft_train).
REAL_SIZES = {"prompts_eval": 200, "prompts_ppo": 1000, "sft_val": 500, "prefs_val": 2000}
DEFAULT_MEGABYTES = 4.0    # size of tinyworld's pretraining text

# Quality of the demonstrations, like human-written ones (concise, verbose, wrong):
# most are correct, but more than half ramble, while the labeler prefers concise
# answers. So SFT imitates a style the preference labels then correct, which is
# what RLHF is for: with 70% concise demonstrations SFT's greedy answers already
# had the labeler's style and PPO had nothing its reward model could judge left
# to improve (README, stage 6).
DEMO_MIX = (0.35, 0.55, 0.10)

# Bradley-Terry label noise: P(a preferred over b) = sigmoid((gold_a - gold_b) / T).
# T = 1.0 gives about 90% agreement with the noiseless labels on tinyworld pairs.
LABEL_TEMPERATURE = 1.0

# Curation
JUNK_FRACTION = 0.02       # share of planted junk documents in raw tinyworld text
NEAR_DUP_THRESHOLD = 0.8   # MinHash estimate of Jaccard similarity above which a document is dropped
SHINGLE_WORDS = 5          # word 5-grams
MINHASH_PERMS = 64         # signature length
MINHASH_BANDS = 16         # LSH bands (4 rows each): candidate pairs share a band
MIN_WORDS = 5              # quality filter: documents need at least this many words,
MIN_SENTENCES = 2          #   this many sentences,
MIN_LETTER_FRACTION = 0.6  #   and this share of letters among non-space characters
MIN_DUP_LINE_CHARS = 50    # only lines at least this long count as repeated lines
BOILERPLATE_LINE_PHRASES = ["javascript", "cookie policy", "privacy policy", "terms of use",
                            "all rights reserved", "subscribe to", "click here"]
BOILERPLATE_DOC_PHRASES = ["lorem ipsum"]

# -----------------------------------------------------------------------------
# Small helpers used everywhere


class DataError(Exception):
    """A problem with the input that the user can fix: reported as one line."""


def rng_for(seed, part):
    """A private random stream for one part of the build. Seeding by a string
    goes through sha512 in Python, so it is the same on every run and machine,
    and parts never disturb one another's randomness."""
    return random.Random(f"stagegpt:{seed}:{part}")


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path, data):
    """Write to a temporary file in the same folder, flush, then rename: a
    crash never leaves a half-written file under the real name."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def write_jsonl(path, records):
    """One JSON object per line, UTF-8, keys in the order given."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    atomic_write_text(path, "".join(lines))


def read_jsonl(path):
    """All records of a JSONL file. An empty or malformed line is an error that
    names the file and the line number (sft.py, reward.py, ppo.py, eval.py read
    their data through this)."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: run `python prepare_data.py` (or with --dataset) first")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                raise DataError(f"{path} line {number} is empty: every line must be one JSON object")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number} is not a JSON object")
            records.append(record)
    return records


def tokens_of(text):
    """Lowercase words and numbers of a text: the unit of every rule below."""
    return re.findall(r"[a-z]+|[0-9]+", text.lower())


def log(msg, quiet=False):
    if not quiet:
        print(f"[prepare_data] {msg}", flush=True)


# -----------------------------------------------------------------------------
# The world of tinyworld: a closed vocabulary. The lists of one kind never share
# a word with another kind's (a test checks), so an answer can be recognised by
# the words it uses.

GIRL_NAMES = ["Mia", "Lily", "Anna", "Zoe", "Ella", "Ruby", "Lucy", "Rosa",
              "Nina", "Maya", "Lena", "Sara", "Emma", "Clara", "Alice", "Hana"]
BOY_NAMES = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Noah", "Finn",
             "Omar", "Hugo", "Theo", "Eli", "Adam", "Kai", "Otto", "Paul"]
NAMES = GIRL_NAMES + BOY_NAMES
ANIMALS = ["dog", "cat", "bird", "fish", "rabbit", "frog", "duck", "horse", "cow", "pig",
           "sheep", "goat", "mouse", "bear", "fox", "owl", "turtle", "lion", "hen", "bee"]
OBJECTS = ["ball", "kite", "hat", "book", "box", "cup", "bike", "boat", "car", "doll",
           "drum", "bag", "shoe", "coat", "key", "lamp", "map", "bell", "sock", "train",
           "truck", "shell", "flag", "blanket"]
COLOURS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "black", "white", "brown"]
PLACES = ["park", "beach", "forest", "garden", "school", "farm", "river", "lake", "zoo", "shop",
          "market", "library", "hill", "town", "castle", "playground", "village", "pond"]
FOODS = ["apple", "banana", "cake", "bread", "soup", "cookie", "pie", "carrot", "cheese",
         "egg", "grape", "pear", "plum", "sandwich"]
FEELINGS = ["happy", "sad", "tired", "excited", "scared", "proud", "angry", "calm", "surprised", "lonely"]
GOOD_FEELINGS = ["happy", "excited", "proud", "calm"]
BAD_FEELINGS = ["sad", "tired", "scared", "lonely"]
UNCOUNTABLE = {"bread", "soup", "cheese", "sheep", "fish"}
# Word pairs for the "opposite" task. Every word appears once.
OPPOSITES = [("big", "small"), ("hot", "cold"), ("fast", "slow"), ("old", "new"), ("wet", "dry"),
             ("full", "empty"), ("loud", "quiet"), ("soft", "hard"), ("long", "short"),
             ("heavy", "light"), ("clean", "dirty"), ("up", "down"), ("open", "closed"),
             ("day", "night"), ("early", "late"), ("happy", "sad"), ("near", "far"),
             ("high", "low"), ("thick", "thin"), ("dark", "bright")]
OPPOSITE_OF = {}
for _a, _b in OPPOSITES:
    OPPOSITE_OF[_a], OPPOSITE_OF[_b] = _b, _a
OPPOSITE_WORDS = sorted(OPPOSITE_OF)

# What each animal does; used by the stories ("the dog barked at a duck").
ANIMAL_SOUND = {"dog": "barked", "cat": "meowed", "bird": "sang", "fish": "splashed", "rabbit": "hopped",
                "frog": "croaked", "duck": "quacked", "horse": "neighed", "cow": "mooed", "pig": "oinked",
                "sheep": "bleated", "goat": "bleated", "mouse": "squeaked", "bear": "growled",
                "fox": "yelped", "owl": "hooted", "turtle": "hissed", "lion": "roared",
                "hen": "clucked", "bee": "buzzed"}
ANIMAL_HABIT = {"dog": "run in the grass", "cat": "sleep in the sun", "bird": "fly from tree to tree",
                "fish": "swim in circles", "rabbit": "eat carrots", "frog": "jump into the water",
                "duck": "swim with its friends", "horse": "run across the field", "cow": "eat grass all day",
                "pig": "roll in the mud", "sheep": "stay close to the others", "goat": "climb on rocks",
                "mouse": "hide in small places", "bear": "eat honey", "fox": "dig holes",
                "owl": "stay up all night", "turtle": "walk very slowly", "lion": "sleep under a tree",
                "hen": "look for seeds", "bee": "visit the flowers"}
WEATHER = ["sunny", "rainy", "windy", "snowy", "cloudy", "warm"]
TIMES = ["morning", "afternoon", "evening"]
SPOTS = ["under a tree", "behind a big rock", "in the tall grass", "next to a bench", "under a bush",
         "near the gate"]
CATEGORY_KINDS = {"animal": ANIMALS, "colour": COLOURS, "food": FOODS, "place": PLACES}
# The answer vocabulary of each kind of story question.
KIND_WORDS = {"name": NAMES, "animal": ANIMALS, "object": OBJECTS, "colour": COLOURS,
              "place": PLACES, "food": FOODS, "feeling": FEELINGS}


def article(word):
    return "an" if word[0].lower() in "aeiou" else "a"


def with_article(word):
    """'a dog', 'an owl', 'some bread'."""
    return f"some {word}" if word in UNCOUNTABLE else f"{article(word)} {word}"


def plural(word, count=2):
    """'1 apple', '3 apples', '2 boxes', '4 sandwiches'."""
    if count == 1 or word in UNCOUNTABLE:
        return word
    if word.endswith(("x", "ch", "sh")):
        return word + "es"
    return word + "s"


def capitalize(sentence):
    return sentence[:1].upper() + sentence[1:]


def fill(template, facts):
    return capitalize(template.format(**facts))


# -----------------------------------------------------------------------------
# Stories. A story has a hero, a friend and their things. `story_facts` turns the
# base facts (names and chosen words) into every form a template needs
# (pronouns, articles, plurals), so a template cannot get them wrong.

def pick_base_facts(rng):
    """The facts of one story: distinct hero and friend, and their things."""
    name, fname = rng.sample(NAMES, 2)
    obj, fobj = rng.sample(OBJECTS, 2)
    colour, fcolour = rng.sample(COLOURS, 2)
    animal, animal2 = rng.sample(ANIMALS, 2)
    return {
        "name": name, "fname": fname, "object": obj, "fobject": fobj,
        "colour": colour, "fcolour": fcolour, "animal": animal, "animal2": animal2,
        "place": rng.choice(PLACES), "food": rng.choice(FOODS),
        "feeling": rng.choice(GOOD_FEELINGS), "bad_feeling": rng.choice(BAD_FEELINGS),
        "weather": rng.choice(WEATHER), "time": rng.choice(TIMES), "spot": rng.choice(SPOTS),
    }


def story_facts(base):
    """Base facts + pronouns, articles and plurals derived from them."""
    f = dict(base)
    girl = base["name"] in GIRL_NAMES
    fgirl = base["fname"] in GIRL_NAMES
    f.update(
        he="she" if girl else "he", his="her" if girl else "his", him="her" if girl else "him",
        kid="girl" if girl else "boy",
        fhe="she" if fgirl else "he", fhis="her" if fgirl else "his", fhim="her" if fgirl else "him",
        a_colour=article(base["colour"]) + " " + base["colour"],
        a_fcolour=article(base["fcolour"]) + " " + base["fcolour"],
        a_animal=with_article(base["animal"]), a_animal2=with_article(base["animal2"]),
        a_food=with_article(base["food"]), foods=plural(base["food"]),
        sound=ANIMAL_SOUND[base["animal"]], habit=ANIMAL_HABIT[base["animal"]],
    )
    f["He"], f["His"] = capitalize(f["he"]), capitalize(f["his"])
    return f


# Each plot is a list of steps; each step is a list of alternative templates
# (an empty string means the step may be skipped). The last step is the ending,
# which calls back facts from earlier: the multiple-choice cloze set asks a model
# to pick the ending that keeps the story consistent.
PLOTS = {
    "lost_and_found": [
        ["Once upon a time, there was a little {kid} named {name}.", "There was once a {kid} called {name}.",
         "{name} was a little {kid} who liked to play outside."],
        ["{name} had {a_colour} {object}.", "{name} had {a_colour} {object} that {he} loved very much.",
         "{His} favourite toy was {a_colour} {object}."],
        ["One day, {name} took {his} {object} to the {place}.",
         "One {time}, {name} went to the {place} with {his} {colour} {object}."],
        ["It was a {weather} day.", "The sun was shining.", ""],
        ["{name} played with the {object} for a long time, but then {he} lost it.",
         "A strong wind came and took the {colour} {object} away.",
         "{name} put {his} {object} down to look at {a_animal}. When {he} looked back, the {object} was gone."],
        ["{name} felt very sad.", "{He} was sad and started to cry.", "{name} was so sad that {he} sat down on the grass."],
        ["Then {his} friend {fname} came and asked, \"Why are you sad, {name}?\"", "{fname} saw {name} and wanted to help."],
        ["\"I lost my {colour} {object},\" said {name}.", "{name} told {fname} about the {colour} {object}.", ""],
        ["{fname} looked {spot} and found the {colour} {object}.",
         "They looked everywhere. At last, {fname} found the {object} {spot}."],
        ["{name} was very happy again.", "{name} smiled and gave {fname} a big hug.", "\"Thank you, {fname}!\" said {name}."],
        ["{name} held {his} {colour} {object} tight and went home.",
         "From that day on, {name} never lost {his} {colour} {object} again.",
         "{name} and {fname} played with the {colour} {object} at the {place} until the sun went down."],
    ],
    "pet_day": [
        ["{name} had a little {animal}.", "Once upon a time, a {kid} named {name} had a pet {animal}.",
         "{name} lived with {his} mom, {his} dad and {his} {animal}."],
        ["The {animal} liked to {habit}.", "Every morning, the {animal} {sound} to wake {name} up.", ""],
        ["One day, {name} took the {animal} to the {place}.", "One {time}, {name} and the {animal} went to the {place}."],
        ["At the {place}, the {animal} saw {a_animal2} and {sound}.", "The {animal} found {a_food} and ate it all up.",
         "The {animal} ran away and {name} ran after it."],
        ["There, {name} met {fname}, who had {a_fcolour} {fobject}.", "{fname} was at the {place} too.", ""],
        ["{name}, {fname} and the {animal} played together.", "They played with the {animal} for a long time."],
        ["{name} felt {feeling}.", "{name} was very {feeling} that day."],
        ["At the end of the day, {name} and {his} {animal} went home from the {place}.",
         "{name} gave {his} {animal} a hug and said, \"You are my best friend.\"",
         "That night, the {animal} slept next to {name} and dreamed of the {place}."],
    ],
    "sharing": [
        ["One day, {name} went to the {place} with {a_food} in {his} bag.",
         "{name} loved to eat {foods}. One {time}, {he} took {a_food} to the {place}."],
        ["At the {place}, {name} saw {fname}.", "{fname} was sitting alone at the {place}."],
        ["{fname} looked {bad_feeling}.", "\"I am hungry,\" said {fname}. \"I forgot my lunch.\""],
        ["{name} opened {his} bag and gave {fname} half of the {food}.",
         "\"You can have some of my {food},\" said {name}."],
        ["{fname} smiled and said, \"Thank you, {name}!\"", "The two friends ate the {food} together."],
        ["Sharing made them both {feeling}.", "{name} felt {feeling} because {he} helped a friend.", ""],
        ["{name} was glad {he} shared {his} {food} with {fname}.",
         "From that day on, {name} and {fname} shared their lunch at the {place} every day."],
    ],
    "weather_walk": [
        ["It was a {weather} day.", "One {weather} {time}, {name} wanted to go outside."],
        ["{name} put on {his} {colour} {object} and went out.", "{name} took {his} {colour} {object} and went out."],
        ["{He} walked to the {place}.", "{name} walked all the way to the {place}."],
        ["There {he} saw {a_animal}. It liked to {habit}.", "At the {place}, {a_animal} {sound} at {name}."],
        ["{name} felt {feeling}.", "{name} watched it for a long time.", ""],
        ["Then {he} met {fname} and they walked together.", ""],
        ["{name} walked home from the {place} with {his} {colour} {object}.",
         "{name} told {his} mom about the {animal} at the {place}."],
    ],
    "play_date": [
        ["{name} went to {fname}'s house to play.", "One {time}, {fname} came to {name}'s house."],
        ["\"Do you want to play with my {colour} {object}?\" asked {name}. \"Yes, please!\" said {fname}.",
         "{name} showed {fname} {his} {colour} {object}. {fname} liked the {object} very much."],
        ["They played with the {object} all {time}.", "They took turns with the {object}."],
        ["Then {name}'s mom gave them {a_food}.", "Later, they ate {foods} in the kitchen.", ""],
        ["\"I had a lot of fun today,\" said {fname}.", "Both friends were {feeling}."],
        ["{fname} went home thinking about {name}'s {colour} {object}.",
         "{name} put the {colour} {object} away and waved goodbye to {fname}."],
    ],
}
# Plots written by functions, because they compute something: sums and lessons.
FACT_PLOTS = ["counting", "school"]
# Slots of an ending that a cloze distractor may change, and the words to use.
CLOZE_SLOTS = {"name": NAMES, "fname": NAMES, "colour": COLOURS, "object": OBJECTS,
               "place": PLACES, "animal": ANIMALS, "food": FOODS}


def tell_plot(plot, facts, rng):
    """(body sentences, ending template) of a templated plot."""
    steps = PLOTS[plot]
    body = []
    for options in steps[:-1]:
        template = rng.choice(options)
        if template:
            body.append(fill(template, facts))
    return body, rng.choice(steps[-1])


def tell_counting(facts, rng):
    """A story whose numbers add up: 'Mia had 3 apples ... 3 plus 4 is 7.'"""
    thing = rng.choice([x for x in FOODS + OBJECTS if x not in UNCOUNTABLE])
    f = facts
    if rng.random() < 0.5:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        c = a + b
        lines = [f"{f['name']} had {a} {plural(thing, a)}.",
                 rng.choice([f"{f['fname']} gave {f['him']} {b} more.",
                             f"Then {f['he']} found {b} more {plural(thing, b)} at the {f['place']}."]),
                 f"Now {f['name']} had {c} {plural(thing, c)}.",
                 rng.choice([f"{a} plus {b} is {c}.", f"{f['name']} knew that {a} plus {b} is {c}."])]
    else:
        a = rng.randint(2, 9)
        b = rng.randint(1, a)
        c = a - b
        lines = [f"{f['name']} had {a} {plural(thing, a)}.",
                 rng.choice([f"{capitalize(f['he'])} gave {b} to {f['fname']}.",
                             f"{capitalize(f['he'])} lost {b} of them at the {f['place']}."]),
                 f"Now {f['name']} had {c} {plural(thing, c)} left.",
                 rng.choice([f"{a} minus {b} is {c}.", f"{f['name']} knew that {a} minus {b} is {c}."])]
    ending = rng.choice(["{name} counted them again to be sure.", "{name} was {feeling} and ran to tell {fname}.",
                         "Counting with {fname} was fun."])
    return [capitalize(x) for x in lines], ending


def school_fact(rng, f):
    """One question-and-answer of a school lesson: a sum, an opposite or a kind."""
    kid = rng.choice([f["name"], f["fname"]])
    pick = rng.random()
    if pick < 0.4:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if rng.random() < 0.5:
            q, ans = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}"
        else:
            a, b = max(a, b), min(a, b)
            q, ans = f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}"
    elif pick < 0.7:
        w = rng.choice(OPPOSITE_WORDS)
        q, ans = f"What is the opposite of {w}?", f"The opposite of {w} is {OPPOSITE_OF[w]}"
    else:
        kind = rng.choice(sorted(CATEGORY_KINDS))
        word = rng.choice(CATEGORY_KINDS[kind])
        q, ans = f"What is {kind_subject(word, kind).lower()}?", kind_sentence(word, kind)[:-1]
    return f"\"{q}\" asked the teacher. \"{ans},\" said {kid}."


def tell_school(facts, rng):
    f = facts
    body = [rng.choice([f"At school, the teacher asked {f['name']} and {f['fname']} some questions.",
                        f"One {f['time']}, {f['name']} and {f['fname']} were at school.",
                        "The children sat down and the teacher began the lesson."])]
    for _ in range(rng.randint(2, 4)):
        body.append(school_fact(rng, f))
    ending = rng.choice(["The teacher was proud of {name} and {fname}.",
                         "After school, {name} and {fname} went to the {place} to play.",
                         "{name} liked school very much."])
    return body, ending


def kind_subject(word, kind):
    """How a word is named as the subject of a sentence: 'A dog', 'The park', 'Red'."""
    if kind == "colour":
        return capitalize(word)
    if kind == "place":
        return f"The {word}"
    return capitalize(with_article(word)) if word not in UNCOUNTABLE else capitalize(word)


def kind_sentence(word, kind):
    """'A dog is an animal.', 'Red is a colour.', 'The park is a place.'"""
    return f"{kind_subject(word, kind)} is {article(kind)} {kind}."


def make_story_parts(rng):
    """(body sentences, ending template, facts) of one random story."""
    plot = rng.choice(sorted(PLOTS) + FACT_PLOTS)
    base = pick_base_facts(rng)
    if plot == "weather_walk":
        base["object"] = rng.choice(["hat", "coat"])  # something to put on
    facts = story_facts(base)
    if plot == "counting":
        body, ending = tell_counting(facts, rng)
    elif plot == "school":
        body, ending = tell_school(facts, rng)
    else:
        body, ending = tell_plot(plot, facts, rng)
    return body, ending, facts


def make_story(rng):
    """One story as a single paragraph of plain text."""
    body, ending, facts = make_story_parts(rng)
    return " ".join(body + [fill(ending, facts)])


def generate_stories(seed, megabytes):
    """Stories (and QUIZ_SHARE quizzes) until their UTF-8 size reaches
    `megabytes` (MB = 1e6 bytes)."""
    rng = rng_for(seed, "stories")
    target = int(megabytes * 1_000_000)
    stories, size = [], 0
    while size < target:
        story = make_quiz(rng, seed) if rng.random() < QUIZ_SHARE else make_story(rng)
        stories.append(story)
        size += len(story.encode("utf-8")) + 1
    return stories


# -----------------------------------------------------------------------------
# Planted web junk: raw tinyworld text looks a little like a web crawl, so that
# each curation step has something to remove (and a test can count it).

JUNK_FOOTER = "Read more stories like this on our website and subscribe to our newsletter!"
JUNK_PAGE = ("Home | About | Contact | Privacy policy | Terms of use\n"
             "Lorem ipsum dolor sit amet, consectetur adipiscing elit. Lorem ipsum dolor sit amet.")
JUNK_SYMBOLS = "### $$$ %%% 1010 0101 *** +++ === >>> <<< ||| ### 2024 @@@ ~~~ ^^^ ### 777"
JUNK_SHORT = ["Read about {}.", "The end, {}.", "More from {}!", "Bye, {}."]
JUNK_KINDS = ["exact_copy", "near_copy", "footer", "web_page", "symbols", "too_short", "personal_data"]


def add_web_junk(stories, rng, fraction):
    """Return (documents, counts): the stories with about fraction * len(stories)
    junk documents inserted at random places, and how many of each kind."""
    docs = list(stories)
    n_junk = int(round(fraction * len(stories)))
    counts = {kind: 0 for kind in JUNK_KINDS}
    for i in range(n_junk):
        kind = JUNK_KINDS[i % len(JUNK_KINDS)]
        source = rng.choice(stories)  # copies are of an existing story,
        fresh = make_story(rng)         # the other junk rides on a new one
        if kind == "exact_copy":
            doc = source
        elif kind == "near_copy":
            words = source.split(" ")
            j = rng.randrange(len(words))
            words[j] = "very " + words[j]  # one extra word: same story, not the same text
            doc = " ".join(words)
        elif kind == "footer":
            doc = fresh + "\n" + JUNK_FOOTER
        elif kind == "web_page":
            doc = JUNK_PAGE + f" Page {i}."
        elif kind == "symbols":
            doc = " ".join(rng.sample(JUNK_SYMBOLS.split(), 12))
        elif kind == "too_short":
            doc = rng.choice(JUNK_SHORT).format(rng.choice(NAMES))
        else:  # personal_data: a story with an e-mail, a phone number and an IP address in it
            name = rng.choice(NAMES)
            doc = (f"{fresh} {name}'s mom wrote her email, {name.lower()}.family{i}@example.com, "
                   f"and her phone number, 555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}, on a card. "
                   f"The toy robot said its address was 192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}.")
        docs.insert(rng.randint(0, len(docs)), doc)
        counts[kind] += 1
    return docs, counts


# -----------------------------------------------------------------------------
# Instruction tasks. Each maker returns one record holding what the gold labeler
# needs to check any answer:
#   task          "story_qa" | "arithmetic" | "opposite" | "category"
#   prompt        the user's text (plain; the chat template is added by bpe.py)
#   context       the story of a story question ("" otherwise): no story is
#                 ever shared by two splits
#   reference     the answer: one word, or a number written in digits
#   answer_kind   which words count as an answer: a KIND_WORDS key ("place",
#                 "name", ...), "number", "opposite" or "option"
#   given         words of the question that are not an answer ("big" in
#                 "What is the opposite of big?")
#   options       the choices of a "category" question
#   reference_response   one concise correct response
# and, only while building (dropped before writing): _concise (correct concise
# responses), _wrong (concise wrong ones), _reasoning (a sentence a rambling
# answer adds).

TASKS = ["story_qa", "arithmetic", "opposite", "category"]
QA_KINDS = ["place", "object", "colour", "animal", "food", "feeling", "name"]
QA_FACT_OF_KIND = {"place": "place", "object": "thing", "colour": "thing", "animal": "animal",
                   "food": "food", "feeling": "feeling", "name": "place"}
QA_REASONING = ["The story tells us the answer.", "I read the story again to check.", "The answer is in the story."]
VERBOSE_OPENERS = ["Let me think about this.", "Sure, I can help with that.", "That is a nice question.",
                   "Okay, let me see.", "Thank you for asking.", "Let me read it carefully."]
VERBOSE_CLOSERS = ["I hope this helps!", "Let me know if you have more questions.", "That is my answer.",
                   "I am glad I could help.", "I hope that is clear."]
COUNTABLE_THINGS = [x for x in FOODS + OBJECTS if x not in UNCOUNTABLE]


def task_record(task, prompt, reference, answer_kind, concise, wrong, reasoning,
                context="", given=(), options=()):
    return {
        "task": task, "prompt": prompt, "context": context, "reference": reference,
        "answer_kind": answer_kind, "given": list(given), "options": list(options),
        "reference_response": concise[0],
        "_concise": concise, "_wrong": wrong, "_reasoning": reasoning,
    }


def qa_sentence(fact, c):
    """The sentence that states one fact about character c."""
    n = c["name"]
    if fact == "place":
        return f"{n} {c['place_verb']} to the {c['place']}."
    if fact == "thing":
        return f"{n} {c['thing_verb']} {article(c['colour'])} {c['colour']} {c['object']}."
    if fact == "animal":
        return f"{n} {c['animal_verb']} {with_article(c['animal'])}."
    if fact == "food":
        return f"{n} ate {with_article(c['food'])}."
    return f"{n} {c['feeling_verb']} {c['feeling']}."


def qa_question(kind, c):
    n = c["name"]
    return {
        "place": f"Where did {n} go?",
        "object": f"What did {n} {'have' if c['thing_verb'] == 'had' else 'find'}?",
        "colour": f"What colour was {n}'s {c['object']}?",
        "animal": f"What animal did {n} {'see' if c['animal_verb'] == 'saw' else 'play with'}?",
        "food": f"What did {n} eat?",
        "feeling": f"How did {n} feel?",
        "name": f"Who went to the {c['place']}?",
    }[kind]


def qa_answers(kind, c):
    """Concise answers to a question of `kind` about character c; the first
    keeps the answer at the end (so it can be truncated before it)."""
    n = c["name"]
    a_thing = f"{article(c['colour'])} {c['colour']} {c['object']}"
    return {
        "place": [f"{n} went to the {c['place']}.", f"To the {c['place']}.", f"The {c['place']}."],
        "object": [f"{n} {c['thing_verb']} {a_thing}.", f"{capitalize(a_thing)}."],
        "colour": [f"{n}'s {c['object']} was {c['colour']}.", f"It was {c['colour']}.", f"The {c['object']} was {c['colour']}."],
        "animal": [f"{n} {c['animal_verb']} {with_article(c['animal'])}.", f"{capitalize(with_article(c['animal']))}."],
        "food": [f"{n} ate {with_article(c['food'])}.", f"{capitalize(with_article(c['food']))}."],
        "feeling": [f"{n} felt {c['feeling']}.", f"{n} was {c['feeling']}.", f"{capitalize(c['feeling'])}."],
        "name": [f"It was {n}.", f"{n} went to the {c['place']}.", f"{n} did."],
    }[kind]


def make_story_qa(rng):
    """A story of 2-4 sentences about one or two children, and a question about
    one fact of it. When there are two children, the other one usually has the
    same kind of fact, so the answer must be read from the right sentence."""
    kind = rng.choice(QA_KINDS)
    fact = QA_FACT_OF_KIND[kind]
    two = rng.random() < QA_SECOND_CHILD or kind == "name"
    names = rng.sample(NAMES, 2)
    places, objs, colours = rng.sample(PLACES, 2), rng.sample(OBJECTS, 2), rng.sample(COLOURS, 2)
    animals, foods, feelings = rng.sample(ANIMALS, 2), rng.sample(FOODS, 2), rng.sample(FEELINGS, 2)
    chars = []
    for i in range(2):
        chars.append({"name": names[i], "place": places[i], "object": objs[i], "colour": colours[i],
                      "animal": animals[i], "food": foods[i], "feeling": feelings[i],
                      "place_verb": rng.choice(["went", "walked", "ran"]),
                      "thing_verb": rng.choice(["had", "found"]),
                      "animal_verb": rng.choice(["saw", "played with"]),
                      "feeling_verb": rng.choice(["felt", "was very"])})
    asked, other = chars
    others_facts = [f for f in ["place", "thing", "animal", "food", "feeling"] if f != fact]
    blocks = [[fact] + rng.sample(others_facts, rng.randint(0, 1) if two else rng.randint(1, 2))]
    if two:
        same = fact if (kind == "name" or rng.random() < QA_SAME_KIND) else rng.choice(others_facts)
        blocks.append([same] + rng.sample([f for f in others_facts if f != same], rng.randint(0, 1)))
    sentences = []
    for c, facts in zip(chars, blocks):
        block = [qa_sentence(f, c) for f in facts]
        rng.shuffle(block)
        sentences.append(block)
    if two and rng.random() < 0.5:
        sentences.reverse()
    story = " ".join(s for block in sentences for s in block)
    question = qa_question(kind, asked)
    concise = qa_answers(kind, asked)
    # A wrong answer names the other child's fact when the story has one, else any other word of the kind.
    if two and fact in blocks[1]:
        wrong_char = dict(other, place=asked["place"]) if kind == "name" else dict(asked, **{kind: other[kind]})
    else:
        story_words = set(tokens_of(story))
        wrong_char = dict(asked, **{kind: rng.choice([w for w in KIND_WORDS[kind] if w.lower() not in story_words])})
    wrong = qa_answers(kind, wrong_char)
    reference = asked["name"] if kind == "name" else asked[kind]
    return task_record("story_qa", f"{story}\n{question}", reference, kind, concise, wrong,
                       QA_REASONING, context=story)


def make_arithmetic(rng):
    """A sum or a difference of single digits, bare or as a word problem."""
    op = rng.choice(["plus", "minus"])
    word_problem = rng.random() < 0.5
    if op == "plus":
        lo = 1 if word_problem else 0
        a, b = rng.randint(lo, 9), rng.randint(lo, 9)
        c = a + b
    else:
        a = rng.randint(2 if word_problem else 0, 9)
        b = rng.randint(1 if word_problem else 0, a)
        c = a - b
    wrong_c = c + 1 if (c == 0 or rng.random() < 0.5) else c - 1
    thing = rng.choice(COUNTABLE_THINGS)  # what a word problem counts
    if not word_problem:
        if op == "plus":
            prompt = rng.choice([f"What is {a} plus {b}?", f"How much is {a} plus {b}?",
                                 f"Please add {a} and {b}.", f"What do you get when you add {a} and {b}?"])
            reasoning = [f"We start with {a} and add {b} more."]
        else:
            prompt = rng.choice([f"What is {a} minus {b}?", f"How much is {a} minus {b}?",
                                 f"Please take {b} away from {a}.", f"What do you get when you take {b} from {a}?"])
            reasoning = [f"We start with {a} and take away {b}."]
        answers = [f"{a} {op} {b} is {{value}}.", "The answer is {value}.", "It is {value}."]
    else:
        n, m = rng.sample(NAMES, 2)
        him, he = ("her", "She") if n in GIRL_NAMES else ("him", "He")
        things = plural(thing)
        if op == "plus":
            prompt = rng.choice([f"{n} has {a} {plural(thing, a)}. {m} gives {him} {b} more. How many {things} does {n} have now?",
                                 f"{n} has {a} {plural(thing, a)} and finds {b} more. How many {things} does {n} have?"])
            reasoning = [f"{n} starts with {a} and gets {b} more."]
            answers = [f"{n} has {{value}} {{things}} now.", f"{n} has {{value}} {{things}}.", "The answer is {value}."]
        else:
            prompt = rng.choice([f"{n} has {a} {plural(thing, a)}. {he} gives {b} to {m}. How many {things} does {n} have left?",
                                 f"{n} has {a} {plural(thing, a)} and loses {b}. How many {things} does {n} have left?"])
            reasoning = [f"{n} starts with {a} and loses {b}."]
            answers = [f"{n} has {{value}} {{things}} left.", f"{n} has {{value}} {{things}}.", "The answer is {value}."]
    concise = [t.format(value=c, things=plural(thing, c)) for t in answers]
    wrong = [t.format(value=wrong_c, things=plural(thing, wrong_c)) for t in answers]
    return task_record("arithmetic", prompt, str(c), "number", concise, wrong, reasoning)


def make_opposite(rng):
    """The opposite of a word from a fixed list (knowledge from pretraining)."""
    w = rng.choice(OPPOSITE_WORDS)
    o = OPPOSITE_OF[w]
    n, m = rng.sample(NAMES, 2)
    prompt = rng.choice([f"What is the opposite of {w}?", f"Tell me the opposite of {w}.",
                         f"What word means the opposite of {w}?", f"Can you tell me the opposite of the word {w}?",
                         f"{n} is learning about opposites. What is the opposite of {w}?",
                         f"{n} asks {m}: what is the opposite of {w}?"])
    x = rng.choice([v for v in OPPOSITE_WORDS if v not in (w, o)])
    concise = [f"The opposite of {w} is {o}.", f"It is {o}.", f"{capitalize(o)}."]
    wrong = [f"The opposite of {w} is {x}.", f"It is {x}.", f"{capitalize(x)}."]
    reasoning = ["Opposites are words that mean very different things.", "I thought about what the word means."]
    return task_record("opposite", prompt, o, "opposite", concise, wrong, reasoning, given=[w])


def make_category(rng):
    """Which of three words is an animal (a colour, a food, a place)?"""
    kind = rng.choice(sorted(CATEGORY_KINDS))
    answer = rng.choice(CATEGORY_KINDS[kind])
    other_kinds = [k for k in ["animal", "colour", "food", "place", "object"] if k != kind]
    distractors = []
    while len(distractors) < 2:
        word = rng.choice(KIND_WORDS[rng.choice(other_kinds)])
        if word not in distractors:
            distractors.append(word)
    options = [answer] + distractors
    rng.shuffle(options)
    x, y, z = options
    a_kind = f"{article(kind)} {kind}"
    prompt = rng.choice([f"Which word is {a_kind}: {x}, {y}, {z}?",
                         f"Here are three words: {x}, {y}, {z}. Which one is {a_kind}?",
                         f"Find {a_kind} in this list: {x}, {y}, {z}.",
                         f"{capitalize(x)}, {y} or {z}: which one is {a_kind}?"])
    concise = [f"The answer is {answer}.", kind_sentence(answer, kind), f"{capitalize(answer)}."]
    wrong_word = rng.choice(distractors)
    wrong = [f"The answer is {wrong_word}.", f"{kind_subject(wrong_word, kind)} is {a_kind}.", f"{capitalize(wrong_word)}."]
    reasoning = ["Only one of the three words fits.", "I looked at each word in the list."]
    return task_record("category", prompt, answer, "option", concise, wrong, reasoning, options=options)


TASK_MAKERS = {"story_qa": make_story_qa, "arithmetic": make_arithmetic,
               "opposite": make_opposite, "category": make_category}


def public_record(record):
    """The record without its build-time helpers (keys starting with '_')."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def record_key(record):
    """What must never be shared by two splits: the story, or else the prompt."""
    return record.get("context") or record["prompt"]


def is_quiz_key(key, seed):
    """True for the QUIZ_KEY_SHARE of keys reserved for pretraining quizzes."""
    return split_of(key, f"{seed}:quiz", ["quiz", "tasks"], [QUIZ_KEY_SHARE, 1 - QUIZ_KEY_SHARE]) == "quiz"


def make_quiz(rng, seed):
    """A pretraining document of 2-4 questions, each followed by a concise
    answer, in the tasks' own words, drawn from the quiz keys only. One line,
    like a story, so that line de-duplication never cuts a quiz apart."""
    items = []
    for _ in range(rng.randint(2, 4)):
        while True:
            record = TASK_MAKERS[rng.choice(TASKS)](rng)
            if is_quiz_key(record_key(record), seed):
                break
        items.append(record["prompt"].replace("\n", " ") + " " + rng.choice(record["_concise"]))
    return " ".join(items)


# -----------------------------------------------------------------------------
# Responses of varied quality: demonstrations for SFT, candidates for preferences.

def verbose_frame(record, rng):
    """The filler of a rambling answer: (sentences before the answer, sentences
    after it): opener(s) and a reasoning sentence, maybe a closing line. None of
    the filler words is an answer word."""
    before = rng.sample(VERBOSE_OPENERS, rng.randint(1, 2)) + [rng.choice(record["_reasoning"])]
    after = [rng.choice(VERBOSE_CLOSERS)] if rng.random() < 0.7 else []
    return before, after


def verbose_response(record, rng, answer=None):
    """A correct but rambling answer (or `answer` in the same rambling frame)."""
    before, after = verbose_frame(record, rng)
    answer = rng.choice(record["_concise"]) if answer is None else answer
    return " ".join(before + [answer] + after)


def make_demonstration(record, rng, mix=DEMO_MIX):
    """(response, quality) for an SFT record; quality is drawn from
    mix = (concise, verbose, wrong) probabilities."""
    p_concise, p_verbose, _ = mix
    u = rng.random()
    if u < p_concise:
        return rng.choice(record["_concise"]), "concise"
    if u < p_concise + p_verbose:
        return verbose_response(record, rng), "verbose"
    return rng.choice(record["_wrong"]), "wrong"


def truncate_before_answer(response, reference):
    """The response cut just before the first mention of the answer, as if the
    model had hit its length limit; None when the answer comes first."""
    m = re.search(rf"\b{re.escape(reference)}\b", response, flags=re.IGNORECASE)
    if m is None or not response[:m.start()].strip():
        return None
    return response[:m.start()].rstrip(" ,")


CANDIDATE_KINDS = ["concise", "wrong", "verbose", "verbose_wrong", "copy", "truncated", "empty", "repetitive"]
# Pairs that differ only in the answer (the same words around a right and a wrong
# one): without them a reward model can score well by judging the style alone
# (rambling answers were always right, wrong ones worded differently), and then
# ranks a policy's own answers, which share one style, no better than chance.
MATCHED_PAIRS = [("concise", "wrong"), ("verbose", "verbose_wrong")]
MATCHED_PAIR_SHARE = 0.5   # share of preference pairs that are matched right/wrong pairs


def make_candidates(record, rng):
    """Realistic responses to one prompt, as a list of (kind, text, ended):
    right and concise, wrong in the same wording, right but rambling, wrong in
    the same rambling, a copy of the question, truncated (no end of turn), empty,
    repetitive (ran to the length limit)."""
    question = record["prompt"].split("\n")[-1]
    i = rng.randrange(len(record["_concise"]))  # one wording for the right and the wrong answer
    right, wrong = record["_concise"][i], record["_wrong"][i % len(record["_wrong"])]
    before, after = verbose_frame(record, rng)
    cands = [("concise", right, True),
             ("wrong", wrong, True),
             ("verbose", " ".join(before + [right] + after), True),
             ("verbose_wrong", " ".join(before + [wrong] + after), True),
             ("copy", question, True)]
    cuts = [truncate_before_answer(r, record["reference"]) for r in record["_concise"]]
    cuts = [c for c in cuts if c]
    if cuts:  # the longest cut: the model was stopped just before the answer
        cands.append(("truncated", max(cuts, key=len), False))
    cands.append(("empty", "", True))
    if rng.random() < 0.5:
        text = " ".join([rng.choice(record["_concise"])] * rng.randint(3, 6))
    else:
        text = " ".join([record["reference"]] * rng.randint(4, 8))
    cands.append(("repetitive", text, False))
    return cands


# -----------------------------------------------------------------------------
# The simulated labeler. gold_score plays the human who rates a response; it
# must work on anything a model generates (garbage, repetition, no end of turn).
# The rules, in order of importance:
#   1. Empty (no word or number at all): GOLD_EMPTY, the worst score there is.
#   2. Correct: +GOLD_CORRECT, wrong: 0. Correct means
#        number answers:  the last number in the response is the reference
#                         (digits or words "zero".."twenty"), so "3 plus 4 is 7" is right;
#        word answers:    the answer words in the response (words of the answer
#                         kind, minus the question's given words) are exactly
#                         {reference}: naming two places for "Where did Mia go?" is wrong;
#        open tasks (Alpaca; no answer kind): GOLD_CORRECT x word-overlap F1 with the
#                         reference (correct when F1 >= 0.5); no reference (HH): 0.
#   3. Concise: each word beyond max(FREE_WORDS, 2 x reference words) costs
#      LENGTH_COST, at most LENGTH_PENALTY_MAX.
#   4. Properly ended with the end-of-turn token: otherwise -NOT_ENDED_PENALTY.
#   5. No repetition: -REPETITION_PENALTY_MAX x the share of word pairs (bigrams)
#      that repeat an earlier pair.
# Penalties add up to less than GOLD_CORRECT, so a correct response always beats
# a wrong one, and any non-empty response beats an empty one.

GOLD_EMPTY = -3.0
GOLD_CORRECT = 3.0
FREE_WORDS = 8
LENGTH_COST = 0.05
LENGTH_PENALTY_MAX = 1.0
NOT_ENDED_PENALTY = 0.5
REPETITION_PENALTY_MAX = 1.0
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                "eighteen", "nineteen", "twenty"]


def numbers_in(text):
    """The numbers of a text in order, from digits or number words."""
    out = []
    for tok in tokens_of(text):
        if tok.isdigit():
            out.append(int(tok) if len(tok) <= 18 else -1)  # a huge number is never an answer
        elif tok in NUMBER_WORDS:
            out.append(NUMBER_WORDS.index(tok))
    return out


def answer_space(record):
    """The words that count as answers for this record (lowercase)."""
    kind = record.get("answer_kind")
    if kind == "opposite":
        return set(OPPOSITE_WORDS)
    if kind == "option":
        return {w.lower() for w in record.get("options", [])}
    return {w.lower() for w in KIND_WORDS.get(kind, [])}


def answer_words(record, text):
    """The answer words a response mentions (sorted), given words excluded."""
    given = {w.lower() for w in record.get("given", [])}
    space = answer_space(record) - given
    return sorted(set(tokens_of(text)) & space)


def overlap_f1(text, reference):
    """Word-overlap F1 between a response and a reference (bags of words)."""
    a, b = tokens_of(text), tokens_of(reference)
    if not a or not b:
        return 0.0
    common = 0
    counts = {}
    for w in b:
        counts[w] = counts.get(w, 0) + 1
    for w in a:
        if counts.get(w, 0) > 0:
            common += 1
            counts[w] -= 1
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def is_correct(record, text):
    """Rule 2: does the response give the reference answer (and no other)?"""
    kind = record.get("answer_kind") or "open"
    reference = record.get("reference")
    if not reference:
        return False
    if kind == "number":
        numbers = numbers_in(text)
        return bool(numbers) and numbers[-1] == int(reference)
    if kind == "open":
        return overlap_f1(text, reference) >= 0.5
    return answer_words(record, text) == [str(reference).lower()]


def repetition_fraction(text):
    """Share of word bigrams that repeat an earlier bigram: 0 for normal text,
    close to 1 for 'park park park park'."""
    toks = tokens_of(text)
    bigrams = list(zip(toks, toks[1:]))
    if not bigrams:
        return 0.0
    return 1.0 - len(set(bigrams)) / len(bigrams)


def gold_components(record, text, ended=True):
    """Each rule's contribution; gold_score is their sum. If the text still holds
    the end-of-turn string, what follows it is ignored and the turn has ended."""
    if bpe.END_OF_TURN in text:
        text, ended = text.split(bpe.END_OF_TURN)[0], True
    toks = tokens_of(text)
    if not toks:
        return {"empty": GOLD_EMPTY, "correct": False, "correctness": 0.0, "length": 0.0,
                "not_ended": 0.0, "repetition": 0.0, "total": GOLD_EMPTY}
    reference = record.get("reference") or ""
    correct = is_correct(record, text)
    if (record.get("answer_kind") or "open") == "open":
        correctness = GOLD_CORRECT * overlap_f1(text, reference) if reference else 0.0
    else:
        correctness = GOLD_CORRECT if correct else 0.0
    free = max(FREE_WORDS, 2 * len(tokens_of(reference)))
    length = min(LENGTH_PENALTY_MAX, LENGTH_COST * max(0, len(toks) - free))
    not_ended = 0.0 if ended else NOT_ENDED_PENALTY
    repetition = REPETITION_PENALTY_MAX * repetition_fraction(text)
    total = correctness - length - not_ended - repetition
    return {"empty": 0.0, "correct": correct, "correctness": correctness, "length": -length,
            "not_ended": -not_ended, "repetition": -repetition, "total": total}


def gold_score(record, text, ended=True):
    """The simulated labeler's score of `text` as a response to `record` (a
    record of sft_*, prompts_* or prefs_* files). `ended` says whether the
    response was closed by the end-of-turn token. Higher is better."""
    return round(gold_components(record, text, ended)["total"], 6)


def grade_answers(records, answers):
    """Grade a model's answers to prompt records, as the simulated labeler would.
    answers: [(text, ended), ...] in the records' order. Returns the overall
    figures and the same per task type:
        {"n", "accuracy", "gold", "end_rate", "words", "by_task": {task: {...}}}
    accuracy: share answered correctly (is_correct); gold: mean gold_score;
    end_rate: share closed by the end-of-turn token; words: mean length."""
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} records but {len(answers)} answers")
    groups = {}
    for record, (text, ended) in zip(records, answers):
        row = (is_correct(record, text), gold_score(record, text, ended), bool(ended), len(tokens_of(text)))
        groups.setdefault("all", []).append(row)
        groups.setdefault(record.get("task", "open"), []).append(row)

    def summary(rows):
        n = len(rows)
        return {"n": n, "accuracy": sum(r[0] for r in rows) / n, "gold": sum(r[1] for r in rows) / n,
                "end_rate": sum(r[2] for r in rows) / n, "words": sum(r[3] for r in rows) / n}

    out = summary(groups.pop("all")) if records else {"n": 0, "accuracy": 0.0, "gold": 0.0, "end_rate": 0.0,
                                                       "words": 0.0}
    out["by_task"] = {task: summary(rows) for task, rows in sorted(groups.items())}
    return out


# -----------------------------------------------------------------------------
# Preference labels with human-like noise (Bradley-Terry).

def bradley_terry_prob(gold_a, gold_b, temperature):
    """P(a is preferred over b) = sigmoid((gold_a - gold_b) / temperature)."""
    z = (gold_a - gold_b) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def noisy_ranking(golds, temperature, rng):
    """A noisy best-first ranking of K responses (Plackett-Luce): pick the best
    among the rest with probability proportional to exp(gold / temperature),
    repeat. For K = 2 this is exactly bradley_terry_prob."""
    remaining = list(range(len(golds)))
    order = []
    while remaining:
        top = max(golds[i] for i in remaining)
        weights = [math.exp((golds[i] - top) / temperature) for i in remaining]
        u = rng.random() * sum(weights)
        for i, w in zip(remaining, weights):
            u -= w
            if u <= 0:
                break
        order.append(i)
        remaining.remove(i)
    return order


def make_preference_pair(record, rng, temperature=LABEL_TEMPERATURE):
    """One preference record: two candidates with different gold scores, the
    noisy labeler's choice as chosen/rejected, and the noiseless verdict."""
    cands = [(kind, text, ended, gold_score(record, text, ended)) for kind, text, ended in make_candidates(record, rng)]
    by_kind = {c[0]: c for c in cands}
    if rng.random() < MATCHED_PAIR_SHARE:
        a, b = (by_kind[k] for k in rng.choice(MATCHED_PAIRS))
        if rng.random() < 0.5:
            a, b = b, a
    else:
        while True:
            a, b = rng.sample(cands, 2)
            if a[3] != b[3]:
                break
    a_wins = rng.random() < bradley_terry_prob(a[3], b[3], temperature)
    chosen, rejected = (a, b) if a_wins else (b, a)
    out = public_record(record)
    out.update(chosen=chosen[1], rejected=rejected[1], chosen_ended=chosen[2], rejected_ended=rejected[2],
               chosen_kind=chosen[0], rejected_kind=rejected[0], gold_chosen=chosen[3],
               gold_rejected=rejected[3], gold_prefers_chosen=chosen[3] > rejected[3])
    return out


def make_preference_ranking(record, rng, k, temperature=LABEL_TEMPERATURE):
    """A ranked-K record: k candidates with distinct gold scores, noisy best first."""
    cands = [(kind, text, ended, gold_score(record, text, ended)) for kind, text, ended in make_candidates(record, rng)]
    rng.shuffle(cands)
    picked, golds = [], set()
    for c in cands:
        if c[3] not in golds:
            picked.append(c)
            golds.add(c[3])
    picked = picked[:k]
    order = noisy_ranking([c[3] for c in picked], temperature, rng)
    ranked = [picked[i] for i in order]
    out = public_record(record)
    out.update(responses=[c[1] for c in ranked], ended=[c[2] for c in ranked],
               kinds=[c[0] for c in ranked], gold=[c[3] for c in ranked])
    return out


def label_agreement(pairs):
    """Share of preference pairs whose noisy label agrees with the gold one."""
    return sum(p["gold_prefers_chosen"] for p in pairs) / max(1, len(pairs))


# -----------------------------------------------------------------------------
# Multiple choice, HellaSwag-style: a story without its last sentence and four
# endings; only one keeps the story's facts (the others change one fact).

def make_cloze(rng):
    """{"task", "context", "endings" (4, each starting with a space), "label"}."""
    while True:
        plot = rng.choice(sorted(PLOTS))
        base = pick_base_facts(rng)
        if plot == "weather_walk":
            base["object"] = rng.choice(["hat", "coat"])
        facts = story_facts(base)
        body, ending = tell_plot(plot, facts, rng)
        slots = [s for s in CLOZE_SLOTS if "{" + s + "}" in ending]
        if slots:
            break
    context = " ".join(body)
    used = set(tokens_of(context)) | {facts[s].lower() for s in CLOZE_SLOTS}
    correct = fill(ending, facts)
    endings = [correct]
    rng.shuffle(slots)
    k = 0
    while len(endings) < 4:
        slot = slots[k % len(slots)]
        k += 1
        pool = [w for w in CLOZE_SLOTS[slot] if w.lower() not in used]
        if slot in ("name", "fname"):  # same gender, so the pronouns still fit
            same = GIRL_NAMES if facts[slot] in GIRL_NAMES else BOY_NAMES
            pool = [w for w in pool if w in same]
        wrong = fill(ending, story_facts(dict(facts, **{slot: rng.choice(pool)})))
        if wrong not in endings:
            endings.append(wrong)
    order = list(range(4))
    rng.shuffle(order)
    return {"task": "cloze", "context": context, "endings": [" " + endings[i] for i in order],
            "label": order.index(0)}


# -----------------------------------------------------------------------------
# Splits. Every record has a key (its story, or its prompt when it has no story);
# a hash of the key decides the split, so a story or a question can never land
# in two splits, whatever the sizes.

def split_of(key, seed, names, weights):
    """The split of a key: a sha256 of (seed, key) read as a number in [0, 1),
    placed among the cumulative weights."""
    u = int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    total = float(sum(weights))
    acc = 0.0
    for name, w in zip(names, weights):
        acc += w / total
        if u < acc:
            return name
    return names[-1]


def build_task_splits(seed, sizes, extra_prefs_train=0):
    """{split: [task records]} with sizes[split] records each, the four task
    types in equal numbers, every prompt unique in the whole dataset, no key
    shared by two splits or by a split and the pretraining quizzes.
    extra_prefs_train: that many more prefs_train records, drawn after all the
    others and appended, so that every split (and the first prefs_train records)
    is the same as without them."""
    names = list(sizes)
    weights = [max(1, sizes[s]) for s in names]
    out = {s: [] for s in names}
    rng = rng_for(seed, "tasks")
    seen_prompts = set()

    def per_task(n):
        """n records -> {task: count}, the four tasks in equal numbers."""
        return {task: n // len(TASKS) + (1 if i < n % len(TASKS) else 0) for i, task in enumerate(TASKS)}

    def draw(quota, what):
        """Draw task records (the tasks in turn) until quota {(split, task): n}
        is filled; each record goes to the split its key belongs to, or nowhere."""
        missing = sum(quota.values())
        draws, max_draws = 0, 100 * missing + 10_000
        while missing:
            task = TASKS[draws % len(TASKS)]
            draws += 1
            if draws > max_draws:
                raise DataError(f"could not draw {what}; ask for fewer")
            record = TASK_MAKERS[task](rng)
            key = record_key(record)
            if is_quiz_key(key, seed):
                continue  # reserved for the pretraining quizzes
            s = split_of(key, seed, names, weights)
            if quota.get((s, task), 0) == 0 or record["prompt"] in seen_prompts:
                continue
            seen_prompts.add(record["prompt"])
            quota[(s, task)] -= 1
            missing -= 1
            out[s].append(record)

    draw({(s, task): n for s in names for task, n in per_task(sizes[s]).items()},
         f"{sum(sizes.values())} distinct task prompts")
    # then the extra ones, from the same stream: the splits above stay as they were
    draw({("prefs_train", task): n for task, n in per_task(extra_prefs_train).items()},
         f"{extra_prefs_train} more distinct preference prompts")
    return out


# -----------------------------------------------------------------------------
# Downloads: one function for every corpus.

class IncompleteDownload(Exception):
    """The server closed the connection before sending every byte it announced."""


def source_url(name, mirror=None):
    """The URL of a source; with a mirror (flag or $STAGEGPT_MIRROR), the
    mirror's base URL + the source's cache file name."""
    mirror = mirror or os.environ.get(MIRROR_ENV)
    if mirror:
        return mirror.rstrip("/") + "/" + SOURCES[name]["filename"]
    return SOURCES[name]["url"]


def read_checksums(folder):
    path = os.path.join(folder, CHECKSUMS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def record_checksum(folder, filename, digest):
    sums = read_checksums(folder)
    sums[filename] = digest
    atomic_write_text(os.path.join(folder, CHECKSUMS_FILE), json.dumps(sums, indent=2, sort_keys=True) + "\n")


def stream_to_file(url, tmp, timeout):
    """GET url into the file tmp; returns (sha256, bytes). Asks for the plain
    (not gzip-encoded) body, so the byte count can be checked against the
    Content-Length the server announced."""
    h = hashlib.sha256()
    n = 0
    with requests.get(url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}) as r:
        r.raise_for_status()
        announced = int(r.headers.get("Content-Length") or 0)
        with open(tmp, "wb") as f:
            for chunk in r.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                h.update(chunk)
                n += len(chunk)
            f.flush()
            os.fsync(f.fileno())
    if announced and n != announced:
        raise IncompleteDownload(f"got {n} of {announced} bytes")
    return h.hexdigest(), n


def download(url, path, sha256=None, timeout=DOWNLOAD_TIMEOUT_S, retries=DOWNLOAD_RETRIES,
             backoff=DOWNLOAD_BACKOFF_S, quiet=False):
    """Fetch `url` into `path` once and return `path`.
    - Cached: when `path` exists and matches its sha256 (pinned here, or recorded
      in checksums.json beside it at the first download), no network is used.
    - Streamed to a temporary file in the same folder, renamed only when complete.
    - Network errors, timeouts, 5xx answers and cut transfers are retried, waiting
      backoff, 2 x backoff, ... seconds; 4xx answers (404) are not.
    - A checksum mismatch deletes the download. Every failure is a DataError
      naming the URL and how to place the file by hand."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    filename = os.path.basename(path)
    expected = sha256 or read_checksums(folder).get(filename)
    if os.path.exists(path):
        if expected is None or sha256_file(path) == expected:
            return path
        log(f"{path} does not match its sha256; downloading it again", quiet)
        os.remove(path)
    by_hand = f"if you are offline, download {url} by hand and save it as {path}"
    tmp = f"{path}.part{os.getpid()}"
    error, result = None, None
    for attempt in range(1, retries + 1):
        log(f"downloading {url} (try {attempt}/{retries})", quiet)
        try:
            result = stream_to_file(url, tmp, timeout)
            break
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            error = f"HTTP {status}"
            if 400 <= status < 500 and status not in (408, 429):
                break  # the file is not there: asking again will not help
        except requests.Timeout:
            error = f"no answer within {timeout:g} s"
        except (requests.RequestException, IncompleteDownload) as e:
            error = str(e) if isinstance(e, IncompleteDownload) else type(e).__name__
        finally:
            if result is None and os.path.exists(tmp):
                os.remove(tmp)
        if attempt < retries:
            time.sleep(backoff * 2 ** (attempt - 1))
    if result is None:
        raise DataError(f"could not download {url} ({error}); {by_hand}")
    digest, n_bytes = result
    if expected and digest != expected:
        os.remove(tmp)
        raise DataError(f"checksum mismatch for {url}: sha256 {digest}, expected {expected}; "
                        f"the download was deleted. Check the URL, or {by_hand}")
    os.replace(tmp, path)
    if not sha256:
        record_checksum(folder, filename, digest)
    log(f"saved {path} ({n_bytes:,} bytes, sha256 {digest[:12]}...)", quiet)
    return path


def fetch_source(name, data_root, mirror=None, quiet=False):
    """Download (or find in the cache) one of SOURCES; returns its path."""
    src = SOURCES[name]
    path = os.path.join(data_root, DOWNLOAD_DIR, src["filename"])
    return download(source_url(name, mirror), path, sha256=src["sha256"], quiet=quiet)


# -----------------------------------------------------------------------------
# Parsers: each real corpus into the same shapes as tinyworld's.

def read_text(path):
    """A UTF-8 text file's content; missing, empty or binary files are a DataError."""
    try:
        return bpe.read_text_file(path)
    except ValueError as e:
        raise DataError(str(e)) from None


def read_maybe_gzip(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8")


def chunk_text(text, target_chars=CHUNK_CHARS):
    """Cut one long text into documents of about target_chars characters, at
    blank lines (at any line break if a paragraph runs past 4 x target)."""
    docs, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if (size >= target_chars and not line.strip()) or size >= 4 * target_chars:
            doc = "".join(current).strip("\n")
            if doc.strip():
                docs.append(doc)
            current, size = [], 0
    doc = "".join(current).strip("\n")
    if doc.strip():
        docs.append(doc)
    return docs


def parse_tinystories(text):
    """TinyStories text: stories separated by <|endoftext|>."""
    return [s.strip() for s in text.split(bpe.DOC_SEP) if s.strip()]


def parse_alpaca(text, source="alpaca_data.json"):
    """Alpaca JSON (a list of {instruction, input, output}) -> SFT records."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source} is not valid JSON ({e.msg}); delete it and run again to re-download") from None
    records = []
    for item in items:
        prompt = item["instruction"].strip()
        if item.get("input", "").strip():
            prompt += "\n\n" + item["input"].strip()
        output = item["output"].strip()
        if prompt and output:
            records.append({"task": "alpaca", "prompt": prompt, "context": "", "reference": output,
                            "answer_kind": "open", "given": [], "options": [], "reference_response": output,
                            "response": output, "quality": "human"})
    return records


def split_hh_turns(dialogue):
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [("Human", "hi"), ("Assistant", "hello")]."""
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + dialogue.lstrip("\n"))
    return [(who, said.strip()) for who, said in zip(parts[1::2], parts[2::2])]


def parse_hh(text):
    """Anthropic HH-RLHF JSONL ({"chosen": dialogue, "rejected": dialogue}) ->
    (prompt, chosen, rejected) for the single-turn dialogues (one Human turn,
    one Assistant turn), which fit stagegpt's one-turn chat template."""
    pairs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        chosen, rejected = split_hh_turns(item["chosen"]), split_hh_turns(item["rejected"])
        if len(chosen) != 2 or len(rejected) != 2:
            continue
        if [w for w, _ in chosen] != ["Human", "Assistant"] or chosen[0][1] != rejected[0][1]:
            continue
        prompt, good, bad = chosen[0][1], chosen[1][1], rejected[1][1]
        if prompt and good != bad:
            pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return pairs


def parse_hellaswag(text):
    """HellaSwag JSONL -> multiple-choice records (endings start with a space)."""
    items = []
    for line in text.splitlines():
        if line.strip():
            item = json.loads(line)
            items.append({"task": "hellaswag", "context": item["ctx"],
                          "endings": [" " + e.strip() for e in item["endings"]], "label": int(item["label"])})
    return items


# -----------------------------------------------------------------------------
# Curation. Each step takes documents and returns (documents, report): the
# report says what it removed.

def dedup_documents(docs):
    """Exact duplicates (ignoring surrounding whitespace): keep the first copy."""
    seen, out = set(), []
    for d in docs:
        key = hashlib.sha256(d.strip().encode("utf-8")).digest()
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out, {"step": "dedup_documents", "removed_docs": len(docs) - len(out)}


def dedup_lines(docs, min_chars=MIN_DUP_LINE_CHARS):
    """Lines (at least min_chars long) already seen earlier in the corpus are
    removed: repeated footers and headers. Documents left empty are dropped."""
    seen, out, removed_lines = set(), [], 0
    for d in docs:
        kept = []
        for line in d.split("\n"):
            key = line.strip()
            if len(key) >= min_chars:
                if key in seen:
                    removed_lines += 1
                    continue
                seen.add(key)
            kept.append(line)
        new = "\n".join(kept).strip("\n")
        if new.strip():
            out.append(new)
    return out, {"step": "dedup_lines", "removed_lines": removed_lines, "removed_docs": len(docs) - len(out)}


def filter_boilerplate_lines(docs, phrases=BOILERPLATE_LINE_PHRASES):
    """C4's line rule: drop lines that mention javascript, policies, 'subscribe
    to'... Documents left empty are dropped."""
    out, removed_lines = [], 0
    for d in docs:
        lines = d.split("\n")
        kept = [line for line in lines if not any(p in line.lower() for p in phrases)]
        removed_lines += len(lines) - len(kept)
        new = "\n".join(kept).strip("\n")
        if new.strip():
            out.append(new)
    return out, {"step": "filter_boilerplate_lines", "removed_lines": removed_lines,
                 "removed_docs": len(docs) - len(out)}


def quality_problem(doc, min_words=MIN_WORDS, min_sentences=MIN_SENTENCES,
                    min_letter_fraction=MIN_LETTER_FRACTION):
    """Why a document fails the C4-style quality rules, or None if it passes."""
    low = doc.lower()
    if any(p in low for p in BOILERPLATE_DOC_PHRASES):
        return "boilerplate"
    chars = [c for c in doc if not c.isspace()]
    if not chars or sum(c.isalpha() for c in chars) / len(chars) < min_letter_fraction:
        return "few_letters"
    if len(doc.split()) < min_words:
        return "too_few_words"
    if len(re.findall(r"[.!?]+(?=\s|$|[\"'])", doc)) < min_sentences:
        return "too_few_sentences"
    return None


def quality_filter(docs, min_words=MIN_WORDS, min_sentences=MIN_SENTENCES,
                   min_letter_fraction=MIN_LETTER_FRACTION):
    """Drop documents with too few words or sentences, mostly non-letters, or
    page-level boilerplate ('lorem ipsum'); the report counts each reason."""
    out, reasons = [], {}
    for d in docs:
        problem = quality_problem(d, min_words, min_sentences, min_letter_fraction)
        if problem is None:
            out.append(d)
        else:
            reasons[problem] = reasons.get(problem, 0) + 1
    return out, {"step": "quality_filter", "removed_docs": len(docs) - len(out), "reasons": reasons}


def shingles(text, n=SHINGLE_WORDS):
    """The set of word n-grams of a text (lowercase, split on whitespace)."""
    words = text.lower().split()
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a, b):
    """|A & B| / |A | B| of two sets (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def minhash_params(num_perm, seed=0):
    """num_perm random hash functions h(x) = ((a*x + b) mod 2^64) >> 32
    ("multiply-add-shift": a mixing hash of 32-bit keys; uint64 arithmetic
    wraps around by itself, which is the mod 2^64)."""
    g = np.random.default_rng(seed)
    a = g.integers(1, 1 << 63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = g.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signature(shingle_set, num_perm=MINHASH_PERMS, seed=0):
    """The MinHash signature of a set: for each of num_perm hash functions, the
    smallest hash over the set's elements. Two sets agree at one position with
    probability equal to their Jaccard similarity. Shape (num_perm,), uint64."""
    a, b = minhash_params(num_perm, seed)
    if not shingle_set:
        return np.full(num_perm, 1 << 32, dtype=np.uint64)  # above every real hash
    x = np.array([zlib.crc32(s.encode("utf-8")) for s in shingle_set], dtype=np.uint64)  # stable 32-bit keys
    with np.errstate(over="ignore"):
        h = (x[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)  # (shingles, num_perm)
    return h.min(axis=0)


def estimated_jaccard(sig_a, sig_b):
    """Share of positions where two MinHash signatures agree."""
    return float(np.mean(sig_a == sig_b))


def near_dedup(docs, threshold=NEAR_DUP_THRESHOLD, num_perm=MINHASH_PERMS, bands=MINHASH_BANDS,
               n=SHINGLE_WORDS):
    """Drop documents whose estimated Jaccard similarity (word n-gram shingles,
    MinHash) to an earlier kept document is at least `threshold`. Locality-
    sensitive hashing: only documents sharing one band (num_perm/bands
    consecutive signature values) with this one are compared."""
    rows = num_perm // bands
    buckets = {}
    kept, signatures = [], []
    for d in docs:
        sig = minhash_signature(shingles(d, n), num_perm)
        keys = [(i, sig[i * rows:(i + 1) * rows].tobytes()) for i in range(bands)]
        candidates = sorted({j for key in keys for j in buckets.get(key, [])})
        if any(estimated_jaccard(sig, signatures[j]) >= threshold for j in candidates):
            continue
        for key in keys:
            buckets.setdefault(key, []).append(len(kept))
        kept.append(d)
        signatures.append(sig)
    return kept, {"step": "near_dedup", "removed_docs": len(docs) - len(kept), "threshold": threshold}


EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
IP_RE = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
PHONE_RE = re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?!\w|\.\d)")
PLACEHOLDERS = {"email": "[EMAIL]", "ip": "[IP]", "phone": "[PHONE]"}


def redact_pii(text):
    """(text, counts): e-mail addresses, IP addresses and phone numbers replaced
    by [EMAIL], [IP] and [PHONE] (e-mails first: they may hold digits)."""
    counts = {}
    for kind, pattern in [("email", EMAIL_RE), ("ip", IP_RE), ("phone", PHONE_RE)]:
        text, counts[kind] = pattern.subn(PLACEHOLDERS[kind], text)
    return text, counts


def redact_documents(docs):
    out, total = [], {"email": 0, "ip": 0, "phone": 0}
    for d in docs:
        d, counts = redact_pii(d)
        out.append(d)
        for k, v in counts.items():
            total[k] += v
    return out, {"step": "redact_pii", "removed_docs": 0, "redacted": total}


def curate(docs, near_dup_threshold=NEAR_DUP_THRESHOLD, quiet=False):
    """All curation steps in order; returns (documents, reports)."""
    reports = []
    steps = [dedup_documents, dedup_lines, filter_boilerplate_lines, quality_filter,
             lambda ds: near_dedup(ds, threshold=near_dup_threshold), redact_documents]
    for step in steps:
        t0 = time.time()
        before = len(docs)
        docs, report = step(docs)
        reports.append(report)
        detail = {k: v for k, v in report.items() if k not in ("step", "removed_docs")}
        log(f"  {report['step']:<25} {before:>7,} -> {len(docs):>7,} documents  {detail} "
            f"({time.time() - t0:.1f}s)", quiet)
    return docs, reports


# -----------------------------------------------------------------------------
# Tokenize: BPE trained on the training split, token ids to .bin files.

def token_dtype(vocab_size):
    """The smallest unsigned integer type that holds every id."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def split_train_val(docs, val_fraction):
    """The last val_fraction of the documents (at least one) are validation.
    A corpus of one document is cut in two at a line break."""
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        newline = text.rfind("\n", 0, cut)
        cut = newline if newline > 0 else cut
        docs = [text[:cut].strip("\n"), text[cut:].strip("\n")]
        docs = [d for d in docs if d]
    if len(docs) < 2:
        raise DataError("the corpus is too small to split into train and validation: give more text")
    n_val = min(len(docs) - 1, max(1, int(round(len(docs) * val_fraction))))
    return docs[:-n_val], docs[-n_val:]


def encode_documents(tokenizer, docs, dtype):
    """All documents as one array of ids, each document followed by the
    <|endoftext|> id (the separator a model learns to start over after)."""
    eot = tokenizer.special_ids[bpe.DOC_SEP]
    per_doc = tokenizer.encode_batch(docs)
    out = np.empty(sum(len(ids) + 1 for ids in per_doc), dtype=dtype)
    pos = 0
    for ids in per_doc:
        out[pos:pos + len(ids)] = ids
        pos += len(ids)
        out[pos] = eot
        pos += 1
    return out


def write_pretraining_files(out_dir, train_docs, val_docs, vocab_size, pattern, tokenizer_path, quiet):
    """tokenizer.json, train/val .bin and .txt; returns the meta.json fields."""
    t0 = time.time()
    if tokenizer_path:
        try:
            tok = bpe.Tokenizer.load(tokenizer_path)
        except ValueError as e:
            raise DataError(str(e)) from None
        log(f"using the tokenizer {tokenizer_path} ({tok.vocab_size} ids)", quiet)
    else:
        text = bpe.DOC_SEP.join(train_docs)
        log(f"training BPE: vocabulary {vocab_size}, pattern {pattern}, on {len(text.encode('utf-8')):,} bytes", quiet)
        try:
            tok = bpe.train_tokenizer(text, vocab_size, pattern=pattern)
        except ValueError as e:
            raise DataError(str(e)) from None
        log(f"  {len(tok.merges)} merges in {time.time() - t0:.1f}s", quiet)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    dtype = token_dtype(tok.vocab_size)
    meta = {"vocab_size": tok.vocab_size, "vocab_size_requested": vocab_size, "dtype": np.dtype(dtype).name,
            "pattern": pattern,
            "special_ids": dict(tok.special_ids), "eot_id": tok.special_ids[bpe.DOC_SEP],
            "tokenizer_sha256": sha256_file(os.path.join(out_dir, "tokenizer.json"))}
    for split, docs in [("train", train_docs), ("val", val_docs)]:
        t1 = time.time()
        ids = encode_documents(tok, docs, dtype)
        atomic_write_bytes(os.path.join(out_dir, f"{split}.bin"), ids.tobytes())
        atomic_write_text(os.path.join(out_dir, f"{split}.txt"), "".join(d + bpe.DOC_SEP for d in docs))
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        meta[f"{split}_docs"] = len(docs)
        meta[f"{split}_tokens"] = int(len(ids))
        meta[f"{split}_bytes"] = n_bytes  # document bytes, separators not counted
        log(f"  {split}.bin: {len(ids):,} tokens from {len(docs):,} documents, {n_bytes:,} bytes "
            f"({time.time() - t1:.1f}s)", quiet)
    # bytes per token of the documents themselves (separators not counted): the
    # factor that turns a loss in nats/token into bits per byte.
    meta["bytes_per_token"] = round(meta["train_bytes"] / (meta["train_tokens"] - meta["train_docs"]), 4)
    return meta


# -----------------------------------------------------------------------------
# The build: one function per kind of dataset, a meta.json at the end.

@dataclasses.dataclass
class Config:
    """Every argument of a build. None means "the dataset's default"."""
    dataset: str = "tinyworld"
    input: str = None               # a local text file to use instead of a dataset
    out: str = None                 # output folder (default DATA_ROOT/NAME)
    data_root: str = DATA_ROOT
    seed: int = 1337
    megabytes: float = DEFAULT_MEGABYTES
    vocab_size: int = None
    pattern: str = "gpt4"
    val_fraction: float = None
    tokenizer: str = None           # reuse this tokenizer.json instead of training one
    sft_train: int = None
    sft_val: int = None
    prefs_train: int = None
    prefs_extra: int = None         # tinyworld: more prefs_train pairs after all the rest (None: the dataset's, 0)
    prefs_val: int = None
    prompts_ppo: int = None
    prompts_eval: int = None
    mc: int = None
    demo_mix: tuple = DEMO_MIX
    label_temperature: float = LABEL_TEMPERATURE
    prefs_k: int = 2
    junk_fraction: float = JUNK_FRACTION
    curation: bool = True
    near_dup_threshold: float = NEAR_DUP_THRESHOLD
    mirror: str = None
    force: bool = False
    quiet: bool = False


SIZE_FIELDS = ["prompts_eval", "prompts_ppo", "prefs_val", "prefs_train", "sft_val", "sft_train"]
# Every file a build may write (meta.json last); files of an earlier build that
# this build does not write are removed at the end.
OUTPUT_FILES = ["tokenizer.json", "train.bin", "val.bin", "train.txt", "val.txt",
                "sft_train.jsonl", "sft_val.jsonl", "prefs_train.jsonl", "prefs_val.jsonl",
                "prefs_ranked_train.jsonl", "prefs_ranked_val.jsonl",
                "prompts_ppo.jsonl", "prompts_eval.jsonl", "mc.jsonl"]


def dataset_name(cfg):
    """The dataset's name: --dataset, or the input file's name without extension."""
    if cfg.input:
        stem = os.path.splitext(os.path.basename(cfg.input))[0]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "input"
    return cfg.dataset


def resolve_config(cfg):
    """A copy of cfg with the dataset's defaults filled in and every value
    checked. Raises DataError (one line: the value and the fix)."""
    cfg = dataclasses.replace(cfg)
    if cfg.input:
        spec = {"kind": "pretrain", "vocab_size": INPUT_VOCAB_SIZE, "val_fraction": INPUT_VAL_FRACTION}
    elif cfg.dataset in DATASETS:
        spec = DATASETS[cfg.dataset]
    else:
        raise DataError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}, "
                        f"or give a text file with --input PATH")
    if cfg.vocab_size is None:
        cfg.vocab_size = spec.get("vocab_size", 0)
    if cfg.val_fraction is None:
        cfg.val_fraction = spec.get("val_fraction", 0.1)
    generated = spec["kind"] == "generated"
    for field in SIZE_FIELDS:
        if getattr(cfg, field) is None:
            setattr(cfg, field, SPLIT_SIZES[field] if generated else REAL_SIZES.get(field))
    if cfg.mc is None and generated:
        cfg.mc = MC_SIZE
    if cfg.prefs_extra is None:
        cfg.prefs_extra = spec.get("prefs_extra", 0)
    if spec["kind"] in ("generated", "pretrain") and not cfg.tokenizer and cfg.vocab_size < bpe.min_vocab_size():
        raise DataError(f"--vocab-size {cfg.vocab_size} is too small: a tokenizer needs at least "
                        f"{bpe.min_vocab_size()} ids (256 bytes + {len(bpe.SPECIAL_TOKENS)} special tokens)")
    try:
        bpe.resolve_pattern(cfg.pattern)
    except ValueError as e:
        raise DataError(f"--pattern: {e}") from None
    checks = [
        (0 < cfg.val_fraction < 1, f"--val-fraction {cfg.val_fraction} must be between 0 and 1"),
        (cfg.megabytes > 0, f"--megabytes {cfg.megabytes} must be positive"),
        (len(cfg.demo_mix) == 3 and min(cfg.demo_mix) >= 0 and abs(sum(cfg.demo_mix) - 1) < 1e-6,
         f"--demo-mix {cfg.demo_mix} must be three shares (concise, verbose, wrong) that add up to 1"),
        (cfg.label_temperature > 0, f"--label-temperature {cfg.label_temperature} must be positive"),
        (2 <= cfg.prefs_k <= len(CANDIDATE_KINDS) - 1, f"--prefs-k {cfg.prefs_k} must be between 2 and {len(CANDIDATE_KINDS) - 1}"),
        (0 <= cfg.junk_fraction < 1, f"--junk-fraction {cfg.junk_fraction} must be in [0, 1)"),
        (0 < cfg.near_dup_threshold <= 1, f"--near-dup-threshold {cfg.near_dup_threshold} must be in (0, 1]"),
    ]
    checks += [(getattr(cfg, f) is None or getattr(cfg, f) >= 0, f"--{f.replace('_', '-')} must not be negative")
               for f in SIZE_FIELDS + ["mc", "prefs_extra"]]
    checks.append((cfg.prefs_extra == 0 or generated,
                   f"--prefs-extra {cfg.prefs_extra}: more preference pairs can only be generated for tinyworld"))
    for ok, message in checks:
        if not ok:
            raise DataError(message)
    if cfg.tokenizer and not os.path.isfile(cfg.tokenizer):
        raise DataError(f"--tokenizer {cfg.tokenizer} does not exist: give a tokenizer.json written by bpe.py or prepare_data.py")
    if cfg.out is None:
        cfg.out = os.path.join(cfg.data_root, dataset_name(cfg))
    return cfg


def build_args(cfg, kind):
    """The arguments that decide the output: a build with the same ones is reused."""
    skip = {"out", "data_root", "mirror", "force", "quiet"}
    args = {"format_version": FORMAT_VERSION, "dataset": dataset_name(cfg), "kind": kind}
    for field in dataclasses.fields(Config):
        if field.name == "prefs_extra" and not cfg.prefs_extra:
            continue  # absent when 0, so folders built before the option existed still match
        if field.name not in skip:
            args[field.name] = getattr(cfg, field.name)
    if cfg.input:
        args["input_sha256"] = sha256_file(cfg.input)
    if cfg.tokenizer:
        args["tokenizer_sha256"] = sha256_file(cfg.tokenizer)
    return json.loads(json.dumps(args))  # tuples -> lists, as they come back from meta.json


def file_info(out_dir, names):
    return {n: {"bytes": os.path.getsize(os.path.join(out_dir, n)), "sha256": sha256_file(os.path.join(out_dir, n))}
            for n in names}


def is_up_to_date(out_dir, build):
    """True when meta.json records the same build arguments and every file it
    lists is there, unchanged."""
    path = os.path.join(out_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("build") != build:
        return False
    for name, info in meta.get("files", {}).items():
        p = os.path.join(out_dir, name)
        if not os.path.isfile(p) or os.path.getsize(p) != info["bytes"] or sha256_file(p) != info["sha256"]:
            return False
    return True


def load_meta(data_dir):
    """meta.json of a prepared dataset folder."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist: run `python prepare_data.py` first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def default_build_differences(data_dir, dataset="tinyworld"):
    """How a generated dataset's folder differs from what this code builds by
    default: ["prefs_train 4000 (default 12000)", ...], [] when it matches.
    An older checkout's folder keeps its old sizes until it is rebuilt."""
    built = load_meta(data_dir).get("build", {})
    default = build_args(resolve_config(Config(dataset=dataset, out=data_dir)), DATASETS[dataset]["kind"])
    return [f"{key} {built.get(key)} (default {value})" for key, value in default.items() if built.get(key) != value]


def ensure_prepared(dataset, data_root=DATA_ROOT):
    """What every stage calls before it reads data/<dataset>: builds the embedded
    tinyworld when its folder is missing (offline, seconds), and says in one line
    when it was built with other arguments than this code's defaults (an older
    checkout's sizes, or your own --prefs-train ...). A folder is never rebuilt
    silently: what you built on purpose stays. Returns the folder."""
    folder = os.path.join(data_root, dataset)
    if DATASETS.get(dataset, {}).get("kind") != "generated":
        return folder
    if not os.path.exists(os.path.join(folder, "meta.json")):
        print(f"{folder} is not prepared yet: building the embedded {dataset} dataset (offline, seconds)")
        prepare(dataset=dataset, data_root=data_root)
        return folder
    try:
        differences = default_build_differences(folder, dataset)
    except (OSError, json.JSONDecodeError, DataError):
        differences = ["meta.json unreadable"]
    if differences:
        print(f"note: {folder} was built with other arguments than this code's defaults: "
              f"{', '.join(differences[:4])}{' ...' if len(differences) > 4 else ''}; "
              f"`python prepare_data.py --dataset {dataset}` rebuilds it with the defaults "
              f"(keep it if you chose these)")
    return folder


def maybe_curate(docs, cfg):
    if not cfg.curation:
        log("curation skipped (--no-curation)", cfg.quiet)
        return docs, []
    log(f"curating {len(docs):,} documents", cfg.quiet)
    return curate(docs, near_dup_threshold=cfg.near_dup_threshold, quiet=cfg.quiet)


def with_ids(split, records):
    return [dict({"id": f"{split}-{i:05d}"}, **r) for i, r in enumerate(records)]


def count_by(records, key):
    counts = {}
    for r in records:
        counts[r[key]] = counts.get(r[key], 0) + 1
    return dict(sorted(counts.items()))


def write_tinyworld_tasks(cfg, out_dir):
    """SFT, preference, prompt and multiple-choice files; returns (meta, files)."""
    t0 = time.time()
    sizes = {s: getattr(cfg, s) for s in SIZE_FIELDS}
    splits = build_task_splits(cfg.seed, sizes, cfg.prefs_extra)
    meta, files = {"tasks": TASKS, "splits": {}}, []
    for split in ["sft_train", "sft_val"]:
        rng = rng_for(cfg.seed, split)
        records = []
        for rec in splits[split]:
            response, quality = make_demonstration(rec, rng, cfg.demo_mix)
            records.append(dict(public_record(rec), response=response, quality=quality,
                                gold=gold_score(rec, response)))
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), with_ids(split, records))
        files.append(f"{split}.jsonl")
        meta["splits"][split] = {"records": len(records), "tasks": count_by(records, "task"),
                                 "quality": count_by(records, "quality"),
                                 "mean_gold": round(sum(r["gold"] for r in records) / max(1, len(records)), 4)}
    pairs_all = []
    for split in ["prefs_train", "prefs_val"]:
        rng = rng_for(cfg.seed, split)
        pairs = [make_preference_pair(rec, rng, cfg.label_temperature) for rec in splits[split]]
        pairs_all += pairs
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), with_ids(split, pairs))
        files.append(f"{split}.jsonl")
        meta["splits"][split] = {"records": len(pairs), "tasks": count_by(pairs, "task"),
                                 "label_agreement": round(label_agreement(pairs), 4)}
        if cfg.prefs_k > 2:
            ranked_split = split.replace("prefs", "prefs_ranked")
            rng = rng_for(cfg.seed, ranked_split)
            ranked = [make_preference_ranking(rec, rng, cfg.prefs_k, cfg.label_temperature) for rec in splits[split]]
            write_jsonl(os.path.join(out_dir, f"{ranked_split}.jsonl"), with_ids(ranked_split, ranked))
            files.append(f"{ranked_split}.jsonl")
    meta["label_temperature"] = cfg.label_temperature
    meta["label_agreement"] = round(label_agreement(pairs_all), 4)
    for split in ["prompts_ppo", "prompts_eval"]:
        records = [public_record(rec) for rec in splits[split]]
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), with_ids(split, records))
        files.append(f"{split}.jsonl")
        meta["splits"][split] = {"records": len(records), "tasks": count_by(records, "task")}
    rng = rng_for(cfg.seed, "mc")
    items, contexts = [], set()
    while len(items) < cfg.mc:
        item = make_cloze(rng)
        if item["context"] not in contexts:
            contexts.add(item["context"])
            items.append(item)
    write_jsonl(os.path.join(out_dir, "mc.jsonl"), with_ids("mc", items))
    files.append("mc.jsonl")
    meta["splits"]["mc"] = {"records": len(items)}
    log(f"tasks: {sum(len(v) for v in splits.values()):,} prompts in {len(splits)} splits, {len(items)} cloze items, "
        f"label agreement {meta['label_agreement']:.1%} at temperature {cfg.label_temperature} "
        f"({time.time() - t0:.1f}s)", cfg.quiet)
    return meta, files


def build_tinyworld(cfg, out_dir):
    t0 = time.time()
    stories = generate_stories(cfg.seed, cfg.megabytes)
    docs, junk = add_web_junk(stories, rng_for(cfg.seed, "junk"), cfg.junk_fraction)
    log(f"generated {len(stories):,} stories ({cfg.megabytes:g} MB) + {sum(junk.values())} planted junk "
        f"documents in {time.time() - t0:.1f}s", cfg.quiet)
    meta = {"raw_docs": len(docs), "planted_junk": junk,
            "source_sha256": sha256_bytes(bpe.DOC_SEP.join(docs).encode("utf-8"))}
    docs, meta["curation"] = maybe_curate(docs, cfg)
    train_docs, val_docs = split_train_val(docs, cfg.val_fraction)
    meta.update(write_pretraining_files(out_dir, train_docs, val_docs, cfg.vocab_size, cfg.pattern,
                                        cfg.tokenizer, cfg.quiet))
    files = ["tokenizer.json", "train.bin", "val.bin", "train.txt", "val.txt"]
    task_meta, task_files = write_tinyworld_tasks(cfg, out_dir)
    meta.update(task_meta)
    return meta, files + task_files


def build_pretrain(cfg, out_dir):
    """shakespeare, tinystories or --input: documents -> tokenizer and bins."""
    if cfg.input:
        text = read_text(cfg.input)
        meta = {"source": os.path.abspath(cfg.input), "source_sha256": sha256_file(cfg.input)}
        docs = chunk_text(text)
    else:
        source = DATASETS[cfg.dataset]["sources"][0]
        path = fetch_source(source, cfg.data_root, cfg.mirror, cfg.quiet)
        text = read_text(path)
        meta = {"source": source_url(source, cfg.mirror), "source_sha256": sha256_file(path)}
        docs = parse_tinystories(text) if cfg.dataset == "tinystories" else chunk_text(text)
    meta["raw_docs"] = len(docs)
    log(f"{len(docs):,} documents, {len(text.encode('utf-8')):,} bytes", cfg.quiet)
    docs, meta["curation"] = maybe_curate(docs, cfg)
    if not docs:
        raise DataError("curation removed every document: the input has no usable text (try --no-curation)")
    train_docs, val_docs = split_train_val(docs, cfg.val_fraction)
    meta.update(write_pretraining_files(out_dir, train_docs, val_docs, cfg.vocab_size, cfg.pattern,
                                        cfg.tokenizer, cfg.quiet))
    return meta, ["tokenizer.json", "train.bin", "val.bin", "train.txt", "val.txt"]


def redact_fields(records, fields):
    """Privacy redaction of some text fields of records; returns the counts."""
    total = {"email": 0, "ip": 0, "phone": 0}
    for r in records:
        for f in fields:
            if isinstance(r.get(f), str):
                r[f], counts = redact_pii(r[f])
                for k, v in counts.items():
                    total[k] += v
    return total


def unique_by_prompt(records):
    seen, out = set(), []
    for r in records:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            out.append(r)
    return out


def take(records, n):
    """(first n records, the rest); n None means all."""
    n = len(records) if n is None else min(n, len(records))
    return records[:n], records[n:]


def prompt_record(r):
    keys = ["task", "prompt", "context", "reference", "answer_kind", "given", "options", "reference_response"]
    return {k: r[k] for k in keys}


def build_alpaca(cfg, out_dir):
    """Alpaca -> sft_train/val and prompts_ppo/eval (references: Alpaca's outputs)."""
    path = fetch_source("alpaca", cfg.data_root, cfg.mirror, cfg.quiet)
    records = parse_alpaca(read_maybe_gzip(path), source=path)
    meta = {"source": source_url("alpaca", cfg.mirror), "source_sha256": sha256_file(path), "raw_records": len(records)}
    if cfg.curation:
        meta["redacted"] = redact_fields(records, ["prompt", "response", "reference", "reference_response"])
    records = unique_by_prompt(records)
    rng_for(cfg.seed, "alpaca").shuffle(records)
    evals, rest = take(records, cfg.prompts_eval)
    ppo, rest = take(rest, cfg.prompts_ppo)
    val, rest = take(rest, cfg.sft_val)
    train, _ = take(rest, cfg.sft_train)
    out = {"prompts_eval": [prompt_record(r) for r in evals], "prompts_ppo": [prompt_record(r) for r in ppo],
           "sft_val": val, "sft_train": train}
    for split, recs in out.items():
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), with_ids(split, recs))
    meta["splits"] = {split: {"records": len(recs)} for split, recs in out.items()}
    log(f"alpaca: {meta['splits']}", cfg.quiet)
    return meta, [f"{s}.jsonl" for s in out]


def hh_prompt_record(pair):
    return {"task": "hh", "prompt": pair["prompt"], "context": "", "reference": pair["chosen"],
            "answer_kind": "open", "given": [], "options": [], "reference_response": pair["chosen"]}


def hh_pref_record(pair):
    """Human labels: no gold score is known, so the gold fields are null."""
    return {"task": "hh", "prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
            "chosen_ended": True, "rejected_ended": True, "chosen_kind": "human", "rejected_kind": "human",
            "gold_chosen": None, "gold_rejected": None, "gold_prefers_chosen": None}


def build_hh(cfg, out_dir):
    """HH-RLHF (helpful-base, single-turn) -> prefs_train/val, prompts_ppo/eval."""
    paths = [fetch_source(s, cfg.data_root, cfg.mirror, cfg.quiet) for s in ["hh_train", "hh_test"]]
    train, test = [parse_hh(read_maybe_gzip(p)) for p in paths]
    meta = {"source": [source_url(s, cfg.mirror) for s in ["hh_train", "hh_test"]],
            "source_sha256": [sha256_file(p) for p in paths], "raw_pairs": [len(train), len(test)]}
    if cfg.curation:
        meta["redacted"] = redact_fields(train + test, ["prompt", "chosen", "rejected"])
    train, test = unique_by_prompt(train), unique_by_prompt(test)
    rng_for(cfg.seed, "hh-train").shuffle(train)
    rng_for(cfg.seed, "hh-test").shuffle(test)
    ppo, prefs_train = take(train, cfg.prompts_ppo)
    prefs_train, _ = take(prefs_train, cfg.prefs_train)
    evals, prefs_val = take(test, cfg.prompts_eval)
    prefs_val, _ = take(prefs_val, cfg.prefs_val)
    out = {"prefs_train": [hh_pref_record(p) for p in prefs_train], "prefs_val": [hh_pref_record(p) for p in prefs_val],
           "prompts_ppo": [hh_prompt_record(p) for p in ppo], "prompts_eval": [hh_prompt_record(p) for p in evals]}
    for split, recs in out.items():
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), with_ids(split, recs))
    meta["splits"] = {split: {"records": len(recs)} for split, recs in out.items()}
    log(f"hh: {meta['splits']}", cfg.quiet)
    return meta, [f"{s}.jsonl" for s in out]


def build_hellaswag(cfg, out_dir):
    path = fetch_source("hellaswag", cfg.data_root, cfg.mirror, cfg.quiet)
    items = parse_hellaswag(read_maybe_gzip(path))
    items, _ = take(items, cfg.mc)
    write_jsonl(os.path.join(out_dir, "mc.jsonl"), with_ids("mc", items))
    log(f"hellaswag: {len(items):,} items", cfg.quiet)
    return ({"source": source_url("hellaswag", cfg.mirror), "source_sha256": sha256_file(path),
             "splits": {"mc": {"records": len(items)}}}, ["mc.jsonl"])


BUILDERS = {"generated": build_tinyworld, "pretrain": build_pretrain, "sft": build_alpaca,
            "prefs": build_hh, "mc": build_hellaswag}


def prepare(cfg=None, **overrides):
    """Build a dataset folder (or find it up to date) and return its path.
    prepare(dataset="tinyworld", megabytes=0.2, data_root="/tmp/d") works too."""
    cfg = dataclasses.replace(cfg or Config(), **overrides)
    cfg = resolve_config(cfg)
    if cfg.input:
        read_text(cfg.input)  # a bad input fails here, before anything is touched
    kind = "pretrain" if cfg.input else DATASETS[cfg.dataset]["kind"]
    out_dir = cfg.out
    build = build_args(cfg, kind)
    if not cfg.force and is_up_to_date(out_dir, build):
        log(f"{out_dir} is up to date (same arguments, files unchanged); --force rebuilds it", cfg.quiet)
        return out_dir
    t0 = time.time()
    log(f"building {dataset_name(cfg)} into {out_dir}", cfg.quiet)
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the folder is "complete" again only when the new meta.json is written
    meta, files = BUILDERS[kind](cfg, out_dir)
    for name in OUTPUT_FILES:  # outputs of an earlier, different build
        if name not in files and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    full = {"format_version": FORMAT_VERSION, "dataset": dataset_name(cfg), "kind": kind, "build": build}
    full.update(meta)
    full["files"] = file_info(out_dir, files)
    atomic_write_text(meta_path, json.dumps(full, indent=2, ensure_ascii=False) + "\n")
    log(f"done in {time.time() - t0:.1f}s: {out_dir} ({', '.join(files)}, meta.json)", cfg.quiet)
    return out_dir


# -----------------------------------------------------------------------------
# Command line

def parse_mix(text):
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not three comma-separated numbers") from None
    return parts


def make_parser():
    d = Config()
    p = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Build a dataset folder: tokenizer, train/val token bins, SFT, preference, prompt "
                    "and multiple-choice files. With no arguments: the embedded tinyworld, offline.")
    p.add_argument("--dataset", default=d.dataset, help=f"one of: {', '.join(DATASETS)} (default tinyworld)")
    p.add_argument("--input", default=None, metavar="PATH", help="a local UTF-8 text file to pretrain on instead")
    p.add_argument("--out", default=None, help="output folder (default data/NAME)")
    p.add_argument("--data-root", default=d.data_root, help="parent of dataset folders and of downloads/ (default data)")
    p.add_argument("--seed", type=int, default=d.seed, help="tinyworld: same seed, same bytes; also the split shuffles")
    p.add_argument("--megabytes", type=float, default=d.megabytes, help="tinyworld pretraining text size in MB (default 4)")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default per dataset: tinyworld 2048, "
                   "shakespeare 1024, tinystories 2048, --input 1024)")
    p.add_argument("--pattern", default=d.pattern, help="BPE pre-split pattern: gpt4 (default) or gpt2")
    p.add_argument("--val-fraction", type=float, default=None, help="share of documents for validation")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="reuse this tokenizer.json instead of training one")
    for field in SIZE_FIELDS + ["mc"]:
        p.add_argument("--" + field.replace("_", "-"), type=int, default=None,
                       help=f"number of {field} records (default: tinyworld {SPLIT_SIZES.get(field, MC_SIZE)})")
    p.add_argument("--prefs-extra", type=int, default=None, metavar="N",
                   help="tinyworld: N more prefs_train pairs, drawn after everything else so that every other "
                        "file stays the same (default 0; tinyworld-prefs36k: 24000)")
    p.add_argument("--demo-mix", type=parse_mix, default=d.demo_mix, metavar="C,V,W",
                   help="shares of concise, verbose and wrong SFT demonstrations (default 0.35,0.55,0.1)")
    p.add_argument("--label-temperature", type=float, default=d.label_temperature,
                   help="Bradley-Terry noise of preference labels (default 1.0: ~90%% agree with gold)")
    p.add_argument("--prefs-k", type=int, default=d.prefs_k,
                   help="also write ranked-K preference files (prefs_ranked_*.jsonl) when K > 2")
    p.add_argument("--junk-fraction", type=float, default=d.junk_fraction,
                   help="share of planted junk documents in raw tinyworld text (default 0.02)")
    p.add_argument("--no-curation", dest="curation", action="store_false", help="skip every curation step")
    p.add_argument("--near-dup-threshold", type=float, default=d.near_dup_threshold,
                   help="MinHash Jaccard above which a document is a near duplicate (default 0.8)")
    p.add_argument("--mirror", default=None, help=f"base URL serving the download files by name (or ${MIRROR_ENV})")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    cfg = Config(**vars(args))
    try:
        prepare(cfg)
    except DataError as e:
        print(f"prepare_data.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a folder that cannot be written, a full disk
        print(f"prepare_data.py: error: {e.strerror or e}: {e.filename or ''} (check the --data-root/--out folder)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare_data.py: interrupted; every file is written whole or not at all: run again to finish",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
