"""prepare_data.py: the data of every stage, from raw text to preference pairs.

Every later stage learns from the files this script writes into data/NAME/:

    tokenizer.json          the BPE tokenizer (bpe.py), trained on train.txt
    train.bin, val.bin      token ids (uint16, or uint32 above 65,536 ids), each document then <|endoftext|>
    train.txt, val.txt      the same text, to read with your own eyes
    meta.json               what was built, from what, with which arguments
    sft_train/val.jsonl     prompt/response demonstrations         (sft.py)
    prefs_train/val.jsonl   prompt, chosen, rejected               (reward.py)
    prompts_ppo/eval.jsonl  prompts with references                (ppo.py, eval.py)
    mc.jsonl                4-way multiple choice, HellaSwag-style (eval.py)

With no arguments: tinyworld (tinyworld.py: generated offline from a seed, answers a program can check). Real corpora
are downloaded once and parsed into the same files: tinyshakespeare and TinyStories (pretraining), Alpaca (SFT),
Anthropic HH-RLHF (preferences), HellaSwag (multiple choice); or any text file (--input). Raw text is curated as the
lectures teach it: exact duplicates, repeated and boilerplate lines, C4-style quality, MinHash near-duplicates, privacy.
"""

import argparse
import collections
import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import pathlib
import re
import sys
import time
import zlib

import numpy as np
import requests

import bpe
import tinyworld


# -----------------------------------------------------------------------------
# Configuration

FORMAT_VERSION = 3                # bump when the files' layout or content rules change
DATA_ROOT = "data"                # every dataset lives in DATA_ROOT/NAME/
DOWNLOAD_DIR = "downloads"        # raw downloads are cached in DATA_ROOT/downloads/
CHECKSUMS_FILE = "checksums.json" # sha256 recorded on first download (unpinned files)
MIRROR_ENV = "STAGEGPT_MIRROR"    # base URL that replaces every source's host (tests, offline mirrors)

# The datasets this script knows. "vocab_size", the default BPE vocabulary, is a ceiling for tinyworld (its closed
# vocabulary runs out of merges first); small for shakespeare and --input: a megabyte cannot teach rare tokens.
DATASETS = {
    "tinyworld":   {"kind": "generated", "vocab_size": 2048, "val_fraction": 0.05},
    "shakespeare": {"kind": "pretrain", "sources": ["shakespeare"], "vocab_size": 1024, "val_fraction": 0.10},
    "tinystories": {"kind": "pretrain", "sources": ["tinystories"], "vocab_size": 2048, "val_fraction": 0.05},
    "alpaca":      {"kind": "sft", "sources": ["alpaca"]},
    "hh":          {"kind": "prefs", "sources": ["hh_train", "hh_test"]},
    "hellaswag":   {"kind": "mc", "sources": ["hellaswag"]},
}
INPUT_SPEC = {"kind": "pretrain", "vocab_size": 1024, "val_fraction": 0.10}   # --input FILE
REAL_SIZES = {"prompts_eval": 200, "prompts_ppo": 1000, "sft_val": 500, "prefs_val": 2000}  # real sets; rest: *_train
SIZE_FIELDS = list(tinyworld.SPLIT_SIZES) + ["mc"]  # instruction files' sizes: no flags, tests build small datasets
PRETRAIN_FILES = ["tokenizer.json", "train.bin", "val.bin", "train.txt", "val.txt"]
CHUNK_CHARS = 4000  # long texts (shakespeare, --input) are cut into documents of about this size

GITHUB, HUGGINGFACE = "https://raw.githubusercontent.com/", "https://huggingface.co/datasets/"
HH = HUGGINGFACE + "Anthropic/hh-rlhf/resolve/main/helpful-base/"
SOURCES = {  # name: {url, the cache's file name, sha256 where pinned, else recorded at the first download}
    "shakespeare": {"url": GITHUB + "karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    "filename": "tinyshakespeare.txt",
                    "sha256": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"},
    "tinystories": {"url": HUGGINGFACE + "roneneldan/TinyStories/resolve/main/TinyStories-valid.txt",
                    "filename": "TinyStories-valid.txt"},
    "alpaca": {"url": GITHUB + "tatsu-lab/stanford_alpaca/main/alpaca_data.json", "filename": "alpaca_data.json"},
    "hh_train": {"url": HH + "train.jsonl.gz", "filename": "hh-helpful-base-train.jsonl.gz"},
    "hh_test": {"url": HH + "test.jsonl.gz", "filename": "hh-helpful-base-test.jsonl.gz"},
    "hellaswag": {"url": GITHUB + "rowanz/hellaswag/master/data/hellaswag_val.jsonl", "filename": "hellaswag_val.jsonl"},
}
DOWNLOAD_TIMEOUT_S, DOWNLOAD_RETRIES, DOWNLOAD_BACKOFF_S = 30.0, 3, 1.0  # backoff: 1 s, 2 s, 4 s ... between tries

# Curation
NEAR_DUP_THRESHOLD = 0.8   # MinHash estimate of Jaccard similarity above which a document is dropped
SHINGLE_WORDS, MINHASH_PERMS, MINHASH_BANDS = 5, 64, 16  # word 5-grams; signature length; LSH bands of 4 rows
MIN_WORDS, MIN_SENTENCES, MIN_LETTER_FRACTION = 5, 2, 0.6  # quality: a document's least words, sentences, letter share
MIN_DUP_LINE_CHARS = 50    # only lines at least this long count as repeated lines
BOILERPLATE_LINE_PHRASES = ["javascript", "cookie policy", "privacy policy", "terms of use",
                            "all rights reserved", "subscribe to", "click here"]
BOILERPLATE_DOC_PHRASES = ["lorem ipsum"]
EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
IP_RE = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
PHONE_RE = re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?!\w|\.\d)")

