"""Experiment loggers. W&B runs online with credentials and offline without, by itself."""

from __future__ import annotations

import netrc
import os
import sys
from typing import Any

from omegaconf import Container, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from tunelab import libraries
from tunelab.config.redact import redact, redact_line
from tunelab.job import RunContext


def wandb_credentials_present() -> bool:
    """True when W&B could authenticate: an API key in the environment or a W&B entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_logger(mode: str = "auto", run: RunContext | None = None, **kwargs: Any) -> WandbLogger:
    """Lightning's WandbLogger; `mode=auto` picks online when credentials exist and offline otherwise.

    An explicit WANDB_MODE in the environment wins, as W&B users expect. `run` (passed in by the verb)
    gives each job a unique id and readable name, and the sweep's id as the group of its trials.
    """
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_present() else "offline")
    # W&B copies sys.argv into the run's metadata; Hydra has parsed it by now, so mask secrets in place.
    sys.argv[:] = [redact_line(arg) for arg in sys.argv]
    # Tags, names and notes reach the W&B run record as given: mask secret-looking values there too.
    kwargs = {k: redact(OmegaConf.to_container(v) if isinstance(v, Container) else v) for k, v in kwargs.items()}
    kwargs.setdefault("log_model", False)  # model/ holds the weights; uploading checkpoints is opt-in
    identity = run.wandb_identity() if run is not None else {}
    kwargs.update({k: redact(v) for k, v in identity.items() if kwargs.get(k) is None})
    # `mode` goes to wandb.init; Lightning's own `offline=True` would set WANDB_MODE for the whole process.
    logger = WandbLogger(mode=mode, **kwargs)
    libraries.drop_wandb_anonymous(logger)  # a deprecation notice about an argument tunelab never sets
    return logger


def mlflow_logger(tracking_uri: str | None = None, **kwargs: Any) -> Any:
    """Lightning's MLFlowLogger. A `file:` tracking URI (the default: <run dir>/mlruns) is a local file store: MLflow
    3 refuses one unless MLFLOW_ALLOW_FILE_STORE is set ("maintenance mode"), and its database store needs SQLAlchemy
    and a migration step a single run does not need; the file store still reads with `mlflow ui` and the client."""
    from pytorch_lightning.loggers import MLFlowLogger

    if str(tracking_uri or "").startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a user's own setting wins
    return MLFlowLogger(tracking_uri=tracking_uri, **kwargs)
