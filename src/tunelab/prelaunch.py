"""The command line's last check before Hydra starts a job: the run directory it will write into.

Runs after the pre-flight (a typo fails before this imports torch) and before Hydra creates anything, so a
busy run directory or an empty `resume=` (exit 2), or a bad `resume=` (exit 4) is refused while nothing has been
written.
"""

from __future__ import annotations

import re
from pathlib import Path

from tunelab import libraries
from tunelab.checkpoint.io import is_checkpoint_dir
from tunelab.checkpoint.lock import check_free
from tunelab.checkpoint.resume import find_resume, identity, resume_value
from tunelab.config.compose import compose, new_run_id


def prepare_run_dir(argv: list[str], config_name: str = "train") -> list[str]:
    """Before Hydra writes anything into a run directory: refuse one that a live job holds (exit 2), check
    `resume=` (readable, same model and method: exit 4), and make `resume=<run dir>` continue that run in
    place (its directory, checkpoints and W&B run). Returns the argv to launch.

    `resume=<file>` starts a new run directory from that checkpoint; `resume=auto` uses this job's own
    directory (pin it with run_id=... so that a requeued job finds it).
    """
    args = libraries.hydra_args(argv)
    if args.multirun or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return argv
    named = [o.split("=", 1)[0] for o in args.overrides]
    if "resume" not in named and "hydra.run.dir" not in named and f"run_id={new_run_id()}" in args.overrides:
        return argv  # a fresh run in a directory named by this process's new id: nothing to check
    cfg = compose(args.overrides, args.config_name or config_name, args.config_dir)
    run_dir = Path(str(cfg.hydra.run.dir))
    if cfg.hydra.output_subdir is not None:
        # Hydra is about to write .hydra/ there: never into a directory a live job holds (two pipelines with one
        # run_id once both ran, each overwriting the other's saved config). Verbs that write nothing (generate,
        # export, serve: output_subdir null) may run inside a live run's directory.
        check_free(run_dir)
    if "resume" not in cfg:
        return argv
    value = resume_value(cfg.resume)  # an empty resume= is exit 2 before a path is made of it
    target = Path(value).expanduser() if value is not None else None
    in_place = target is not None and value != "auto" and target.is_dir() and not is_checkpoint_dir(target)
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