# Small helpers used everywhere
class DataError(Exception):
    """A problem with the input that the user can fix: reported as one line."""


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pid_alive(pid):
    """Whether process pid still runs: a lock or a temporary file of one that has ended is stale."""
    if os.name == "nt":  # Windows has no signal 0 (os.kill would stop the process): every such file counts as stale
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def atomic_write(path, data):
    """Bytes, str (UTF-8) or a writer f(file) -> path via a synced temporary renamed over it: never half a file."""
    if os.path.exists(path) and not os.path.isfile(path):  # a folder or a device (/dev/null) is never replaced
        raise OSError(None, "is not a file (a folder or a device): give a file's path", path)
    if callable(data):  # the writer fills memory first: a full disk is then an OSError (torch.save reports its own)
        data(buffer := io.BytesIO())
        data = buffer.getvalue()
    data = data.encode("utf-8") if isinstance(data, str) else data
    folder, tmp = os.path.dirname(os.path.abspath(path)), f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(glob.escape(path) + ".tmp*"):  # temporaries that killed writers left
            if stale[len(path) + 4:].isdigit() and not pid_alive(int(stale[len(path) + 4:])):
                os.remove(stale)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):  # POSIX: the rename is on disk once the folder is
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
    except OSError as e:  # a read-only folder, a full disk: the file meant is named, not its temporary
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def error_line(e):
    """A user's error as one line: its message, or for an OSError the file, what went wrong and what to check."""
    if not isinstance(e, OSError):
        return str(e)
    return (f"{e.filename or 'a file'}: {e.strerror or e} (check that its folder exists, is writable and has room; "
            f"every file written before is whole)")


def write_jsonl(path, records):
    """One JSON object per line, UTF-8, keys in the order given."""
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path):
    """All records of a JSONL file (every stage reads its data through this); a bad line is an error naming it."""
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


def log(msg, quiet=False):
    if not quiet:
        print(f"[prepare_data] {msg}", flush=True)


# -----------------------------------------------------------------------------
# The real corpora: one download function for all, then a parser for each, into tinyworld's shapes.

def source_url(name, mirror=None):
    """The URL of a source; with a mirror (flag or $STAGEGPT_MIRROR): the mirror + the cache file name."""
    mirror = mirror or os.environ.get(MIRROR_ENV)
    return mirror.rstrip("/") + "/" + SOURCES[name]["filename"] if mirror else SOURCES[name]["url"]


