"""The training progress bar: Lightning's tqdm bar, truthful about the run's length and alive on a terminal."""

from __future__ import annotations

import sys
import threading
from typing import Any

from pytorch_lightning.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDMProgressBar with three changes.

    - The total is what this run will train: with hyperparams.max_steps, the batches left until that step (x/40 for
      max_steps=40), not the epoch's 125 batches Lightning shows whenever max_epochs is also set.
    - On a terminal it moves every batch and is redrawn every `terminal_refresh_s` seconds even while one step
      takes longer (elapsed time and rate stay current); into a file (a log) every `refresh_rate` batches, to keep
      the log short.
    - No `v_num`: the logger's version (here the run id's tail) says nothing about progress.
    """

    def __init__(self, refresh_rate: int = 20, terminal_refresh_s: float = 1.0, process_position: int = 0,
                 leave: bool = False, terminal: bool | None = None) -> None:
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        super().__init__(refresh_rate=1 if self.terminal and refresh_rate > 0 else refresh_rate,
                         process_position=process_position, leave=leave)
        self.terminal_refresh_s = terminal_refresh_s
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps <= 0:
            return total
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready  # this epoch's, before a resume
        left = (max_steps - self.trainer.global_step) * max(1, self.trainer.accumulate_grad_batches)
        return min(total, done + left)

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        if self.terminal and self.is_enabled and self.terminal_refresh_s > 0:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, args=(trainer,), daemon=True, name="progress-bar")
            self._ticker.start()

    def _tick(self, trainer: Any) -> None:
        while not self._stop.wait(self.terminal_refresh_s):
            bar = self._train_progress_bar
            if bar is not None and not bar.disable and trainer.training:  # validation draws its own bar
                bar.refresh()  # takes tqdm's lock: never interleaved with the loop's own update

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._stop.set()  # a failed or interrupted run: the daemon thread stops drawing at once
