"""The `tunelab` command: `tunelab <verb> [hydra overrides]`.

Before Hydra starts any job, the overrides are composed (every combination of a sweep, up to a
limit) and validated, so a typo fails at once with exit code 2 and a did-you-mean message,
instead of inside the first trial or as a raw traceback.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tunelab import libraries
from tunelab.config.checks import check_deep
from tunelab.config.compose import compose, new_run_id, quoting_hint, register_resolvers
from tunelab.config.validate import validate
from tunelab.console import quiet_known_noise
from tunelab.errors import ConfigError, TunelabError, did_you_mean, exit_with


@dataclass(frozen=True)
class Verb:
    """One `tunelab <verb>`: its function, its primary config, and its line in --help.

    `function` names `module:function`, a plain `(cfg, run) -> result` (declared with `tunelab.job.verb`, which
    says what it needs from the job: run directory, validation, lock, ...); `config` is conf/<config>.yaml.
    `check` names a `module:function` the pre-flight also calls with each composed config (a pipeline composes
    and validates its stages there). `positional` names the key a first bare argument sets and `options` the
    keys `--key value` sets, the value taken literally as free text (`-` reads it from standard input): the old
    spellings of the verbs that once parsed their own options, and `generate --prompt "..."`. `renamed` maps a
    key's former name to its name now (`old=value` is read as `new=value`): compare's keys once had names of
    their own, and now share the group names of every other verb.
    """

    name: str
    function: str
    usage: str
    config: str
    check: str | None = None
    positional: str | None = None
    options: tuple[str, ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()
    refused: tuple[tuple[str, str], ...] = ()  # key -> the hint of a key other verbs take and this one does not

    @property
    def module(self) -> str:
        return self.function.partition(":")[0]


# The one table of verbs: dispatch, pre-flight and --help all read it. A new verb is one line here.
VERBS: tuple[Verb, ...] = (
    Verb("train", "tunelab.verbs.train:train",
         "fine-tune: model=, method=, dataset=, hyperparams.*= (try: tunelab train --help)",
         "train"),
    Verb("generate", "tunelab.verbs.generate:generate",
         'answer with a trained run: run=<run dir> --prompt "any text" (or - for stdin) [interactive=true]',
         "generate", options=("prompt",)),
    Verb("eval", "tunelab.verbs.eval:evaluate_cfg",
         "score a run or a model on a test split: run=<dir> | model=, dataset=, prompting=few_shot|retrieval", "eval"),
    Verb("compare", "tunelab.verbs.compare:compare",
         "base zero-/one-/few-shot, retrieval, fine-tuned (+retrieval): run=<dir> dataset= documents= base_model=",
         "compare",
         check="tunelab.verbs.compare:preflight",
         renamed=(("base", "base_model"), ("data", "dataset"), ("docs", "documents"), ("tracker", "logger")),
         refused=(("model", "the base arms' model is base_model=<option>; a run brings its own (run=<dir>)"),)),
    Verb("train-retriever", "tunelab.verbs.train_retriever:train_retriever",
         "fine-tune the dense retriever on (question, gold passage) pairs: dataset=knowledge documents=knowledge",
         "train_retriever"),
    Verb("export", "tunelab.verbs.export:export",
         "merge adapters and write a plain Hugging Face model: run=<run dir> [out=<dir>] [push_to_hub=<repo>]",
         "export", check="tunelab.tracking.hub:check_push"),
    Verb("serve", "tunelab.verbs.serve:serve",
         "an OpenAI-compatible HTTP API over a run: run=<run dir or W&B artifact> [port=]",
         "serve", check="tunelab.verbs.serve:check_command_line"),
    Verb("data preview", "tunelab.verbs.preview:preview",
         "tokenised samples with supervised tokens marked, length percentiles: dataset=<name>", "data"),
    Verb("sweep-report", "tunelab.verbs.sweep_report:sweep_report",
         "rank the trials of a multirun, plot them, write the best config: dir=<multirun dir> [metric=] [mode=]",
         "sweep_report", positional="dir", options=("metric", "mode")),
    Verb("pipeline", "tunelab.verbs.pipeline:run_pipeline",
         "train stages in order and measure forgetting: pipeline=<name> [strategy=replay] [-m strategy=a,b]",
         "pipeline", check="tunelab.verbs.pipeline:preflight"),
    Verb("pipeline-report", "tunelab.verbs.pipeline_report:pipeline_report",
         "compare the strategies of a pipeline multirun: dir=<multirun dir>", "pipeline_report", positional="dir"),
    Verb("board", "tunelab.verbs.board:board",
         "a read-only local web page over outputs/: runs, curves, sweeps, compares, pipelines, predictions [port=]",
         "board", check="tunelab.verbs.board:check_command_line", positional="dir"),
)
EXIT_CODES = ("exit codes: 0 ok, 1 unexpected bug, 2 config or usage error, 3 data error, 4 checkpoint error,"
              " 5 numerics, 130/143 stopped by SIGINT/SIGTERM (training: after writing a checkpoint; resume=<run dir> "
              "continues)")


def usage() -> str:
    """`tunelab --help`, from the verb table."""
    width = max(len(v.name) for v in VERBS) + 2
    lines = [f"  {v.name.ljust(width)}{v.usage}" for v in VERBS]
    return ("usage: tunelab <verb> [overrides] [-m] [--cfg job] [--config-dir DIR] [--help]\n\nverbs:\n"
            + "\n".join(lines) + f"\n\n{EXIT_CODES}\n")


def find_verb(argv: list[str]) -> tuple[Verb | None, list[str]]:
    """The verb `argv` names (one word, or two for `data preview`) and the arguments after it."""
    for verb in VERBS:
        words = verb.name.split()
        if argv[: len(words)] == words:
            return verb, argv[len(words):]
    return None, argv[1:]


MAX_PREFLIGHT = 64  # sweep combinations composed before launch; beyond, each value is still checked once


def _config_loader(config_dir: str | None):  # noqa: ANN202 - hydra's ConfigLoaderImpl
    """Hydra's config loader over conf/ (and --config-dir), so `group=glob(*)` expands to the group's options."""
    from tunelab import paths

    return libraries.hydra_config_loader(str(paths.conf_dir()), config_dir)


def _expand(overrides: list[str], multirun: bool, config_dir: str | None = None) -> list[list[str]]:
    """The override sets a sweep will run (or a covering sample of them), for pre-flight composition."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create(config_loader=_config_loader(config_dir)).parse_overrides(overrides)
    if not multirun or not any(o.is_sweep_override() for o in parsed):
        return [overrides]
    axes = []
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            axes.append([f"{key}={override.get_value_element_as_str()}"])
        elif override.is_discrete_sweep():
            axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:  # a continuous search space (Optuna's interval): check the key with its current value
            axes.append([])
    combos = [[c for c in combo if c] for combo in itertools.product(*[a or [None] for a in axes])]
    if len(combos) <= MAX_PREFLIGHT:
        return combos
    width = max(len(a) for a in axes)  # each value of each axis appears in at least one checked set
    return [[a[i % len(a)] for a in axes if a] for i in range(width)]