def read_checksums(folder):
    try:
        return json.loads(pathlib.Path(folder, CHECKSUMS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def download(url, path, sha256=None, timeout=DOWNLOAD_TIMEOUT_S, retries=DOWNLOAD_RETRIES,
             backoff=DOWNLOAD_BACKOFF_S, quiet=False):
    """Fetch `url` into `path` once, written whole, and return `path`; no network when `path` matches its sha256
    (pinned, or recorded in checksums.json). Network errors, timeouts, 5xx and cut transfers are retried after backoff,
    2 x backoff, ... seconds; 4xx (404) are not. A failure is a DataError naming the URL and how to fetch it by hand."""
    folder, filename = os.path.split(os.path.abspath(path))
    sums = read_checksums(folder)
    expected = sha256 or sums.get(filename)
    if os.path.exists(path):
        if expected is None or sha256_file(path) == expected:
            return path
        log(f"{path} does not match its sha256; downloading it again", quiet)
        os.remove(path)
    by_hand = f"if you are offline, download {url} by hand and save it as {path}"
    error, body = None, None
    for attempt in range(1, retries + 1):
        log(f"downloading {url} (try {attempt}/{retries})", quiet)
        try:  # the plain body (no gzip), to check its length against Content-Length
            with requests.get(url, stream=True, timeout=timeout, headers={"Accept-Encoding": "identity"}) as r:
                r.raise_for_status()
                announced = int(r.headers.get("Content-Length") or 0)
                body = b"".join(r.iter_content(chunk_size=1 << 16))
            if not announced or len(body) == announced:
                break
            error, body = f"got {len(body)} of {announced} bytes", None  # the server closed the connection early
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            error = f"HTTP {status}"
            if 400 <= status < 500 and status not in (408, 429):
                break  # the file is not there: asking again will not help
        except requests.Timeout:
            error = f"no answer within {timeout:g} s"
        except requests.RequestException as e:
            error = type(e).__name__
        if attempt < retries:
            time.sleep(backoff * 2 ** (attempt - 1))
    if body is None:
        raise DataError(f"could not download {url} ({error}); {by_hand}")
    digest = hashlib.sha256(body).hexdigest()
    if expected and digest != expected:
        raise DataError(f"checksum mismatch for {url}: sha256 {digest}, expected {expected}; "
                        f"the download was deleted. Check the URL, or {by_hand}")
    atomic_write(path, body)
    if not sha256:
        sums[filename] = digest
        atomic_write(os.path.join(folder, CHECKSUMS_FILE), json.dumps(sums, indent=2, sort_keys=True) + "\n")
    log(f"saved {path} ({len(body):,} bytes, sha256 {digest[:12]}...)", quiet)
    return path


def fetch_all(cfg):
    """The --input file, or the dataset's sources downloaded (or found in the cache): (paths, meta: URLs and sha256)."""
    if cfg.input:
        return [cfg.input], {"source": os.path.abspath(cfg.input), "source_sha256": sha256_file(cfg.input)}
    sources = DATASETS[cfg.dataset]["sources"]
    paths = [download(source_url(s, cfg.mirror), os.path.join(cfg.data_root, DOWNLOAD_DIR, SOURCES[s]["filename"]),
                      sha256=SOURCES[s].get("sha256"), quiet=cfg.quiet) for s in sources]
    urls, sums = [source_url(s, cfg.mirror) for s in sources], [sha256_file(p) for p in paths]
    return paths, {"source": urls if len(urls) > 1 else urls[0], "source_sha256": sums if len(sums) > 1 else sums[0]}


def read_text(path):
    """A UTF-8 text file's content; missing, empty or binary files are a DataError."""
    try:
        return bpe.read_text_file(path)
    except ValueError as e:
        raise DataError(str(e)) from None


def read_maybe_gzip(path):
    data = pathlib.Path(path).read_bytes()
    return (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8")


def chunk_text(text, target_chars=CHUNK_CHARS):
    """One long text cut into documents of about target_chars, at blank lines (any line break past 4 x)."""
    docs, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if (size >= target_chars and not line.strip()) or size >= 4 * target_chars:
            docs.append("".join(current).strip("\n"))
            current, size = [], 0
    docs.append("".join(current).strip("\n"))
    return [d for d in docs if d.strip()]


def parse_tinystories(text):
    """TinyStories: stories separated by <|endoftext|>."""
    return [s.strip() for s in text.split(bpe.DOC_SEP) if s.strip()]


def task_fields(task, prompt, reference):
    """The fields every prompt record shares with tinyworld's (open tasks: no answer kind)."""
    return {"task": task, "prompt": prompt, "context": "", "reference": reference, "answer_kind": "open",
            "given": [], "options": [], "reference_response": reference}


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
            records.append(dict(task_fields("alpaca", prompt, output), response=output, quality="human"))
    return records


def split_hh_turns(dialogue):
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [("Human", "hi"), ("Assistant", "hello")]."""
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + dialogue.lstrip("\n"))
    return [(who, said.strip()) for who, said in zip(parts[1::2], parts[2::2])]


def parse_hh(text):
    """HH-RLHF JSONL -> {prompt, chosen, rejected} of single-turn dialogues: stagegpt's chat template has one turn."""
    pairs = []
    for item in map(json.loads, filter(str.strip, text.splitlines())):
        chosen, rejected = split_hh_turns(item["chosen"]), split_hh_turns(item["rejected"])
        if len(rejected) != 2 or [w for w, _ in chosen] != ["Human", "Assistant"] or chosen[0][1] != rejected[0][1]:
            continue
        prompt, good, bad = chosen[0][1], chosen[1][1], rejected[1][1]
        if prompt and good != bad:
            pairs.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return pairs


def parse_hellaswag(text):
    """HellaSwag JSONL -> multiple-choice records (endings start with a space)."""
    return [{"task": "hellaswag", "context": item["ctx"], "endings": [" " + e.strip() for e in item["endings"]],
             "label": int(item["label"])} for item in map(json.loads, filter(str.strip, text.splitlines()))]


# -----------------------------------------------------------------------------
# Curation. Each step takes documents and returns (documents, a report of what it removed).

def dedup_documents(docs):
    """Exact duplicates (ignoring surrounding whitespace): keep the first copy."""
    first = {}
    for d in docs:  # keyed by the text's hash: the corpus is not held twice
        first.setdefault(hashlib.sha256(d.strip().encode("utf-8")).digest(), d)
    out = list(first.values())
    return out, {"step": "dedup_documents", "removed_docs": len(docs) - len(out)}


def drop_lines(docs, drop, step):
    """The documents without the lines for which drop(line) is true; emptied documents go too."""
    out, removed_lines = [], 0
    for d in docs:
        lines = d.split("\n")
        kept = [line for line in lines if not drop(line)]
        removed_lines += len(lines) - len(kept)
        if any(line.strip() for line in kept):
            out.append("\n".join(kept).strip("\n"))
    return out, {"step": step, "removed_lines": removed_lines, "removed_docs": len(docs) - len(out)}


def dedup_lines(docs, min_chars=MIN_DUP_LINE_CHARS):
    """Lines (min_chars or longer) seen earlier in the corpus go: repeated footers and headers."""
    seen = set()
    def repeated(line):
        key = line.strip()
        found = len(key) >= min_chars and key in seen
        seen.add(key)
        return found
    return drop_lines(docs, repeated, "dedup_lines")


def filter_boilerplate_lines(docs, phrases=BOILERPLATE_LINE_PHRASES):
    """C4's line rule: drop lines that mention javascript, policies, 'subscribe to'..."""
    return drop_lines(docs, lambda line: any(p in line.lower() for p in phrases), "filter_boilerplate_lines")


def quality_problem(doc):
    """Why a document fails the C4-style quality rules, or None if it passes."""
    if any(p in doc.lower() for p in BOILERPLATE_DOC_PHRASES):
        return "boilerplate"
    chars = [c for c in doc if not c.isspace()]
    if not chars or sum(c.isalpha() for c in chars) / len(chars) < MIN_LETTER_FRACTION:
        return "few_letters"
    if len(doc.split()) < MIN_WORDS:
        return "too_few_words"
    if len(re.findall(r"[.!?]+(?=\s|$|[\"'])", doc)) < MIN_SENTENCES:
        return "too_few_sentences"
    return None


def quality_filter(docs):
    """Drop the documents quality_problem rejects; the report counts each reason."""
    problems = [quality_problem(d) for d in docs]
    out = [d for d, problem in zip(docs, problems) if problem is None]
    reasons = dict(collections.Counter(problem for problem in problems if problem))
    return out, {"step": "quality_filter", "removed_docs": len(docs) - len(out), "reasons": reasons}


def shingles(text, n=SHINGLE_WORDS):
    """The set of word n-grams of a text (lowercase, split on whitespace); a shorter text is one shingle."""
    words = text.lower().split()
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


def minhash_signature(shingle_set, num_perm=MINHASH_PERMS, seed=0):
    """The MinHash signature of a set, shape (num_perm,) uint64: per hash function, the smallest hash over the set; two
    sets agree at a position with probability = their Jaccard similarity. h(x) = ((a*x + b) mod 2^64) >> 32."""
    g = np.random.default_rng(seed)
    a = g.integers(1, 1 << 63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = g.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
    if not shingle_set:
        return np.full(num_perm, 1 << 32, dtype=np.uint64)  # above every real hash
    x = np.array([zlib.crc32(s.encode("utf-8")) for s in shingle_set], dtype=np.uint64)  # stable 32-bit keys
    with np.errstate(over="ignore"):
        h = (x[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)  # (shingles, num_perm)
    return h.min(axis=0)


def estimated_jaccard(sig_a, sig_b):
    """Share of positions where two MinHash signatures agree."""
    return float(np.mean(sig_a == sig_b))


def near_dedup(docs, threshold=NEAR_DUP_THRESHOLD, num_perm=MINHASH_PERMS, bands=MINHASH_BANDS):
    """Drop documents whose estimated Jaccard similarity (MinHash of shingles) to an earlier kept one is at
    least `threshold`. LSH: only documents sharing a band (num_perm/bands signature values) are compared."""
    rows = num_perm // bands
    buckets, kept = {}, []  # (band, its values) -> the signatures of the kept documents that share it
    for d in docs:
        sig = minhash_signature(shingles(d), num_perm)
        keys = [(i, sig[i * rows:(i + 1) * rows].tobytes()) for i in range(bands)]
        if not any(estimated_jaccard(sig, other) >= threshold for key in keys for other in buckets.get(key, [])):
            for key in keys:
                buckets.setdefault(key, []).append(sig)
            kept.append(d)
    return kept, {"step": "near_dedup", "removed_docs": len(docs) - len(kept), "threshold": threshold}


def redact_pii(text):
    """(text, counts): e-mails, IP addresses, phone numbers -> [EMAIL], [IP], [PHONE] (e-mails first: digits)."""
    counts = {}
    for kind, pattern in [("email", EMAIL_RE), ("ip", IP_RE), ("phone", PHONE_RE)]:
        text, counts[kind] = pattern.subn(f"[{kind.upper()}]", text)
    return text, counts


def redact_fields(records, fields):
    """Privacy redaction of some text fields of records (dicts), in place; returns the counts."""
    total = collections.Counter(email=0, ip=0, phone=0)
    for r in records:
        for f in fields:
            if isinstance(r.get(f), str):
                r[f], counts = redact_pii(r[f])
                total.update(counts)
    return dict(total)


def redact_documents(docs):
    records = [{"text": d} for d in docs]
    total = redact_fields(records, ["text"])
    return [r["text"] for r in records], {"step": "redact_pii", "removed_docs": 0, "redacted": total}


def curate(docs, quiet=False):
    """All curation steps in order; returns (documents, reports)."""
    log(f"curating {len(docs):,} documents", quiet)
    reports = []
    for step in [dedup_documents, dedup_lines, filter_boilerplate_lines, quality_filter, near_dedup, redact_documents]:
        t0, before = time.time(), len(docs)
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
    """The last val_fraction of the documents (at least one) are validation; a single one is cut at a line break."""
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1 - val_fraction))
        cut = max(text.rfind("\n", 0, cut), 0) or cut  # at the last line break before it, if any
        docs = [d for d in (text[:cut].strip("\n"), text[cut:].strip("\n")) if d]
    if len(docs) < 2:
        raise DataError("the corpus is too small to split into train and validation: give more text")
    n_val = min(len(docs) - 1, max(1, int(round(len(docs) * val_fraction))))
    return docs[:-n_val], docs[-n_val:]


def encode_documents(tokenizer, docs, dtype):
    """All documents as one array of ids, each followed by <|endoftext|> (a model learns to start over after it).
    The ids stream into the array (encode_iterable, a document at a time, so text that looks like a special token
    stays text): a corpus's ids held as Python ints would take far more memory than the corpus."""
    per_doc = (itertools.chain(tokenizer.encode_iterable([d]), [tokenizer.special_ids[bpe.DOC_SEP]]) for d in docs)
    return np.fromiter(itertools.chain.from_iterable(per_doc), dtype=dtype)  # flattened in C: no Python step per id


def write_pretraining_files(cfg, docs):
    """Documents -> tokenizer.json (trained on the train split, or cfg.tokenizer), .bin and .txt; the meta fields."""
    train_docs, val_docs = split_train_val(docs, dataset_spec(cfg)["val_fraction"])
    t0 = time.time()
    try:
        if cfg.tokenizer:
            tok = bpe.Tokenizer.load(cfg.tokenizer)
            log(f"using the tokenizer {cfg.tokenizer} ({tok.vocab_size} ids)", cfg.quiet)
        else:
            text = bpe.DOC_SEP.join(train_docs)
            log(f"training BPE: vocabulary {cfg.vocab_size}, pattern {cfg.pattern}, "
                f"on {len(text.encode('utf-8')):,} bytes", cfg.quiet)
            tok = bpe.train_tokenizer(text, cfg.vocab_size, pattern=cfg.pattern)
            log(f"  {len(tok.merges)} merges in {time.time() - t0:.1f}s", cfg.quiet)
    except ValueError as e:
        raise DataError(str(e)) from None
    tok.save(os.path.join(cfg.out, "tokenizer.json"))
    dtype = token_dtype(tok.vocab_size)
    meta = {"vocab_size": tok.vocab_size, "vocab_size_requested": cfg.vocab_size, "dtype": np.dtype(dtype).name,
            "pattern": cfg.pattern, "special_ids": dict(tok.special_ids), "eot_id": tok.special_ids[bpe.DOC_SEP],
            "tokenizer_sha256": sha256_file(os.path.join(cfg.out, "tokenizer.json"))}
    for split, docs in [("train", train_docs), ("val", val_docs)]:
        ids = encode_documents(tok, docs, dtype)
        atomic_write(os.path.join(cfg.out, f"{split}.bin"), ids.tobytes())
        atomic_write(os.path.join(cfg.out, f"{split}.txt"), "".join(d + bpe.DOC_SEP for d in docs))
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)  # document bytes, separators not counted
        meta.update({f"{split}_docs": len(docs), f"{split}_tokens": int(len(ids)), f"{split}_bytes": n_bytes})
        log(f"  {split}.bin: {len(ids):,} tokens from {len(docs):,} documents, {n_bytes:,} bytes", cfg.quiet)
    # bytes per token of the documents themselves: the factor that turns nats/token into bits per byte
    meta["bytes_per_token"] = round(meta["train_bytes"] / (meta["train_tokens"] - meta["train_docs"]), 4)
    return meta


# -----------------------------------------------------------------------------
# The build: one function per kind of dataset, a meta.json at the end. cfg: the command line, plus SIZE_FIELDS.

def dataset_spec(cfg):
    return INPUT_SPEC if cfg.input else DATASETS[cfg.dataset]


def dataset_name(cfg):
    """The dataset's name: --dataset, or the input file's name without extension."""
    if cfg.input:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(cfg.input))[0]) or "input"
    return cfg.dataset


