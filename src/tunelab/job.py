"""A job: its run context (where it writes, its id, whether it is one trial of a sweep), what a verb needs
from the job around it, and the one Hydra entry point every verb runs under.

A verb is a plain function `(cfg, run) -> result`; `@verb(...)` declares what it needs from the prologue
(its run directory, validation) and runs that prologue whenever it is called, so tests, notebooks and
pipeline stages call verbs as functions. `hydra_verb` adds what belongs to a whole process: the run
context read from Hydra's global state, the run directory's lock, the allocator of a training process,
and the epilogue (a sweep trial's failure recorded, any other tunelab error as its exit code).
"""

from __future__ import annotations

import functools
import math
import traceback
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab import paths
from tunelab.errors import TunelabError, exit_with


@dataclass(frozen=True)
class RunContext:
    run_dir: Path
    run_id: str = ""
    multirun: bool = False
    job_num: int = 0
    sweep_dir: Path | None = None
    override_dirname: str = ""  # the trial's overrides as one string, for readable W&B run names
    overrides: tuple[str, ...] = ()  # the command line's overrides: error messages point at them
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option chosen
    # (schema, path, provider) of each place Hydra searched for configs (--config-dir, hydra.searchpath): a verb
    # that composes more configs (compare's arms, a pipeline's stages) searches the same (config.compose.SearchPath)
    config_sources: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def local(cls, run_dir: str | Path, run_id: str | None = None, overrides: tuple[str, ...] = ()) -> RunContext:
        """A single job outside Hydra's launcher: a notebook, a test, a pipeline stage."""
        run_dir = Path(run_dir)
        return cls(run_dir=run_dir, run_id=run_id or run_dir.name, overrides=tuple(overrides))

    @classmethod
    def from_hydra(cls) -> RunContext:
        """The context of the job Hydra is running; call only from the Hydra entry point (`hydra_verb`)."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        run_dir = Path(hydra_cfg.runtime.output_dir)
        sweep_dir = Path(hydra_cfg.sweep.dir) if multirun else None
        return cls(
            run_dir=run_dir,
            run_id=f"{sweep_dir.name}-{run_dir.name}" if sweep_dir else run_dir.name,
            multirun=multirun,
            job_num=int(hydra_cfg.job.get("num") or 0),
            sweep_dir=sweep_dir,
            override_dirname=str(hydra_cfg.job.override_dirname or ""),
            overrides=tuple(hydra_cfg.overrides.task),
            choices={k: str(v) for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")},
            config_sources=tuple((str(s.schema), str(s.path), str(s.provider))
                                 for s in hydra_cfg.runtime.config_sources),
        )

    def wandb_identity(self) -> dict[str, Any]:
        """A unique W&B id and readable name per job; in a multirun the sweep's id is the group."""
        if self.multirun and self.sweep_dir is not None:
            sweep = self.sweep_dir.name
            name = f"{self.job_num}:{self.override_dirname}" if self.override_dirname else str(self.job_num)
            return {"id": self.run_id, "group": sweep, "name": name}
        return {"id": self.run_id, "name": self.run_id}


# ---- what a verb needs from its job -----------------------------------------------------------------
@dataclass(frozen=True)
class Needs:
    """What a verb takes from the job around it; declared once with `@verb(...)` beside the function."""

    run_dir: bool = False  # writes its run directory: paths.run_dir points there, it exists, saved configs masked
    validate: bool = False  # validate(cfg) first (the CLI pre-flight did; a library caller relies on this one)
    lock: bool = False  # one job at a time in the run directory (RunDirLock), taken by the Hydra entry point
    training: bool = False  # a training process: freed memory kept for the next step (training/allocator.py)
    sweep_goes_on: bool = False  # a failing trial of a multirun is recorded and returns nan; the sweep goes on


