"""
tinyworld.py: a world a program can label.

RLHF needs a human who says which of two answers is better, thousands of times. A laptop course has none,
so this file builds a small world in which a program can play that human, and play it well:

1. The world: children, animals, toys, colours, places, food and feelings in word lists that never share a
   word, told in simple stories whose facts stay consistent; quizzes that drill its facts; a little planted
   web junk for curation to remove.
2. Instruction tasks whose answers can be checked: story questions, small sums, opposites, "which word is an
   animal". Each record carries its reference and the kind of word that counts.
3. The simulated labeler: `gold_score` scores any response rule by rule (right answer first, then concise,
   ended, not repetitive), whatever a model writes; `grade_answers` sums it up.
4. SFT demonstrations of mixed quality; preference pairs labelled through human-like noise.
5. Multiple-choice cloze items, and splits that share no story or prompt.

Everything comes from a seed through private random streams: the same seed gives the same bytes on every
machine. prepare_data.py writes it all to data/tinyworld/.
"""

import collections
import hashlib
import itertools
import math
import random
import re

import bpe

# -----------------------------------------------------------------------------
# Configuration

DEFAULT_MEGABYTES = 4.0    # size of the pretraining text (stories and quizzes)
JUNK_FRACTION = 0.02       # share of planted junk documents in the raw text
# Quizzes drill the world's facts in the tasks' own formats, from task keys no split ever uses.
QUIZ_SHARE = 0.30          # share of pretraining documents that are quizzes
QUIZ_KEY_SHARE = 0.25      # share of task keys (stories, prompts) reserved for quizzes
# Story questions: how often a second child appears, and has a fact of the asked kind (hard to read).
QA_SECOND_CHILD, QA_SAME_KIND = 0.8, 0.8

# Sizes of the instruction splits (records), the four task types in equal numbers: prompts with references
# (eval.py, ppo.py), preference pairs (reward.py: judging a sum right needs many fresh pairs), demonstrations (sft.py).
SPLIT_SIZES = {"prompts_eval": 200, "prompts_ppo": 1000, "prefs_val": 1000, "prefs_train": 36000,
               "sft_val": 200, "sft_train": 4000}
MC_SIZE = 400              # multiple-choice cloze items (eval.py)
# prefs_train beyond its first pairs is drawn after every other split: they stay the same whatever its size.
PREFS_TRAIN_FIRST = 12000

# Demonstrations are concise, verbose or wrong, like human ones. More than half ramble while the labeler
# prefers concise answers: SFT imitates a style the preference labels then correct, as RLHF is for.
DEMO_MIX = (0.35, 0.55, 0.10)
# Label noise: P(a preferred over b) = sigmoid((gold_a - gold_b) / T). The lower T, the more often the
# noisy labeler agrees with the gold one; T = 1 leaves a human-like share of disagreements.
LABEL_TEMPERATURE = 1.0


def rng_for(seed, part):
    """A private random stream for one part of the build, seeded by a string (through sha512): the same on every
    machine, and no part disturbs another's randomness."""
    return random.Random(f"stagegpt:{seed}:{part}")


def tokens_of(text):
    """Lowercase words and numbers of a text: the unit of every rule below."""
    return re.findall(r"[a-z]+|[0-9]+", text.lower())


# -----------------------------------------------------------------------------
# The world: a closed vocabulary. The lists of one kind never share a word with another kind's (a test
# checks), so an answer can be recognised by the words it uses.

GIRL_NAMES = ["Mia", "Lily", "Anna", "Zoe", "Ella", "Ruby", "Lucy", "Rosa",
              "Nina", "Maya", "Lena", "Sara", "Emma", "Clara", "Alice", "Hana"]
BOY_NAMES = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Noah", "Finn",
             "Omar", "Hugo", "Theo", "Eli", "Adam", "Kai", "Otto", "Paul"]
NAMES = GIRL_NAMES + BOY_NAMES
ANIMALS = ["dog", "cat", "bird", "fish", "rabbit", "frog", "duck", "horse", "cow", "pig",
           "sheep", "goat", "mouse", "bear", "fox", "owl", "turtle", "lion", "hen", "bee"]
OBJECTS = ["ball", "kite", "hat", "book", "box", "cup", "bike", "boat", "car", "doll", "drum", "bag", "shoe",
           "coat", "key", "lamp", "map", "bell", "sock", "train", "truck", "shell", "flag", "blanket"]
COLOURS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "black", "white", "brown"]
PLACES = ["park", "beach", "forest", "garden", "school", "farm", "river", "lake", "zoo", "shop",
          "market", "library", "hill", "town", "castle", "playground", "village", "pond"]
FOODS = ["apple", "banana", "cake", "bread", "soup", "cookie", "pie", "carrot", "cheese", "egg", "grape", "pear",
         "plum", "sandwich"]
