"""bpe.py: byte-level Byte Pair Encoding, the tokenizer of every stage.

A language model reads integers, not text. This file, and only this file, turns text into ids and back.

The algorithm, as in the lectures:
  1. Text is UTF-8 bytes, so ids 0..255 are the 256 byte values and any text can be encoded (nothing is "unknown").
  2. Count every adjacent pair of ids in the training text.
  3. Merge the most frequent pair into a new id (256, 257, ...), everywhere.
  4. Repeat until the vocabulary has the size we asked for.
Encoding new text replays the merges in the order they were learned.

Before counting, a regular expression (GPT-2's or GPT-4's) pre-splits the text into words, numbers, punctuation
and whitespace, so that a merge never glues a word to the punctuation after it ("dog." and "dog!" share "dog").
Tie rule: among equally frequent pairs the smallest wins, first id then second: (97, 98) beats (97, 99) and (98, 0).

Two trainers give exactly the same merges:
  train_naive  recounts every pair of the whole text after each merge (readable);
  train_fast   counts each distinct pre-token once, recounts only words a merge touches, takes the top pair off a heap.
Two encoders give exactly the same ids:
  Tokenizer.encode_reference  the merge loop in plain Python (readable);
  Tokenizer.encode            the same merges exported to tiktoken (fast, Rust).
from_vocab loads another BPE (GPT-2's, say) with its own ids; encode_iterable encodes a stream without holding it all.

Special tokens (document separator, chat turn markers, end of turn, reward) get the ids after the merges. They are
never learned, and only `encode(text, allow_special=True)` makes them: plain `encode` reads a typed "<|end|>" as text.

Command line:
  python bpe.py train  --input FILE --vocab-size N --out PATH [--pattern gpt4|gpt2]
  python bpe.py encode --tokenizer PATH "some text"     (shows the pieces)
  python bpe.py decode --tokenizer PATH 72 101 108
"""

import argparse
import collections
import functools
import heapq
import json
import os
import sys
import time

import regex  # the `regex` package (installed with tiktoken): \p{L} classes and possessive quantifiers
import tiktoken

# -----------------------------------------------------------------------------
# Pre-split patterns: tiktoken's own strings, so that the pure-Python split and tiktoken's Rust split cut text alike.

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# Where encode_iterable may cut a stream so that both halves encode to the ids of the whole: next to a "\n" followed
# by a non-space character, which no chunk of either pattern joins to that "\n". GPT-4 ends the whitespace before
# it with the "\n" (" \n" is one chunk): cut after it; GPT-2 leaves it alone (" ", "\n"): before it. Others: no cut.
STREAM_CUT_OFFSET = {GPT4_PATTERN: 1, GPT2_PATTERN: 0}
STREAM_CHARS = 1 << 16  # encode_iterable encodes pieces of at least this many characters

# -----------------------------------------------------------------------------
# Special tokens, reserved in every tokenizer, ids right after the merges in this order; only encode_chat combines them.

DOC_SEP = "<|endoftext|>"      # between documents in pretraining data
USER = "<|user|>"              # starts a user turn
ASSISTANT = "<|assistant|>"    # starts an assistant turn
END_OF_TURN = "<|end|>"        # ends any turn; generation stops here
REWARD = "<|reward|>"          # the reward model reads its score at this token
SPECIAL_TOKENS = [DOC_SEP, USER, ASSISTANT, END_OF_TURN, REWARD]

FORMAT_NAME = "stagegpt-bpe"
FORMAT_VERSION = 1


# -----------------------------------------------------------------------------
# The algorithm in plain loops

