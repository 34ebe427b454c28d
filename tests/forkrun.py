"""Test helper: run `tunelab <verb>` in a forked child of the test process.

A forked child is a real process (a SIGKILL ends it with no cleanup; it exits with its own status) that
does not pay the seconds of importing torch, transformers and Lightning again.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path


def fork_tunelab(argv: list[str], log: Path, verb: str = "train", wait: bool = True) -> int:
    """Run `tunelab <verb> argv` in a forked child; its exit status (-N if signal N killed it), or with
    `wait=False` its pid (then `wait_for(pid)`)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # pytest's capture swapped sys.stdout/err for its own files: write where the fds now point
            sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115
            from tunelab.cli import run_verb

            sys.argv = ["tunelab", verb, *argv]
            run_verb(verb, list(argv))
            code = 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        except BaseException:  # noqa: BLE001 - the child reports and exits, whatever happened
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return wait_for(pid) if wait else pid


def wait_for(pid: int) -> int:
    """The exit status of child `pid`, or -N if signal N killed it."""
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
