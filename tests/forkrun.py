"""Test helper: run `tunelab <verb>` as a real child process of the test.

A child is a real process: a SIGKILL ends it with no cleanup, and it exits with its own status. It is
started fresh (`python -m tunelab.cli`), never forked from the test process: a fork of a process whose
torch thread pools have run (any earlier test in the session) can inherit a lock held by a thread that
does not exist in the child, and the child then waits on it forever (seen in the full suite: a forked
kill-test child asleep on a futex for 8 minutes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import procs

_CHILDREN: dict[int, subprocess.Popen] = {}


def fork_tunelab(argv: list[str], log: Path, verb: str = "train", wait: bool = True) -> int:
    """Run `tunelab <verb> argv` in a child process; its exit status (-N if signal N killed it), or with
    `wait=False` its pid (then `wait_for(pid)`)."""
    tests = str(Path(__file__).resolve().parent)  # test-only callbacks (killpoints) import from here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)}
    with open(log, "a") as out:  # the child keeps its own copy of the descriptor
        child = subprocess.Popen([sys.executable, "-m", "tunelab.cli", *verb.split(), *argv], stdout=out,
                                 stderr=subprocess.STDOUT, env=env)
    _CHILDREN[child.pid] = child
    return wait_for(child.pid) if wait else child.pid


def wait_for(pid: int, seconds: float = 600) -> int:
    """The exit status of child `pid`, or -N if signal N killed it; killed after `procs.budget(seconds)` (a hang:
    the short trainings here take a minute on a loaded machine)."""
    return procs.wait(_CHILDREN.pop(pid), seconds)
