"""The whole pipeline on `tiny`, as a user runs it from a fresh folder:
prepare -> train -> sft -> reward -> ppo -> eval -> sample, through each file's
command-line entry point, with every default path."""

import json
import os

import eval as evaluation
import ppo
import prepare_data
import reward
import sample
import sft
import train
from model import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_DATA = dict(megabytes=0.08, sft_train=80, sft_val=8, prefs_train=80, prefs_val=16, prompts_ppo=32,
                  prompts_eval=8, mc=8, quiet=True)


def test_whole_pipeline_on_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/ and out/ are created here, at their default places
    prepare_data.prepare(dataset="tinyworld", data_root="data", **SMALL_DATA)
    assert train.main(["--config", "tiny"]) == 0
    assert sft.main(["--config", "tiny"]) == 0
    assert reward.main(["--config", "tiny"]) == 0
    assert ppo.main(["--config", "tiny"]) == 0
    assert evaluation.main(["--config", "tiny"]) == 0
    assert sample.main(["--ckpt", "out/tiny/ppo", "--prompt", "What is 2 plus 3?", "--max-new-tokens", "8"]) == 0

    # every checkpoint names its parent by path and sha256
    paths = {stage: os.path.join("out", "tiny", stage, "ckpt.pt") for stage in ("pretrain", "sft", "rm", "ppo")}
    ckpts = {stage: load_checkpoint(path) for stage, path in paths.items()}
    assert ckpts["pretrain"]["parent"] is None
    assert ckpts["sft"]["parent"]["sha256"] == prepare_data.sha256_file(paths["pretrain"])
    assert ckpts["rm"]["parent"]["sha256"] == prepare_data.sha256_file(paths["sft"])
    assert ckpts["ppo"]["parent"]["sha256"] == prepare_data.sha256_file(paths["sft"])
    assert ckpts["ppo"]["reward_parent"]["sha256"] == prepare_data.sha256_file(paths["rm"])
    assert "critic" in ckpts["ppo"], "the critic travels in the policy's checkpoint"

    # the report has a row per stage, each evaluated
    with open(os.path.join("out", "tiny", "eval", "report.json")) as f:
        report = json.load(f)
    rows = {row["stage"]: row for row in report["rows"]}
    assert set(rows) == {"pretrain", "sft", "rm", "ppo"}, rows.keys()
    assert all(row["status"] == "ok" for row in rows.values()), [(r["stage"], r.get("reason")) for r in rows.values()]
    assert os.path.exists(os.path.join("out", "tiny", "eval", "report.md"))


def test_tests_start_in_an_empty_folder_never_the_repositorys():
    """A default path (data/, out/) in a test is never the repository's own, whatever a user ran there (conftest)."""
    assert os.path.realpath(os.getcwd()) != os.path.realpath(ROOT) and os.listdir(".") == []
