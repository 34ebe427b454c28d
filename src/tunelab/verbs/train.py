"""`tunelab train`: compose → validate → build tokenizer, data, model, module, trainer → fit → test → report.

`train(cfg)` is importable and returns the final metrics; `main` is the thin Hydra entry point.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import WandbLogger

from tunelab import paths
from tunelab.checkpoint.lock import RunDirLock
from tunelab.checkpoint.resume import find_resume, identity
from tunelab.config.build import build, build_with
from tunelab.config.engine import check_engine
from tunelab.config.redact import redact, redact_file
from tunelab.config.schema import Packing
from tunelab.config.validate import validate
from tunelab.errors import ConfigError, NumericsError, TunelabError, exit_with
from tunelab.job import RunContext
from tunelab.models.method import apply_method, build_method, count_parameters
from tunelab.tracking import report
from tunelab.tracking.model_card import publish_model
from tunelab.training.allocator import keep_freed_memory
from tunelab.training.callbacks import Throughput

log = logging.getLogger(__name__)


def _collect(trainer: pl.Trainer, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


def logged_config(cfg: DictConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The resolved config for experiment trackers: secrets masked, hyperparameters also at the top level
    (so W&B's parallel-coordinates and parameter-importance panels find them)."""
    resolved = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    flat = {k: v for k, v in resolved["hyperparams"].items() if not isinstance(v, dict)}
    return redact({**flat, **extra, **resolved})


def train(cfg: DictConfig, run: RunContext | None = None) -> dict[str, float]:
    """Train, evaluate and save one run as `cfg` describes; returns the metrics also written to metrics.json.

    `run` says where the job writes and whether it is a sweep's trial; without it the job is a single run
    in `cfg.paths.run_dir` (tests and notebooks set that key).
    """
    run = run or RunContext.local(cfg.paths.run_dir)
    with open_dict(cfg):  # every ${paths.run_dir} below resolves to the context's directory, Hydra or not
        cfg.paths.run_dir = str(run.run_dir)
    validate(cfg)
    check_engine(cfg)  # a valid config naming an engine this machine lacks (DeepSpeed): exit 2 before anything is built
    run_dir = run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    sweep_config = [run.sweep_dir / "multirun.yaml"] if run.sweep_dir else []  # Hydra writes it before any job
    for saved in [*(run_dir / ".hydra").glob("*.yaml"), *sweep_config]:
        redact_file(saved)
    pl.seed_everything(cfg.hyperparams.seed, workers=True, verbose=False)
    resume = find_resume(cfg.get("resume"), run_dir, identity(cfg))  # a bad resume= is exit 4 before anything is built

    method = build_method(cfg.method)  # PEFT config, quantization, freeze rule; bad combinations refused here
    packed = Packing(cfg.hyperparams.packing) is not Packing.none
    if packed and getattr(method.peft, "is_prompt_learning", False):
        # PEFT prepends virtual tokens and widens a 2D attention mask; a packed batch's 4D block mask cannot be.
        raise ConfigError("packing cannot be combined with a prompt-learning method (prompt/prefix tuning)",
                          "keys hyperparams.packing and method", "set hyperparams.packing=none, or use LoRA/IA3")
    tokenizer = build(cfg.tokenizer)
    objective = build(cfg.objective)  # how batches are collated and how loss comes from them (tunelab.objectives)
    datamodule = build(cfg.datamodule, tokenizer=tokenizer, collator=objective.collator, _convert_="all")
    datamodule.setup("fit")  # data errors surface here, before any model is built
    model = apply_method(build(cfg.model, quantization_config=method.quantization), method)
    if packed and getattr(getattr(model, "config", None), "output_router_logits", False):
        # transformers' load-balancing loss weights tokens by a 2D attention mask; packing passes a 4D one.
        raise ConfigError("packing cannot be combined with a mixture-of-experts router loss yet",
                          "keys hyperparams.packing and model", "set hyperparams.packing=none for MoE models")
    trainable, total = count_parameters(model)
    report.parameters(trainable, total, model)
    tasks = build(datamodule.task_metrics, _convert_="all")  # task -> metric name -> scorer
    module = build(cfg.module, model=model, tokenizer=tokenizer, tasks=tasks, objective=objective, _convert_="all")

    resume.continue_logger_runs(cfg.logger)  # resumed in place: the same W&B run
    loggers = [build_with(node, run=run) for node in cfg.logger.values()]
    callbacks = [build(node) for node in cfg.callbacks.values()]
    resume.prepare(callbacks, module, identity(cfg))  # refuses another model's tensors; tags checkpoints with ours
    if not loggers:  # Lightning refuses a learning-rate monitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      default_root_dir=str(run_dir))
    for logger in loggers:
        logger.log_hyperparams(logged_config(cfg, {
            **{f"choice/{k}": v for k, v in run.choices.items()},
            "params/trainable": trainable, "params/total": total, "data": datamodule.stats,
            **{f"params/{k}": v for k, v in report.memory_estimate(trainable, total, model).items()},
        }))

    metrics: dict[str, float] = {}
    completed = False  # a run that raised is closed as failed (W&B shows it red; the sweep report lists it)
    try:
        if cfg.eval.test and cfg.eval.baseline:
            module.eval_prefix = "baseline/test"
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(_collect(trainer, "baseline/"))
        # Our own run's checkpoint: tensors and plain containers only, so Lightning can load it weights_only.
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.ckpt_path, weights_only=True)
        metrics.update(_collect(trainer, "train/loss"))  # before validate(), which replaces the callback metrics
        if not _collect(trainer, "val/"):
            # max_steps can end training between validations; sweeps need a final val/ figure.
            trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update(_collect(trainer, "val/"))
        if cfg.eval.test:
            module.eval_prefix = "test"
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update(_collect(trainer, "test/"))
        bad = sorted(k for k, v in metrics.items() if k.startswith(("val/", "test/")) and k.endswith("/loss")
                     and not math.isfinite(v))
        if bad:  # a run that diverged is not a success (lr=1e9 ends with NaN val/test loss, exit 0 before)
            raise NumericsError(f"training ended with non-finite {', '.join(bad)}", f"run {run_dir}",
                                "the run diverged: lower hyperparams.lr")
        for callback in callbacks:
            if isinstance(callback, Throughput):
                metrics.update(callback.summary(trainer.accumulate_grad_batches, module.device))
        # model/README.md (a model card with the final test figures) and the W&B model artifact
        publish_model(cfg, run, callbacks, loggers, {**metrics, "params/trainable": trainable, "params/total": total})
        completed = True
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                # one W&B run per job, even in a sequential multirun
                logger.experiment.finish(exit_code=0 if completed else 1)
            else:
                logger.finalize("success" if completed else "failed")
    metrics["params/trainable"], metrics["params/total"] = trainable, total
    if trainer.is_global_zero:  # under DDP every rank gets here; one writes and prints
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        report.summary(run_dir, metrics, datamodule.stats, loggers)
    return metrics


