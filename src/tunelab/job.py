"""A job: its run context (where it writes, its id, whether it is one trial of a sweep) and the one
Hydra entry point every verb uses.

Verbs receive it as an argument (`train(cfg, run=...)`); only the Hydra entry points build it from
Hydra's global state (`RunContext.from_hydra()`), so tests, notebooks and pipeline stages call the
verbs without touching Hydra's globals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

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

    @classmethod
    def local(cls, run_dir: str | Path, run_id: str | None = None, overrides: tuple[str, ...] = ()) -> RunContext:
        """A single job outside Hydra's launcher: a notebook, a test, a pipeline stage."""
        run_dir = Path(run_dir)
        return cls(run_dir=run_dir, run_id=run_id or run_dir.name, overrides=tuple(overrides))

    @classmethod
    def from_hydra(cls) -> RunContext:
        """The context of the job Hydra is running; call only from a verb's `@hydra.main` entry point."""
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
        )

    def wandb_identity(self) -> dict[str, Any]:
        """A unique W&B id and readable name per job; in a multirun the sweep's id is the group."""
        if self.multirun and self.sweep_dir is not None:
            sweep = self.sweep_dir.name
            name = f"{self.job_num}:{self.override_dirname}" if self.override_dirname else str(self.job_num)
            return {"id": self.run_id, "group": sweep, "name": name}
        return {"id": self.run_id, "name": self.run_id}

def hydra_verb(config_name: str, verb: Callable[[DictConfig, RunContext], Any]) -> Callable[[], Any]:
    """A Hydra entry point running `verb(cfg, RunContext.from_hydra())` over `conf/<config_name>.yaml`."""

    @hydra.main(config_path=str(paths.conf_dir()), config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> Any:
        try:
            return verb(cfg, RunContext.from_hydra())  # the one place Hydra's global state is read
        except TunelabError as err:
            exit_with(err)

    return main