def get_pair_counts(ids, counts=None):
    """Count adjacent pairs, summed into `counts` if given: [1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge_pair(ids, pair, new_id):
    """Replace every `pair` in `ids` by `new_id`, scanning left to right: merge_pair([5, 5, 5], (5, 5), 9) -> [9, 5]."""
    merged = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def resolve_pattern(pattern):
    """'gpt2' or 'gpt4' -> the regex string; a regex string is returned as is after checking that it compiles."""
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if not isinstance(pattern, str) or not any(c in pattern for c in "\\|[(?+*"):
        raise ValueError(f"unknown pattern {pattern!r}: use one of {sorted(PATTERNS)} or a regex string")
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regex: {e}") from None
    return pattern


def split_text(text, pattern=GPT4_PATTERN):
    """Pre-split text into the chunks BPE works inside: split_text("Hi there!") -> ['Hi', ' there', '!']. Special-token
    strings are dropped as boundaries (their ids are reserved, never learned): no merge spans a document separator."""
    compiled = regex.compile(resolve_pattern(pattern))
    pieces = regex.split("|".join(map(regex.escape, SPECIAL_TOKENS)), text)  # 'a<|end|>b' -> ['a', 'b']
    return [chunk for piece in pieces if piece for chunk in compiled.findall(piece)]


def _check_num_merges(num_merges):
    if not isinstance(num_merges, int) or num_merges < 0:
        raise ValueError(f"number of merges must be a non-negative integer, got {num_merges!r}")


def train_naive(text, num_merges, pattern=GPT4_PATTERN):
    """The readable trainer: after every merge, count all pairs of the whole text again. Returns the merges
    in creation order, a list of (id, id) pairs; merge i creates id 256 + i. Stops early if no pair is left."""
    _check_num_merges(num_merges)
    chunks = [list(chunk.encode("utf-8")) for chunk in split_text(text, pattern)]
    merges = []
    for _ in range(num_merges):
        counts = {}
        for ids in chunks:
            get_pair_counts(ids, counts)
        if not counts:
            break  # every chunk is a single token
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent; ties: smallest pair
        new_id = 256 + len(merges)
        chunks = [merge_pair(ids, best, new_id) for ids in chunks]
        merges.append(best)
    return merges


def count_words(text, pattern=GPT4_PATTERN):
    """Each distinct pre-token (byte ids) and its count: count_words("a a b") -> {(97,): 1, (32, 97): 1, (32, 98): 1}"""
    return dict(collections.Counter(tuple(chunk.encode("utf-8")) for chunk in split_text(text, pattern)))


def train_fast(text, num_merges, pattern=GPT4_PATTERN, verbose=False):
    """The fast trainer; returns exactly the merges of train_naive. Three ideas make it fast:
      - each distinct pre-token ("word") is stored once with its count: " the" seen 20,000 times is merged once;
      - pair counts are kept up to date: a merge touches only the words that contain its pair (pair_words lists them);
      - the most frequent pair comes from a heap of (-count, pair). Entries go stale when counts change; a popped entry
        whose count is no longer the live count is dropped (lazy deletion)."""
    _check_num_merges(num_merges)
    word_counts = count_words(text, pattern)
    words = [list(w) for w in word_counts]      # word index -> current ids
    freqs = list(word_counts.values())         # word index -> occurrences
    pair_counts = {}                           # pair -> occurrences in the text
    pair_words = {}                            # pair -> indices of words that (may) contain it
    for w, ids in enumerate(words):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + freqs[w]
            pair_words.setdefault(pair, set()).add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges = []
    start = time.time()
    while len(merges) < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count:
            continue  # stale entry: the live count was pushed separately
        new_id = 256 + len(merges)
        changed = {}  # pair -> new count, for pairs whose count moved
        for w in pair_words.pop(pair):
            ids = words[w]
            new_ids = merge_pair(ids, pair, new_id)
            if len(new_ids) == len(ids):
                continue  # stale membership: an earlier merge removed the pair
            for p in zip(ids, ids[1:]):
                pair_counts[p] -= freqs[w]
                changed[p] = pair_counts[p]
            for p in zip(new_ids, new_ids[1:]):
                pair_counts[p] = pair_counts.get(p, 0) + freqs[w]
                changed[p] = pair_counts[p]
                pair_words.setdefault(p, set()).add(w)
            words[w] = new_ids
        for p, count in changed.items():
            if count > 0:
                heapq.heappush(heap, (-count, p))
            else:
                pair_counts.pop(p, None)  # no occurrence left, as for the merged pair itself
        merges.append(pair)
        done = len(merges)
        if verbose and (done % max(1, num_merges // 20) == 0 or done == num_merges):  # about 20 lines in all
            rate = done / max(time.time() - start, 1e-9)
            piece = build_vocab(merges)[-1].decode("utf-8", errors="replace")
            print(f"merge {done:6d}/{num_merges} ({100 * done / num_merges:3.0f}%) {pair} -> {new_id} {piece!r} "
                  f"count {-neg_count} | {rate:,.0f} merges/s, ETA {(num_merges - done) / max(rate, 1e-9):.1f}s",
                  flush=True)
    return merges


def build_vocab(merges):
    """id -> bytes for the 256 bytes and every merge (special tokens excluded)."""
    token_bytes = [bytes([b]) for b in range(256)]
    for a, b in merges:
        token_bytes.append(token_bytes[a] + token_bytes[b])
    return token_bytes


def gpt2_bytes_to_unicode():
    """GPT-2's files spell each byte as a printable character: the 188 printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ')
    as themselves, the other 68 as chr(256 + n) in byte order (32 -> 'Ġ'); a byte's position here is its GPT-2 id."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def encode_chunk(ids, ranks):
    """Apply learned merges to one pre-token, earliest-learned first. `ranks` maps pair -> the id it merges into
    (smaller id = learned earlier): encode_chunk([97, 98, 99], {(97, 98): 256, (256, 99): 257}) -> [257]"""
    ids = list(ids)
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break  # nothing left that was learned
        ids = merge_pair(ids, pair, ranks[pair])
    return ids