def verb(**needs: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a verb `(cfg, run) -> result` and what it needs; the decorated function runs the prologue
    (`prepare`) on every call, and `run` may be left out (a single job in `cfg.paths.run_dir`)."""
    declared = Needs(**needs)

    def declare(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def prepared(cfg: DictConfig, run: RunContext | None = None, *args: Any, **kwargs: Any) -> Any:
            return function(cfg, prepare(cfg, run, declared), *args, **kwargs)

        prepared.needs = declared  # type: ignore[attr-defined]  # read by hydra_verb and tests/test_verbs.py
        return prepared

    return declare


def needs_of(function: Callable[..., Any]) -> Needs:
    """What `function` declared with `@verb`; a plain undecorated `(cfg, run)` function needs nothing."""
    return getattr(function, "needs", None) or Needs()


def prepare(cfg: DictConfig, run: RunContext | None, needs: Needs) -> RunContext:
    """The job's prologue: the run context, `${paths.run_dir}` pointing at its directory (Hydra or not),
    validation, the directory made, and the configs Hydra saved there (and the sweep's) masked."""
    if run is None:  # a library call: the directory the config names (`${hydra:...}` resolves only under Hydra)
        where = OmegaConf.select(cfg, "paths.run_dir", default=None, throw_on_resolution_failure=False)
        run = RunContext.local(where or ".")
    if needs.run_dir:
        with open_dict(cfg):
            cfg.paths.run_dir = str(run.run_dir)
    if needs.validate:
        from tunelab.config.validate import validate

        validate(cfg)
    if needs.run_dir:
        from tunelab.config.redact import redact_file

        run.run_dir.mkdir(parents=True, exist_ok=True)
        sweep_config = [run.sweep_dir / "multirun.yaml"] if run.sweep_dir else []  # Hydra writes it before any job
        for saved in [*(run.run_dir / ".hydra").glob("*.yaml"), *sweep_config]:
            redact_file(saved)
    return run


# ---- the epilogue -----------------------------------------------------------------------------------
def close_loggers(loggers: Iterable[Any], completed: bool) -> None:
    """End each logger's run, once, as succeeded or failed (W&B shows a failed run red; the sweep report
    lists it). A W&B run is finished, not only flushed: one W&B run per job, even in a sequential multirun."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=0 if completed else 1)
        else:
            logger.finalize("success" if completed else "failed")


def record_failure(cfg: DictConfig, run: RunContext, text: str) -> float:
    """A failed trial of a sweep: error.txt in its directory and a failed W&B run; nan for the sweeper."""
    import logging

    (run.run_dir / "error.txt").write_text(text + "\n")
    logging.getLogger(__name__).error("trial %s failed; the sweep goes on. %s", run.run_dir,
                                      text.strip().splitlines()[-1])
    import wandb

    if wandb.run is not None:
        wandb.run.finish(exit_code=1)  # marked failed on the dashboard
        return math.nan
    # Failed before the verb started its loggers (e.g. a data error): the trial still gets its own W&B run,
    # marked failed, so the sweep's group shows every trial. Skipped when the verb already closed one.
    from pytorch_lightning.loggers import WandbLogger

    from tunelab.config.build import build_with
    from tunelab.config.redact import logged_config

    with open_dict(cfg):
        cfg.paths.run_dir = str(run.run_dir)
    for node in (OmegaConf.select(cfg, "logger", default=None) or {}).values():
        logger = build_with(node, run=run)
        if not isinstance(logger, WandbLogger):
            continue
        if list(Path(logger.save_dir or ".").glob(f"wandb/*run-*{logger.version}")):
            continue
        logger.log_hyperparams(logged_config(cfg, {f"choice/{k}": v for k, v in run.choices.items()}))
        lines = text.strip().splitlines()  # a tunelab error's first line says what; a traceback's last line
        logger.experiment.summary["error"] = next((x for x in lines if x.startswith("tunelab:")), lines[-1])
        close_loggers([logger], completed=False)
    return math.nan


def sweeper_value(cfg: DictConfig, result: Any) -> Any:
    """What Hydra's sweeper receives: the figure `optimized_metric` names when the config has one, else the
    verb's result as it is."""
    metric = OmegaConf.select(cfg, "optimized_metric", default=None)
    if metric is None or not isinstance(result, Mapping):
        return result
    value = result.get(metric)
    return None if value is None else float(value)


# ---- the one Hydra entry point ----------------------------------------------------------------------
def hydra_verb(config_name: str, function: Callable[..., Any]) -> Callable[[], Any]:
    """A Hydra entry point running `function(cfg, RunContext.from_hydra())` over `conf/<config_name>.yaml`,
    with what `function` declared (`needs_of`) around it."""
    import hydra

    needs = needs_of(function)

    @hydra.main(config_path=str(paths.conf_dir()), config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> Any:
        run = RunContext.from_hydra()  # the one place Hydra's global state is read
        if needs.training:
            from tunelab.training.allocator import keep_freed_memory

            keep_freed_memory()  # this process is the job's: memory freed by a step stays for the next
        from tunelab.checkpoint.lock import RunDirLock

        try:
            with RunDirLock(run.run_dir) if needs.lock else nullcontext():  # a second job here: exit 2
                result = function(cfg, run)
        except TunelabError as err:
            if not (run.multirun and needs.sweep_goes_on):
                exit_with(err)
            return record_failure(cfg, run, err.message())
        except Exception:
            if not (run.multirun and needs.sweep_goes_on):
                raise
            return record_failure(cfg, run, traceback.format_exc())
        return sweeper_value(cfg, result)

    return main
