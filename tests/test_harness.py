"""lm-evaluation-harness interop: lm-eval's `hf` model on a run's export, with the bundled task YAML
(data/harness/reviews_sentiment.yaml, local files only), scores the multiple-choice sentiment task exactly as
`tunelab eval decoding=choices` does on the same examples."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from conftest import REPO, make_cfg
from tunelab.config.compose import compose
from tunelab.errors import ConfigError
from tunelab.verbs.eval import evaluate_cfg
from tunelab.verbs.export import export
from tunelab.verbs.train import train

pytest.importorskip("lm_eval", reason="the harness extra installs lm-eval")
TASK = str(REPO / "data" / "harness" / "reviews_sentiment.yaml")
N = 48  # the first N test examples on both sides


def _eval(out: Path, overrides: list[str]) -> dict[str, float]:
    cfg = compose([*overrides, "logger=none", f"paths.output_dir={out}"], config_name="eval")
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.run_dir = str(out)
    return evaluate_cfg(cfg)


@pytest.mark.slow  # trains the tiny model for 24 steps, then scores twice
def test_harness_accuracy_equals_tunelab_choices_on_the_same_examples(tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(run, ["hyperparams.max_steps=24", "logger=none", "eval.baseline=false", "eval.test=false",
                         "eval.generate_on_val=false", "eval.max_eval_samples=8"])
    with open_dict(cfg):  # the task YAML renders the first template: train (and so score) with that one only
        cfg.dataset.templates = [cfg.dataset.templates[0]]
    train(cfg)
    GlobalHydra.instance().clear()
    export_cfg = compose([f"run={run}"], config_name="export", return_hydra_config=False)
    GlobalHydra.instance().clear()
    export(export_cfg)
    ours = _eval(tmp_path / "ours", [f"run={run}", "decoding=choices", f"max_samples={N}"])
    theirs = _eval(tmp_path / "theirs", [f"run={run}", f"harness={TASK}", f"max_samples={N}"])
    print(f"tunelab choices {ours['test/accuracy']:.4f}, lm-eval {theirs['harness/tunelab_reviews_sentiment/acc']:.4f}")
    assert theirs["harness/tunelab_reviews_sentiment/acc"] == pytest.approx(ours["test/accuracy"], abs=1e-9)
    assert ours["test/n"] == N
    assert (tmp_path / "theirs" / "harness_task" / "reviews_sentiment.yaml").is_file()


def test_harness_refusals(tmp_path):
    with pytest.raises(ConfigError, match="harness task file not found"):
        _eval(tmp_path / "a", ["model=tiny_instruct", "harness=/nonexistent/task.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: x\ndoc_to_text: !function utils.doc_to_text\n")
    with pytest.raises(ConfigError, match="not a plain YAML task"):
        _eval(tmp_path / "b", ["model=tiny_instruct", f"harness={bad}"])
    with pytest.raises(ConfigError, match="needs a model directory with weights"):
        _eval(tmp_path / "c", ["model=tiny", f"harness={TASK}"])
