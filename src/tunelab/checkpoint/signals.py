"""SIGTERM/SIGINT during training: finish the step, write a checkpoint, exit 143/130 with the command that resumes.

`StopRequest` records the signal instead of dying (a second one stops at once); the `Checkpointing` callback
polls it at step boundaries (and right after a checkpoint write), in evaluation batches and between the job's
phases, and raises `Interrupted` once its checkpoint is written. Lightning's own SIGTERM handler (which ends
the loops with exit status 0) is taken back from each time a loop starts.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Any


class Interrupted(SystemExit):
    """SIGTERM/SIGINT during training, after the step finished and a checkpoint was written: exit 128+signal.

    A SystemExit so that Lightning (which turns a KeyboardInterrupt into exit 1) and Hydra let it pass
    with its code, and a sweep stops instead of starting its next trial on a preempted machine.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.message = signum, message


class StopRequest:
    """Records SIGTERM/SIGINT instead of dying; a second signal of either kind stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Handle SIGTERM/SIGINT here from now on (once: a second call keeps the handlers found by the first)."""
        import threading

        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread (ddp_spawn workers, notebooks' threads)
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def take_over(self) -> None:
        """Handle them alone again, over whatever was put on top since `install` (Lightning's SIGTERM handler,
        which stops the loops with an exit status of 0): the handlers to restore stay those `install` found."""
        if self._previous:
            for signum in self.SIGNALS:
                signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: no more waiting
            self.restore()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\ntunelab: {signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run: the original overrides plus resume=<run dir>."""
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("train.py", "tunelab")) else []
    kept = [a for a in argv if not re.match(r"^(resume|run_id|hydra\.run\.dir)=", a)]
    return " ".join(["tunelab train", *kept, f"resume={run_dir}"])


def interrupted(signum: int, step: int, checkpoint: Path | None, run_dir: Path, announce: bool) -> Interrupted:
    """The exit for `signum` at `step`, saying which checkpoint holds the run and how to resume it."""
    if checkpoint is None:  # before the first step (the baseline evaluation): nothing to resume, start again
        argv = resume_command(run_dir).rsplit(" resume=", 1)[0]
        message = (f"tunelab: interrupted by {signal.Signals(signum).name} before training started: no checkpoint"
                   f"\n  start again with: {argv}")
    else:
        message = (f"tunelab: interrupted by {signal.Signals(signum).name} at step {step}: "
                   f"checkpoint {checkpoint}\n  resume with: {resume_command(run_dir)}")
    if announce:
        print(message, file=sys.stderr, flush=True)
    return Interrupted(signum, message)
