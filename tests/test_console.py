"""The console: known-harmless library messages filtered at the entry point (and nothing else), the progress bar's
total is the run's step budget without v_num, and a printed path or command is one line at any width."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from conftest import make_cfg
from tunelab.console import TIP_LOGGERS, WARNINGS, print_whole, quiet_known_noise
from tunelab.training.progress import StepProgressBar


def test_each_known_message_is_filtered_and_any_other_still_shows(caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a "
                      "`LightningDataModule`. It will use ...", UserWarning, stacklevel=1)
        warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other deprecation"]
    assert all(reason for _, _, reason in WARNINGS)  # each filter names why it is harmless
    with caplog.at_level(logging.INFO):
        for name in TIP_LOGGERS:
            logging.getLogger(name).info("💡 Tip: For seamless cloud logging ... try installing [litlogger]")
            logging.getLogger(name).info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"] * len(TIP_LOGGERS)


def test_a_printed_path_is_one_line_at_80_columns():
    out = io.StringIO()
    path = "/tmp/out/runs/2026-12-06_20-18-21_0ec00f/wandb/offline-run-20261206_201827-2026-12-06_20-18-21_0ec00f"
    print_whole(Console(file=out, width=80), f"W&B (offline): upload with  wandb sync {path}")
    assert out.getvalue() == f"W&B (offline): upload with  wandb sync {path}\n"  # no newline rich inserted
    assert "[/]" not in out.getvalue()


SEEN: dict = {}


class Recording(StepProgressBar):
    """The training's own bar, recording what it shows after each batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        SEEN["total"] = self.train_progress_bar.total
        SEEN["postfix"] = self.get_metrics(trainer, pl_module)
        SEEN["batches"] = trainer.num_training_batches


@pytest.mark.slow  # a 4-step training of the tiny model
def test_progress_bar_counts_the_step_budget_without_v_num(tmp_path):
    from tunelab.verbs.train import train

    SEEN.clear()
    cfg = make_cfg(tmp_path, ["hyperparams.max_steps=4", "eval.baseline=false", "eval.test=false", "logger=csv",
                              "eval.generate_on_val=false", "eval.max_eval_samples=4",
                              f"callbacks.progress._target_={__name__}.Recording", "+callbacks.progress.terminal=true"])
    train(cfg)
    assert SEEN["batches"] > 4 and SEEN["total"] == 4  # x/4, not x/<batches in the epoch>
    assert "v_num" not in SEEN["postfix"] and "train/loss" in SEEN["postfix"]
    assert (Path(tmp_path) / "metrics.json").is_file()