# -----------------------------------------------------------------------------
# The tokenizer: merges + pattern + special tokens, with fast and reference paths

class Tokenizer:
    """A trained byte-level BPE tokenizer.

    ids 0..255      the bytes
    ids 256..       one per merge, in creation order
    then            the special tokens, in order (SPECIAL_TOKENS unless given)
    These are the tokens' ranks; a tokenizer from another BPE's vocabulary (from_vocab) gives its ids: ids[rank]."""

    def __init__(self, merges, pattern="gpt4", special_tokens=SPECIAL_TOKENS, ids=None):
        self.pattern = resolve_pattern(pattern)
        self.merges = [tuple(int(x) for x in pair) for pair in merges]
        self.ranks = {pair: 256 + i for i, pair in enumerate(self.merges)}
        self.token_bytes = build_vocab(self.merges)
        self.special_tokens = list(special_tokens or [])
        n = len(self.token_bytes) + len(self.special_tokens)
        self.ids = None if ids is None or list(ids) == list(range(n)) else [int(i) for i in ids]  # None: id = rank
        table = self.ids or range(n)
        if len(table) != n or len(set(table)) != n or min(table) < 0:
            raise ValueError(f"the id table needs {n} distinct ids >= 0: one per byte, merge and special token")
        self.vocab = dict(zip(table, self.token_bytes + [s.encode() for s in self.special_tokens]))  # id -> bytes
        self.special_ids = {s: table[len(self.token_bytes) + k] for k, s in enumerate(self.special_tokens)}
        self.vocab_size = max(table) + 1
        self._regex = regex.compile(self.pattern)
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._specials = regex.compile("(" + "|".join(map(regex.escape, longest_first)) + ")")  # see _around_specials

    # --- fast path (tiktoken) ---------------------------------------------
    def to_tiktoken(self, name="stagegpt"):
        """The same tokenizer as a tiktoken.Encoding: every byte string ranked by merge order (bytes, then merges),
        specials after them. Its ids are the ranks, which encode() maps to ids (the same unless from_vocab)."""
        mergeable_ranks = {b: i for i, b in enumerate(self.token_bytes)}
        if len(mergeable_ranks) != len(self.token_bytes):
            raise ValueError("two ids share one byte string; tiktoken cannot represent this tokenizer")
        n = len(self.token_bytes)
        return tiktoken.Encoding(name=name, pat_str=self.pattern, mergeable_ranks=mergeable_ranks,
                                 special_tokens={s: n + k for k, s in enumerate(self.special_tokens)},
                                 explicit_n_vocab=n + len(self.special_tokens))

    @functools.cached_property
    def encoding(self):
        """The tiktoken.Encoding, built on first use."""
        return self.to_tiktoken()

    def encode(self, text, allow_special=False):
        """Text -> ids (tiktoken); special-token strings stay text unless allow_special=True (never for user text)."""
        if allow_special and self.special_tokens:
            return self._around_specials(text, self.encode)
        return self._own_ids(self.encoding.encode_ordinary(text))

    def _around_specials(self, text, encode_plain):
        """encode_plain() on the text between special-token strings, their ids between:
        "a<|end|>b" -> encode_plain("a") + [id of <|end|>] + encode_plain("b"). Split here, not by
        tiktoken, so that where special tokens overlap the longest wins ("<|a|><|a|>" over "<|a|>")."""
        parts = self._specials.split(text)  # odd positions are the special tokens
        return [i for k, part in enumerate(parts) for i in ([self.special_ids[part]] if k % 2 else encode_plain(part))]

    def _own_ids(self, ranks):
        return ranks if self.ids is None else [self.ids[r] for r in ranks]

    def encode_iterable(self, lines, allow_special=False):
        """Yields the ids of "".join(lines) while the text streams in (an open file, say), holding only
        a piece of it: the text is encoded up to its last safe cut (STREAM_CUT_OFFSET), the rest waits
        for more. A text with no safe cut yet (no line breaks) is held until it has one or ends."""
        if self.pattern not in STREAM_CUT_OFFSET or allow_special and any("\n" in s for s in self.special_tokens):
            raise ValueError("encode_iterable cuts only gpt2 or gpt4 text, no special token with a line break: use encode")
        pending, size, limit = [], 0, STREAM_CHARS
        for line in lines:
            pending.append(line)
            size += len(line)
            if size >= limit:
                text = "".join(pending)
                cut = self._stream_cut(text, allow_special)
                yield from self.encode(text[:cut], allow_special)
                pending, size = [text[cut:]], len(text) - cut
                limit = max(STREAM_CHARS, 2 * size)  # no cut found: wait for twice the text (linear time)
        yield from self.encode("".join(pending), allow_special)

    def _stream_cut(self, text, allow_special):
        """The last index where `text` can be cut without changing its ids, or 0: at a line break followed
        by a non-space character that starts no special token, even in part (a special token ends the
        text before it, as a cut does), after the break (gpt4) or before it (gpt2)."""
        i, specials = text.rfind("\n", 0, len(text) - 1), self.special_tokens if allow_special else []
        while i >= 0 and (text[i + 1].isspace() or any(s.startswith(text[i + 1:i + 1 + len(s)]) for s in specials)):
            i = text.rfind("\n", 0, i)
        return max(i + STREAM_CUT_OFFSET[self.pattern], 0)

    # --- reference path (plain Python) --------------------------------------
    def encode_reference(self, text, allow_special=False):
        """Text -> ids with the plain-Python merge loop. Same ids as encode()."""
        if allow_special and self.special_tokens:
            return self._around_specials(text, self.encode_reference)
        chunks = self._regex.findall(text)
        return self._own_ids([i for chunk in chunks for i in encode_chunk(chunk.encode("utf-8"), self.ranks)])

    # --- decoding ------------------------------------------------------------
    def decode_bytes(self, ids):
        """ids -> the raw bytes they stand for (special tokens as their strings)."""
        try:
            return b"".join(self.vocab[int(i)] for i in ids)
        except KeyError as bad:
            raise ValueError(f"token id {bad} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1})") from None

    def decode(self, ids):
        """ids -> text. Ids that cut a multi-byte character in half decode to U+FFFD (replacement), not an error."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def pieces(self, ids):
        """The text of each id on its own, for showing how text was cut."""
        return [self.decode_bytes([i]).decode("utf-8", errors="replace") for i in ids]

    # --- chat template -------------------------------------------------------
    def encode_chat(self, prompt, response=None, ended=True):
        """The one chat template of stagegpt: <|user|> prompt <|end|> <|assistant|> response <|end|>
        Returns (prompt_ids, response_ids); response_ids is [] when response is None (a prompt waiting for the
        model's answer); ended=False leaves out the response's end-of-turn token (a response cut at a length
        limit). User and model text are encoded as plain text, so "<|end|>" typed by a user stays characters."""
        sid = self.special_ids
        if missing := [s for s in (USER, END_OF_TURN, ASSISTANT) if s not in sid]:
            raise ValueError(f"this tokenizer has no {missing[0]} token: the chat template needs {USER}, "
                             f"{END_OF_TURN} and {ASSISTANT} among its special tokens")
        prompt_ids = [sid[USER]] + self.encode(prompt) + [sid[END_OF_TURN], sid[ASSISTANT]]
        response_ids = [] if response is None else self.encode(response) + ([sid[END_OF_TURN]] if ended else [])
        return prompt_ids, response_ids

    # --- save / load -------------------------------------------------------------
    def to_dict(self):
        """A plain dict (str, int, list only) that a checkpoint can embed and torch.load(weights_only=True) reads."""
        if len(self.vocab) > len(self.token_bytes) + len(self.special_tokens):
            raise ValueError("vocab ids that no merge makes (from_vocab) cannot be saved: keep the vocab and merges")
        d = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "pattern": self.pattern,
             "merges": [list(pair) for pair in self.merges], "special_tokens": dict(self.special_ids)}
        return d | ({} if self.ids is None else {"ids": self.ids})  # the id table, only when ids are not ranks

    @classmethod
    def from_dict(cls, d, source="tokenizer dict"):
        """Inverse of to_dict; checks every field and names what is wrong."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise ValueError(f"{source} is not a stagegpt tokenizer (no 'format': '{FORMAT_NAME}')")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source} has format version {d.get('version')!r}; this bpe.py reads version {FORMAT_VERSION}")
        merges = d.get("merges")
        if not isinstance(merges, list):
            raise ValueError(f"{source}: 'merges' must be a list of [id, id] pairs")
        for i, pair in enumerate(merges):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(isinstance(x, int) and 0 <= x < 256 + i for x in pair)):
                raise ValueError(f"{source}: merge {i} is {pair!r}; each merge must be two ids below {256 + i}")
        specials, ids = d.get("special_tokens"), d.get("ids")
        ids_ok = ids is None or isinstance(ids, list) and all(type(i) is int for i in ids)
        if not isinstance(specials, dict) or not ids_ok:
            raise ValueError(f"{source}: 'special_tokens' must be a dict {{string: id}} and 'ids' a list of ids")
        try:
            tok = cls(merges, d.get("pattern"), list(specials), ids)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        if specials != tok.special_ids:
            raise ValueError(f"{source}: special tokens {specials!r} do not match the expected {tok.special_ids!r}")
        if len(set(tok.token_bytes)) != len(tok.token_bytes):
            raise ValueError(f"{source}: two merges produce the same bytes")
        return tok

    def save(self, path):
        """Write a small human-readable JSON file (one merge per line) atomically: a temp file renamed over `path`."""
        head = "".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},\n"
                       for k, v in self.to_dict().items() if k != "merges")
        merges = ",\n".join(f"    [{a}, {b}]" for a, b in self.merges)
        text = "{\n" + head + '  "merges": [' + (f"\n{merges}\n  " if merges else "") + "]\n}\n"
        if os.path.exists(path) and not os.path.isfile(path):  # a folder or a device (/dev/null) is never replaced
            raise OSError(None, "is not a file (a folder or a device): give a file's path", path)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:  # a read-only folder, a full disk: the error names the file meant, not its temporary
            raise OSError(e.errno, e.strerror, path) from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path):
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path} does not exist: train one with "
                             f"`python bpe.py train --input FILE --vocab-size N --out {path}`")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"tokenizer file {path} is corrupt (not valid JSON: {e}); retrain it") from None
        return cls.from_dict(d, source=f"tokenizer file {path}")

    # --- another BPE's vocabulary ---------------------------------------------------
    @classmethod
    def from_vocab(cls, vocab, merges, special_tokens=SPECIAL_TOKENS, pattern="gpt2"):
        """A tokenizer that encodes to another BPE's ids: vocab {id: bytes}, merges [(bytes, bytes)] in learned order.
        A special token keeps its id if the vocab has its bytes, else takes the next free id. Vocab ids no byte, merge
        or special token makes only decode (cannot be saved). `pattern`: the merges' pre-split, GPT-2's by default."""
        vocab_id = {b: i for i, b in vocab.items()}
        for s in special_tokens or []:
            vocab_id.setdefault(s.encode("utf-8"), max(vocab_id.values(), default=-1) + 1)
        rank, pairs = {bytes([b]): b for b in range(256)}, []
        for k, (a, b) in enumerate(merges):
            if a not in rank or b not in rank:
                raise ValueError(f"merge {k} {(a, b)!r} joins bytes that no byte or earlier merge makes")
            pairs.append((rank[a], rank[b]))
            rank[a + b] = 256 + k
        by_rank = build_vocab(pairs) + [s.encode("utf-8") for s in special_tokens or []]
        if missing := [t for t in by_rank if t not in vocab_id]:
            raise ValueError(f"{missing[0]!r}, a byte or a merge's result, has no id in the vocab")
        tok = cls(pairs, pattern, special_tokens, [vocab_id[t] for t in by_rank])
        tok.vocab = {i: vocab[i] for i in set(vocab) - set(tok.vocab)} | tok.vocab  # ids no merge makes: decode only
        tok.vocab_size = max(tok.vocab) + 1
        return tok

    @classmethod
    def from_gpt2_files(cls, vocab_json_path, merges_txt_path, special_tokens=SPECIAL_TOKENS):
        """GPT-2's files: vocab.json {string: id} and merges.txt ("#version" line, then "a b" per merge),
        their strings spelling bytes with gpt2_bytes_to_unicode."""
        byte_of = {c: b for b, c in gpt2_bytes_to_unicode().items()}
        def to_bytes(s):
            if bad := [c for c in s if c not in byte_of]:
                raise ValueError(f"{vocab_json_path}, {merges_txt_path}: {s!r} has {bad[0]!r}, "
                                 f"which spells no byte in GPT-2's table")
            return bytes(byte_of[c] for c in s)
        with open(vocab_json_path, encoding="utf-8") as f:
            vocab = {i: to_bytes(s) for s, i in json.load(f).items()}
        with open(merges_txt_path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip() and not line.startswith("#version")]
        merges = [tuple(map(to_bytes, line.split())) for line in lines]
        return cls.from_vocab(vocab, merges, special_tokens, "gpt2")


