"""One scoring path: a pipeline scores a model on a task exactly as `tunelab eval` does, every consumer reads a
dataset through the one row loop, and every answer comes from the one generation loop."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import REPO, fmt
from tunelab.config.build import build
from tunelab.config.compose import compose
from tunelab.errors import DataError
from tunelab.evaluation import score
from tunelab.evaluation.evaluate import perplexity
from tunelab.evaluation.prompting import load_samples
from tunelab.pipeline.scoring import Scorer
from tunelab.pipeline.stages import make_plan
from tunelab.verbs.eval import evaluate_cfg

SRC = REPO / "src" / "tunelab"
SAMPLES = 6  # test examples scored per task: seconds on the bundled tiny_instruct model
STAGE = ["model=tiny_instruct", "decoding.max_new_tokens=3", "logger=none"]


def _recording(monkeypatch) -> list[tuple[str, list[list[int]], list[str], dict[str, float]]]:
    """Every `evaluate` call of score_task: (task, prompt ids, answers, aggregate metrics)."""
    calls = []
    real = score.evaluate

    def record(model, tokenizer, items, *args, **kwargs):
        result = real(model, tokenizer, items, *args, **kwargs)
        calls.append((items[0].task, [i.prompt_ids for i in items], [r["answer"] for r in result.rows],
                      result.metrics))
        return result

    monkeypatch.setattr(score, "evaluate", record)
    return calls


def test_the_pipelines_score_equals_tunelab_evals_for_the_same_model_and_task(tmp_path, monkeypatch):
    cfg = compose(["logger=none", f"paths.output_dir={tmp_path}", f"scoring.max_samples={SAMPLES}",
                   "scoring.batch_size=8"], "pipeline")
    with open_dict(cfg):
        cfg.stage_overrides = STAGE
    plan = make_plan(cfg, tmp_path / "p")
    first = plan.configs[0]
    calls = _recording(monkeypatch)
    model, tokenizer = build(first.model).eval(), build(first.tokenizer)
    row = Scorer.from_config(cfg, plan)(model, tokenizer)
    piped = {task: (ids, answers, metrics) for task, ids, answers, metrics in calls}
    assert set(piped) == set(plan.tasks) == {"reviews_sentiment", "reviews_rating"}

    for task in plan.tasks:
        calls.clear()
        ecfg = compose([*STAGE, f"dataset={task}", f"paths.output_dir={tmp_path}", f"max_samples={SAMPLES}",
                        "batch_size=8", f"seed={first.hyperparams.seed}"], "eval")
        with open_dict(ecfg):
            ecfg.paths.run_dir = str(tmp_path / "eval" / task)
        metrics = evaluate_cfg(ecfg)
        (_, ids, answers, _), = calls
        assert ids == piped[task][0] and answers == piped[task][1]  # the same prompts, the same answers
        primary = next(iter(plan.task_specs[task]["metrics"]))
        assert row[task] == metrics[f"test/{primary}"] == piped[task][2][primary]
    assert row[plan.probe[0]] > 1.0  # the probe's perplexity, through the one perplexity function


def test_the_pipeline_prompts_through_the_prompting_group(tmp_path, monkeypatch):
    cfg = compose(["logger=none", f"paths.output_dir={tmp_path}", "scoring.max_samples=2", "prompting=few_shot",
                   "prompting.k=1"], "pipeline")
    with open_dict(cfg):
        cfg.stage_overrides = STAGE
    plan = make_plan(cfg, tmp_path / "p")
    plan.tasks = plan.tasks[:1]
    plan.probe = None
    calls = _recording(monkeypatch)
    first = plan.configs[0]
    Scorer.from_config(cfg, plan)(build(first.model).eval(), build(first.tokenizer))
    zero = load_samples(plan.task_specs[plan.tasks[0]], int(first.hyperparams.seed))["test"][0]
    shot_prompt = calls[0][1][0]
    # one solved train example before the question: the few-shot prompt is longer than the question alone
    assert len(shot_prompt) > len(build(first.tokenizer).apply_chat_template(zero.example.messages[:-1]))


def test_eval_samples_apply_max_bad_fraction_as_training_does(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    good = [json.dumps({"q": f"question {i}", "a": "yes"}) for i in range(9)]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("\n".join([*good, "{not json"]) + "\n")
    task = {"name": "t", "source": {"path": str(folder), "splits": {"train": "train", "test": "test"}},
            "on_bad_row": "skip", "format": fmt("prompt_completion"),
            "templates": [{"prompt": "Q: {{ q }}", "completion": "{{ a }}"}]}
    assert len(load_samples({**task, "max_bad_fraction": 0.2}, 0)["test"]) == 9
    with pytest.raises(DataError, match="max_bad_fraction=0.05"):
        load_samples({**task, "max_bad_fraction": 0.05}, 0)


def test_one_generation_loop_one_row_loop_one_perplexity():
    # code lines only: the model card's usage snippet (a string) shows a reader `model.generate` too
    sources = {p: "\n".join(line for line in p.read_text().splitlines() if not line.strip().startswith(("'", '"')))
               for p in SRC.rglob("*.py")}
    generate = [p for p, text in sources.items() if re.search(r"\bmodel\.generate\(", text)]
    assert generate == [SRC / "evaluation" / "evaluate.py"]
    rows = [p for p, text in sources.items() if "RowContext(" in text]
    assert rows == [SRC / "data" / "items.py"]  # every example is formatted from its row in one place
    # exp of a loss is a perplexity (objectives may exp log-prob differences: GRPO's policy ratio and KL)
    exps = [p for p, text in sources.items() if re.search(r"(math|torch)\.exp\((loss|[^)]*\bloss\b)", text)]
    assert exps == [SRC / "evaluation" / "evaluate.py"]
    assert float(perplexity(0.0)) == 1.0 and float(perplexity(1e6)) == pytest.approx(1.0686e13, rel=1e-3)


def test_pipeline_scoring_config_composes_with_its_prompting_default(tmp_path):
    cfg = compose(["logger=none", f"paths.output_dir={tmp_path}"], "pipeline")
    assert OmegaConf.select(cfg, "prompting._target_") == "tunelab.evaluation.prompting.ZeroShot"


def test_a_tasks_own_answer_budget_wins_over_the_decodings(tmp_path, monkeypatch):
    """dataset.max_new_tokens (brand_replies sets 96: its replies outrun decoding's 64) bounds the answers of the
    task in `tunelab eval` and pipelines (score_task) and in training's generation-scored metrics (the module)."""
    from tunelab.training.module import TuneModule

    calls = _recording(monkeypatch)
    ecfg = compose(["model=tiny_instruct", "dataset=brand_replies", f"paths.output_dir={tmp_path}", "max_samples=3",
                    "logger=none", "decoding.max_new_tokens=64", "dataset.max_new_tokens=4"], "eval")
    with open_dict(ecfg):
        ecfg.paths.run_dir = str(tmp_path / "eval")
    evaluate_cfg(ecfg)
    (_, _, answers, _), = calls
    tokenizer = build(ecfg.tokenizer)
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert lengths and max(lengths) <= 4 + 1, answers  # the untrained model rambles to the limit (+1: re-tokenising)
    assert compose(["dataset=brand_replies"], "eval").dataset.max_new_tokens == 96
    module = TuneModule(build(ecfg.model), tokenizer, None, generation={"max_new_tokens": 64, "do_sample": False},
                        tasks={"brand_replies": {}}, answer_tokens={"brand_replies": 7})
    assert module.task_generation == {"brand_replies": {"max_new_tokens": 7, "do_sample": False}}
