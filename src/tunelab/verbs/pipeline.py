"""`tunelab pipeline`: `train` stages run in order, each from the previous stage's model, and a forgetting matrix.

    tunelab pipeline pipeline=reviews_chain                      # conf/pipeline/reviews_chain.yaml, sequential
    tunelab pipeline pipeline=reviews_chain strategy=replay      # the same chain with replay
    tunelab pipeline -m strategy=sequential,replay,multitask,lora   # side by side: comparison.md/.png
    tunelab pipeline pipeline=reviews_chain run_id=<id>          # resume a killed pipeline

compose → plan (every stage composed and validated, the strategy applied, models and tokenizers checked
alike) → score the starting model (the baseline row) → for each stage: train it from the previous stage's
model (`tunelab.verbs.train.train`, in its own run directory), mark it done, score the model on every task of the
pipeline as `tunelab eval` scores it (the `prompting` group, zero_shot by default, through
`tunelab.evaluation.score.score_task`) and the probe's perplexity, rewrite the matrix → a W&B table.
The plan and the stage hand-over live in `tunelab.pipeline.stages`, the scoring in `tunelab.pipeline.scoring`.

The pipeline directory:

    .hydra/  plan.json                the pipeline's config and its stages' overrides (checked on resume)
    baseline/scores.json              the starting model's row
    01_<stage>/ 02_<stage>/ ...       ordinary run directories (model/, metrics.json, ...), plus
                                      stage.json (written last: the stage is done) and scores.json (its row)
    matrix.csv summary.json heatmap.png

A stage is done when stage.json, metrics.json and model/ exist; a rerun with the same run_id skips done
stages (never retrained) and retrains an unfinished one from its start.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.checkpoint.io import atomic_write
from tunelab.config.build import build, build_with
from tunelab.errors import ConfigError
from tunelab.job import RunContext, close_loggers, verb
from tunelab.pipeline import forgetting
from tunelab.pipeline.scoring import Scorer, metric_names
from tunelab.pipeline.stages import DONE, Plan, compose_stage, make_plan, stage_dirname, start_overrides

log = logging.getLogger(__name__)

__all__ = ["DONE", "make_plan", "preflight", "run_pipeline"]


def preflight(cfg: DictConfig) -> None:
    """The CLI's pre-flight for `tunelab pipeline`: every stage of every swept pipeline composes and validates."""
    make_plan(cfg, Path(str(cfg.paths.output_dir)) / "runs" / "<pipeline>")


# ---- running ------------------------------------------------------------------------------------------
def is_done(stage_dir: Path) -> bool:
    """A finished stage: its marker (written last), its metrics and its model."""
    return (stage_dir / DONE).is_file() and (stage_dir / "metrics.json").is_file() and (stage_dir / "model").is_dir()


def _check_plan(pipeline_dir: Path, record: dict[str, Any]) -> None:
    """A resumed pipeline must be the same pipeline: same stages, same overrides, same strategy."""
    saved_file = pipeline_dir / "plan.json"
    if not saved_file.is_file():
        atomic_write(saved_file, json.dumps(record, indent=2) + "\n")
        return
    saved = json.loads(saved_file.read_text())
    if saved != record:
        old = {s["name"]: s["overrides"] for s in saved.get("stages", [])}
        new = {s["name"]: s["overrides"] for s in record["stages"]}
        differ = [n for n in dict.fromkeys([*old, *new]) if old.get(n) != new.get(n)] or ["(strategy or tasks)"]
        raise ConfigError(f"{pipeline_dir} holds a pipeline planned differently (stage {differ[0]!r} differs)",
                          f"file {saved_file}",
                          "rerun with the same pipeline and overrides to resume it, or leave run_id out to start anew")


