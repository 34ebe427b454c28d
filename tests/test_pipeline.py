"""`tunelab pipeline`: bundled pipelines compose, bad stages fail before training, stages chain weights, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from tunelab import paths
from tunelab.cli import preflight
from tunelab.config.compose import compose
from tunelab.errors import ConfigError
from tunelab.job import RunContext
from tunelab.verbs.pipeline import DONE, make_plan, run_pipeline

CONF = paths.conf_dir()
PIPELINES = sorted(p.stem for p in (CONF / "pipeline").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))
# A few steps per stage, few scored examples, short answers.
FAST = ["logger=none", "hyperparams.max_steps=2", "hyperparams.batch_size=4", "hyperparams.eval_batch_size=8",
        "eval.max_eval_samples=4", "decoding.max_new_tokens=3", "callbacks.progress.refresh_rate=0",
        "+callbacks.snapshot._target_=test_pipeline.StartWeights"]


class StartWeights(pl.Callback):
    """Every stage's weights at the start of fit, in stage order (class-level, for the test)."""

    seen: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        StartWeights.seen.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})


def _cfg(tmp_path: Path, overrides: list[str], stage_overrides: list[str] | None = None):
    cfg = compose(["logger=none", f"paths.output_dir={tmp_path}", "scoring.max_samples=4", *overrides], "pipeline")
    with open_dict(cfg):
        cfg.stage_overrides = list(FAST if stage_overrides is None else stage_overrides)
    return cfg


def test_discovery_finds_the_bundled_pipelines_and_strategies():
    assert {"reviews_chain", "terminology"} <= set(PIPELINES)
    assert {"sequential", "replay", "multitask", "lora"} <= set(STRATEGIES)


@pytest.mark.parametrize(("pipeline", "strategy"),
                         [(p, "sequential") for p in PIPELINES] + [("reviews_chain", s) for s in STRATEGIES
                                                                   if s != "sequential"])
def test_every_bundled_pipeline_composes(pipeline, strategy, tmp_path):
    cfg = _cfg(tmp_path, [f"pipeline={pipeline}", f"strategy={strategy}"], [])
    plan = make_plan(cfg, tmp_path / "p")
    assert plan.tasks and len(plan.intro) == len(plan.tasks) and plan.probe is not None
    for stage_cfg in plan.configs:
        assert stage_cfg.eval.baseline is False  # the pipeline scores the baseline row itself
    if strategy == "multitask":
        assert len(plan.stages) == 1 and set(plan.configs[0].dataset.tasks) == set(plan.tasks)
    if strategy == "replay":  # a mixture of the stage's own data and the earlier stage's, same examples per epoch
        later = plan.configs[1].dataset
        assert dict(later.weights) == pytest.approx({"reviews_rating": 0.8, "reviews_sentiment": 0.2})
        assert later.samples_per_epoch == plan.stages[1].train_rows > 0
    if strategy == "lora":
        assert plan.configs[0].method.peft is None and plan.configs[1].method.peft.r > 0


def test_a_bad_stage_override_fails_before_anything_trains(tmp_path):
    cfg = _cfg(tmp_path, [])
    with open_dict(cfg):
        cfg.pipeline.stages.rating = ["dataset=reviews_rating", "hyperparams.lrr=1e-3"]
    with pytest.raises(ConfigError) as info:
        run_pipeline(cfg, RunContext.local(tmp_path / "p"))
    text = info.value.message()
    assert text.startswith("tunelab: config error: stage 'rating': unknown key 'lrr'") and "did you mean 'lr'" in text
    assert not list((tmp_path / "p").glob("01_*")) and not (tmp_path / "p" / "baseline").exists()


def test_the_cli_preflight_composes_every_stage_of_every_swept_strategy():
    with pytest.raises(ConfigError) as info:
        preflight(["-m", "strategy=sequential,replay", 'pipeline.stages.rating=["dataset=reviews_ratin"]'],
                  "pipeline", check="tunelab.verbs.pipeline:preflight")
    assert "stage 'rating': unknown dataset option 'reviews_ratin'" in info.value.message()


def test_stages_with_different_models_are_refused(tmp_path):
    cfg = _cfg(tmp_path, [])
    with open_dict(cfg):
        cfg.pipeline.stages.rating = ["dataset=reviews_rating", "model=tiny_moe"]
    with pytest.raises(ConfigError) as info:
        make_plan(cfg, tmp_path / "p")
    assert "different models or tokenizers (model.name_or_path:" in info.value.message()
    assert "tiny-llama" in info.value.message() and "tiny-moe" in info.value.message()


