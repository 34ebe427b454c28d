"""Test helper: child processes that do not fail because the machine is busy.

Two rules, learned from `make test-fast` at load 20 on the 2-core machine (33 errors: tests/test_errors.py
started 20 CLIs at once, each with 300 s counted from the launch of all of them):
- at most WORKERS children run at a time (a pool), so each gets a share of the cores it can finish in;
- each child's timeout is its own budget, counted from when that child started, and scaled by the load on
  the machine at that moment. A timeout is there to catch a hang, never to fail a busy machine.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

WORKERS = max(2, os.cpu_count() or 1)
MAX_SCALE = 10.0  # a hang still ends, even at load 10x the cores


def budget(seconds: float) -> float:
    """`seconds` (enough on an idle machine, with room to spare) scaled by the load per core now, 1 at least."""
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    return seconds * min(MAX_SCALE, max(1.0, load))


def run(argv: Sequence[str], seconds: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(argv)` with text output captured and a timeout of `budget(seconds)` from its start."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(list(argv), timeout=budget(seconds), **kwargs)


def run_all(commands: Mapping[str, tuple[Sequence[str], dict[str, Any]]], seconds: float,
            workers: int = WORKERS) -> dict[str, subprocess.CompletedProcess]:
    """Run `name -> (argv, subprocess.run keyword arguments)`, `workers` at a time, each with `run`'s budget
    counted from its own start (a case that waits for a free worker is not charged for the wait)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run, argv, seconds, **kwargs) for name, (argv, kwargs) in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def wait(child: subprocess.Popen, seconds: float) -> int:
    """`child.wait()` with a budget from now; a child still running then is killed and the timeout raised."""
    try:
        return child.wait(timeout=budget(seconds))
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise
