"""Test-only: a callback that SIGKILLs its own process at a chosen point of training (a real kill: no
handler runs, nothing is flushed or closed), for the kill harness in test_kill.py.

`where` names the point; `step` is the optimizer step (trainer.global_step) it waits for, `epoch` an epoch.
Before dying it appends `<where> <global_step>` to `record`, so the test knows what the kill could lose.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

import tunelab.checkpoint.io as checkpoint_io


class KillAt(pl.Callback):
    """where: batch_start (with `micro` = micro-batch index within the step), batch_end, epoch_start,
    validation, write_tmp (checkpoint bytes written, before the rename), write_marker (renamed, before the
    completion marker), train_end (after training, before the final evaluation and export)."""

    def __init__(self, where: str, record: str, step: int = 0, epoch: int = 0, micro: int = 0) -> None:
        self.where, self.step, self.epoch, self.micro, self.record = where, step, epoch, micro, Path(record)

    def _die(self, step: int) -> None:
        with self.record.open("a") as file:
            file.write(f"{self.where} {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.where not in ("write_tmp", "write_marker"):
            return
        replace = os.replace

        def replace_or_die(src: Any, dst: Any) -> None:
            name = Path(dst).name
            target = f"step{self.step}.ckpt" + (".done" if self.where == "write_marker" else "")
            if name == target:  # write_marker: the checkpoint was renamed already; its marker never will be
                self._die(self.step)
            replace(src, dst)

        checkpoint_io.os.replace = replace_or_die  # the writer's own module: a kill inside save_atomic

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        micro = batch_idx % trainer.accumulate_grad_batches
        if self.where == "batch_start" and trainer.global_step == self.step and micro == self.micro:
            self._die(trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.where == "batch_end" and trainer.global_step == self.step:
            self._die(trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.where == "epoch_start" and trainer.current_epoch == self.epoch:
            self._die(trainer.global_step)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.where == "validation" and trainer.current_epoch == self.epoch and trainer.state.fn == "fit":
            self._die(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.where == "train_end":
            self._die(trainer.global_step)


class SignalAt(pl.Callback):
    """Sends `signum` to its own process in the second micro-batch of optimizer step `step` (mid-accumulation)."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step, self.sent = signum, step, False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        micro = batch_idx % trainer.accumulate_grad_batches
        if not self.sent and trainer.global_step == self.step and micro == 1:
            self.sent = True
            os.kill(os.getpid(), self.signum)