@pytest.mark.slow
def test_stage_two_starts_from_stage_one_and_a_resume_does_not_retrain_it(tmp_path):
    StartWeights.seen = []
    cfg = _cfg(tmp_path, ["stop_after=1"])
    out = tmp_path / "p"
    first = run_pipeline(cfg, RunContext.local(out))  # "killed" between the stages
    stage1 = out / "01_sentiment"
    assert (stage1 / DONE).is_file() and not (out / "02_rating").exists() and first["rows"] == ["baseline", "sentiment"]
    marker, weights = (stage1 / DONE).stat().st_mtime_ns, (stage1 / "model" / "model.safetensors").stat().st_mtime_ns
    (out / "02_rating").mkdir()
    (out / "02_rating" / "junk.txt").write_text("an unfinished stage")  # no marker: trained again from its start
    summary = run_pipeline(_cfg(tmp_path, []), RunContext.local(out))
    assert len(StartWeights.seen) == 2  # stage 1 once (first run), stage 2 once (second run): never retrained
    assert (stage1 / DONE).stat().st_mtime_ns == marker
    assert (stage1 / "model" / "model.safetensors").stat().st_mtime_ns == weights
    assert not (out / "02_rating" / "junk.txt").exists() and (out / "02_rating" / DONE).is_file()
    saved = load_file(str(stage1 / "model" / "model.safetensors"))
    start = StartWeights.seen[1]
    assert set(saved) <= set(start)
    for name, tensor in saved.items():
        assert torch.equal(start[name], tensor), name  # stage 2 started from stage 1's weights exactly
    assert summary["rows"] == ["baseline", "sentiment", "rating"] and summary["stages_done"] == 2
    lines = (out / "matrix.csv").read_text().splitlines()
    assert lines[0] == "row,reviews_sentiment/accuracy,reviews_rating/accuracy,reviews_sentiment/validation/ppl"
    assert [line.split(",")[0] for line in lines[1:]] == ["baseline", "sentiment", "rating"]
    assert (out / "heatmap.png").is_file() and json.loads((out / "summary.json").read_text())["bwt"] is not None
    stage_cfg = (out / "02_rating" / ".hydra" / "config.yaml").read_text()
    assert str(stage1 / "model") in stage_cfg and "random_init: false" in stage_cfg


@pytest.mark.slow
def test_continue_adapter_trains_the_same_adapter_on_the_same_base(tmp_path):
    StartWeights.seen = []
    cfg = _cfg(tmp_path, ["strategy=lora", "strategy.from_stage=0"])
    out = tmp_path / "p"
    run_pipeline(cfg, RunContext.local(out))
    adapter = load_file(str(out / "01_sentiment" / "model" / "adapter_model.safetensors"))
    base = load_file(str(out / "01_sentiment" / "model" / "base" / "model.safetensors"))
    # PEFT names: `<layer>.lora_A.default.weight` (saved without the adapter name), `<layer>.base_layer.weight`
    start = {k.replace(".default", "").replace(".base_layer", ""): v for k, v in StartWeights.seen[1].items()}
    assert adapter and all(torch.equal(start[k], v) for k, v in adapter.items())
    assert all(torch.equal(start[f"base_model.model.{k}"], v) for k, v in base.items())
    assert os.path.isfile(out / "02_rating" / "model" / "adapter_config.json")


def test_a_second_pipeline_with_the_same_run_id_is_refused_before_hydra_writes(tmp_path):
    """Two pipelines given one run_id both ran, retrained each other's stages and interleaved pipeline.log and
    matrix.csv (issue 21.6): the pipeline directory takes the run-directory lock, checked before Hydra writes."""
    from tunelab.checkpoint.lock import RunDirLock
    from tunelab.errors import ConfigError
    from tunelab.prelaunch import prepare_run_dir

    argv = ["pipeline=reviews_chain", "run_id=shared", f"paths.output_dir={tmp_path}"]
    cfg = compose(argv, config_name="pipeline")
    pipeline_dir = Path(str(cfg.hydra.run.dir))
    with RunDirLock(pipeline_dir):
        (pipeline_dir / "pipeline.log").write_text("the first pipeline's log\n")
        with pytest.raises(ConfigError, match="in use by another job"):
            prepare_run_dir(argv, "pipeline")
        assert (pipeline_dir / "pipeline.log").read_text() == "the first pipeline's log\n"
        assert not (pipeline_dir / ".hydra").exists()
    assert prepare_run_dir(argv, "pipeline") == argv  # free again: the second may run