FEELINGS = ["happy", "sad", "tired", "excited", "scared", "proud", "angry", "calm", "surprised", "lonely"]
GOOD_FEELINGS, BAD_FEELINGS = ["happy", "excited", "proud", "calm"], ["sad", "tired", "scared", "lonely"]
UNCOUNTABLE = {"bread", "soup", "cheese", "sheep", "fish"}
COUNTABLE_THINGS = [x for x in FOODS + OBJECTS if x not in UNCOUNTABLE]
# Word pairs for the "opposite" task. Every word appears once.
OPPOSITES = [("big", "small"), ("hot", "cold"), ("fast", "slow"), ("old", "new"), ("wet", "dry"), ("full", "empty"),
             ("loud", "quiet"), ("soft", "hard"), ("long", "short"), ("heavy", "light"), ("clean", "dirty"),
             ("up", "down"), ("open", "closed"), ("day", "night"), ("early", "late"), ("happy", "sad"),
             ("near", "far"), ("high", "low"), ("thick", "thin"), ("dark", "bright")]
OPPOSITE_OF = {a: b for pair in OPPOSITES for a, b in (pair, pair[::-1])}
OPPOSITE_WORDS = sorted(OPPOSITE_OF)

# What each animal does; used by the stories ("the dog barked at a duck").
ANIMAL_SOUND = {"dog": "barked", "cat": "meowed", "bird": "sang", "fish": "splashed", "rabbit": "hopped",
                "frog": "croaked", "duck": "quacked", "horse": "neighed", "cow": "mooed", "pig": "oinked",
                "sheep": "bleated", "goat": "bleated", "mouse": "squeaked", "bear": "growled", "fox": "yelped",
                "owl": "hooted", "turtle": "hissed", "lion": "roared", "hen": "clucked", "bee": "buzzed"}
ANIMAL_HABIT = {"dog": "run in the grass", "cat": "sleep in the sun", "bird": "fly from tree to tree",
                "fish": "swim in circles", "rabbit": "eat carrots", "frog": "jump into the water",
                "duck": "swim with its friends", "horse": "run across the field", "cow": "eat grass all day",
                "pig": "roll in the mud", "sheep": "stay close to the others", "goat": "climb on rocks",
                "mouse": "hide in small places", "bear": "eat honey", "fox": "dig holes", "owl": "stay up all night",
                "turtle": "walk very slowly", "lion": "sleep under a tree", "hen": "look for seeds",
                "bee": "visit the flowers"}
WEATHER, TIMES = ["sunny", "rainy", "windy", "snowy", "cloudy", "warm"], ["morning", "afternoon", "evening"]
SPOTS = ["under a tree", "behind a big rock", "in the tall grass", "next to a bench", "under a bush", "near the gate"]
CATEGORY_KINDS = {"animal": ANIMALS, "colour": COLOURS, "food": FOODS, "place": PLACES}
# The answer vocabulary of each kind of story question.
KIND_WORDS = {"name": NAMES, "animal": ANIMALS, "object": OBJECTS, "colour": COLOURS, "place": PLACES, "food": FOODS,
              "feeling": FEELINGS}


def article(word):
    return "an" if word[0].lower() in "aeiou" else "a"


def with_article(word):
    """'a dog', 'an owl', 'some bread'."""
    return f"some {word}" if word in UNCOUNTABLE else f"{article(word)} {word}"


def plural(word, count=2):
    """'1 apple', '3 apples', '2 boxes', '4 sandwiches'."""
    if count == 1 or word in UNCOUNTABLE:
        return word
    return word + ("es" if word.endswith(("x", "ch", "sh")) else "s")


def capitalize(sentence):
    return sentence[:1].upper() + sentence[1:]


def fill(template, facts):
    return capitalize(template.format(**facts))


# -----------------------------------------------------------------------------
# Stories. A story has a hero, a friend and their things. `story_facts` turns these base facts into
# every form a template needs (pronouns, articles, plurals), so a template cannot get them wrong.


def story_facts(base):
    """Base facts + pronouns, articles and plurals derived from them."""
    girl, fgirl = base["name"] in GIRL_NAMES, base["fname"] in GIRL_NAMES
    f = dict(base, he="she" if girl else "he", his="her" if girl else "his", him="her" if girl else "him",
             kid="girl" if girl else "boy", fhe="she" if fgirl else "he", fhis="her" if fgirl else "his",
             fhim="her" if fgirl else "him", a_colour=article(base["colour"]) + " " + base["colour"],
             a_fcolour=article(base["fcolour"]) + " " + base["fcolour"], a_animal=with_article(base["animal"]),
             a_animal2=with_article(base["animal2"]), a_food=with_article(base["food"]), foods=plural(base["food"]),
             sound=ANIMAL_SOUND[base["animal"]], habit=ANIMAL_HABIT[base["animal"]])
    return dict(f, He=capitalize(f["he"]), His=capitalize(f["his"]))


