"""The Lightning side of checkpoints: a CheckpointIO plugin that writes atomically, and the callback that decides
when to save.

- `AtomicCheckpointIO` (so every checkpoint goes through it: ours, the best-by-metric one, SLURM's hpc one)
  writes with `tunelab.checkpoint.io.save_atomic`: temp file, fsync, rename, then a completion marker.
- `Checkpointing` saves every N optimizer steps and/or M minutes, independent of any validation monitor
  (ModelCheckpoint with a monitor writes nothing until the metric exists), keeps the last K, saves at the end of
  training, holds the RNG states, and turns SIGTERM/SIGINT into "finish this step, checkpoint, exit 143/130";
  `hold_signals` keeps that for a whole job (the final evaluation, the export and the loggers' finish too).
- `BestCheckpoint` is Lightning's best-by-metric ModelCheckpoint keeping its top k files across a resume.
- Sharded strategies that write a checkpoint as a directory of per-rank shards (DeepSpeed, FSDP with
  state_dict_type=sharded) bypass the CheckpointIO: there the callback marks the directory complete once
  every rank has written (the marker then also holds what the file would: identity, W&B id), `last.ckpt`
  is a symlink, and pruning removes whole directories. The engine reads its own shards on resume.

What makes a resumed run bitwise equal to an uninterrupted one: model, optimizer, scheduler and loop
state (Lightning), the data position (`tunelab.data.resumable.ResumableLoader`), and the RNG state
that the next training batch starts from. Each training batch starts from the RNG state the previous
one ended with (validation, new iterators and the like in between do not count), so the state saved
after step k is exactly the one step k+1 starts from, in a resumed run as in the original.
"""

from __future__ import annotations

import glob
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from tunelab import libraries
from tunelab.checkpoint.io import (
    FORMAT,
    checkpoint_bytes,
    link_last,
    mark_directory,
    marker_path,
    read_marker,
    remove_checkpoint,
    remove_partial_writes,
    save_atomic,
)
from tunelab.checkpoint.signals import Interrupted, StopRequest, interrupted


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch CheckpointIO with atomic, fsynced writes and a completion marker written last."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        save_atomic(checkpoint, Path(path))

    def remove_checkpoint(self, path: Any) -> None:
        remove_checkpoint(Path(path))  # also a directory that a sharded strategy wrote (best-by-metric under DeepSpeed)


