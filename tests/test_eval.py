"""`tunelab eval` and prompting: never test in the prompt, cached retrieval, exact agreement with `train` and export."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import open_dict

from conftest import REPO, make_cfg
from procs import budget
from tunelab import paths
from tunelab.config.compose import compose
from tunelab.config.validate import validate
from tunelab.errors import CheckpointError, ConfigError, DataError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
KNOWLEDGE = REPO / "data" / "knowledge"
QUIET_TRAIN = ["eval.baseline=false", "eval.generate_on_val=false", "logger=none"]


def eval_cfg(out: Path, overrides: list[str]):
    """A composed `tunelab eval` config writing to `out`, as the Hydra job would see it."""
    cfg = compose([*overrides, f"paths.output_dir={out}"], config_name="eval")
    with open_dict(cfg):
        cfg.paths.run_dir = str(out)
    return cfg


def run_eval(out: Path, overrides: list[str]) -> dict[str, float]:
    from tunelab.verbs.eval import evaluate_cfg

    return evaluate_cfg(eval_cfg(out, ["logger=none", *overrides]))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


# ---- configs ----------------------------------------------------------------------------------------


def _default_groups(config: str) -> set[str]:
    """The groups a primary config's defaults list chooses from (conf/<config>.yaml read as YAML)."""
    entries = yaml.safe_load((paths.conf_dir() / f"{config}.yaml").read_text())["defaults"]
    return {next(iter(entry)).split("/")[0] for entry in entries if isinstance(entry, dict)}


EVAL_GROUPS = sorted(_default_groups("eval") - _default_groups("train"))  # eval's own groups
OPTIONS = sorted(f"{g}={p.stem}" for g in EVAL_GROUPS for p in (paths.conf_dir() / g).glob("*.yaml"))


def test_eval_options_are_discovered():
    assert {"documents", "prompting"} <= set(EVAL_GROUPS)
    assert {"prompting=zero_shot", "prompting=few_shot", "prompting=retrieval", "documents=knowledge"} <= set(OPTIONS)


@pytest.mark.parametrize("override", OPTIONS)
def test_every_eval_option_composes_and_validates(override):
    cfg = compose([override, "prompting=retrieval" if override.startswith("documents") else override],
                  config_name="eval")
    validate(cfg)
    assert cfg.task_name == "eval" and "_target_" in cfg.prompting


# ---- prompting never draws from test ----------------------------------------------------------------
def _samples(dataset: str):
    from omegaconf import OmegaConf

    from tunelab.evaluation.prompting import load_samples

    cfg = compose([f"dataset={dataset}"], config_name="eval", return_hydra_config=False)
    return load_samples(OmegaConf.to_container(cfg.dataset, resolve=True), 0)


def test_few_shot_never_draws_from_test():
    from transformers import AutoTokenizer

    from tunelab.data.encode import prompt_ids
    from tunelab.evaluation.prompting import FewShot, Setting

    splits = _samples("knowledge")
    tokenizer = AutoTokenizer.from_pretrained(str(paths.assets_dir() / "tiny-llama"))
    with pytest.raises(ConfigError, match="not from the train split"):
        Setting(tokenizer, splits["train"] + splits["test"][:1], 448)
    setting = Setting(tokenizer, splits["train"], 448, None, 0, prompt_ids)
    test_questions = {s.question for s in splits["test"]}
    train_origins = {s.example.origin for s in splits["train"]}
    for selection in ("random", "similar"):
        strategy = FewShot(setting, k=3, selection=selection)
        for sample in splits["test"][:40]:
            prompt = strategy(sample)
            assert prompt.meta["shots"] == 3 and set(prompt.meta["shot_origins"]) <= train_origins
            earlier = [m["content"] for m in prompt.messages[:-1]]
            assert not test_questions & set(earlier), "a test question appeared as a shot"
            assert prompt.messages[-1] == sample.example.messages[-2]  # the question itself comes last
    # similar: the closest train question is about the same drug and fact
    sample = splits["test"][0]
    best = FewShot(setting, k=1, selection="similar").shots(sample)[0]
    assert best.fields["drug"] == sample.fields["drug"]
    with pytest.raises(ConfigError, match="prompting.k=401 but the train split has 400"):
        FewShot(setting, k=401)


def test_few_shot_says_how_many_fit():
    from transformers import AutoTokenizer

    from tunelab.data.encode import prompt_ids
    from tunelab.evaluation.prompting import FewShot, Setting

    splits = _samples("knowledge")
    tokenizer = AutoTokenizer.from_pretrained(str(paths.assets_dir() / "tiny-llama"))
    strategy = FewShot(Setting(tokenizer, splits["train"], 200, None, 0, prompt_ids), k=8)
    prompts = [strategy(s) for s in splits["test"][:10]]
    assert all(len(p.ids) <= 200 for p in prompts)
    assert all(0 < p.meta["shots"] < 8 for p in prompts)  # dropped whole shots, never cut the prompt
    assert "10 of 10 prompts cannot hold 8 shots within 200 tokens" in strategy.summary()


