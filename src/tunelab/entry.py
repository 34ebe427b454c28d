"""The one `main` wrapper every Hydra verb uses: compose with the verb's primary config, run, report errors.

A verb module defines `main = hydra_verb("<config>", <function>)`; the function takes the composed
config and the job's run context. A user's mistake ends as `tunelab: <kind> error: ...` with its exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from tunelab import paths
from tunelab.errors import TunelabError, exit_with
from tunelab.run import RunContext


def hydra_verb(config_name: str, verb: Callable[[DictConfig, RunContext], Any]) -> Callable[[], Any]:
    """A Hydra entry point running `verb(cfg, RunContext.from_hydra())` over `conf/<config_name>.yaml`."""

    @hydra.main(config_path=str(paths.conf_dir()), config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> Any:
        try:
            return verb(cfg, RunContext.from_hydra())  # the one place Hydra's global state is read
        except TunelabError as err:
            exit_with(err)

    return main