def resolve_config(cfg=None, **overrides):
    """A copy of cfg (default: the command line's) with the overrides and dataset defaults, every value checked."""
    cfg = argparse.Namespace(**vars(cfg or make_parser().parse_args([])))
    if unknown := [key for key in overrides if key not in vars(cfg)]:
        raise TypeError(f"unknown build argument {unknown[0]!r}")
    vars(cfg).update(overrides)
    if not cfg.input and cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}, "
                        f"or give a text file with --input PATH")
    spec = dataset_spec(cfg)
    cfg.vocab_size = spec.get("vocab_size", 0) if cfg.vocab_size is None else cfg.vocab_size
    sizes = dict(tinyworld.SPLIT_SIZES, mc=tinyworld.MC_SIZE) if spec["kind"] == "generated" else REAL_SIZES
    for field in SIZE_FIELDS:
        setattr(cfg, field, sizes.get(field) if getattr(cfg, field) is None else getattr(cfg, field))
        if (getattr(cfg, field) or 0) < 0:
            raise DataError(f"{field} {getattr(cfg, field)} must not be negative")
    if spec["kind"] in ("generated", "pretrain") and not cfg.tokenizer and cfg.vocab_size < bpe.min_vocab_size():
        raise DataError(f"--vocab_size {cfg.vocab_size} is too small: a tokenizer needs at least "
                        f"{bpe.min_vocab_size()} ids (256 bytes + {len(bpe.SPECIAL_TOKENS)} special tokens)")
    try:
        bpe.resolve_pattern(cfg.pattern)
    except ValueError as e:
        raise DataError(f"--pattern: {e}") from None
    if not cfg.megabytes > 0:
        raise DataError(f"--megabytes {cfg.megabytes} must be positive")
    if cfg.tokenizer and not os.path.isfile(cfg.tokenizer):
        raise DataError(f"--tokenizer {cfg.tokenizer} does not exist: give a tokenizer.json of bpe.py or prepare_data.py")
    cfg.out = cfg.out or os.path.join(cfg.data_root, dataset_name(cfg))
    return cfg