def preflight(argv: list[str], config_name: str = "train", deep: bool = True, check: str | None = None) -> None:
    """Compose and validate what `argv` asks for; raise ConfigError on the first problem.

    `deep=False` leaves out the checks that import the training libraries (see config.validate).
    `check` (`module:function`) is also called with each composed config when `deep` (a verb's own checks), and so
    are the checks of this machine (config/machine.py).
    """
    args = libraries.hydra_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return
    from hydra.errors import OverrideParseException

    try:
        combos = _expand(args.overrides, args.multirun, args.config_dir)
    except OverrideParseException as err:  # an unbalanced quote or bracket: Hydra's grammar refuses it here
        bad = _unparsable(args.overrides)
        raise ConfigError(f"cannot parse override: {str(err).splitlines()[0]}",
                          f"override {bad} on the command line" if bad else "command line",
                          quoting_hint(bad)) from None
    # Every combination's light checks (values, places) first: a typo in the last one is refused before torch
    # loads for the first one's deep checks.
    cfgs = [compose(overrides, args.config_name or config_name, args.config_dir) for overrides in combos]
    for cfg in cfgs:
        validate(cfg, deep=False, launch=True)
        _check_sweeper_params(cfg)
        _check_slurm_ranks(cfg)
        if args.multirun:
            _check_launcher_installed(cfg)
            _check_multirun_strategy(cfg)
    if not deep:
        return
    # What this machine offers (hub models cached or reachable, the GPU asked for, the engine's package) and the
    # verb's own check (serve's host and key) before the option names: each answers in about a second, the deep
    # checks only after torch and transformers load.
    from tunelab.config.machine import check_machine

    for cfg in cfgs:
        check_machine(cfg)
        if check:
            import importlib

            module, _, function = check.partition(":")
            getattr(importlib.import_module(module), function)(cfg)
    if not _torch_loaded() and sys.stderr.isatty():
        # The imports take seconds (minutes on a busy machine): say what waits on them, to a person at a terminal
        # (captured stderr keeps its contract: a refusal is the one `tunelab: <kind> error:` message).
        print("tunelab: checking the optimizer, scheduler and library option names (loading torch and "
              "transformers)...", file=sys.stderr, flush=True)
    for cfg in cfgs:
        check_deep(cfg)