# Each plot is a list of steps, each a list of alternative templates ("": the step may be skipped). The
# ending calls back earlier facts: a cloze item asks for the ending that keeps the story consistent.
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
    body = [fill(t, facts) for t in (rng.choice(options) for options in steps[:-1]) if t]
    return body, rng.choice(steps[-1])


def tell_counting(facts, rng):
    """A story whose numbers add up: 'Mia had 3 apples ... 3 plus 4 is 7.'"""
    thing, f = rng.choice(COUNTABLE_THINGS), facts
    if rng.random() < 0.5:
        op, a, b = "plus", rng.randint(1, 9), rng.randint(1, 9)
        c, left = a + b, ""
        change = rng.choice([f"{f['fname']} gave {f['him']} {b} more.",
                             f"Then {f['he']} found {b} more {plural(thing, b)} at the {f['place']}."])
    else:
        op, a = "minus", rng.randint(2, 9)
        b = rng.randint(1, a)
        c, left = a - b, " left"
        change = rng.choice([f"{f['He']} gave {b} to {f['fname']}.", f"{f['He']} lost {b} of them at the {f['place']}."])
    lines = [f"{f['name']} had {a} {plural(thing, a)}.", change, f"Now {f['name']} had {c} {plural(thing, c)}{left}.",
             rng.choice([f"{a} {op} {b} is {c}.", f"{f['name']} knew that {a} {op} {b} is {c}."])]
    ending = rng.choice(["{name} counted them again to be sure.", "{name} was {feeling} and ran to tell {fname}.",
                         "Counting with {fname} was fun."])
    return lines, ending


def tell_school(f, rng):
    """A lesson: the teacher asks 2-4 questions of the tasks' kinds (a sum, an opposite, a kind of word), the
    children answer right."""
    body = [rng.choice([f"At school, the teacher asked {f['name']} and {f['fname']} some questions.",
                        f"One {f['time']}, {f['name']} and {f['fname']} were at school.",
                        "The children sat down and the teacher began the lesson."])]
    for _ in range(rng.randint(2, 4)):
        kid, pick = rng.choice([f["name"], f["fname"]]), rng.random()
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
        body.append(f"\"{q}\" asked the teacher. \"{ans},\" said {kid}.")
    ending = rng.choice(["The teacher was proud of {name} and {fname}.",
                         "After school, {name} and {fname} went to the {place} to play.",
                         "{name} liked school very much."])
    return body, ending


def kind_subject(word, kind):
    """How a word is named as the subject of a sentence: 'A dog', 'The park', 'Red'."""
    plain = kind == "colour" or word in UNCOUNTABLE  # 'Red', 'Bread'
    return f"The {word}" if kind == "place" else capitalize(word if plain else with_article(word))


def kind_sentence(word, kind):
    """'A dog is an animal.', 'Red is a colour.', 'The park is a place.'"""
    return f"{kind_subject(word, kind)} is {article(kind)} {kind}."


def plot_facts(plot, rng):
    """The facts of a new story of this plot (hero, friend and their things), in every form its templates need."""
    (name, fname), (obj, fobj) = rng.sample(NAMES, 2), rng.sample(OBJECTS, 2)
    (colour, fcolour), (animal, animal2) = rng.sample(COLOURS, 2), rng.sample(ANIMALS, 2)
    base = {"name": name, "fname": fname, "object": obj, "fobject": fobj, "colour": colour, "fcolour": fcolour,
            "animal": animal, "animal2": animal2, "place": rng.choice(PLACES), "food": rng.choice(FOODS),
            "feeling": rng.choice(GOOD_FEELINGS), "bad_feeling": rng.choice(BAD_FEELINGS),
            "weather": rng.choice(WEATHER), "time": rng.choice(TIMES), "spot": rng.choice(SPOTS)}
    if plot == "weather_walk":
        base["object"] = rng.choice(["hat", "coat"])  # something to put on
    return story_facts(base)


def make_story_parts(rng):
    """(body sentences, ending template, facts) of one random story."""
    plot = rng.choice(sorted(PLOTS) + FACT_PLOTS)
    facts = plot_facts(plot, rng)
    teller = {"counting": tell_counting, "school": tell_school}.get(plot)
    body, ending = teller(facts, rng) if teller else tell_plot(plot, facts, rng)
    return body, ending, facts


def make_story(rng):
    """One story as a single paragraph of plain text."""
    body, ending, facts = make_story_parts(rng)
    return " ".join(body + [fill(ending, facts)])


