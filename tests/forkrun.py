"""Test helper: run `tunelab <verb>` as a real child process of the test.

A child is a real process: a SIGKILL ends it with no cleanup, and it exits with its own status. It is never
forked from the test process: a fork of a process whose torch thread pools have run (any earlier test in the
session) can inherit a lock held by a thread that does not exist in the child, and the child then waits on it
forever (seen in the full suite: a forked kill-test child asleep on a futex for 8 minutes).

A waited-for run is forked from a fork server instead (multiprocessing's `forkserver`): a fresh interpreter,
started once per test process, that has imported torch, transformers, PEFT, Lightning and `tunelab train` but
never run a torch op, so it holds no thread pool's lock. Each run then skips those imports (about 10 s of CPU of
the 16 s a kill-chain run took on the 2-core machine; the kill chains start 27 such runs). A `wait=False` run is
started fresh (`python -m tunelab.cli`), so the test can `os.waitpid` it as its own child.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import procs

TESTS = str(Path(__file__).resolve().parent)  # test-only callbacks (killpoints) import from here
# What the fork server imports before it forks anything: each is imported, never run.
PRELOAD = ["torch", "pytorch_lightning", "transformers.modeling_utils", "peft", "tunelab.cli", "tunelab.job",
           "tunelab.verbs.train", "killpoints"]
_CHILDREN: dict[int, subprocess.Popen] = {}
_SERVER = None


def _server() -> multiprocessing.context.ForkServerContext:
    global _SERVER
    if _SERVER is None:
        _SERVER = multiprocessing.get_context("forkserver")
        if TESTS not in sys.path:  # the server starts with this process's sys.path
            sys.path.insert(0, TESTS)
        _SERVER.set_forkserver_preload(PRELOAD)
        # Ended and waited for with this process, so its runs' CPU time counts as this process's children's
        # (`/usr/bin/time make test`) and no server outlives the test session.
        stop = getattr(multiprocessing.forkserver._forkserver, "_stop", None)
        if stop is not None:
            atexit.register(stop)
    return _SERVER


def _child(verb: str, argv: list[str], log: str, cwd: str, env: dict[str, str], errors: str | None = None) -> None:
    """In the forked child: the caller's directory and environment, output to `log` (stderr to `errors` when
    given), then the console script."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for target, path in ((1, log), (2, errors or log)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the fds the server gave may be others
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    from tunelab.cli import main

    sys.argv = ["tunelab", *verb.split(), *argv]
    main()  # SystemExit(code) becomes the process's exit status (multiprocessing's bootstrap)


def _join(child: multiprocessing.process.BaseProcess, argv: list[str], seconds: float) -> int:
    child.join(procs.budget(seconds))
    if child.exitcode is None:  # a hang, not a busy machine (procs.budget): end it and say so
        child.kill()
        child.join()
        raise subprocess.TimeoutExpired(argv, procs.budget(seconds))
    return child.exitcode


def _env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with this folder first on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (TESTS, env.get("PYTHONPATH", "")) if p)}


def run_forked(verb: str, argv: list[str], cwd: Path, env: dict[str, str], seconds: float = 120,
               ) -> subprocess.CompletedProcess:
    """`tunelab <verb> argv` run in a child forked from the fork server, in `cwd` with `env` (plus this folder on
    PYTHONPATH); its exit status and its stdout and stderr apart, as `subprocess.run(capture_output=True)` gives."""
    out, err = Path(cwd) / ".forkrun.out", Path(cwd) / ".forkrun.err"
    child = _server().Process(target=_child, args=(verb, list(argv), str(out), str(cwd), _env(env), str(err)))
    child.start()
    code = _join(child, ["tunelab", verb, *argv], seconds)
    texts = [path.read_text() if path.exists() else "" for path in (out, err)]
    for path in (out, err):
        path.unlink(missing_ok=True)
    return subprocess.CompletedProcess(["tunelab", verb, *argv], code, *texts)


def run_all_forked(commands: dict[str, tuple[str, list[str], Path, dict[str, str]]], seconds: float = 120,
                   ) -> dict[str, subprocess.CompletedProcess]:
    """`run_forked` of `name -> (verb, argv, cwd, env)`, procs.WORKERS at a time."""
    _server()  # made here, before the threads
    with ThreadPoolExecutor(max_workers=procs.WORKERS) as pool:
        futures = {name: pool.submit(run_forked, *command, seconds) for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def fork_tunelab(argv: list[str], log: Path, verb: str = "train", wait: bool = True) -> int:
    """Run `tunelab <verb> argv` in a child process; its exit status (-N if signal N killed it), or with
    `wait=False` its pid (then `wait_for(pid)`)."""
    env = _env()
    if wait:
        child = _server().Process(target=_child, args=(verb, list(argv), str(log), os.getcwd(), env))
        child.start()
        return _join(child, ["tunelab", verb, *argv], 600)
    with open(log, "a") as out:  # the child keeps its own copy of the descriptor
        child = subprocess.Popen([sys.executable, "-m", "tunelab.cli", *verb.split(), *argv], stdout=out,
                                 stderr=subprocess.STDOUT, env=env)
    _CHILDREN[child.pid] = child
    return child.pid


def wait_for(pid: int, seconds: float = 600) -> int:
    """The exit status of child `pid`, or -N if signal N killed it; killed after `procs.budget(seconds)` (a hang:
    the short trainings here take a minute on a loaded machine)."""
    return procs.wait(_CHILDREN.pop(pid), seconds)