def _torch_loaded() -> bool:
    return "torch" in sys.modules


def _unparsable(overrides: list[str]) -> str | None:
    """The first override Hydra's grammar refuses (None: it refuses none alone)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except Exception:  # OverrideParseException, or a grammar error of another type
            return override
    return None


def _check_multirun_strategy(cfg: DictConfig) -> None:
    """Refuse `-m` with a DDP launcher that re-runs the command line for ranks 1..N-1: under multirun that
    re-runs the sweep (pytorch-lightning#11300). SLURM starts ranks itself, and ddp_spawn forks, so both pass."""
    from tunelab.config.engine import sharded_strategy

    sharded = sharded_strategy(cfg)  # FSDP and DeepSpeed start their extra ranks the way DDP does
    strategy = sharded.name if sharded else str(OmegaConf.select(cfg, "trainer.strategy", default="auto"))
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    launcher = str(OmegaConf.select(cfg, "hydra.launcher._target_", default=""))
    relaunches = sharded is not None or (strategy.startswith("ddp") and "spawn" not in strategy)
    if relaunches and devices not in (1, "1") and "submitit" not in launcher:
        raise ConfigError(
            f"a sweep (-m) cannot run trials with trainer.strategy={strategy} on {devices} devices here: "
            "Lightning re-runs the command line for each extra rank, which would re-run the sweep",
            "keys trainer.strategy, trainer.devices",
            ("one device per trial, or hydra/launcher=slurm (see docs/SCALE.md)" if sharded else
             "use trainer.strategy=ddp_spawn, one device per trial, or hydra/launcher=slurm (see docs/SWEEPS.md)"),
        )


def _check_launcher_installed(cfg: DictConfig) -> None:
    """A sweep's launcher is a Hydra plugin from an extra; without it Hydra fails with a traceback after the
    sweep directory exists. Looked up without importing it (Ray's import alone takes seconds)."""
    import importlib.util

    target = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    module = target.rpartition(".")[0]
    if not module.startswith("hydra_plugins."):
        return
    try:
        found = importlib.util.find_spec(".".join(module.split(".")[:2])) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        choice = OmegaConf.select(cfg, "hydra.runtime.choices", default={}).get("hydra/launcher")
        raise ConfigError(f"hydra/launcher={choice} needs its Hydra plugin ({module.split('.')[1]}), which is not "
                          "installed", "key hydra/launcher",
                          "install its extra: pip install -e '.[ray]' for Ray, '.[sweep]' for joblib and SLURM "
                          "(docs/SCALE.md)")


def _check_slurm_ranks(cfg: DictConfig) -> None:
    """On SLURM, Lightning takes its ranks from srun: one task per device on every node. The slurm launcher
    interpolates its task and node counts from trainer.devices and trainer.num_nodes; both must be numbers."""
    launcher = OmegaConf.select(cfg, "hydra.launcher", default=None)
    if not isinstance(launcher, DictConfig) or "SlurmLauncher" not in str(launcher.get("_target_", "")):
        return
    for key, setting in (("tasks_per_node", "trainer.devices"), ("nodes", "trainer.num_nodes")):
        wanted = OmegaConf.select(cfg, setting, default=1)
        try:
            value = OmegaConf.select(launcher, key, default=1)
        except Exception:  # noqa: BLE001 - an interpolation to `auto` refused by the launcher's int field
            value = None
        if isinstance(wanted, bool) or not isinstance(wanted, int) or value != wanted:
            starts = f"starts {value} {key.replace('_', ' ')}" if value is not None else f"needs a number of {key}"
            raise ConfigError(
                f"hydra/launcher=slurm {starts} but {setting} is {wanted!r}: Lightning expects one SLURM task "
                "per device on every node", f"keys hydra.launcher.{key}, {setting}",
                f"give {setting} a number (GPUs per node for devices) and leave hydra.launcher.{key} at its "
                f"default, which follows it (docs/SCALE.md)")


def _check_sweeper_params(cfg: DictConfig) -> None:
    """Every key an Optuna search space names must exist in the composed config."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    for key in params or {}:
        parent, _, leaf = str(key).rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is None or leaf not in node:
            valid = list(node.keys()) if node is not None and hasattr(node, "keys") else []
            raise ConfigError(f"the sweep searches an unknown key {key!r}", "key hydra.sweeper.params",
                              did_you_mean(leaf, [str(v) for v in valid]))


def overrides_last(argv: list[str]) -> list[str]:
    """`argv` with the flags first and the overrides after them, in their order.

    Hydra parses with argparse, which takes positionals only once: `a=1 --cfg job b=2` fails, and so
    would `a=1 --cfg job` once the CLI appends `run_id=...`. Reordering keeps every spelling working.
    """
    overrides = libraries.hydra_args(argv, intermixed=True).overrides
    flags, pending = [], list(overrides)
    for token in argv:
        if pending and token == pending[0]:
            pending.pop(0)
        else:
            flags.append(token)
    return flags + list(overrides)


def _answered_by_hydra(argv: list[str]) -> bool:
    args = libraries.hydra_args(argv)
    return bool(args.help or args.hydra_help or args.cfg or args.info or args.shell_completion)


def _never_called(cfg: DictConfig, run: object) -> None:
    raise AssertionError("Hydra calls no task function for --help, --cfg or --info")


def run_overrides(environ: Mapping[str, str], task: str) -> list[str]:
    """This invocation's run id, as overrides. Under `srun` with several tasks every rank starts its own
    `tunelab <verb>` and all must agree on one run directory, so the id comes from the SLURM job step (a
    requeued job gets the same one, and resume=auto continues there); ranks other than 0 write no `.hydra/`
    and log to `<task>_rank<N>.log`, as Lightning arranges for the ranks it starts itself. Elsewhere a new id
    (time + random digits)."""
    job, tasks = environ.get("SLURM_JOB_ID"), environ.get("SLURM_NTASKS", "1")
    if not (job and tasks.isdigit() and int(tasks) > 1):
        return [f"run_id={new_run_id()}"]
    rank = environ.get("SLURM_PROCID", "0")
    extra = [] if rank == "0" else ["hydra.output_subdir=null", f"hydra.job.name={task}_rank{rank}"]
    return [f"run_id=slurm-{job}-{environ.get('SLURM_STEP_ID', '0')}", *extra]


def old_spellings(verb: Verb, argv: list[str]) -> list[str]:
    """`argv` with a verb's former argparse spellings as overrides: a first bare argument (`tunelab sweep-report
    <dir>`) sets `verb.positional`, `--metric M` / `--metric=M` set the keys `verb.options` names, and a key's
    former name (`verb.renamed`: compare's `data=`) is its name now."""
    out: list[str] = []
    tokens = iter(argv)
    renamed = dict(verb.renamed)
    for i, token in enumerate(tokens):
        key, eq, value = token[2:].partition("=")
        name, is_set, setting = token.partition("=")
        if is_set and name in renamed:  # `data=knowledge` -> `dataset=knowledge`, exactly as typed after the `=`
            out.append(f"{renamed[name]}={setting}")
        elif verb.positional and i == 0 and not token.startswith("-") and "=" not in token:
            out.append(f"{verb.positional}={literal(token)}")
        elif token.startswith("--") and key in verb.options:
            given = value if eq else next(tokens, "")
            # `--prompt -` reads the text from standard input (a file, a here-doc: any characters, any length).
            out.append(f"{key}={literal(sys.stdin.read().rstrip(chr(10)) if given == '-' else given)}")
        else:
            out.append(token)
    return out


def check_refused(verb: Verb, argv: list[str]) -> None:
    """A key other verbs take that this verb names otherwise (compare's `model=`): refused with the key it means,
    rather than Hydra's "unknown key"."""
    for token in argv:
        key = token.partition("=")[0].lstrip("+~").split(".")[0]
        hint = dict(verb.refused).get(key) if "=" in token and not token.startswith("-") else None
        if hint:
            raise ConfigError(f"tunelab {verb.name} has no key {key!r}", f"override {token} on the command line", hint)


def literal(text: str) -> str:
    """`text` as one Hydra override value that composes back to exactly `text`, a string: free text with commas,
    `?`, `:`, `=`, quotes, backslashes, brackets or a `${...}` (taken literally, never resolved: a prompt must
    not read an environment variable) never needs quoting by hand (`tunelab generate --prompt "..."`)."""
    plain = re.fullmatch(r"[A-Za-z_/][\w./-]*|\./[\w./-]*", text)  # not `.5` or `1e3`: numbers when bare
    if plain and text.lower() not in ("true", "false", "null", "nan", "inf"):
        return text  # a plain word or path reads the same bare (`val/loss`, `outputs/multiruns/x`)
    # OmegaConf: `\${` is a literal `${`; backslashes right before it are doubled so they stay backslashes.
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    # Hydra's quoted strings: a quote is escaped, and so is a run of backslashes that precedes a quote or the end.
    text = re.sub(r"(\\*)(')", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)\Z", lambda m: m.group(1) * 2, text)  # \Z: `$` would also match before a final newline
    return f"'{text}'"


RUN_DATASET_VERBS = ("eval", "compare")  # verbs that score `run=<dir>` on the `dataset` group's option
OPTION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


def saved_choice(run_dir: Path, group: str) -> str | None:
    """The option of config group `group` that the run at `run_dir` was composed with (its .hydra/hydra.yaml), or
    None. Read as data: a regular file under 1 MB, and only a plain option name is returned (no path out of the
    config tree, no interpolation), which the caller must still find in its own config search path."""
    saved = run_dir / ".hydra" / "hydra.yaml"
    try:
        if saved.is_symlink() or not saved.is_file() or saved.stat().st_size > 1 << 20:
            return None
        choice = OmegaConf.select(OmegaConf.load(saved), f"hydra.runtime.choices.{group}", default=None,
                                  throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001 - a damaged file: the verb's own checks of the run report it
        return None
    return choice if isinstance(choice, str) and OPTION_NAME.fullmatch(choice) and ".." not in choice else None


def run_dataset(verb: Verb, argv: list[str]) -> list[str]:
    """`tunelab eval|compare run=<dir>` without `dataset=` scores the run's own dataset option, not the group's
    default: a run trained on brand_replies was scored on reviews_sentiment before. Says so on stderr; a run whose
    option this config search path lacks (a `--config-dir` of the training's) keeps the default, and says that."""
    if verb.name not in RUN_DATASET_VERBS:
        return argv
    args = libraries.hydra_args(argv)
    if args.multirun or args.help or args.hydra_help or args.info or args.shell_completion:
        return argv
    named = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[-1] for o in args.overrides}
    if "dataset" in named or not named.get("run") or not Path(named["run"]).expanduser().is_dir():
        return argv
    choice = saved_choice(Path(named["run"]).expanduser(), "dataset")
    if choice is None:
        return argv
    config = args.config_name or verb.config
    default = OmegaConf.select(compose(args.overrides, config, args.config_dir), "hydra.runtime.choices.dataset")
    if choice == default:
        return argv
    try:
        compose([*args.overrides, f"dataset={choice}"], config, args.config_dir)
    except ConfigError:
        print(f"tunelab {verb.name}: the run was trained on dataset={choice}, which is not in this config search "
              f"path; scoring dataset={default} (give the training's --config-dir, or dataset=<name>)",
              file=sys.stderr)
        return argv
    print(f"tunelab {verb.name}: scoring dataset={choice}, the run's own (dataset=<name> scores another)",
          file=sys.stderr)
    return [*argv, f"dataset={choice}"]


def run_verb(verb: Verb | str, argv: list[str] | None = None) -> None:
    """Run one verb as the console script would, with `argv` (default: sys.argv[1:])."""
    import importlib

    from tunelab.job import hydra_verb

    if isinstance(verb, str):
        verb = next(v for v in VERBS if v.name == verb)
    argv = overrides_last(old_spellings(verb, list(sys.argv[1:] if argv is None else argv)))
    register_resolvers()
    quiet_known_noise()  # the libraries' tips and known-harmless warnings (each named in tunelab/console.py)
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    if not any(a.startswith("run_id=") for a in argv):
        # Pin the id in the config so parallel workers (joblib, SLURM) all see the same value.
        argv += run_overrides(os.environ, verb.config)
    try:
        check_refused(verb, argv)
        argv = run_dataset(verb, argv)
        # Each verb's primary config is conf/<config>.yaml; --cfg job only prints, so it needs no deep checks.
        preflight(argv, verb.config, deep=not _answered_by_hydra(argv), check=verb.check)
        if not _answered_by_hydra(argv):
            from tunelab.prelaunch import prepare_run_dir  # after preflight: a typo fails before torch loads

            argv = prepare_run_dir(argv, verb.config)  # busy run dir (exit 2), bad resume= (exit 4): before Hydra
    except TunelabError as err:
        exit_with(err)
    if _answered_by_hydra(argv):
        # --help, --cfg, --info: Hydra prints and exits without calling the verb, so its heavy module
        # (torch, Lightning, transformers: seconds) is not imported; the same config tree answers.
        sys.argv = [f"tunelab {verb.name}", *argv]
        hydra_verb(verb.config, _never_called)()
        return
    module = importlib.import_module(verb.module)  # after pre-flight: a typo answers before heavy imports
    # argv[0] is the verb's own file: Lightning's DDP launcher re-runs `python argv[0] argv[1:]` for each
    # extra rank, which must land in the same verb with the same overrides.
    sys.argv = [str(module.__file__), *argv]
    main_module = sys.modules.get("__main__")
    if getattr(getattr(main_module, "__spec__", None), "name", None) == "tunelab.cli":
        # `python -m tunelab.cli train ...`: Lightning would re-run `python -m tunelab.cli <overrides>` (no verb:
        # "unknown verb" in rank 1); without a spec it re-runs argv[0], the verb's file, as the console script does.
        main_module.__spec__ = None
    hydra_verb(verb.config, getattr(module, verb.function.partition(":")[2]))()


def main() -> None:
    """Console script: `tunelab <verb> [overrides]`."""
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if len(sys.argv) >= 2 else 2)
    verb, argv = find_verb(sys.argv[1:])
    if verb is None:
        first = sys.argv[1]
        names = [v.name for v in VERBS]
        nested = [v.name for v in VERBS if v.name.split()[0] == first]
        if nested:
            print(f"tunelab: usage error: `tunelab {first}` needs one of: {', '.join(nested)}", file=sys.stderr)
        else:
            print(f"tunelab: usage error: unknown verb {first!r}\n  hint: {did_you_mean(first, names)}",
                  file=sys.stderr)
        raise SystemExit(2)
    try:
        run_verb(verb, argv)
    except KeyboardInterrupt:  # Ctrl-C outside training's own handler (start-up, eval, generate, export): no traceback
        print(f"tunelab: {verb.name} stopped by SIGINT", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