def generate_stories(seed, megabytes):
    """Stories (and QUIZ_SHARE quizzes) until their UTF-8 size reaches `megabytes` (1e6 bytes each)."""
    rng, stories, size = rng_for(seed, "stories"), [], 0
    while size < int(megabytes * 1_000_000):
        stories.append(make_quiz(rng, seed) if rng.random() < QUIZ_SHARE else make_story(rng))
        size += len(stories[-1].encode("utf-8")) + 1
    return stories


# -----------------------------------------------------------------------------
# Planted web junk: the raw text looks a little like a web crawl, so each curation step has work to do.

JUNK_FOOTER = "Read more stories like this on our website and subscribe to our newsletter!"
JUNK_PAGE = ("Home | About | Contact | Privacy policy | Terms of use\n"
             "Lorem ipsum dolor sit amet, consectetur adipiscing elit. Lorem ipsum dolor sit amet.")
JUNK_SYMBOLS = "### $$$ %%% 1010 0101 *** +++ === >>> <<< ||| ### 2024 @@@ ~~~ ^^^ ### 777"
JUNK_SHORT = ["Read about {}.", "The end, {}.", "More from {}!", "Bye, {}."]
JUNK_KINDS = ["exact_copy", "near_copy", "footer", "web_page", "symbols", "too_short", "personal_data"]


def add_web_junk(stories, rng, fraction):
    """(documents, counts): the stories with fraction * len(stories) junk documents inserted at random."""
    docs = list(stories)
    counts = {kind: 0 for kind in JUNK_KINDS}
    for i in range(int(round(fraction * len(stories)))):
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
# Instruction tasks. Each maker returns one record holding what the gold labeler needs to check any answer:
#   task          "story_qa" | "arithmetic" | "opposite" | "category"
#   prompt        the user's text (plain; the chat template is added by bpe.py)
#   context       the story of a story question ("" otherwise): no story is in two splits
#   reference     the answer: one word, or a number written in digits
#   answer_kind   which words count: a KIND_WORDS key ("place", "name", ...), "number", "opposite" or "option"
#   given         words of the question that are not an answer ("big" in "What is the opposite of big?")
#   options       the choices of a "category" question
#   reference_response   one concise correct response
# and, only while building: _concise (right concise answers), _wrong (wrong ones), _reasoning (filler).

TASKS = ["story_qa", "arithmetic", "opposite", "category"]
QA_KINDS = ["place", "object", "colour", "animal", "food", "feeling", "name"]
QA_FACT_OF_KIND = {"place": "place", "object": "thing", "colour": "thing", "animal": "animal",
                   "food": "food", "feeling": "feeling", "name": "place"}
QA_REASONING = ["The story tells us the answer.", "I read the story again to check.", "The answer is in the story."]
VERBOSE_OPENERS = ["Let me think about this.", "Sure, I can help with that.", "That is a nice question.",
                   "Okay, let me see.", "Thank you for asking.", "Let me read it carefully."]
VERBOSE_CLOSERS = ["I hope this helps!", "Let me know if you have more questions.", "That is my answer.",
                   "I am glad I could help.", "I hope that is clear."]


def task_record(task, prompt, reference, answer_kind, concise, wrong, reasoning, context="", given=(), options=()):
    return {"task": task, "prompt": prompt, "context": context, "reference": reference, "answer_kind": answer_kind,
            "given": list(given), "options": list(options), "reference_response": concise[0],
            "_concise": concise, "_wrong": wrong, "_reasoning": reasoning}


def qa_sentence(fact, c):
    """The sentence that states one fact about character c."""
    n = c["name"]
    return {"place": f"{n} {c['place_verb']} to the {c['place']}.", "food": f"{n} ate {with_article(c['food'])}.",
            "thing": f"{n} {c['thing_verb']} {article(c['colour'])} {c['colour']} {c['object']}.",
            "animal": f"{n} {c['animal_verb']} {with_article(c['animal'])}.",
            "feeling": f"{n} {c['feeling_verb']} {c['feeling']}."}[fact]


def qa_question(kind, c):
    n = c["name"]
    return {"place": f"Where did {n} go?", "food": f"What did {n} eat?", "feeling": f"How did {n} feel?",
            "object": f"What did {n} {'have' if c['thing_verb'] == 'had' else 'find'}?",
            "colour": f"What colour was {n}'s {c['object']}?", "name": f"Who went to the {c['place']}?",
            "animal": f"What animal did {n} {'see' if c['animal_verb'] == 'saw' else 'play with'}?"}[kind]