# ---- retrieval ----------------------------------------------------------------------------------------
def test_retrieval_index_cache_hit_and_invalidation(tmp_path):
    from tunelab.evaluation.retrieval import Bm25Retriever, load_documents

    source = {"path": str(KNOWLEDGE / "documents.jsonl"), "text_column": "text", "id_column": "id",
              "title_column": "title"}
    passages = load_documents(source)
    first = Bm25Retriever(passages, tmp_path)
    second = Bm25Retriever(passages, tmp_path)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    query = "How should Caldamab be stored?"
    assert [p.id for p, _ in first.search(query, 3)] == [p.id for p, _ in second.search(query, 3)]
    assert first.search(query, 1)[0][0].id == "caldamab-handling"
    # the updated formulary differs in content: a new index, the old one untouched
    updated = load_documents({**source, "path": str(KNOWLEDGE / "updated" / "documents.jsonl")})
    third = Bm25Retriever(updated, tmp_path)
    assert not third.cache_hit and third.key != first.key
    assert len(list((tmp_path / "retrieval").iterdir())) == 2
    assert Bm25Retriever(passages, tmp_path, k1=1.2).key != first.key  # settings are part of the key


def test_document_source_without_text_column(tmp_path):
    from tunelab.evaluation.retrieval import load_documents

    (tmp_path / "docs.jsonl").write_text('{"id": "a", "body": "x"}\n')
    with pytest.raises(DataError, match="no column 'text'") as err:
        load_documents({"path": str(tmp_path / "docs.jsonl"), "text_column": "text", "id_column": "id"})
    assert err.value.where == "key documents.text_column" and "body" in err.value.hint


# ---- the verb -----------------------------------------------------------------------------------------
GOLDEN = {  # the first test row of the knowledge task, retrieval k=2, the tiny random-init model (seed 0)
    "dataset": "knowledge", "task": "knowledge", "id": "caldamab-dose-q3",
    "prompt": "<|im_start|>user\nUse the following passages to answer.\n\n"
              "[caldamab-handling] Caldamab is made by Corvane Labs. The Harbourside Clinic keeps Caldamab away "
              "from light.\n[caldamab-dosing] Caldamab is an antiemetic. The standard adult dose of Caldamab is "
              "250 mg twice daily, and the maximum daily dose is 1000 mg.\n\nAnswer from the Harbourside Clinic "
              "formulary.\nQuestion: According to the formulary, how is Caldamab dosed in adults?<|im_end|>\n"
              "<|im_start|>assistant\n",
    "context": "Caldamab is made by Corvane Labs. The Harbourside Clinic keeps Caldamab away from light.\n"
               "Caldamab is an antiemetic. The standard adult dose of Caldamab is 250 mg twice daily, and the "
               "maximum daily dose is 1000 mg.",
    "retrieved": ["caldamab-handling", "caldamab-dosing"], "passages": 2, "retrieval_hit": 1.0, "gold_rank": 2,
    "reference": "250 mg twice daily", "answer": "etoothetoothetoothetoothetoothetoothetoothetooth",
    "prompt_tokens": 198, "answer_tokens": 8, "exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0,
}