def _write_stage_config(stage_dir: Path, cfg: DictConfig, overrides: Sequence[str]) -> None:
    """`.hydra/config.yaml` and `overrides.yaml`, as a `tunelab train` run would have them (later verbs read them)."""
    hydra_dir = stage_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), hydra_dir / "config.yaml")
    (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def _load_model(stage_dir: Path | None, cfg0: DictConfig) -> tuple[Any, Any]:
    """A finished stage's model, or (None) the model the first stage starts from, built as `train` builds it."""
    if stage_dir is not None:
        from tunelab.models.load import load_run

        model, tokenizer, _ = load_run(stage_dir)
        return model, tokenizer
    pl.seed_everything(int(cfg0.hyperparams.seed), workers=True, verbose=False)  # train seeds before building
    tokenizer = build(cfg0.tokenizer)
    return build(cfg0.model).eval(), tokenizer


@verb(run_dir=True, validate=True, lock=True)
def run_pipeline(cfg: DictConfig, run: RunContext) -> dict[str, Any]:
    """Plan, score the baseline, train and score each stage not yet done; returns the summary (summary.json)."""
    pipeline_dir = run.run_dir
    plan = make_plan(cfg, pipeline_dir, run)
    name = str(OmegaConf.select(cfg, "pipeline.name", default=None) or run.choices.get("pipeline", "pipeline"))
    strategy = run.choices.get("strategy") or str(cfg.strategy._target_).rsplit(".", 1)[-1]
    _check_plan(pipeline_dir, {"pipeline": name, "strategy": str(cfg.strategy._target_),
                               "stages": [{"name": s.name, "overrides": list(s.overrides)} for s in plan.stages],
                               "tasks": plan.tasks})
    cfg0 = plan.configs[0]
    scorer = Scorer.from_config(cfg, plan)
    group = run.run_id  # one W&B group per pipeline: its stages and its own run
    rows: list[tuple[str, dict[str, float]]] = []
    title = f"{name} ({strategy}): {plan.probe[0] if plan.probe else ''}"

    def score_row(row_name: str, out_dir: Path, stage_dir: Path | None) -> None:
        scores_file = out_dir / "scores.json"
        if scores_file.is_file():
            scores = json.loads(scores_file.read_text())
        else:
            began = time.perf_counter()
            model, tokenizer = _load_model(stage_dir, cfg0)
            scores = scorer(model, tokenizer)
            del model
            log.info("scored %s in %.1f s", row_name, time.perf_counter() - began)
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(scores_file, json.dumps(scores, indent=2, sort_keys=True) + "\n")
        rows.append((row_name, scores))
        _write_outputs(pipeline_dir, plan, rows, name, strategy, title)

    score_row("baseline", pipeline_dir / "baseline", None)
    limit = cfg.stop_after if cfg.stop_after is not None else len(plan.stages)
    for i, stage in enumerate(plan.stages[:limit]):
        stage_dir = pipeline_dir / stage_dirname(i, stage)
        if is_done(stage_dir):
            log.info("stage %s is done (%s): not retrained", stage.name, stage_dir / DONE)
        else:
            if stage_dir.exists():  # an unfinished stage: trained again from its start
                log.warning("stage %s did not finish (no %s): training it again", stage.name, DONE)
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True)
            method = OmegaConf.to_container(plan.configs[i].method, resolve=True)
            start = start_overrides(cfg, i, plan.configs, pipeline_dir, plan.stages, method, prepare=True)
            scfg = compose_stage(stage, start, plan.search)
            with open_dict(scfg):
                for node in scfg.logger.values():
                    if "group" in node:
                        node.group = group
            _write_stage_config(stage_dir, scfg, [*stage.overrides, *start])
            from tunelab.verbs.train import train

            metrics = train(scfg, RunContext.local(stage_dir, run_id=f"{run.run_id}-{stage_dirname(i, stage)}",
                                                   overrides=(*stage.overrides, *start)))
            atomic_write(stage_dir / DONE, json.dumps(
                {"stage": stage.name, "index": i, "overrides": [*stage.overrides, *start],
                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "val/loss": metrics.get("val/loss")}, indent=2) + "\n")
        score_row(stage.name, stage_dir, stage_dir)
    summary = _write_outputs(pipeline_dir, plan, rows, name, strategy, title, final=True)
    _log_wandb(cfg, run, group, plan, rows, summary)
    if run.sweep_dir is not None:  # a multirun over strategies: the side-by-side table so far
        forgetting.compare(run.sweep_dir)
    return summary


def _write_outputs(pipeline_dir: Path, plan: Plan, rows: Sequence[tuple[str, dict[str, float]]], name: str,
                   strategy: str, title: str, final: bool = False) -> dict[str, Any]:
    """matrix.csv, summary.json and heatmap.png from the rows so far (the matrix fills in as stages finish)."""
    R = [[scores[t] for t in plan.tasks] for _, scores in rows[1:]]
    baseline = [rows[0][1][t] for t in plan.tasks]
    figures = forgetting.summarize(R, baseline, plan.intro)
    probe = plan.probe[0] if plan.probe else None
    probe_values = [scores.get(probe) for _, scores in rows] if probe else []
    summary = {"pipeline": name, "strategy": strategy, "stages_total": len(plan.stages), **figures,
               "tasks": plan.tasks, "metrics": metric_names(plan), "intro": plan.intro,
               "rows": [row for row, _ in rows], "probe": probe,
               "probe_baseline": probe_values[0] if probe_values else None,
               "probe_final": probe_values[-1] if probe_values else None,
               "probe_change": (probe_values[-1] - probe_values[0]) if len(probe_values) > 1 else None,
               "stages": [asdict(s) for s in plan.stages]}
    forgetting.write_matrix(pipeline_dir, plan.tasks, metric_names(plan), rows, probe, summary)
    heading = (f"{name} · {strategy} · ACC {forgetting.fmt(figures['acc'])} BWT {forgetting.fmt(figures['bwt'])} "
               f"forgetting {forgetting.fmt(figures['forgetting'])}")
    forgetting.heatmap(pipeline_dir / "heatmap.png", plan.tasks, rows, heading, probe)
    forgetting.print_matrix(plan.tasks, rows, probe, summary, f"{title} — {'final' if final else 'so far'}")
    return summary


def _log_wandb(cfg: DictConfig, run: RunContext, group: str, plan: Plan,
               rows: Sequence[tuple[str, dict[str, float]]], summary: Mapping[str, Any]) -> None:
    """The pipeline's own W&B run, in the stages' group: the matrix as a Table, the figures as its summary."""
    from pytorch_lightning.loggers import WandbLogger

    with open_dict(cfg):
        for node in cfg.logger.values():
            if "group" in node:
                node.group = group
            if "job_type" in node:
                node.job_type = "pipeline"
    for node in cfg.logger.values():
        logger = build_with(node, run=replace(run, run_id=f"{run.run_id}-pipeline"))
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        completed = False
        try:
            columns = ["row", *plan.tasks] + ([plan.probe[0]] if plan.probe else [])
            table = wandb.Table(columns=columns, data=[[name, *(scores.get(c) for c in columns[1:])]
                                                       for name, scores in rows])
            logger.experiment.log({"forgetting_matrix": table,
                                   "heatmap": wandb.Image(str(run.run_dir / "heatmap.png"))})
            logger.experiment.summary.update({f"pipeline/{k}": v for k, v in summary.items()
                                              if isinstance(v, (int, float)) and v is not None})
            completed = True
        finally:
            close_loggers([logger], completed)


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("pipeline")