def load_meta(data_dir):
    """meta.json of a prepared dataset folder; missing or unreadable, a DataError that names the fix."""
    path, name = os.path.join(data_dir, "meta.json"), os.path.basename(os.path.normpath(data_dir))
    try:
        meta = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return meta
    except (OSError, ValueError) as e:
        raise DataError(f"dataset {name!r} is not prepared ({path}: {type(e).__name__}): "
                        f"run `python prepare_data.py --dataset {name} --force`") from None


def load_tokens(data_dir, split, meta):
    """data_dir/SPLIT.bin memmapped as meta.json's dtype; missing, empty or cut short, a DataError naming the fix."""
    path, name = os.path.join(data_dir, f"{split}.bin"), os.path.basename(os.path.normpath(data_dir))
    fix = f"rerun `python prepare_data.py --dataset {name} --force`"
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"{os.path.join(data_dir, 'meta.json')} names no token dtype (uint16 or uint32): {fix}")
    size = os.path.getsize(path) if os.path.isfile(path) else -1
    if size <= 0 or size % np.dtype(meta["dtype"]).itemsize:
        raise DataError(f"{path} is {'missing' if size < 0 else 'empty' if size == 0 else 'cut short'}: {fix}")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


def is_up_to_date(out_dir, build):
    """True when meta.json records the same build arguments and lists every file, unchanged."""
    try:
        meta = load_meta(out_dir)
    except (OSError, ValueError, DataError):
        return False
    files = {os.path.join(out_dir, name): info for name, info in meta.get("files", {}).items()}
    return meta.get("build") == build and all(os.path.isfile(p) and os.path.getsize(p) == info["bytes"]
                                              and sha256_file(p) == info["sha256"] for p, info in files.items())


