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
    """Sends `signum` to its own process at `where`: mid_step (the second micro-batch of optimizer step `step`),
    write (inside the step-`step` checkpoint write: its bytes on disk, before the rename), validation (the first
    batch of a validation during fit after step `step`), test (the first test batch), fit_end (beside the
    model export, after training). The process goes on: what it does with the signal is what is tested."""

    def __init__(self, signum: int, step: int = 0, where: str = "mid_step") -> None:
        self.signum, self.step, self.where, self.sent = signum, step, where, False
        self._replace: Any = None

    def _send(self, where: str) -> None:
        if self.where == where and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.where != "write" or self._replace is not None:
            return
        self._replace = replace = os.replace

        def signal_then_replace(src: Any, dst: Any) -> None:
            if Path(dst).name == f"step{self.step}.ckpt":
                self._send("write")  # the handler runs here, inside save_atomic
                self._restore()
            replace(src, dst)

        checkpoint_io.os.replace = signal_then_replace  # the writer's own module (os itself: restored after)

    def _restore(self) -> None:
        if self._replace is not None:
            checkpoint_io.os.replace, self._replace = self._replace, None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        micro = batch_idx % trainer.accumulate_grad_batches
        if trainer.global_step == self.step and micro == 1:
            self._send("mid_step")

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.global_step == self.step:
            self._send("validation")

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self._send("test")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._send("fit_end")