def qa_answers(kind, c):
    """Concise answers to a question of `kind` about c; the first ends on the answer (to cut before it)."""
    n = c["name"]
    a_thing = f"{article(c['colour'])} {c['colour']} {c['object']}"
    return {
        "place": [f"{n} went to the {c['place']}.", f"To the {c['place']}.", f"The {c['place']}."],
        "object": [f"{n} {c['thing_verb']} {a_thing}.", f"{capitalize(a_thing)}."],
        "colour": [f"{n}'s {c['object']} was {c['colour']}.", f"It was {c['colour']}.", f"The {c['object']} was {c['colour']}."],
        "animal": [f"{n} {c['animal_verb']} {with_article(c['animal'])}.", f"{capitalize(with_article(c['animal']))}."],
        "food": [f"{n} ate {with_article(c['food'])}.", f"{capitalize(with_article(c['food']))}."],
        "feeling": [f"{n} felt {c['feeling']}.", f"{n} was {c['feeling']}.", f"{capitalize(c['feeling'])}."],
        "name": [f"It was {n}.", f"{n} went to the {c['place']}.", f"{n} did."]}[kind]


def make_story_qa(rng):
    """A story of 2-4 sentences about one or two children and a question about one fact of it. A second
    child usually has a fact of the same kind, so the answer must be read from the right sentence."""
    kind = rng.choice(QA_KINDS)
    fact = QA_FACT_OF_KIND[kind]
    two = rng.random() < QA_SECOND_CHILD or kind == "name"
    pairs = [rng.sample(words, 2) for words in (NAMES, PLACES, OBJECTS, COLOURS, ANIMALS, FOODS, FEELINGS)]
    chars = [dict(zip(["name", "place", "object", "colour", "animal", "food", "feeling"], picks),
                  place_verb=rng.choice(["went", "walked", "ran"]), thing_verb=rng.choice(["had", "found"]),
                  animal_verb=rng.choice(["saw", "played with"]), feeling_verb=rng.choice(["felt", "was very"]))
             for picks in zip(*pairs)]
    asked, other = chars
    others_facts = [f for f in ["place", "thing", "animal", "food", "feeling"] if f != fact]
    blocks = [[fact] + rng.sample(others_facts, rng.randint(0, 1) if two else rng.randint(1, 2))]
    if two:
        same = fact if (kind == "name" or rng.random() < QA_SAME_KIND) else rng.choice(others_facts)
        blocks.append([same] + rng.sample([f for f in others_facts if f != same], rng.randint(0, 1)))
    sentences = [[qa_sentence(f, c) for f in facts] for c, facts in zip(chars, blocks)]
    for block in sentences:
        rng.shuffle(block)
    if two and rng.random() < 0.5:
        sentences.reverse()
    story = " ".join(s for block in sentences for s in block)
    # A wrong answer names the other child's fact when the story has one, else any other word of the kind.
    if two and fact in blocks[1]:
        wrong_char = dict(other, place=asked["place"]) if kind == "name" else dict(asked, **{kind: other[kind]})
    else:
        story_words = set(tokens_of(story))
        wrong_char = dict(asked, **{kind: rng.choice([w for w in KIND_WORDS[kind] if w.lower() not in story_words])})
    reference = asked["name"] if kind == "name" else asked[kind]
    return task_record("story_qa", f"{story}\n{qa_question(kind, asked)}", reference, kind, qa_answers(kind, asked),
                       qa_answers(kind, wrong_char), QA_REASONING, context=story)


def make_arithmetic(rng):
    """A sum or a difference of single digits, bare or as a word problem."""
    op, word_problem = rng.choice(["plus", "minus"]), rng.random() < 0.5
    lo = 1 if word_problem else 0  # a word problem never counts zero things
    if op == "plus":
        a, b = rng.randint(lo, 9), rng.randint(lo, 9)
        c = a + b
    else:
        a = rng.randint(2 * lo, 9)
        b = rng.randint(lo, a)
        c = a - b
    wrong_c = c + 1 if (c == 0 or rng.random() < 0.5) else c - 1
    thing = rng.choice(COUNTABLE_THINGS)  # what a word problem counts
    if not word_problem:
        prompts = {"plus": [f"Please add {a} and {b}.", f"What do you get when you add {a} and {b}?"],
                   "minus": [f"Please take {b} away from {a}.", f"What do you get when you take {b} from {a}?"]}[op]
        prompt = rng.choice([f"What is {a} {op} {b}?", f"How much is {a} {op} {b}?"] + prompts)
        reasoning = [f"We start with {a} and " + (f"add {b} more." if op == "plus" else f"take away {b}.")]
        answers = [f"{a} {op} {b} is {{value}}.", "The answer is {value}.", "It is {value}."]
    else:
        n, m = rng.sample(NAMES, 2)
        him, he = ("her", "She") if n in GIRL_NAMES else ("him", "He")
        has, things, now = f"{n} has {a} {plural(thing, a)}", plural(thing), "now" if op == "plus" else "left"
        prompt = rng.choice({"plus": [f"{has}. {m} gives {him} {b} more. How many {things} does {n} have now?",
                                      f"{has} and finds {b} more. How many {things} does {n} have?"],
                             "minus": [f"{has}. {he} gives {b} to {m}. How many {things} does {n} have left?",
                                       f"{has} and loses {b}. How many {things} does {n} have left?"]}[op])
        reasoning = [f"{n} starts with {a} and " + (f"gets {b} more." if op == "plus" else f"loses {b}.")]
        answers = [f"{n} has {{value}} {{things}} {now}.", f"{n} has {{value}} {{things}}.", "The answer is {value}."]
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
    """A pretraining document of 2-4 questions in the tasks' own words, each with a concise answer, from
    the quiz keys only. One line, like a story, so that line de-duplication never cuts it apart."""
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
    """The filler of a rambling answer, (before, after): opener(s) and a reasoning sentence before
    it, maybe a closing line after. No filler word is an answer word."""
    before = rng.sample(VERBOSE_OPENERS, rng.randint(1, 2)) + [rng.choice(record["_reasoning"])]
    after = [rng.choice(VERBOSE_CLOSERS)] if rng.random() < 0.7 else []
    return before, after