def ensure_prepared(dataset, data_root=DATA_ROOT):
    """What every stage calls before it reads data/<dataset>: builds tinyworld when its folder is missing or
    of an older format. A folder of the current format is used whatever its arguments: what you built stays."""
    folder = os.path.join(data_root, dataset)
    if DATASETS.get(dataset, {}).get("kind") == "generated":
        try:
            current = load_meta(folder).get("format_version") == FORMAT_VERSION
        except (DataError, OSError, ValueError):  # no meta.json (never built, or cut short), or unreadable
            current = False
        if not current:
            print(f"{folder} is missing, incomplete or older than this code: building it (offline, seconds)")
            prepare(dataset=dataset, data_root=data_root)
    return folder


def write_records(cfg, files, meta):
    """{name: [records]} -> cfg.out/NAME.jsonl, ids first ("sft_train-00042"), meta["splits"]; the file names."""
    for name, records in files.items():
        write_jsonl(os.path.join(cfg.out, f"{name}.jsonl"),
                    [dict({"id": f"{name}-{i:05d}"}, **r) for i, r in enumerate(records)])
    meta["splits"] = {name: {"records": len(records)} for name, records in files.items()}
    return [f"{name}.jsonl" for name in files]


def build_tinyworld(cfg):
    """Stories, quizzes and planted junk -> curation -> tokenizer and bins; then the instruction files."""
    stories = tinyworld.generate_stories(cfg.seed, cfg.megabytes)
    docs, junk = tinyworld.add_web_junk(stories, tinyworld.rng_for(cfg.seed, "junk"), tinyworld.JUNK_FRACTION)
    log(f"{len(stories):,} stories and quizzes ({cfg.megabytes:g} MB), {sum(junk.values())} planted junk", cfg.quiet)
    meta = {"raw_docs": len(docs), "planted_junk": junk,
            "source_sha256": hashlib.sha256(bpe.DOC_SEP.join(docs).encode("utf-8")).hexdigest()}
    docs, meta["curation"] = curate(docs, cfg.quiet) if cfg.curation else (docs, [])
    meta.update(write_pretraining_files(cfg, docs))
    files = tinyworld.build_instruction_sets(cfg.seed, {s: getattr(cfg, s) for s in tinyworld.SPLIT_SIZES}, cfg.mc)
    names = write_records(cfg, files, meta)
    meta["label_agreement"] = round(tinyworld.label_agreement(files["prefs_train"] + files["prefs_val"]), 4)
    return meta, PRETRAIN_FILES + names


