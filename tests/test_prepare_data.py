"""Tests for prepare_data.py: every public function against hand-computed
values or an independent check, the tinyworld build end to end (determinism,
split disjointness, train.bin decoding back to train.txt), downloads against a
local HTTP server on 127.0.0.1, and bad inputs. Offline and fast."""

import gzip
import hashlib
import http.server
import json
import os
import random
import stat
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import bpe
import prepare_data as P
import tinyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small tinyworld build: seconds, yet every file and every code path. More planted
# junk than the default, so that so little text holds every kind of it.
SMALL = dict(megabytes=0.08, sft_train=80, sft_val=8, prefs_train=80, prefs_val=16, prompts_ppo=40,
             prompts_eval=20, mc=12, quiet=True)
SMALL_JUNK = 0.05


def build_small(root, **overrides):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tinyworld, "JUNK_FRACTION", SMALL_JUNK)
        return P.prepare(data_root=str(root), **dict(SMALL, **overrides))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(folder, meta) of one small tinyworld build shared by many tests."""
    out = build_small(tmp_path_factory.mktemp("tw"))
    return out, P.load_meta(out)


def read_split(folder, name):
    return P.read_jsonl(os.path.join(folder, name + ".jsonl"))


def test_more_prefs_train_pairs_come_last_and_keep_every_other_file(small, tmp_path, monkeypatch):
    folder, meta = small
    monkeypatch.setattr(tinyworld, "PREFS_TRAIN_FIRST", 80)
    more = build_small(tmp_path, prefs_train=100)
    for name in os.listdir(folder):
        if name in ("meta.json", "prefs_train.jsonl"):
            continue
        with open(os.path.join(folder, name), "rb") as a, open(os.path.join(more, name), "rb") as b:
            assert a.read() == b.read(), f"{name} changed with more prefs_train pairs"
    with open(os.path.join(folder, "prefs_train.jsonl")) as f:
        base_lines = f.readlines()
    with open(os.path.join(more, "prefs_train.jsonl")) as f:
        more_lines = f.readlines()
    assert len(base_lines) == 80 and len(more_lines) == 100
    assert more_lines[:80] == base_lines, "the first pairs must come first, unchanged"
    assert P.load_meta(more)["build"]["prefs_train"] == 100
    assert P.resolve_config().prefs_train == 36000, "tinyworld's default: 36,000 preference pairs"
    assert P.resolve_config(dataset="hh").prefs_train is None, "a real dataset takes all its pairs"


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


def test_shingles():
    assert P.shingles("A b c d", n=2) == {"a b", "b c", "c d"}
    assert P.shingles("a b", n=5) == {"a b"}
    assert P.shingles("", n=5) == set()


def test_minhash_estimates_jaccard():
    a = {f"s{i}" for i in range(0, 300)}
    b = {f"s{i}" for i in range(100, 400)}        # |A & B| = 200, |A | B| = 400: J = 0.5
    assert len(a & b) / len(a | b) == 0.5
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
    stories = tinyworld.generate_stories(4, 0.05)
    docs, planted = tinyworld.add_web_junk(stories, random.Random(1), 0.1)
    kept, reports = P.curate(docs, quiet=True)
    text = "\n".join(kept)
    for junk in [tinyworld.JUNK_FOOTER, "Lorem ipsum", "@example.com", "192.168.", "$$$", "Privacy policy"]:
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


def test_encode_documents_streams_ids_into_the_array():
    """Peak memory stays near the array's own size (2 bytes a token), far below what the corpus's ids would take
    as lists of Python ints (tens of bytes a token); the ids are the same as encoding each document alone."""
    tok = bpe.train_tokenizer("the cat sat on the mat. " * 20 + "a dog ran far. " * 20, 320)
    rng = random.Random(0)
    phrases = ["the cat", "sat on", "the mat.", "a dog", "ran far.", "hm"]
    docs = [" ".join(rng.choices(phrases, k=80)) for _ in range(3000)]
    tracemalloc.start()
    try:
        ids = P.encode_documents(tok, docs, np.uint16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ids.tolist() == [i for d in docs for i in tok.encode(d) + [tok.special_ids[bpe.DOC_SEP]]]
    assert peak < 8 * len(ids), f"peak {peak:,} bytes for {len(ids):,} ids: the ids must stream into the array"


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
    stories = tinyworld.generate_stories(1337, SMALL["megabytes"])
    raw, _ = tinyworld.add_web_junk(stories, tinyworld.rng_for(1337, "junk"), SMALL_JUNK)
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
    assert sorted(meta["files"]) == sorted(P.PRETRAIN_FILES + [f"{n}.jsonl" for n in P.SIZE_FIELDS])


def test_jsonl_schemas(small):
    folder, _ = small
    task_keys = {"id", "task", "prompt", "context", "reference", "answer_kind", "given", "options", "reference_response"}
    sft = read_split(folder, "sft_train")
    assert all(set(r) == task_keys | {"response", "quality", "gold"} for r in sft)
    assert all(r["gold"] == tinyworld.gold_score(r, r["response"]) for r in sft)
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
    stamp = os.stat(train_bin).st_mtime_ns
    build_small(tmp_path, mc=5)
    assert os.stat(train_bin).st_mtime_ns != stamp, "other arguments must rebuild"
    assert P.load_meta(out)["build"]["mc"] == 5 and len(read_split(out, "mc")) == 5


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
# Files written whole: atomic writes, stale temporaries, errors as one line

def dead_pid():
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pid_alive():
    assert P.pid_alive(os.getpid()), "this process runs"
    assert not P.pid_alive(dead_pid()), "an ended process does not"


def test_atomic_write_removes_stale_temporaries_and_syncs_the_folder(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    stale, live = f"{path}.tmp{dead_pid()}", f"{path}.tmp{os.getppid()}"
    for name in (stale, live):
        open(name, "wb").close()
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real_fsync(fd))
    P.atomic_write(path, b"new")
    assert open(path, "rb").read() == b"new"
    assert not os.path.exists(stale), "a killed writer's temporary is removed"
    assert os.path.exists(live), "a running writer's is not"
    assert synced == [False, True], "the file is synced, then (after the rename) its folder"


def test_atomic_write_failure_names_the_file_and_keeps_the_old_one(tmp_path):
    """A full disk (here a file-size limit) while torch.save writes: an OSError naming the file, the old file whole."""
    path = str(tmp_path / "ckpt.pt")
    P.atomic_write(path, b"old")
    code = ("import resource, signal, sys, torch; sys.path.insert(0, sys.argv[2]); import prepare_data as P;"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            "try: P.atomic_write(sys.argv[1], lambda f: torch.save(torch.zeros(10000), f))\n"
            "except OSError as e: print(e.filename, '|', P.error_line(e))")
    out = subprocess.run([sys.executable, "-c", code, path, ROOT], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith(f"{path} | {path}: File too large (check that its folder"), out.stdout + out.stderr
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"], "no temporary is left"
    with pytest.raises(OSError) as failed:
        P.atomic_write(str(tmp_path / "ckpt.pt" / "x.json"), "{}")  # a file where the folder should be
    assert failed.value.filename == str(tmp_path / "ckpt.pt" / "x.json")
    os.mkfifo(tmp_path / "pipe")  # stands for a device such as /dev/null
    with pytest.raises(OSError, match="not a file"):
        P.atomic_write(str(tmp_path / "pipe"), "{}")
    assert (tmp_path / "pipe").is_fifo(), "a device or pipe is never replaced by a file"


def test_error_line():
    assert P.error_line(P.DataError("bad line 3")) == "bad line 3"
    line = P.error_line(PermissionError(13, "Permission denied", "out/x/ckpt.pt"))
    assert line.startswith("out/x/ckpt.pt: Permission denied (check that its folder exists, is writable")
    assert "\n" not in line


def test_load_meta_and_load_tokens_name_the_file_and_the_fix(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "meta.json").write_text("[1, 2]")
    with pytest.raises(P.DataError, match="dataset 'toy' is not prepared .*meta.json.*prepare_data.py --dataset toy"):
        P.load_meta(str(folder))
    np.arange(10, dtype=np.uint16).tofile(folder / "train.bin")
    assert P.load_tokens(str(folder), "train", {"dtype": "uint16"}).tolist() == list(range(10))
    for meta, content, problem in [({}, None, r"meta.json names no token dtype \(uint16 or uint32\)"),
                                   ({"dtype": "uint16"}, b"", "empty"),
                                   ({"dtype": "uint16"}, b"abc", "cut short"),
                                   ({"dtype": "uint32"}, b"ab", "cut short")]:
        if content is not None:
            (folder / "train.bin").write_bytes(content)
        with pytest.raises(P.DataError, match=f"{problem}: rerun `python prepare_data.py --dataset toy --force`"):
            P.load_tokens(str(folder), "train", meta)
    with pytest.raises(P.DataError, match="val.bin is missing"):
        P.load_tokens(str(folder), "val", {"dtype": "uint16"})


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
        (["--input", str(tmp_path)], f"{tmp_path} is a folder"),
        (["--input", str(empty)], "is empty"),
        (["--input", str(binary)], "binary"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--vocab_size=100"], "--vocab_size 100 is too small"),
        (["--vocab-size", "100"], "--vocab_size 100 is too small"),       # dashes read as underscores
        (["--seed=abc"], "invalid int value: 'abc'"),
        (["--prefs_k=3"], "unrecognized arguments: --prefs_k=3"),       # a removed option
        (["--data"], "unrecognized arguments: --data"),                 # no abbreviations
        (["--tokenizer", str(tmp_path / "none.json")], "does not exist"),
    ]
    for argv, expected in cases:
        code, err = run_main(argv + [f"--data_root={root}"], capsys)
        assert code == 1, argv
        assert err.count("\n") == 0 and expected in err and err.startswith("prepare_data.py: error:"), (argv, err)
        assert "Traceback" not in err
    assert not os.path.exists(root), "a bad input must not create or touch anything"


def test_bad_input_keeps_an_existing_build(tmp_path, capsys):
    out = build_small(tmp_path, sft_train=4, sft_val=4, prefs_train=4, prefs_val=4, prompts_ppo=4,
                      prompts_eval=4, mc=4)
    before = {n: P.sha256_file(os.path.join(out, n)) for n in os.listdir(out)}
    code, err = run_main(["--data_root", str(tmp_path), "--vocab_size=10", "--force"], capsys)
    assert code == 1 and "too small" in err
    assert {n: P.sha256_file(os.path.join(out, n)) for n in os.listdir(out)} == before


def test_command_line_exit_code_and_help(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--dataset", "nope",
                        f"--data_root={tmp_path}"], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "unknown dataset 'nope'" in r.stderr
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_data.py"), "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--megabytes" in r.stdout and "--no_curation" in r.stdout


def write_meta(folder, format_version):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "meta.json"), "w", encoding="utf-8") as f:
        json.dump({"format_version": format_version, "build": {"megabytes": 0.5}, "files": {}}, f)


def test_ensure_prepared_builds_missing_or_older_tinyworld_only(tmp_path, monkeypatch, capsys):
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
    write_meta(folder, P.FORMAT_VERSION)   # the current format, built with other arguments
    assert P.ensure_prepared("tinyworld", root) == folder
    assert len(calls) == 1, "an existing folder built with other arguments must never be rebuilt"
    assert capsys.readouterr().out == ""
    write_meta(folder, P.FORMAT_VERSION - 1)
    P.ensure_prepared("tinyworld", root)
    out = capsys.readouterr().out
    assert len(calls) == 2 and out.count("\n") == 1 and "older" in out, "a folder of an older format is rebuilt"
    with open(os.path.join(folder, "meta.json"), "w") as f:
        f.write("{not json")
    P.ensure_prepared("tinyworld", root)
    assert len(calls) == 3, "an unreadable meta.json is rebuilt"