def test_golden_predictions_row(tmp_path):
    metrics = run_eval(tmp_path, ["dataset=knowledge", "prompting=retrieval", "prompting.k=2",
                                  "documents=knowledge", "max_samples=4", "decoding.max_new_tokens=8"])
    row = _rows(tmp_path)[0]
    assert {k: row[k] for k in GOLDEN} == GOLDEN
    assert row["origin"].endswith("data/knowledge/test.jsonl:1")
    assert set(row) == {*GOLDEN, "origin", "latency_s"} and row["latency_s"] > 0
    assert metrics["test/retrieval_hit"] == 1.0 and metrics["test/n"] == 4
    for key in ("exact_match", "token_f1", "rouge_l", "chrf"):  # chrf: the dataset's corpus metric
        assert metrics[f"test/{key}/ci_low"] <= metrics[f"test/{key}"] <= metrics[f"test/{key}/ci_high"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A demo-like run (full fine-tuning of the tiny model on reviews), scored on 64 test examples by train."""
    from tunelab.verbs.train import train

    run = tmp_path_factory.mktemp("run")
    metrics = train(make_cfg(run, [*QUIET_TRAIN, "hyperparams.max_steps=60", "eval.max_eval_samples=64"]))
    return run, metrics


@pytest.mark.slow
def test_eval_reproduces_the_runs_own_test_accuracy(short_run, tmp_path):
    run, trained = short_run
    metrics = run_eval(tmp_path, [f"run={run}", "max_samples=64"])
    assert 0.0 < trained["test/accuracy"] < 1.0, trained  # a figure that can disagree
    assert metrics["test/accuracy"] == trained["test/accuracy"]
    assert metrics["params/trainable"] == trained["params/trainable"]


@pytest.mark.slow
def test_adapter_run_equals_its_merged_export(tmp_path):
    from tunelab.verbs.export import export
    from tunelab.verbs.train import train

    run = tmp_path / "lora"
    train(make_cfg(run, ["method=lora", "hyperparams.lr=3e-3", *QUIET_TRAIN, "eval.test=false",
                         "hyperparams.max_steps=20"]))
    out = export(compose([f"run={run}", f"out={tmp_path / 'merged'}"], config_name="export",
                         return_hydra_config=False))
    common = ["max_samples=24", "prompting=few_shot", "prompting.k=2", "decoding.max_new_tokens=16"]
    adapter = run_eval(tmp_path / "a", [f"run={run}", *common])
    merged = run_eval(tmp_path / "m", [*common, f"model.name_or_path={out}", "model.random_init=false"])
    assert [r["answer"] for r in _rows(tmp_path / "a")] == [r["answer"] for r in _rows(tmp_path / "m")]
    assert adapter["test/accuracy"] == merged["test/accuracy"]


def _saved_choices(run: Path, text: str) -> Path:
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / ".hydra" / "hydra.yaml").write_text(text)
    return run


def test_a_run_is_scored_on_its_own_dataset_unless_another_is_named(tmp_path, capsys):
    """`tunelab eval run=<dir>` without dataset= takes the dataset option the run was composed with (its
    .hydra/hydra.yaml, read as data): a brand_replies run was scored on reviews_sentiment, the group's default."""
    from tunelab.cli import VERBS, run_dataset, saved_choice

    verb = {v.name: v for v in VERBS}
    run = _saved_choices(tmp_path / "run", "hydra:\n  runtime:\n    choices:\n      dataset: brand_replies\n")
    assert run_dataset(verb["eval"], [f"run={run}", "logger=none"]) == [f"run={run}", "logger=none",
                                                                        "dataset=brand_replies"]
    assert "scoring dataset=brand_replies, the run's own" in capsys.readouterr().err
    assert run_dataset(verb["compare"], [f"run={run}"])[-1] == "dataset=brand_replies"
    for argv in ([f"run={run}", "dataset=reviews_title"], [f"run={run}", "+dataset=reviews_title"],
                 ["model=tiny"], [f"run={tmp_path / 'absent'}"], ["-m", f"run={run}"]):
        assert run_dataset(verb["eval"], argv) == argv  # named, no run, or a sweep: as typed
    assert run_dataset(verb["generate"], [f"run={run}"]) == [f"run={run}"]
    # the training's option is not in this search path (it came with a --config-dir): the default, said so
    other = _saved_choices(tmp_path / "other", "hydra:\n  runtime:\n    choices:\n      dataset: my_brand\n")
    assert run_dataset(verb["eval"], [f"run={other}"]) == [f"run={other}"]
    assert "trained on dataset=my_brand, which is not in this config search path" in capsys.readouterr().err
    # tampered or damaged: never a path, an interpolation or a non-string; nothing is added
    for text in ("hydra:\n  runtime:\n    choices:\n      dataset: ../../etc/passwd\n",
                 "hydra:\n  runtime:\n    choices:\n      dataset: ${oc.env:HOME}\n",
                 "hydra:\n  runtime:\n    choices:\n      dataset: [a, b]\n", "{{{ not yaml", ""):
        bad = _saved_choices(tmp_path / "bad", text)
        assert saved_choice(bad, "dataset") is None, text
        assert run_dataset(verb["eval"], [f"run={bad}"]) == [f"run={bad}"]
    linked = tmp_path / "linked" / ".hydra"
    linked.mkdir(parents=True)
    (linked / "hydra.yaml").symlink_to(run / ".hydra" / "hydra.yaml")
    assert saved_choice(linked.parent, "dataset") is None


@pytest.mark.slow
def test_eval_cli_scores_the_runs_own_dataset(short_run, tmp_path):
    from forkrun import run_forked

    run = tmp_path / "run"
    shutil.copytree(short_run[0] / "model", run / "model")
    _saved_choices(run, "hydra:\n  runtime:\n    choices:\n      dataset: reviews_title\n")
    out = run_forked("eval", [f"run={run}", "max_samples=4", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}"],
                     tmp_path, ENV, seconds=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "scoring dataset=reviews_title, the run's own" in out.stderr
    rows = _rows(tmp_path / "eval")
    assert len(rows) == 4 and {r["dataset"] for r in rows} == {"reviews_title"}


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_input_messages(tmp_path):
    with pytest.raises(ConfigError, match="unknown prompting option 'fewshot'") as err:
        compose(["prompting=fewshot"], config_name="eval")
    assert "few_shot" in err.value.hint
    for override, message in (("prompting.k=-1", "prompting.k must be an integer >= 0"),
                              ("bootstrap.confidence=1.5", "bootstrap.confidence must be a finite number in (0, 1)")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(compose(["prompting=few_shot", override], config_name="eval"))
    with pytest.raises(ConfigError, match="prompting.k=5000 but the train split has 400"):
        run_eval(tmp_path / "k", ["dataset=knowledge", "prompting=few_shot", "prompting.k=5000"])
    (tmp_path / "notarun").mkdir()
    with pytest.raises(CheckpointError, match="is not a run directory"):
        run_eval(tmp_path / "r", [f"run={tmp_path / 'notarun'}"])


def test_cli_exit_code_for_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notarun").mkdir()
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "eval", f"run={tmp_path / 'notarun'}",
                           "logger=none", f"paths.output_dir={tmp_path}"], capture_output=True, text=True,
                          env=ENV, timeout=budget(300))
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "tunelab: checkpoint error:" in proc.stderr and "hint:" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- the comparison ---------------------------------------------------------------------------------------
def test_reading_is_generated_from_the_numbers():
    from tunelab.verbs.compare import markdown, reading

    def row(arm, acc, low, high, tokens, params=None, train_s=None, hit=None, changed=None):
        out = {"arm": arm, "accuracy": acc, "accuracy_ci_low": low, "accuracy_ci_high": high,
               "retrieval_hit": hit, "prompt_tokens": tokens, "trainable_params": params, "train_s": train_s}
        if changed is not None:
            out.update({"accuracy (changed=True)": changed, "accuracy (changed=True)_ci_low": changed,
                        "accuracy (changed=True)_ci_high": changed})
        return out

    rows = [row("base_few_shot", 0.50, 0.40, 0.60, 400.0, changed=0.1),
            row("base_retrieval", 0.55, 0.45, 0.65, 300.0, hit=0.9, changed=0.5),
            row("finetuned", 0.81, 0.75, 0.87, 48.0, params=2016960.0, train_s=61.0, changed=0.0)]
    text = reading(rows, "accuracy")
    assert text.startswith("finetuned scores highest: accuracy 0.81 [0.75, 0.87].")
    assert ("finetuned gains +0.26 accuracy over base_retrieval at 16% of its prompt length "
            "(the 95% intervals do not overlap)") in text
    assert "trained 2,016,960 parameters in 61 s" in text
    assert "90% (base_retrieval)" in text
    assert "On the facts that changed (changed=True): base_few_shot 0.10, base_retrieval 0.50, finetuned 0.00." in text
    table = markdown(rows, "accuracy")
    assert "| arm | accuracy [95% CI] |" in table and "| finetuned | 0.810 [0.750, 0.870] |" in table


@pytest.mark.slow
def test_compare_end_to_end(short_run, tmp_path):
    from tunelab.verbs.compare import compare

    run, _ = short_run
    # the group names every verb uses (tests/test_compare.py: the former data=/docs=/base=/tracker= still work)
    cfg = compose([f"run={run}", "dataset=reviews_sentiment", "documents=train", "base_model=tiny", "logger=none",
                   f"paths.output_dir={tmp_path}",
                   'overrides=["max_samples=16","decoding.max_new_tokens=4"]'], config_name="compare")
    with open_dict(cfg):
        cfg.paths.run_dir = str(tmp_path / "cmp")
    rows = compare(cfg)
    assert [r["arm"] for r in rows] == ["base_zero_shot", "base_one_shot", "base_few_shot", "base_retrieval",
                                        "finetuned", "finetuned_retrieval"]
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["finetuned"]["trainable_params"] == 2016960 and by_arm["base_zero_shot"]["trainable_params"] is None
    assert by_arm["base_few_shot"]["prompt_tokens"] > 2 * by_arm["base_zero_shot"]["prompt_tokens"]
    for name in ("compare.md", "compare.csv", "compare.png", "reading.txt"):
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    for arm in by_arm:  # each arm is a complete eval directory
        assert (tmp_path / "cmp" / arm / "predictions.jsonl").is_file()
    # the base and the run score the very same prompts (the run's seed draws every arm's templates)
    assert [r["prompt"] for r in _rows(tmp_path / "cmp" / "base_zero_shot")] == [
        r["prompt"] for r in _rows(tmp_path / "cmp" / "finetuned")]

