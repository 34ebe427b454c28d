"""One job writes a run directory at a time: an exclusive lock on `<run dir>/.lock`, `filelock`'s FileLock.

On Linux and macOS FileLock is the kernel's `flock`, as the hand-written lock it replaced was: the kernel drops it
when its holder dies (even by SIGKILL), so a killed run never blocks its own resume and no stale-lock cleanup is
needed (tests/test_kill.py, tests/test_resume.py). Only the job's launching process (global rank 0) takes it: the
extra ranks of a DDP job share the directory by design. The holder writes `pid N on host` into the file, which a
refused job quotes; a failed attempt does not truncate it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from tunelab.errors import ConfigError

LOCK_NAME = ".lock"


def _is_launching_rank() -> bool:
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value not in (None, "", "0"):
            return False
    return True


class RunDirLock:
    """`with RunDirLock(run_dir):` — refuse (ConfigError, exit 2) when another live job holds `run_dir`."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._lock: FileLock | None = None

    def acquire(self) -> RunDirLock:
        if not _is_launching_rank():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path, mode=0o644, is_singleton=False)
        try:
            lock.acquire(timeout=0)  # never wait: a busy directory is refused at once
        except Timeout:
            try:
                holder = self.path.read_text(errors="replace")[:200].strip()
            except OSError:
                holder = ""
            raise ConfigError(
                f"run directory {self.path.parent} is in use by another job ({holder or 'another process'})",
                "paths.run_dir", "wait for it to end, or give this job its own directory (a new run_id)",
            ) from None
        with open(self.path, "w") as holder_file:  # the locked inode itself: the lock is on it, not on this handle
            holder_file.write(f"pid {os.getpid()} on {os.uname().nodename}")
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def check_free(run_dir: str | Path) -> None:
    """Raise ConfigError now if a live job holds `run_dir` (before anything, e.g. Hydra's .hydra/, is written)."""
    if (Path(run_dir) / LOCK_NAME).exists():
        RunDirLock(run_dir).acquire().release()