def build_pretrain(cfg):
    """shakespeare, tinystories or --input: documents -> tokenizer and bins."""
    paths, meta = fetch_all(cfg)
    text = read_text(paths[0])
    docs = parse_tinystories(text) if cfg.dataset == "tinystories" and not cfg.input else chunk_text(text)
    meta["raw_docs"] = len(docs)
    log(f"{len(docs):,} documents, {len(text.encode('utf-8')):,} bytes", cfg.quiet)
    docs, meta["curation"] = curate(docs, cfg.quiet) if cfg.curation else (docs, [])
    if not docs:
        raise DataError("curation removed every document: the input has no usable text (try --no_curation)")
    meta.update(write_pretraining_files(cfg, docs))
    return meta, PRETRAIN_FILES


def shuffled_unique(records, cfg, part):
    """Privacy-redacted (unless --no_curation), a prompt's first record only, in a seeded random order."""
    if cfg.curation:
        redact_fields(records, ["prompt", "response", "reference", "reference_response", "chosen", "rejected"])
    first = {}
    for r in records:
        first.setdefault(r["prompt"], r)
    out = list(first.values())
    tinyworld.rng_for(cfg.seed, part).shuffle(out)
    return out


def cut(records, sizes):
    """{name: records}: consecutive slices of `records`, sizes [(name, n)]; n None takes the rest."""
    out, start = {}, 0
    for name, n in sizes:
        end = len(records) if n is None else min(len(records), start + n)
        out[name], start = records[start:end], end
    return out


def build_alpaca(cfg):
    """Alpaca -> sft_train/val and prompts_ppo/eval (references: Alpaca's outputs)."""
    paths, meta = fetch_all(cfg)
    records = shuffled_unique(parse_alpaca(read_maybe_gzip(paths[0]), source=paths[0]), cfg, "alpaca")
    files = cut(records, [(s, getattr(cfg, s)) for s in ["prompts_eval", "prompts_ppo", "sft_val", "sft_train"]])
    for name in ["prompts_eval", "prompts_ppo"]:
        files[name] = [task_fields(r["task"], r["prompt"], r["reference"]) for r in files[name]]
    return meta, write_records(cfg, files, meta)


def build_hh(cfg):
    """HH-RLHF (helpful-base, single-turn) -> prefs_train/val, prompts_ppo/eval; human labels: gold fields null."""
    paths, meta = fetch_all(cfg)
    train, test = [shuffled_unique(parse_hh(read_maybe_gzip(p)), cfg, part)
                   for p, part in zip(paths, ["hh-train", "hh-test"])]
    files = dict(cut(train, [("prompts_ppo", cfg.prompts_ppo), ("prefs_train", cfg.prefs_train)]),
                 **cut(test, [("prompts_eval", cfg.prompts_eval), ("prefs_val", cfg.prefs_val)]))
    labels = dict(chosen_ended=True, rejected_ended=True, chosen_kind="human", rejected_kind="human",
                  gold_chosen=None, gold_rejected=None, gold_prefers_chosen=None)
    for name, pairs in files.items():
        files[name] = [task_fields("hh", p["prompt"], p["chosen"]) if name.startswith("prompts")
                       else dict({"task": "hh"}, **p, **labels) for p in pairs]
    return meta, write_records(cfg, files, meta)