@hydra.main(config_path=str(paths.conf_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: runs `train` and returns the metric `optimized_metric` names, for sweepers.

    In a multirun a failing trial is recorded (error.txt in its directory) and the sweep goes on.
    """
    run = RunContext.from_hydra()  # the one place Hydra's global state is read
    keep_freed_memory()  # this process is the job's: memory freed by a step stays for the next (allocator.py)
    try:
        with RunDirLock(run.run_dir):  # a second job aimed at this directory is refused (exit 2)
            metrics = train(cfg, run)
    except TunelabError as err:
        if not run.multirun:
            exit_with(err)
        _record_failure(cfg, run, err.message())
        return math.nan
    except Exception:
        if not run.multirun:
            raise
        _record_failure(cfg, run, traceback.format_exc())
        return math.nan
    value = metrics.get(cfg.optimized_metric)
    return None if value is None else float(value)


def _record_failure(cfg: DictConfig, run: RunContext, text: str) -> None:
    (run.run_dir / "error.txt").write_text(text + "\n")
    log.error("trial %s failed; the sweep goes on. %s", run.run_dir, text.strip().splitlines()[-1])
    import wandb

    if wandb.run is not None:
        wandb.run.finish(exit_code=1)  # marked failed on the dashboard
        return
    # Failed before train() started its loggers (e.g. a data error): the trial still gets its own W&B run,
    # marked failed, so the sweep's group shows every trial. Skipped when train() already closed one.
    with open_dict(cfg):
        cfg.paths.run_dir = str(run.run_dir)
    for node in cfg.logger.values():
        logger = build_with(node, run=run)
        if not isinstance(logger, WandbLogger):
            continue
        if list(Path(logger.save_dir or ".").glob(f"wandb/*run-*{logger.version}")):
            continue
        logger.log_hyperparams(logged_config(cfg, {f"choice/{k}": v for k, v in run.choices.items()}))
        lines = text.strip().splitlines()  # a tunelab error's first line says what; a traceback's last line
        logger.experiment.summary["error"] = next((x for x in lines if x.startswith("tunelab:")), lines[-1])
        logger.experiment.finish(exit_code=1)


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("train")