def make_demonstration(record, rng, mix=DEMO_MIX):
    """(response, quality) for an SFT record, the quality drawn from mix = (concise, verbose, wrong)."""
    p_concise, p_verbose, _ = mix
    u = rng.random()
    if u < p_concise:
        return rng.choice(record["_concise"]), "concise"
    if u < p_concise + p_verbose:  # right, but rambling
        before, after = verbose_frame(record, rng)
        return " ".join(before + [rng.choice(record["_concise"])] + after), "verbose"
    return rng.choice(record["_wrong"]), "wrong"


def truncate_before_answer(response, reference):
    """The response cut before the answer's first mention, as if the model hit its length limit;
    None when the answer comes first."""
    m = re.search(rf"\b{re.escape(reference)}\b", response, flags=re.IGNORECASE)
    if m is None or not response[:m.start()].strip():
        return None
    return response[:m.start()].rstrip(" ,")


CANDIDATE_KINDS = ["concise", "wrong", "verbose", "verbose_wrong", "copy", "truncated", "empty", "repetitive"]
# Pairs that differ only in the answer (the same words around a right and a wrong one): without them a
# reward model can score well by judging the style alone, and then ranks a policy's own answers, which
# share one style, no better than chance.
MATCHED_PAIRS = [("concise", "wrong"), ("verbose", "verbose_wrong")]
MATCHED_PAIR_SHARE = 0.5   # share of preference pairs that are matched right/wrong pairs


def make_candidates(record, rng):
    """Realistic responses to one prompt, [(kind, text, ended)]: right and concise, wrong in the same
    wording, right but rambling, wrong in the same rambling, a copy of the question, truncated (no
    end of turn), empty, repetitive (ran to the length limit)."""
    question = record["prompt"].split("\n")[-1]
    i = rng.randrange(len(record["_concise"]))  # one wording for the right and the wrong answer
    right, wrong = record["_concise"][i], record["_wrong"][i % len(record["_wrong"])]
    before, after = verbose_frame(record, rng)
    cands = [("concise", right, True), ("wrong", wrong, True), ("verbose", " ".join(before + [right] + after), True),
             ("verbose_wrong", " ".join(before + [wrong] + after), True), ("copy", question, True)]
    cuts = [c for c in (truncate_before_answer(r, record["reference"]) for r in record["_concise"]) if c]
    if cuts:  # the longest cut: the model was stopped just before the answer
        cands.append(("truncated", max(cuts, key=len), False))
    text = (" ".join([rng.choice(record["_concise"])] * rng.randint(3, 6)) if rng.random() < 0.5
            else " ".join([record["reference"]] * rng.randint(4, 8)))
    return cands + [("empty", "", True), ("repetitive", text, False)]


# -----------------------------------------------------------------------------
# The simulated labeler. gold_score plays the human who rates a response; it must work on anything a
# model generates (garbage, repetition, no end of turn). The rules, in order of importance:
#   1. Empty (no word or number at all): GOLD_EMPTY, the worst score there is.
#   2. Correct: +GOLD_CORRECT, wrong: 0. Correct means
#        number answers:  the last number in the response (digits or "zero".."twenty") is the
#                         reference, so "3 plus 4 is 7" is right;
#        word answers:    the answer words in the response (words of the answer kind, minus the
#                         question's given words) are exactly {reference}: two places are wrong;
#        open tasks (Alpaca; no answer kind): GOLD_CORRECT x word-overlap F1 with the reference
#                         (correct when F1 >= 0.5); no reference (HH): 0.
#   3. Concise: each word beyond max(FREE_WORDS, 2 x reference words) costs LENGTH_COST, at most LENGTH_PENALTY_MAX.
#   4. Properly ended with the end-of-turn token: otherwise -NOT_ENDED_PENALTY.
#   5. No repetition: -REPETITION_PENALTY_MAX x the share of word bigrams that repeat an earlier one.
# Penalties sum to less than GOLD_CORRECT: a correct response always beats a wrong one, a non-empty one an empty one.