# ---- RNG states as tensors and plain containers (loadable with weights_only=True) ----------------
def rng_states() -> dict[str, Any]:
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the callback ---------------------------------------------------------------------------------
class Checkpointing(pl.Callback):
    """Saves `step<N>.ckpt` every `every_n_steps` optimizer steps and/or `every_minutes`, at the end of training,
    and on SIGTERM/SIGINT (then exits 143/130); keeps the newest `keep_last`; `last.ckpt` is the newest.

    Saves happen only at optimizer-step boundaries (never mid-accumulation), so every one resumes exactly.
    """

    def __init__(self, dirpath: str, every_n_steps: int | None = 200, every_minutes: float | None = 5.0,
                 keep_last: int = 2, save_on_signal: bool = True, identity: dict[str, Any] | None = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or null, got {every_n_steps}")
        if every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"every_minutes must be > 0 or null, got {every_minutes}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.every_minutes, self.keep_last = every_n_steps, every_minutes, keep_last
        self.save_on_signal = save_on_signal
        self.identity = identity or {}
        self.stop = StopRequest()
        self._last_save = time.monotonic()
        self._saved_step = -1
        self._seen_step = -1
        self._step_boundary = True
        self._train_rng: dict[str, Any] | None = None  # the RNG state the last training batch ended with
        self._pending_rng: dict[str, Any] | None = None  # restored when the first resumed batch starts
        self._loader_states: list[dict[str, Any]] = []
        self._saving = False  # True while this callback writes: marks the checkpoint as one to resume from
        self._check_epoch_progress = False
        self._held_by: pl.Trainer | None = None
        self.last_path: Path | None = None

    # -- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.save_on_signal:
            self.stop.install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._held_by is None:  # `hold` keeps the handlers until the job's last phase (export, loggers) ends
            self.stop.restore()

    def hold(self, trainer: pl.Trainer, resumed_from: Path | None = None) -> None:
        """Handle SIGTERM/SIGINT from now until `release()`, across every phase of the job (fit, the final
        evaluation and test, the model export, the loggers' finish), not only during fit."""
        if self.save_on_signal:
            self.stop.install()
            self._held_by = trainer
            self.last_path = self.last_path or resumed_from

    def release(self) -> None:
        self._held_by = None
        self.stop.restore()

    def check(self, trainer: pl.Trainer) -> None:
        """Raise `Interrupted` if a signal came (between phases: the checkpoints are already written)."""
        if self.stop.signum is not None:
            self._interrupt(trainer, self.stop.signum)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop.take_over()  # Lightning put its SIGTERM handler on top of ours: it would end the run with 0
        if self.last_path is None and trainer.ckpt_path:
            self.last_path = Path(trainer.ckpt_path)  # resumed: until this run saves, that checkpoint holds it
        self._restore_data_position(trainer)
        self._last_save = time.monotonic()
        self._seen_step = self._saved_step = trainer.global_step
        if trainer.is_global_zero and self.dirpath.is_dir():
            remove_partial_writes(self.dirpath)  # of a killed run: never complete

    # -- RNG: the training RNG moves only inside training batches
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Whatever ran since the previous batch (validation and its loaders drawing seeds, an epoch's new
        # iterator) does not move the RNG this batch starts from: it is the state the previous batch ended
        # with, which is also what a checkpoint written after that batch holds. So a resumed run draws the
        # same dropout masks as the uninterrupted one, wherever the interruption fell.
        state = self._pending_rng if self._pending_rng is not None else self._train_rng
        if state is not None:
            set_rng_states(state)
        self._pending_rng = None
        if self._check_epoch_progress:
            self._check_epoch_progress = False
            # Resumed from a checkpoint written after an epoch's last batch, Lightning (2.6) starts the next
            # epoch without counting it started: a checkpoint of this run would then say "epoch not started"
            # and a second resume repeats the epoch (4 extra steps, measured). In a training batch the epoch
            # is always started and not yet processed; restore that.
            progress = trainer.fit_loop.epoch_progress
            if progress.total.started == progress.total.processed:
                progress.increment_ready()
                progress.increment_started()
        self._step_boundary = False

    def _capture_rng(self) -> None:
        self._train_rng = rng_states()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["tunelab"] = {
            "format": FORMAT, "identity": self.identity, "wandb_id": self._wandb_id(trainer),
            "rng": self._train_rng if self._train_rng is not None else rng_states(),
            "step_boundary": self._step_boundary, "resumable": self._saving and self._step_boundary,
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._pending_rng = (checkpoint.get("tunelab") or {}).get("rng")
        self._check_epoch_progress = True
        loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
        self._loader_states = (loop.get("state_dict") or {}).get("combined_loader") or []

    def _restore_data_position(self, trainer: pl.Trainer) -> None:
        # Lightning restores a stateful loader only if the loader is built after the checkpoint is read; a
        # scheduler that asks for `estimated_stepping_batches` builds it before, and the position is dropped
        # (the resumed epoch would start again from its first batch). Re-apply it before the first batch.
        states, self._loader_states = self._loader_states, []
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, dict) else (
            list(loaders) if isinstance(loaders, (list, tuple)) else [loaders])
        stateful = [loader for loader in loaders if libraries.is_stateful(loader)]
        if states and len(stateful) == len(states):
            for loader, state in zip(stateful, states, strict=True):
                loader.load_state_dict(state)

    # -- when to save
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._capture_rng()
        if trainer.global_step == self._seen_step:
            return  # mid-accumulation: nothing a checkpoint could resume exactly
        self._seen_step = trainer.global_step
        self._step_boundary = True
        signum = self._broadcast_signal(trainer)
        due = (self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0) or (
            self.every_minutes is not None and time.monotonic() - self._last_save >= 60 * self.every_minutes)
        if due or signum is not None:
            self.save(trainer)
            if signum is None:  # a signal that came during the write: this step is saved, stop now
                signum = self._broadcast_signal(trainer)
        if signum is not None:
            self._interrupt(trainer, signum)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop.take_over()  # trainer.validate() after fit: Lightning's handler again

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop.take_over()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        signum = self._broadcast_signal(trainer)
        if signum is not None:  # do not wait for a long validation (generation) to end
            if trainer.state.fn == "fit" and self._saved_step != trainer.global_step:
                self.save(trainer)
            self._interrupt(trainer, signum)  # after fit (the final validation): the final checkpoint holds it

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        signum = self._broadcast_signal(trainer)
        if signum is not None:  # the baseline or final test: nothing to save (the final checkpoint holds it)
            self._interrupt(trainer, signum)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved_step != trainer.global_step and self._step_boundary:
            self.save(trainer)  # a kill during the final evaluation or export loses no training

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.loggers import WandbLogger

        if isinstance(exception, Interrupted):
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.mark_preempting()  # shown as preempted, then finished as failed

    # -- doing it
    def _broadcast_signal(self, trainer: pl.Trainer) -> int | None:
        signum = self.stop.signum
        if trainer.world_size > 1:  # every rank must stop at the same step, or the next collective hangs
            flag = torch.tensor([signum or 0], device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max").item()) or None
        return signum

    def save(self, trainer: pl.Trainer) -> Path:
        """Write `step<N>.ckpt` (atomically, through the trainer's CheckpointIO), point last.ckpt at it, prune."""
        path = self.dirpath / f"step{trainer.global_step}.ckpt"
        if trainer.is_global_zero and path.is_dir():
            marker_path(path).unlink(missing_ok=True)  # the engine rewrites these shards in place: incomplete now
        self._saving = True
        try:
            trainer.save_checkpoint(path, weights_only=False)
        finally:
            self._saving = False
        if trainer.world_size > 1:
            trainer.strategy.barrier("tunelab-checkpoint")  # every rank's shards are on disk before the marker
        if trainer.is_global_zero and path.is_dir():
            # A sharded strategy wrote a directory, around the CheckpointIO: mark it complete here.
            info = {"identity": self.identity, "wandb_id": self._wandb_id(trainer),
                    "step_boundary": self._step_boundary, "resumable": self._step_boundary}
            mark_directory(path, info, trainer.global_step, trainer.current_epoch)
        self._saved_step, self._last_save = trainer.global_step, time.monotonic()
        self.last_path = path
        if trainer.is_global_zero:
            link_last(self.dirpath, path)
            self._prune()
        return path

    @staticmethod
    def _wandb_id(trainer: pl.Trainer) -> str | None:
        from pytorch_lightning.loggers import WandbLogger

        return next((lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def _prune(self) -> None:
        ours = sorted((int(m.group(1)), p) for p in self.dirpath.glob("step*.ckpt")
                      if (m := re.fullmatch(r"step(\d+)\.ckpt", p.name)))
        for _, path in ours[: -self.keep_last]:
            remove_checkpoint(path)

    def _interrupt(self, trainer: pl.Trainer, signum: int) -> None:
        raise interrupted(signum, trainer.global_step, self.last_path, self.dirpath.parent, trainer.is_global_zero)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's best-by-metric checkpoint, keeping its top k files across a resume too.

    A resumed run's ModelCheckpoint knows only the best files written before the checkpoint it resumes from: a
    best written after it (by the validation that follows a step checkpoint, then a kill) stayed beside every
    newer best (`best-step40.ckpt` beside `best-step120.ckpt`). On resume, the files of its name left in the
    directory are weighed with the score each one holds; the top k are kept, the rest removed."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not trainer.ckpt_path or not self.save_top_k:
            return
        ranked = self._rank_left_behind() if trainer.is_global_zero else None
        ranked = trainer.strategy.broadcast(ranked, src=0)  # every rank must decide alike whether to save
        if ranked is not None:
            k = len(ranked) if self.save_top_k == -1 else self.save_top_k
            self.best_k_models = dict(ranked[:k])
            if trainer.is_global_zero:
                for path, _ in ranked[k:]:
                    remove_checkpoint(Path(path))
            if ranked[:k]:
                self.best_model_path, self.best_model_score = ranked[0]
            if len(ranked[:k]) == k:
                self.kth_best_model_path, self.kth_value = ranked[k - 1]

    def _rank_left_behind(self) -> list[tuple[str, Any]] | None:
        """Every complete best file of this callback in its directory with its score, best first (None: the
        directory holds only what the resumed state knows)."""
        prefix = (self.filename or "").split("{")[0]
        if not prefix or not self.dirpath or not Path(self.dirpath).is_dir():
            return None  # no name of its own to tell its files from the others'
        known = {Path(p).resolve(): (p, s) for p, s in self.best_k_models.items() if Path(p).exists()}
        found = dict(known)
        for path in Path(self.dirpath).glob(f"{glob.escape(prefix)}*{self.FILE_EXTENSION}"):
            if path.resolve() in found or not path.is_file():
                continue
            score = self._score_of(path)
            if score is None:  # cut short by the kill: never a best
                remove_checkpoint(path)
            else:
                found[path.resolve()] = (str(Path(self.dirpath) / path.name), score)
        if found.keys() == known.keys():
            return None
        return sorted(found.values(), key=lambda item: float(item[1]), reverse=self.mode == "max")

    def _score_of(self, path: Path) -> Any:
        marker = read_marker(path)
        if marker is None or marker.get("bytes") != checkpoint_bytes(path):
            return None
        try:  # memory-mapped: only the small callback state is read
            states = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("callbacks") or {}
        except Exception:  # noqa: BLE001 - an unreadable file is not a best to keep
            return None
        state = states.get(self.state_key) or next(
            (s for s in states.values() if isinstance(s, dict) and s.get("monitor") == self.monitor
             and "best_k_models" in s), None)  # written by plain ModelCheckpoint (runs from before this class)
        return None if state is None else state.get("current_score")


class SignalHold:
    """What a job holds while it runs: the `Checkpointing` callback's signal handling, or nothing without one."""

    def __init__(self, checkpointing: Checkpointing | None, trainer: pl.Trainer) -> None:
        self.checkpointing, self.trainer = checkpointing, trainer

    def check(self) -> None:
        if self.checkpointing is not None:
            self.checkpointing.check(self.trainer)

    def release(self) -> None:
        if self.checkpointing is not None:
            self.checkpointing.release()


def hold_signals(callbacks: list[Any], trainer: pl.Trainer, resumed_from: Path | None = None) -> SignalHold:
    """Hold SIGTERM/SIGINT for a whole job (see `Checkpointing.hold`); `release()` it when the job ends."""
    checkpointing = next((c for c in callbacks if isinstance(c, Checkpointing)), None)
    if checkpointing is not None:
        checkpointing.hold(trainer, resumed_from)
    return SignalHold(checkpointing, trainer)
