"""`tunelab board [dir=outputs] [port=8050]`: a read-only local web page over the outputs folder.

Runs with their composed config, loss curves (from history.jsonl, the CSV logger, MLflow's file store or W&B's
offline file: what is on disk, never a server) and test figures; sweeps ranked as `sweep-report` ranks them;
compare tables and charts; pipeline forgetting matrices; a predictions browser over eval's predictions.jsonl.
The standard library's HTTP server and server-rendered HTML with inline SVG: no script, nothing fetched from
the network, nothing to build. The pages live in `tunelab.board`; this file checks the command line and serves.

A run directory is data: files are parsed, never executed or unpickled, every string is escaped, and nothing
outside `dir` is served. Like `serve`, it listens on loopback only unless told otherwise (`allow_remote=true`).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from omegaconf import DictConfig

from tunelab.errors import ConfigError
from tunelab.job import RunContext, verb
from tunelab.verbs.serve import is_loopback


def check_command_line(cfg: DictConfig) -> None:
    """The host rule, the port range and the folder: answered by the CLI's pre-flight before anything binds."""
    port = cfg.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port must be 0..65535, got {port!r}", "key port", "port=0 takes any free port")
    if not isinstance(cfg.get("allow_remote"), bool):
        raise ConfigError(f"allow_remote must be true or false, got {cfg.get('allow_remote')!r}", "key allow_remote")
    if not is_loopback(str(cfg.host)) and not cfg.allow_remote:
        raise ConfigError(
            f"host={cfg.host} would show every run's config and predictions beyond this machine",
            "key host",
            "keep host=127.0.0.1 (an SSH tunnel reaches it: ssh -L 8050:127.0.0.1:8050 ...),"
            " or add allow_remote=true if everyone on that network may read them",
        )
    if cfg.get("dir") is None or not Path(str(cfg.dir)).is_dir():
        raise ConfigError(
            f"no outputs folder at {cfg.get('dir')}",
            "key dir",
            "run tunelab from the folder holding outputs/, or give dir=<outputs folder>",
        )


@verb()
def board(cfg: DictConfig, run: RunContext) -> None:
    """Serve the board until SIGTERM/SIGINT."""
    from tunelab.board.server import make_server

    check_command_line(cfg)  # again: board() is also called as a library function, without the pre-flight
    root = Path(str(cfg.dir)).resolve()
    try:
        server = make_server(root, str(cfg.host), int(cfg.port))
    except OSError as err:
        raise ConfigError(
            f"cannot listen on {cfg.host}:{cfg.port}: {err.strerror or err}",
            "keys host, port",
            "pick another port (port=0 takes any free one) or stop what is using it",
        ) from None
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    print(f"tunelab: board of {root} on http://{shown}:{port}/ (read-only; Ctrl-C stops it)", flush=True)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # signal handlers belong to the main thread
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        server.server_close()


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("board")
