"""One job writes a run directory at a time: an exclusive `fcntl` lock on `<run dir>/.lock`.

The kernel drops the lock when its holder dies (even by SIGKILL), so a killed run never blocks its own
resume, and no stale-lock cleanup is needed. Only the job's launching process (global rank 0) takes it:
the extra ranks of a DDP job share the directory by design.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

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
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        if not _is_launching_rank():
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"run directory {self.path.parent} is in use by another job ({holder})", "paths.run_dir",
                "wait for it to end, or give this job its own directory (a new run_id)",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def check_free(run_dir: str | Path) -> None:
    """Raise ConfigError now if a live job holds `run_dir` (before anything, e.g. Hydra's .hydra/, is written)."""
    if (Path(run_dir) / LOCK_NAME).exists():
        RunDirLock(run_dir).acquire().release()
