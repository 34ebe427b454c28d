"""`tunelab train`: compose → validate → build tokenizer, data, model, module, trainer → fit → test → report.

`train(cfg)` is importable and returns the final metrics; the job around it (run directory, lock, allocator,
a failed sweep trial recorded) is declared with `@verb` and run by `tunelab.job`.
"""

from __future__ import annotations

import json
import logging
import math

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor

from tunelab.checkpoint.callback import hold_signals
from tunelab.checkpoint.resume import find_resume, identity
from tunelab.config.build import build, build_with
from tunelab.config.engine import check_engine
from tunelab.config.redact import logged_config
from tunelab.config.schema import Packing
from tunelab.errors import ConfigError, NumericsError
from tunelab.job import RunContext, close_loggers, verb
from tunelab.models.method import apply_method, build_method, count_parameters
from tunelab.tracking import report
from tunelab.tracking.model_card import publish_model
from tunelab.training.callbacks import Throughput

log = logging.getLogger(__name__)


def _collect(trainer: pl.Trainer, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


@verb(run_dir=True, validate=True, lock=True, training=True, sweep_goes_on=True)
def train(cfg: DictConfig, run: RunContext) -> dict[str, float]:
    """Train, evaluate and save one run as `cfg` describes; returns the metrics also written to metrics.json.

    `run` says where the job writes and whether it is a sweep's trial; without it the job is a single run
    in `cfg.paths.run_dir` (tests and notebooks set that key).
    """
    check_engine(cfg)  # a valid config naming an engine this machine lacks (DeepSpeed): exit 2 before anything is built
    run_dir = run.run_dir
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
    module = build(cfg.module, model=model, tokenizer=tokenizer, tasks=tasks, objective=objective,
                   answer_tokens=datamodule.answer_tokens, _convert_="all")

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
    # SIGTERM/SIGINT in any phase from here (fit, the final evaluation, the export, the loggers' finish) ends the
    # job with 143/130, the resume line and no metrics.json: never Lightning's 0, which a scheduler reads as done.
    signals = hold_signals(callbacks, trainer, resume.path)
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
        signals.check()  # one came during the export or the last evaluation batch: the run is not complete
        completed = True
    finally:
        close_loggers(loggers, completed)
        signals.release()
    signals.check()  # one came while the loggers finished
    metrics["params/trainable"], metrics["params/total"] = trainable, total
    if trainer.is_global_zero:  # under DDP every rank gets here; one writes and prints
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        report.summary(run_dir, metrics, datamodule.stats, loggers)
    return metrics


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("train")
