"""Files that a reader (or a kill) never sees half written, and checkpoints read and written with them.

- `atomic_write` is the one writer of a file that must be whole or absent: checkpoints and their markers,
  caches, pipeline scores and plots. It writes a temp file `.<name>.tmp-<pid>` beside the target (the
  checkpoint reader skips those, a restarted run deletes them), fsyncs it, renames it over the target and
  fsyncs the directory. `atomic_directory` and `atomic_link` do the same for a directory and a link.
- `save_atomic` writes a checkpoint, then a completion marker `<name>.ckpt.done`, so a kill or a full disk
  never leaves a file that looks complete; `read_checkpoint` and `complete_checkpoints` trust only those.

Only the standard library at import: the command line's cache writers use this module, and torch is
imported only by the functions that read or write tensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tunelab.errors import CheckpointError

MARKER = ".done"  # `<checkpoint>.done`: written last, says the checkpoint beside it is complete
FORMAT = 1
PARTIAL = ".*.tmp-*"  # what `atomic_write` leaves behind when its process is killed mid-write


# ---- the atomic writers ---------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the filesystem lets a directory be opened)."""
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


def atomic_write(path: Path, data: bytes | str | Callable[[IO[bytes]], Any], *, durable: bool = True,
                 before_replace: Callable[[], Any] | None = None) -> None:
    """Write `data` (bytes, text as UTF-8, or a function that writes into a binary file) to `path` so that a
    reader sees the old file or the whole new one. `durable` fsyncs the file and the directory (a cache that is
    rebuilt when lost can skip that); `before_replace` runs once the new bytes are on disk, before the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            if callable(data):
                data(file)
            else:
                file.write(data.encode() if isinstance(data, str) else data)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_directory(path: Path, write: Callable[[Path], Any]) -> bool:
    """`write(folder)` into a staging folder beside `path`, then rename it to `path`: readers see no directory
    or a whole one. False (and the staging folder removed) when another process renamed its own first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp-{os.getpid()}"))
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.replace(staging, path)
    except OSError:  # a parallel job renamed its (identical, content-keyed) directory first
        shutil.rmtree(staging, ignore_errors=True)
        return False
    return True


def atomic_link(path: Path, source: Path) -> None:
    """Point `path` at `source` in one rename: a relative symlink for a directory, else a hard link (no disk, no
    copy time), else a copy where the filesystem has no hard links."""
    path, source = Path(path), Path(source)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    if source.is_dir():
        os.symlink(source.name, tmp)
    else:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    os.replace(tmp, path)


# ---- checkpoints and their completion markers -----------------------------------------------------
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


def _write_marker(path: Path, marker: dict[str, Any]) -> None:
    atomic_write(marker_path(path), json.dumps(marker).encode() + b"\n")


def mark_directory(path: Path, info: dict[str, Any], step: int, epoch: int) -> None:
    """Write the completion marker of a checkpoint directory (after every rank wrote its shards). `info` is
    the checkpoint's `tunelab` entry without its tensors: the identity and W&B id travel in the marker."""
    _write_marker(path, {
        "format": FORMAT, "bytes": checkpoint_bytes(path), "step": int(step), "epoch": int(epoch),
        "step_boundary": bool(info.get("step_boundary", True)), "resumable": bool(info.get("resumable")),
        "time": time.time(), "layout": "directory", "identity": info.get("identity") or {},
        "wandb_id": info.get("wandb_id")})


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint file or directory, its marker first (a half-removed pair reads as incomplete)."""
    path = Path(path)
    marker_path(path).unlink(missing_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_atomic(checkpoint: dict[str, Any], path: Path) -> None:
    """Write `checkpoint` to `path` so that a reader sees the old file, or the complete new one and its marker."""
    import torch

    path = Path(path)
    info = checkpoint.get("tunelab") or {}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The old marker goes only once the new bytes are safely on disk: a failed write (full disk) leaves the
        # previous checkpoint of this name complete; from the rename until the new marker, `path` is incomplete.
        atomic_write(path, lambda file: torch.save(checkpoint, file),
                     before_replace=lambda: marker_path(path).unlink(missing_ok=True))
        _write_marker(path, {
            "format": FORMAT, "bytes": path.stat().st_size, "step": int(checkpoint.get("global_step", 0)),
            "epoch": int(checkpoint.get("epoch", 0)), "step_boundary": bool(info.get("step_boundary", True)),
            "resumable": bool(info.get("resumable")), "time": time.time()})
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {err.strerror or err}", f"directory {path.parent}",
            "free disk space or point paths.output_dir at a writable disk; earlier checkpoints are intact",
        ) from None


def link_last(directory: Path, path: Path) -> None:
    """Point `<directory>/last.ckpt` (and its marker) at the checkpoint `path`, each in one rename."""
    last = Path(directory) / "last.ckpt"
    marker_path(last).unlink(missing_ok=True)
    if path.is_dir() and last.is_dir() and not last.is_symlink():
        remove_checkpoint(last)  # a directory of shards cannot be renamed over; the link takes its place
    atomic_link(last, path)
    atomic_write(marker_path(last), marker_path(path).read_bytes(), durable=False)
    fsync_dir(Path(directory))


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
    import torch

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
    marker = read_marker(path)
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
    marker = read_marker(path) or {}
    size = checkpoint_bytes(path)
    if marker.get("layout") != "directory" or marker.get("bytes") != size:
        raise CheckpointError(f"checkpoint directory {path} is incomplete: {size} bytes, its marker says "
                              f"{marker.get('bytes')}", "key resume",
                              "resume=<run dir> picks the newest complete checkpoint")
    info = {"identity": marker.get("identity") or {}, "wandb_id": marker.get("wandb_id")}
    return CheckpointInfo(path, int(marker.get("step", 0)), int(marker.get("epoch", 0)), info)


def read_marker(path: Path) -> dict[str, Any] | None:
    """The completion marker of the checkpoint `path`, or None when it is missing or unreadable."""
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
        marker = read_marker(path)
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
    for tmp in sorted(Path(directory).glob(PARTIAL)):
        notes.append(f"skipping partial write {tmp}")
    found.sort(key=lambda item: (item[0].get("step", 0), item[0].get("time", 0.0)))  # newest last
    return found, notes


def remove_partial_writes(directory: Path) -> None:
    """Delete the temp files of killed writers in `directory` (never complete); this process's own stay."""
    for tmp in Path(directory).glob(PARTIAL):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            tmp.unlink(missing_ok=True)
