"""`tunelab compare` and one-shot prompting: one demonstration, token cost per answer, the group names every verb
uses (and the former spellings), a missing run refused before anything is scored, a user's config dir in arms and
pipeline stages."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from procs import budget
from procs import run as run_child
from tunelab import cli, paths
from tunelab.config.compose import compose
from tunelab.errors import ConfigError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
FAST = 'overrides=["max_samples=4","decoding.max_new_tokens=3"]'


# ---- one-shot ---------------------------------------------------------------------------------------------
def test_one_shot_prompt_holds_exactly_one_demonstration():
    from transformers import AutoTokenizer

    from tunelab.config.build import build
    from tunelab.data.encode import prompt_ids
    from tunelab.evaluation.prompting import Setting, load_samples

    cfg = compose(["prompting=one_shot", "dataset=knowledge"], config_name="eval", return_hydra_config=False)
    assert cfg.prompting.k == 1 and cfg.prompting._target_.endswith("FewShot")
    splits = load_samples(OmegaConf.to_container(cfg.dataset, resolve=True), 0)
    tokenizer = AutoTokenizer.from_pretrained(str(paths.assets_dir() / "tiny-llama"))
    strategy = build(cfg.prompting, setting=Setting(tokenizer, splits["train"], 448, None, 0, prompt_ids))
    train_answers = {s.example.reference for s in splits["train"]}
    for sample in splits["test"][:5]:
        prompt = strategy(sample)
        answers = [m for m in prompt.messages if m["role"] == "assistant"]
        assert prompt.meta["shots"] == 1 and len(answers) == 1 and answers[0]["content"] in train_answers
        assert prompt.messages[-1] == sample.example.messages[-2]  # then the question itself, last


# ---- token cost -------------------------------------------------------------------------------------------
def test_generated_lengths_count_up_to_the_first_end_of_turn():
    from tunelab.evaluation.evaluate import generated_lengths

    eos = 2
    new = torch.tensor([[5, 6, 2, 2], [5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    assert generated_lengths(new, eos) == [3, 2, 4, 1]
    assert generated_lengths(new[:, :0], eos) == [0, 0, 0, 0]


def test_reading_names_the_winners_token_cost_against_zero_shot():
    from tunelab.verbs.compare import markdown, reading

    def row(arm, acc, prompt, total, params=None):
        return {"arm": arm, "accuracy": acc, "accuracy_ci_low": acc - 0.05, "accuracy_ci_high": acc + 0.05,
                "prompt_tokens": prompt, "total_tokens": total, "trainable_params": params}

    rows = [row("base_zero_shot", 0.5, 50.0, 52.0), row("base_one_shot", 0.6, 100.0, 102.0),
            row("base_few_shot", 0.8, 300.0, 312.0)]
    assert "Per answer base_few_shot spends 312 tokens of context (prompt and answer), 6.0× the 52 of " \
           "base_zero_shot." in reading(rows, "accuracy")
    table = markdown(rows, "accuracy")
    assert "| arm | accuracy [95% CI] | prompt_tokens | total_tokens |" in table
    assert "| base_few_shot | 0.800 [0.750, 0.850] | 300 | 312 |" in table
    rows[0]["accuracy"] = 0.9
    assert "Per answer base_zero_shot spends 52 tokens of context (prompt and answer), the zero-shot cost." in reading(
        rows, "accuracy")


# ---- the group names every verb uses ------------------------------------------------------------------------
def test_compare_takes_the_group_names_and_its_former_spellings():
    from tunelab.verbs.compare import shared_overrides

    verb = next(v for v in cli.VERBS if v.name == "compare")
    old = ["data=knowledge", "docs=knowledge", "base=tiny_instruct", "tracker=none", "run=x"]
    new = ["dataset=knowledge", "documents=knowledge", "base_model=tiny_instruct", "logger=none", "run=x"]
    assert cli.old_spellings(verb, old) == new
    cfg = compose([*new[:-1], "dataset.max_bad_fraction=0.1", "group=g"], config_name="compare")
    assert cfg.dataset.name == "knowledge" and cfg.documents.path.endswith("documents.jsonl")
    assert shared_overrides(cfg, seed=False) == ["model=tiny_instruct", "dataset=knowledge", "documents=knowledge",
                                                 "logger=none", "dataset.max_bad_fraction=0.1", "group=g"]
    with pytest.raises(ConfigError, match="tunelab compare has no key 'model'") as info:
        cli.check_refused(verb, ["model=tiny"])
    assert "base_model=" in info.value.hint
    assert "base_model=" in cli.usage() and "dataset=" in cli.usage()
    with pytest.raises(ConfigError, match="compare arm 'base_zero_shot': unknown model option 'tiniest'") as info:
        cli.preflight(["base_model=tiniest", "logger=none"], "compare", check=verb.check)
    assert info.value.where == "key base_model (tiniest)"


def test_a_missing_or_unfinished_run_is_refused_before_any_arm_is_scored(tmp_path):
    (tmp_path / "notarun").mkdir()
    for run, code, kind in ((tmp_path / "no" / "such", 2, "config"), (tmp_path / "notarun", 4, "checkpoint")):
        began = time.monotonic()
        proc = run_child([sys.executable, "-m", "tunelab.cli", "compare", f"run={run}", "tracker=none",
                          f"paths.output_dir={tmp_path}"], 120, env=ENV, cwd=tmp_path)
        assert proc.returncode == code, proc.stderr[-2000:]
        assert proc.stderr.startswith(f"tunelab: {kind} error:") and "Traceback" not in proc.stderr
        assert time.monotonic() - began < budget(30)  # seconds: nothing loaded, nothing scored
        assert not (tmp_path / "compare").exists()


# ---- a user's config dir ------------------------------------------------------------------------------------
def _user_dataset(tmp_path: Path) -> Path:
    """tmp_path/conf/dataset/mine.yaml: the bundled reviews task over a tiny copy of its files, only there."""
    data = tmp_path / "mine"
    data.mkdir()
    for split, rows in (("train", 8), ("validation", 4), ("test", 4)):
        lines = (REPO / "data" / "reviews" / f"{split}.jsonl").read_text().splitlines()[:rows]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    conf = tmp_path / "conf"
    (conf / "dataset").mkdir(parents=True)
    (conf / "dataset" / "mine.yaml").write_text(
        f"# A user's own dataset.\ndefaults:\n  - reviews_sentiment\n  - _self_\n\nname: mine\nsource:\n"
        f"  path: {data}\n")
    return conf


def test_compare_in_a_users_config_dir_reports_tokens_per_answer(tmp_path, monkeypatch):
    conf = _user_dataset(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tunelab"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # run_verb sets it, as the console script does
    monkeypatch.chdir(tmp_path)
    # `--config-dir` as a user types it: the pre-flight composes the arms from the command's search path, and the
    # job (under Hydra) from Hydra's own record of it; the cheapest compare that still compares (two base arms)
    cli.run_verb("compare", ["--config-dir", str(conf), "dataset=mine", "tracker=none", f"paths.output_dir={tmp_path}",
                             FAST, "~arms.base_few_shot", "~arms.base_retrieval", "~arms.finetuned",
                             "~arms.finetuned_retrieval", "run_id=mine"])
    out = tmp_path / "compare" / "mine"
    assert (out / "compare.md").read_text().startswith("## mine: accuracy per arm")
    table = {r["arm"]: r for r in csv.DictReader((out / "compare.csv").open())}
    assert list(table) == ["base_zero_shot", "base_one_shot"]
    assert list(next(iter(table.values())))[4:6] == ["prompt_tokens", "total_tokens"]  # beside the score
    for arm, row in table.items():
        rows = [json.loads(line) for line in (out / arm / "predictions.jsonl").open()]
        assert len(rows) == 4 and all(str(tmp_path / "mine") in r["origin"] for r in rows)
        assert all(1 <= r["answer_tokens"] <= 3 for r in rows)  # decoding.max_new_tokens=3
        prompt, answer = (sum(r[key] for r in rows) / len(rows) for key in ("prompt_tokens", "answer_tokens"))
        assert float(row["prompt_tokens"]) == pytest.approx(prompt)
        assert float(row["total_tokens"]) == pytest.approx(prompt + answer)
    assert float(table["base_one_shot"]["prompt_tokens"]) > float(table["base_zero_shot"]["prompt_tokens"])
    assert "tokens of context (prompt and answer)" in (out / "reading.txt").read_text()


def test_pipeline_stages_see_the_users_config_dir(tmp_path):
    from tunelab.config.compose import SearchPath
    from tunelab.job import RunContext
    from tunelab.pipeline.stages import Stage, compose_stage
    from tunelab.verbs.pipeline import make_plan

    conf = _user_dataset(tmp_path)
    (conf / "pipeline").mkdir()
    (conf / "pipeline" / "mine.yaml").write_text(
        "# A user's own pipeline over a user's own dataset.\nname: mine\nstages:\n  mine: [dataset=mine]\n"
        "common: []\nprobe: null\n")
    overrides = ["pipeline=mine", "logger=none", f"paths.output_dir={tmp_path}"]
    # as the CLI's pre-flight composes it: `cfg.hydra` says where the command searched
    cfg = compose(overrides, "pipeline", config_dir=str(conf))
    plan = make_plan(cfg, tmp_path / "p")
    assert plan.tasks == ["mine"] and plan.configs[0].dataset.source.path == str(tmp_path / "mine")
    assert plan.search == SearchPath(None, (f"file://{conf.resolve()}",))
    # as the job runs it under Hydra: no `hydra` node, the entry point's RunContext says where Hydra searched
    job_cfg = compose(overrides, "pipeline", config_dir=str(conf), return_hydra_config=False)
    run = replace(RunContext.local(tmp_path / "p"), config_sources=(
        ("pkg", "hydra.conf", "hydra"), ("file", str(conf), "command-line"), ("file", str(paths.conf_dir()), "main")))
    assert make_plan(job_cfg, tmp_path / "p", run).search == SearchPath(str(conf), ())
    with pytest.raises(ConfigError, match="stage 'mine': unknown dataset option 'mine'"):
        compose_stage(Stage("mine", ("dataset=mine",)))  # without the command's search path: not found