def build_hellaswag(cfg):
    paths, meta = fetch_all(cfg)
    return meta, write_records(cfg, cut(parse_hellaswag(read_maybe_gzip(paths[0])), [("mc", cfg.mc)]), meta)


def prepare(cfg=None, **overrides):
    """Build a dataset folder (or find it up to date) and return its path. cfg: the parsed command line; from Python,
    keyword overrides of its defaults work too: prepare(dataset="tinyworld", megabytes=0.2, sft_train=80)."""
    cfg = resolve_config(cfg, **overrides)
    if cfg.input:
        read_text(cfg.input)  # a bad input fails here, before anything is touched
    # the arguments that decide the output: a build with the same ones is reused
    build = {"format_version": FORMAT_VERSION, "dataset": dataset_name(cfg), "kind": dataset_spec(cfg)["kind"]}
    build.update((k, v) for k, v in vars(cfg).items()
                 if k not in ("dataset", "out", "data_root", "mirror", "force", "quiet"))
    build.update({f"{n}_sha256": sha256_file(getattr(cfg, n)) for n in ("input", "tokenizer") if getattr(cfg, n)})
    if not cfg.force and is_up_to_date(cfg.out, build):
        log(f"{cfg.out} is up to date (same arguments, files unchanged); --force rebuilds it", cfg.quiet)
        return cfg.out
    t0 = time.time()
    log(f"building {dataset_name(cfg)} into {cfg.out}", cfg.quiet)
    os.makedirs(cfg.out, exist_ok=True)
    if os.path.exists(meta_path := os.path.join(cfg.out, "meta.json")):
        os.remove(meta_path)  # the folder is "complete" again only when the new meta.json is written
    builders = {"generated": build_tinyworld, "pretrain": build_pretrain, "sft": build_alpaca, "prefs": build_hh,
                "mc": build_hellaswag}
    meta, files = builders[build["kind"]](cfg)
    paths = {name: os.path.join(cfg.out, name) for name in files}
    meta = dict({"format_version": FORMAT_VERSION, "dataset": build["dataset"], "kind": build["kind"], "build": build},
                **meta, files={n: {"bytes": os.path.getsize(p), "sha256": sha256_file(p)} for n, p in paths.items()})
    atomic_write(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    log(f"done in {time.time() - t0:.1f}s: {cfg.out} ({', '.join(files)}, meta.json)", cfg.quiet)
    return cfg.out


# -----------------------------------------------------------------------------
# Command line: `python prepare_data.py --dataset=NAME --key=value`, underscore keys as in training (--data-root works).

def make_parser():
    p = argparse.ArgumentParser(prog="prepare_data.py", allow_abbrev=False, description="Build a dataset folder "
                                "(tokenizer, token bins, SFT, preference, prompt and multiple-choice files). "
                                "With no arguments: the embedded tinyworld, offline.")
    p.add_argument("--dataset", default="tinyworld", help=f"one of: {', '.join(DATASETS)} (default tinyworld)")
    p.add_argument("--input", metavar="PATH", help="a local UTF-8 text file to pretrain on instead")
    p.add_argument("--out", help="output folder (default DATA_ROOT/NAME)")
    p.add_argument("--data_root", default=DATA_ROOT, help="parent of dataset folders and of downloads/ (default data)")
    p.add_argument("--seed", type=int, default=1337, help="tinyworld: same seed, same bytes; also the split shuffles")
    p.add_argument("--megabytes", type=float, default=tinyworld.DEFAULT_MEGABYTES, help="tinyworld text size in MB")
    p.add_argument("--vocab_size", type=int, help="BPE vocabulary (default: the dataset's, --input 1024)")
    p.add_argument("--pattern", default="gpt4", help="BPE pre-split pattern: gpt4 (default) or gpt2")
    p.add_argument("--tokenizer", metavar="PATH", help="reuse this tokenizer.json instead of training one")
    p.add_argument("--no_curation", dest="curation", action="store_false", help="skip every curation step")
    p.add_argument("--mirror", help=f"base URL serving the download files by name (or ${MIRROR_ENV})")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(**{name: None for name in SIZE_FIELDS})  # None: the dataset's sizes
    def error(message):  # one line, no usage block
        raise DataError(f"{message} (see --help)")
    p.error = error
    return p


def main(argv=None):
    argv = [re.sub(r"^--[^=]*", lambda m: "--" + m.group(0)[2:].replace("-", "_"), a)
            for a in (sys.argv[1:] if argv is None else argv)]
    try:
        prepare(make_parser().parse_args(argv))
    except (DataError, OSError) as e:  # OSError: a folder that cannot be written, a full disk
        print(f"prepare_data.py: error: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare_data.py: interrupted; every file is written whole or not at all: run again", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