GOLD_EMPTY, GOLD_CORRECT = -3.0, 3.0
FREE_WORDS, LENGTH_COST, LENGTH_PENALTY_MAX = 8, 0.05, 1.0
NOT_ENDED_PENALTY, REPETITION_PENALTY_MAX = 0.5, 1.0
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def numbers_in(text):
    """The numbers of a text in order, from digits or number words."""
    toks = [t for t in tokens_of(text) if t.isdigit() or t in NUMBER_WORDS]  # a huge number (-1) is never an answer
    return [NUMBER_WORDS.index(t) if t in NUMBER_WORDS else int(t) if len(t) <= 18 else -1 for t in toks]


def answer_words(record, text):
    """The answer words a response mentions (sorted): words of the record's answer kind (its options, for
    a category question), the question's given words excluded."""
    kind = record.get("answer_kind")
    words = {"opposite": OPPOSITE_WORDS, "option": record.get("options", [])}.get(kind, KIND_WORDS.get(kind, []))
    space = {w.lower() for w in words} - {w.lower() for w in record.get("given", [])}
    return sorted(set(tokens_of(text)) & space)


def overlap_f1(text, reference):
    """Word-overlap F1 between a response and a reference (bags of words)."""
    a, b = tokens_of(text), tokens_of(reference)
    common = sum((collections.Counter(a) & collections.Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def is_correct(record, text):
    """Rule 2: does the response give the reference answer (and no other)?"""
    kind, reference = record.get("answer_kind") or "open", record.get("reference")
    if not reference:
        return False
    if kind == "number":
        numbers = numbers_in(text)
        return bool(numbers) and numbers[-1] == int(reference)
    if kind == "open":
        return overlap_f1(text, reference) >= 0.5
    return answer_words(record, text) == [str(reference).lower()]


def repetition_fraction(text):
    """Share of word bigrams that repeat an earlier one: 0 for normal text, near 1 for 'park park park'."""
    toks = tokens_of(text)
    bigrams = list(zip(toks, toks[1:]))
    return 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def gold_score(record, text, ended=True):
    """The simulated labeler's score of `text` as a response to `record` (of sft_*, prompts_* or prefs_*
    files): the sum of the five rules, higher is better. `ended`: closed by the end-of-turn token (a
    text that still holds the end-of-turn string ends there)."""
    if bpe.END_OF_TURN in text:
        text, ended = text.split(bpe.END_OF_TURN)[0], True
    toks = tokens_of(text)
    if not toks:
        return GOLD_EMPTY
    reference = record.get("reference") or ""
    open_task = (record.get("answer_kind") or "open") == "open"  # partial credit: the word overlap
    correctness = GOLD_CORRECT * (overlap_f1(text, reference) if open_task else is_correct(record, text))
    free = max(FREE_WORDS, 2 * len(tokens_of(reference)))
    length = min(LENGTH_PENALTY_MAX, LENGTH_COST * max(0, len(toks) - free))
    not_ended = 0.0 if ended else NOT_ENDED_PENALTY
    repetition = REPETITION_PENALTY_MAX * repetition_fraction(text)
    return round(correctness - length - not_ended - repetition, 6)


def grade_answers(records, answers):
    """Grade a model's answers [(text, ended), ...] to prompt records, as the simulated labeler would:
    {"n", "accuracy", "gold", "end_rate", "words", "by_task": {task: the same}}. accuracy: share
    correct (is_correct); gold: mean gold_score; end_rate: share ended; words: mean length."""
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} records but {len(answers)} answers")
    groups = {"all": []}
    for record, (text, ended) in zip(records, answers):
        row = (is_correct(record, text), gold_score(record, text, ended), bool(ended), len(tokens_of(text)))
        groups["all"].append(row)
        groups.setdefault(record.get("task", "open"), []).append(row)

    def summary(rows):
        n = max(1, len(rows))
        return dict(n=len(rows), **{key: sum(r[i] for r in rows) / n
                                    for i, key in enumerate(["accuracy", "gold", "end_rate", "words"])})
    out = summary(groups.pop("all"))
    out["by_task"] = {task: summary(rows) for task, rows in sorted(groups.items())}
    return out


# -----------------------------------------------------------------------------
# Preference labels with human-like noise (Bradley-Terry).


def bradley_terry_prob(gold_a, gold_b, temperature):
    """P(a is preferred over b) = sigmoid((gold_a - gold_b) / temperature)."""
    z = (gold_a - gold_b) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def make_preference_pair(record, rng, temperature=LABEL_TEMPERATURE):
    """Two candidates with different gold scores, the noisy labeler's choice as chosen/rejected, and
    the noiseless verdict."""
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
    return dict(public_record(record), chosen=chosen[1], rejected=rejected[1], chosen_ended=chosen[2],
                rejected_ended=rejected[2], chosen_kind=chosen[0], rejected_kind=rejected[0], gold_chosen=chosen[3],
                gold_rejected=rejected[3], gold_prefers_chosen=chosen[3] > rejected[3])


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
        facts = plot_facts(plot, rng)
        body, ending = tell_plot(plot, facts, rng)
        slots = [s for s in CLOZE_SLOTS if "{" + s + "}" in ending]
        if slots:
            break
    context = " ".join(body)
    used = set(tokens_of(context)) | {facts[s].lower() for s in CLOZE_SLOTS}
    endings = [fill(ending, facts)]
    rng.shuffle(slots)
    for slot in itertools.cycle(slots):
        if len(endings) == 4:
            break
        pool = [w for w in CLOZE_SLOTS[slot] if w.lower() not in used]
        if slot in ("name", "fname"):  # same gender, so the pronouns still fit
            same = GIRL_NAMES if facts[slot] in GIRL_NAMES else BOY_NAMES
            pool = [w for w in pool if w in same]
        wrong = fill(ending, story_facts(dict(facts, **{slot: rng.choice(pool)})))
        if wrong not in endings:
            endings.append(wrong)
    order = list(range(4))
    rng.shuffle(order)
    return {"task": "cloze", "context": context, "endings": [" " + endings[i] for i in order], "label": order.index(0)}


# -----------------------------------------------------------------------------
# Splits. Every record has a key (its story, or its prompt when it has no story);
# a hash of the key decides the split, so a story or a question can never land
# in two splits, whatever the sizes.


def split_of(key, seed, names, weights):
    """The split of a key: a sha256 of (seed, key) read as a number in [0, 1), placed among the weights."""
    u = int.from_bytes(hashlib.sha256(f"{seed}|{key}".encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    total, acc = float(sum(weights)), 0.0
    for name, w in zip(names, weights):
        acc += w / total
        if u < acc:
            return name
    return names[-1]


def build_task_splits(seed, sizes):
    """{split: [task records]}, sizes[split] each, the four task types in equal numbers, every prompt
    unique, no key shared by two splits or by a split and the quizzes. prefs_train records beyond
    PREFS_TRAIN_FIRST are drawn last, so every other split (and the first ones) stays the same."""
    first = {s: min(n, PREFS_TRAIN_FIRST) if s == "prefs_train" else n for s, n in sizes.items()}
    names, weights = list(first), [max(1, n) for n in first.values()]
    rng, out, seen_prompts = rng_for(seed, "tasks"), {s: [] for s in names}, set()

    def per_task(n):  # n records -> {task: count}, the four tasks in equal numbers
        return {task: n // len(TASKS) + (1 if i < n % len(TASKS) else 0) for i, task in enumerate(TASKS)}

    def draw(quota):
        """Draw records (the tasks in turn) until quota {(split, task): n} is filled; each goes to its key's split."""
        missing = sum(quota.values())
        draws, max_draws = 0, 100 * missing + 10_000
        while missing:
            task = TASKS[draws % len(TASKS)]
            draws += 1
            if draws > max_draws:
                raise ValueError(f"could not draw {sum(sizes.values())} distinct task prompts; ask for fewer")
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

    draw({(s, task): n for s in names for task, n in per_task(first[s]).items()})
    more = sizes.get("prefs_train", 0) - first.get("prefs_train", 0)
    draw({("prefs_train", task): n for task, n in per_task(more).items()})
    return out


def build_instruction_sets(seed, sizes, mc=MC_SIZE):
    """The records of every instruction file, {name: [records]}: demonstrations (sft_*: + response,
    quality, gold), labelled preference pairs (prefs_*), prompts (prompts_*) and cloze items (mc),
    each file from its own random stream."""
    out = {}
    for split, records in build_task_splits(seed, sizes).items():
        rng = rng_for(seed, split)
        if split.startswith("sft"):
            demos = [(rec, *make_demonstration(rec, rng)) for rec in records]
            out[split] = [dict(public_record(r), response=t, quality=q, gold=gold_score(r, t)) for r, t, q in demos]
        elif split.startswith("prefs"):
            out[split] = [make_preference_pair(rec, rng) for rec in records]
        else:
            out[split] = [public_record(rec) for rec in records]
    rng, items = rng_for(seed, "mc"), {}
    while len(items) < mc:
        item = make_cloze(rng)
        items.setdefault(item["context"], item)
    out["mc"] = list(items.values())
    return out
