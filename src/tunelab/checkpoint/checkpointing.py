"""Checkpoints that bound lost work, and exact resume from them.

- `AtomicCheckpointIO` (a Lightning CheckpointIO plugin, so every checkpoint goes through it: ours, the
  best-by-metric one, SLURM's hpc one) writes to a temp file, fsyncs, renames, and only then writes a
  completion marker `<name>.ckpt.done`. A kill or a full disk never leaves a file that looks complete.
- `Checkpointing` (a callback) saves every N optimizer steps and/or M minutes, independent of any
  validation monitor (ModelCheckpoint with a monitor writes nothing until the metric exists), keeps
  the last K, saves at the end of training, holds the RNG states, and turns SIGTERM/SIGINT into
  "finish this step, checkpoint, exit 143/130".
- `find_resume` turns `resume=auto|<run dir>|<file>` into one checked checkpoint or a one-line error (exit 4).
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

import json
import logging
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict

from tunelab.errors import CheckpointError

log = logging.getLogger(__name__)

MARKER = ".done"  # `<checkpoint>.done`: written last, says the checkpoint beside it is complete
FORMAT = 1


# ---- writing -------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any, before_replace: Any = None) -> None:
    """`write(file)` into a temp file beside `path`, fsync, rename over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + MARKER)


