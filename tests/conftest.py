"""Shared fixtures: offline, no W&B server, every run writes under a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


def make_cfg(tmp_path: Path, overrides: list[str] | None = None) -> DictConfig:
    """A composed train config whose run directory is `tmp_path`, ready for `train(cfg)` (no Hydra globals)."""
    from tunelab.config.compose import compose

    cfg = compose(list(overrides or []) + [f"paths.output_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.paths.run_dir = str(tmp_path)
    return cfg


@pytest.fixture
def cfg_factory(tmp_path: Path):
    return lambda overrides=None: make_cfg(tmp_path, overrides)


def fmt(name: str) -> dict:
    """A built-in dataset format's config node (conf/dataset/format/<name>.yaml), for hand-written task configs."""
    return {"_target_": f"tunelab.data.formats.{name}", "_partial_": True}