def min_vocab_size():
    """256 byte tokens + the special tokens: the smallest possible vocabulary."""
    return 256 + len(SPECIAL_TOKENS)


def train_tokenizer(text, vocab_size, pattern="gpt4", trainer="fast", verbose=False):
    """Train a Tokenizer of `vocab_size` ids (bytes + merges + specials), fewer if the text runs out of pairs."""
    if not isinstance(vocab_size, int) or vocab_size < min_vocab_size():
        raise ValueError(f"vocab size {vocab_size} is too small: it must be at least {min_vocab_size()} "
                         f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    if not text:
        raise ValueError("training text is empty: give at least some text to learn merges from")
    pattern_str = resolve_pattern(pattern)
    num_merges = vocab_size - min_vocab_size()
    if trainer == "fast":
        merges = train_fast(text, num_merges, pattern_str, verbose=verbose)
    elif trainer == "naive":
        merges = train_naive(text, num_merges, pattern_str)
    else:
        raise ValueError(f"unknown trainer {trainer!r}: use 'fast' or 'naive'")
    if verbose and len(merges) < num_merges:
        print(f"the text ran out of pairs after {len(merges)} merges: "
              f"vocabulary is {len(merges) + min_vocab_size()}, not {vocab_size}")
    return Tokenizer(merges, pattern_str)


# -----------------------------------------------------------------------------
# Command line

def read_text_file(path):
    """A UTF-8 text file's content, or one clear error naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"input file {path} {'is a folder' if os.path.isdir(path) else 'does not exist'}: "
                         f"give the path of a UTF-8 text file")
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise ValueError(f"input file {path} is empty: give a text file with something to learn from")
    if b"\x00" in data:
        raise ValueError(f"input file {path} looks binary (it contains NUL bytes): give a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"input file {path} is not UTF-8 text ({e.reason} at byte {e.start}): "
                         f"convert it to UTF-8 first") from None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bpe.py", description="Byte-level BPE tokenizer: train, encode, decode.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="learn merges from a text file")
    p_train.add_argument("--input", required=True, help="UTF-8 text file to learn from")
    p_train.add_argument("--vocab-size", type=int, required=True,
                         help=f"total ids: 256 bytes + merges + {len(SPECIAL_TOKENS)} specials")
    p_train.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    p_train.add_argument("--pattern", default="gpt4", help="pre-split regex: gpt4 (default), gpt2, or a regex")
    p_train.add_argument("--trainer", default="fast", choices=["fast", "naive"])
    p_enc = sub.add_parser("encode", help="show how a text is cut into tokens")
    p_enc.add_argument("--tokenizer", required=True)
    p_enc.add_argument("--allow-special", action="store_true", help="turn special-token strings into their ids")
    p_enc.add_argument("text")
    p_dec = sub.add_parser("decode", help="turn ids back into text")
    p_dec.add_argument("--tokenizer", required=True)
    p_dec.add_argument("ids", nargs="+", type=int)
    args = parser.parse_args(argv)

    try:
        if args.command == "train":
            text = read_text_file(args.input)
            resolve_pattern(args.pattern)  # fail before the slow part
            t0 = time.time()
            tok = train_tokenizer(text, args.vocab_size, args.pattern, args.trainer, verbose=True)
            tok.save(args.out)
            print(f"trained {len(tok.merges)} merges on {len(text.encode('utf-8')):,} bytes in "
                  f"{time.time() - t0:.2f}s; vocabulary {tok.vocab_size}; saved {args.out}")
        elif args.command == "encode":
            tok = Tokenizer.load(args.tokenizer)
            ids = tok.encode(args.text, allow_special=args.allow_special)
            for i, piece in zip(ids, tok.pieces(ids)):
                print(f"{i:6d}  {piece!r}")
            n_bytes = len(args.text.encode("utf-8"))
            print(f"{len(ids)} tokens for {n_bytes} bytes ({n_bytes / max(len(ids), 1):.2f} bytes/token)")
        elif args.command == "decode":
            print(Tokenizer.load(args.tokenizer).decode(args.ids))
    except ValueError as e:
        print(f"bpe.py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the machine's mistake (a read-only folder, a full disk), named in one line
        print(f"bpe.py: error: {e.filename}: {e.strerror or e} (check that its folder exists, is writable and has room)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