def checkpoint_bytes(path: Path) -> int:
    """The size of a checkpoint: a file's, or the total of a directory of shards (what its marker records)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def is_checkpoint_dir(path: Path) -> bool:
    """A directory written as one checkpoint (shards), as opposed to a run directory or checkpoints/."""
    return Path(path).is_dir() and marker_path(Path(path)).is_file()


def mark_directory(path: Path, info: dict[str, Any], step: int, epoch: int) -> None:
    """Write the completion marker of a checkpoint directory (after every rank wrote its shards). `info` is
    the checkpoint's `tunelab` entry without its tensors: the identity and W&B id travel in the marker."""
    marker = {"format": FORMAT, "bytes": checkpoint_bytes(path), "step": int(step), "epoch": int(epoch),
              "step_boundary": bool(info.get("step_boundary", True)), "resumable": bool(info.get("resumable")),
              "time": time.time(), "layout": "directory", "identity": info.get("identity") or {},
              "wandb_id": info.get("wandb_id")}
    _write_atomic(marker_path(path), lambda file: file.write(json.dumps(marker).encode() + b"\n"))


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint file or directory, its marker first (a half-removed pair reads as incomplete)."""
    import shutil

    path = Path(path)
    marker_path(path).unlink(missing_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_atomic(checkpoint: dict[str, Any], path: Path) -> None:
    """Write `checkpoint` to `path` so that a reader sees the old file, or the complete new one and its marker."""
    path = Path(path)
    info = checkpoint.get("tunelab") or {}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The old marker goes only once the new bytes are safely on disk: a failed write (full disk) leaves the
        # previous checkpoint of this name complete; from the rename until the new marker, `path` is incomplete.
        _write_atomic(path, lambda file: torch.save(checkpoint, file),
                      before_replace=lambda: marker_path(path).unlink(missing_ok=True))
        marker = {"format": FORMAT, "bytes": path.stat().st_size, "step": int(checkpoint.get("global_step", 0)),
                  "epoch": int(checkpoint.get("epoch", 0)), "step_boundary": bool(info.get("step_boundary", True)),
                  "resumable": bool(info.get("resumable")), "time": time.time()}
        _write_atomic(marker_path(path), lambda file: file.write(json.dumps(marker).encode() + b"\n"))
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {err.strerror or err}", f"directory {path.parent}",
            "free disk space or point paths.output_dir at a writable disk; earlier checkpoints are intact",
        ) from None


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


# ---- what a checkpoint belongs to -------------------------------------------------------------
IDENTITY_KEYS = ("model", "method")  # a checkpoint resumes only into a run of the same model and method
# How the model runs, not what its tensors are: a run resumed with gradient checkpointing turned on (after an
# out-of-memory) or compile turned off is the same run.
IGNORED_MODEL_KEYS = {"attn_implementation", "trust_remote_code", "revision", "tokenizer_name_or_path",
                      "gradient_checkpointing", "compile", "liger_kernel"}


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The config that decides which tensors a checkpoint holds and what they mean: model and method."""
    plain = {key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg.get(key), DictConfig)
             else cfg.get(key) for key in IDENTITY_KEYS}
    model = {k: v for k, v in (plain.get("model") or {}).items() if k not in IGNORED_MODEL_KEYS}
    assets = str(OmegaConf.select(cfg, "paths.assets_dir", default="") or "")
    if assets and isinstance(model.get("name_or_path"), str):  # the bundled models move with the checkout
        model["name_or_path"] = model["name_or_path"].replace(assets, "<assets>")
    return {"model": model, "method": plain.get("method")}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def identity_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: value in the checkpoint vs value here` for each setting that differs."""
    before, after = _flatten(saved), _flatten(current)
    return [f"{key}: {before.get(key)!r} in the checkpoint, {after.get(key)!r} here"
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]


# ---- reading ----------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    path: Path
    step: int
    epoch: int
    tunelab: dict[str, Any] = field(default_factory=dict)
    state_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Open `path` as a tunelab/Lightning checkpoint (weights_only, memory-mapped) or raise CheckpointError."""
    path = Path(path)
    hint = "pass a .ckpt file from <run dir>/checkpoints, a run directory, or resume=auto"
    if not path.exists():
        raise CheckpointError(f"no such checkpoint {path}", "key resume", hint)
    if is_checkpoint_dir(path):
        return _read_directory(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory without checkpoints/", "key resume", hint)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)", "key resume",
                              "the writer was stopped; resume from an earlier checkpoint or resume=<run dir>")
    marker = _read_marker(path)
    if marker is not None and marker.get("bytes") != size:
        raise CheckpointError(f"checkpoint {path} is truncated: {size} bytes, its marker says {marker.get('bytes')}",
                              "key resume", "resume=<run dir> picks the newest complete checkpoint")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any reader failure on a user's file is the same user-facing error
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(err)})", "key resume",
                              hint) from None
    if not isinstance(data, dict) or "state_dict" not in data or "global_step" not in data:
        raise CheckpointError(f"{path} is a torch file but not a training checkpoint (no state_dict/global_step)",
                              "key resume", hint)
    shapes = {k: tuple(v.shape) for k, v in data["state_dict"].items() if isinstance(v, torch.Tensor)}
    return CheckpointInfo(path, int(data["global_step"]), int(data.get("epoch", 0)), dict(data.get("tunelab") or {}),
                          shapes)


def _read_directory(path: Path) -> CheckpointInfo:
    """A checkpoint directory of shards: what tunelab needs is in its marker; the shards are the engine's to read
    (DeepSpeed's and torch.distributed.checkpoint's own loaders, on every rank)."""
    marker = _read_marker(path) or {}
    size = checkpoint_bytes(path)
    if marker.get("layout") != "directory" or marker.get("bytes") != size:
        raise CheckpointError(f"checkpoint directory {path} is incomplete: {size} bytes, its marker says "
                              f"{marker.get('bytes')}", "key resume",
                              "resume=<run dir> picks the newest complete checkpoint")
    info = {"identity": marker.get("identity") or {}, "wandb_id": marker.get("wandb_id")}
    return CheckpointInfo(path, int(marker.get("step", 0)), int(marker.get("epoch", 0)), info)


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads(marker_path(path).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def complete_checkpoints(directory: Path) -> tuple[list[tuple[dict[str, Any], Path]], list[str]]:
    """The resumable checkpoints in `directory` (written by `Checkpointing` at a step boundary, with a matching
    completion marker), oldest first; and notes on the incomplete ones.

    The best-by-metric checkpoints are not candidates: written at the end of a validation, they restart
    Lightning's loops from another place than the run they came from (8.7e-5 max-abs off, measured).
    """
    found, notes = [], []
    for path in sorted(Path(directory).glob("*.ckpt")):
        marker = _read_marker(path)
        if marker is not None and not marker.get("resumable"):
            continue
        if marker is None and not re.fullmatch(r"(step\d+|last)\.ckpt", path.name):
            continue  # someone else's file, or a best-by-metric one cut short: not a candidate either way
        if marker is None:
            notes.append(f"skipping incomplete checkpoint {path} (no completion marker: its writer was stopped)")
        elif marker.get("bytes") != checkpoint_bytes(path):
            notes.append(f"skipping incomplete checkpoint {path} ({checkpoint_bytes(path)} bytes, marker says "
                         f"{marker.get('bytes')})")
        else:
            found.append((marker, path))
    for tmp in sorted(Path(directory).glob(".*.tmp-*")):
        notes.append(f"skipping partial write {tmp}")
    found.sort(key=lambda item: (item[0].get("step", 0), item[0].get("time", 0.0)))  # newest last
    return found, notes


# ---- resume=... ---------------------------------------------------------------------------------
@dataclass
class Resume:
    """What `resume=` resolved to: a checked checkpoint (or none), and whether the run continues in place."""

    path: Path | None = None
    info: CheckpointInfo | None = None
    in_place: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def ckpt_path(self) -> str | None:
        return str(self.path) if self.path else None

    def continue_logger_runs(self, loggers: DictConfig) -> None:
        """Resumed in place: a logger node with an `id` key (W&B) continues the checkpoint's run."""
        wandb_id = self.info.tunelab.get("wandb_id") if self.info is not None and self.in_place else None
        if not wandb_id:
            return
        with open_dict(loggers):
            for node in loggers.values():
                if isinstance(node, DictConfig) and "id" in node and node.get("id") is None:
                    node.id = wandb_id

    def prepare(self, callbacks: list[Any], module: pl.LightningModule, run_identity: dict[str, Any]) -> None:
        """Tag this run's checkpoints with its identity; refuse a checkpoint whose tensors do not fit `module`."""
        for callback in callbacks:
            if isinstance(callback, Checkpointing):
                callback.identity = run_identity
        self.check_tensors(module)
        for note in self.notes:
            log.warning(note)
        if self.info is not None:
            log.warning("resuming from %s (step %d, epoch %d)", self.path, self.info.step, self.info.epoch)

    def check_tensors(self, module: pl.LightningModule) -> None:
        """Refuse a checkpoint whose tensors do not fit this run's module (names or shapes), saying what differs."""
        if self.info is None or (self.path is not None and self.path.is_dir()):
            return  # a directory of shards: the engine matches names and shapes itself as it loads
        state = module.state_dict()
        if not getattr(module, "strict_loading", True):  # adapters and frozen runs save only what trains
            trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable}
        expected = {k: tuple(v.shape) for k, v in state.items()}
        saved = {k: v for k, v in self.info.state_shapes.items() if k in expected or not k.startswith("running.")}
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
        if not (missing or extra or reshaped):
            return
        parts = []
        for label, keys in (("missing", missing), ("unexpected", extra), ("of another shape", reshaped)):
            if keys:
                parts.append(f"{len(keys)} tensors {label} (e.g. {keys[0]})")
        raise CheckpointError(f"checkpoint {self.path} is of another model or method: " + "; ".join(parts),
                              "key resume", "resume with the model= and method= the checkpoint was trained with")


def find_resume(resume: Any, run_dir: Path, current_identity: dict[str, Any] | None = None) -> Resume:
    """Resolve `resume` (None, `auto`, a run directory, a checkpoints directory or a file) into a checked checkpoint.

    `auto` looks in this run's own directory and starts from scratch when nothing is there; a directory
    must hold a complete checkpoint. Incomplete checkpoints are skipped with a note.
    """
    if resume is None or str(resume).strip() in ("", "null", "None"):
        return Resume()
    text = str(resume)
    auto = text == "auto"
    target = Path(run_dir) if auto else Path(text).expanduser()
    if auto or (target.is_dir() and not is_checkpoint_dir(target)):
        directory = target / "checkpoints" if (target / "checkpoints").is_dir() else target
        found, notes = complete_checkpoints(directory) if directory.is_dir() else ([], [])
        if not found:
            if auto:
                return Resume(notes=[*notes, f"resume=auto: no checkpoint in {directory} yet, starting from scratch"])
            if not (directory.is_dir() or (target / ".hydra").is_dir()):
                raise CheckpointError(f"{target} is a directory but not a run directory (no checkpoints/)",
                                      "key resume", "pass a run directory (outputs/runs/<id>) or a .ckpt file")
            raise CheckpointError(
                f"no complete checkpoint in {directory}: the run stopped before its first checkpoint"
                + (f" ({len(notes)} incomplete skipped)" if notes else ""), "key resume",
                "start the run again without resume= (nothing was saved to continue from)")
        path = found[-1][1]
        plan = Resume(path, read_checkpoint(path), in_place=True, notes=notes)
    else:
        plan = Resume(target, read_checkpoint(target))
    if current_identity is not None and plan.info is not None and "identity" in plan.info.tunelab:
        differences = identity_difference(plan.info.tunelab["identity"], current_identity)
        if differences:
            raise CheckpointError(
                f"checkpoint {plan.path} is of another model or method: " + "; ".join(differences[:4])
                + (f" (+{len(differences) - 4} more)" if len(differences) > 4 else ""), "key resume",
                "resume with the command line the run was started with (its .hydra/overrides.yaml) plus resume=")
    return plan


def prepare_run_dir(argv: list[str], config_name: str = "train") -> list[str]:
    """Before Hydra writes anything into a run directory: refuse one that a live job holds (exit 2), check
    `resume=` (readable, same model and method: exit 4), and make `resume=<run dir>` continue that run in
    place (its directory, checkpoints and W&B run). Returns the argv to launch.

    `resume=<file>` starts a new run directory from that checkpoint; `resume=auto` uses this job's own
    directory (pin it with run_id=... so that a requeued job finds it).
    """
    from hydra._internal.utils import get_args_parser

    from tunelab.checkpoint.lock import check_free
    from tunelab.config.compose import compose, new_run_id

    args = get_args_parser().parse_args(argv)
    if args.multirun or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return argv
    named = [o.split("=", 1)[0] for o in args.overrides]
    if "resume" not in named and "hydra.run.dir" not in named and f"run_id={new_run_id()}" in args.overrides:
        return argv  # a fresh run in a directory named by this process's new id: nothing to check
    cfg = compose(args.overrides, args.config_name or config_name, args.config_dir)
    if "resume" not in cfg:
        return argv
    value = cfg.resume
    run_dir = Path(str(cfg.hydra.run.dir))
    target = Path(str(value)).expanduser() if value is not None else None
    in_place = target is not None and str(value) != "auto" and target.is_dir() and not is_checkpoint_dir(target)
    if in_place:
        run_dir = target.resolve()
        if run_dir.name == "checkpoints" and not (run_dir / "checkpoints").is_dir():
            run_dir = run_dir.parent
    check_free(run_dir)
    find_resume(value, run_dir, identity(cfg))
    if in_place and not any(o.startswith("hydra.run.dir=") for o in args.overrides):
        text = str(run_dir)
        argv = [*argv, f"hydra.run.dir={text}" if re.fullmatch(r"[\w./-]+", text) else f"hydra.run.dir='{text}'"]
    return argv


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run: the original overrides plus resume=<run dir>."""
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("train.py", "tunelab")) else []
    kept = [a for a in argv if not re.match(r"^(resume|run_id|hydra\.run\.dir)=", a)]
    return " ".join(["tunelab train", *kept, f"resume={run_dir}"])


# ---- signals ------------------------------------------------------------------------------------
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
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread (ddp_spawn workers, notebooks' threads)
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

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
        self.last_path: Path | None = None

    # -- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.save_on_signal:
            self.stop.install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.stop.restore()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_data_position(trainer)
        self._last_save = time.monotonic()
        self._seen_step = self._saved_step = trainer.global_step
        if trainer.is_global_zero and self.dirpath.is_dir():
            for tmp in self.dirpath.glob(".*.tmp-*"):  # partial writes of a killed run: never complete
                if not tmp.name.endswith(f"-{os.getpid()}"):
                    tmp.unlink(missing_ok=True)

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
        from lightning_fabric.utilities.types import _Stateful

        states, self._loader_states = self._loader_states, []
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, dict) else (
            list(loaders) if isinstance(loaders, (list, tuple)) else [loaders])
        stateful = [loader for loader in loaders if isinstance(loader, _Stateful)]
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
        if signum is not None:
            self._interrupt(trainer, signum)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        signum = self._broadcast_signal(trainer)
        if signum is not None:  # do not wait for a long validation (generation) to end
            if self._saved_step != trainer.global_step:
                self.save(trainer)
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
            self._link_last(path)
            self._prune()
        return path

    @staticmethod
    def _wandb_id(trainer: pl.Trainer) -> str | None:
        from pytorch_lightning.loggers import WandbLogger

        return next((lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def _link_last(self, path: Path) -> None:
        last = self.dirpath / "last.ckpt"
        marker_path(last).unlink(missing_ok=True)
        tmp = self.dirpath / f".last.ckpt.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        if path.is_dir():
            os.symlink(path.name, tmp)  # a directory of shards: a relative symlink, replaced atomically like a file
            if last.is_dir() and not last.is_symlink():
                remove_checkpoint(last)
        else:
            try:
                os.link(path, tmp)  # a hard link: last.ckpt costs no disk and no copy time
            except OSError:
                import shutil

                shutil.copyfile(path, tmp)
        os.replace(tmp, last)
        tmp_marker = marker_path(tmp)
        tmp_marker.write_bytes(marker_path(path).read_bytes())
        os.replace(tmp_marker, marker_path(last))
        _fsync_dir(self.dirpath)

    def _prune(self) -> None:
        ours = sorted((int(m.group(1)), p) for p in self.dirpath.glob("step*.ckpt")
                      if (m := re.fullmatch(r"step(\d+)\.ckpt", p.name)))
        for _, path in ours[: -self.keep_last]:
            remove_checkpoint(path)

    def _interrupt(self, trainer: pl.Trainer, signum: int) -> None:
        run_dir = self.dirpath.parent
        message = (f"tunelab: interrupted by {signal.Signals(signum).name} at step {trainer.global_step}: "
                   f"checkpoint {self.last_path}\n  resume with: {resume_command(run_dir)}")
        if trainer.is_global_zero:
            print(message, file=sys.stderr, flush=True)
        raise Interrupted(signum, message)
