"""Value checks run by `validate()` before anything is built: number ranges, words, switches, chat templates,
output dirs, and (through config/targets.py and config/engine.py) `_target_` arguments and the engine.

The ranges come from the schemas' field metadata (config/schema.py) and, for keys no schema types, from
config/ranges.py; the message names the key, where it was set and the allowed range.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from tunelab.config.chat_templates import chat_template_problem
from tunelab.config.engine import check_sharding_names, check_strategy
from tunelab.config.locate import MISSING_VALUE, leaves, value_at, where
from tunelab.config.places import check_attn_implementation, check_inputs, check_output_dirs, check_run_id
from tunelab.config.ranges import RANGES_WITHOUT_SCHEMA, Range
from tunelab.config.schema import SCHEMAS, schema_ranges
from tunelab.config.targets import check_choices, check_factories
from tunelab.errors import ConfigError, did_you_mean

# Keys taking one of a few words (None: null allowed); names a `_target_`'s annotation lists are checked by
# check_choices instead.
DTYPES = ("float32", "bfloat16", "float16", "float64")
WORDS: dict[str, tuple[str | None, ...]] = {
    "model.dtype": (*DTYPES, "auto"),
    "dtype": (*DTYPES, None),  # `tunelab export dtype=...`
}


def ranges() -> list[tuple[str, Range]]:
    """(key pattern, range) of every ranged key: the schemas' fields first, in field order, then the rest. A bad
    hyperparams.epochs is so reported under its own name, not as the trainer.max_epochs it is interpolated into."""
    rows = [row for name, schema in SCHEMAS.items() for row in schema_ranges(schema, name)]
    return rows + list(RANGES_WITHOUT_SCHEMA.items())


def check_ranges(cfg: DictConfig) -> None:
    """Raise ConfigError for the first number outside its range, or a cross-key rule broken."""
    keys = [k for k in leaves(cfg) if "[" not in k]
    for pattern, allowed in ranges():
        for key in keys:
            if not fnmatch.fnmatchcase(key, pattern):
                continue
            value = value_at(cfg, key)
            if value is MISSING_VALUE or allowed.accepts(value):
                continue
            if isinstance(value, str) and not allowed.words:
                hint = f"{key} takes a number, not the string {value!r}; drop the quotes"
            else:
                hint = f"{key} takes {allowed.describe()}"
            raise ConfigError(f"{key} must be {allowed.describe()}, got {value!r}", where(cfg, key), hint)
        if pattern == "hyperparams.max_steps":  # both epochs and max_steps are in range: their pair too
            _check_training_length(cfg)
    for key, words in WORDS.items():
        value = value_at(cfg, key)
        if value is not MISSING_VALUE and value not in words:
            raise ConfigError(f"{key} must be one of {', '.join(str(w).replace('None', 'null') for w in words)}, "
                              f"got {value!r}", where(cfg, key), did_you_mean(str(value), [w for w in words if w]))
    _check_weights(cfg)
    _check_rank_choices(cfg)


def _check_weights(cfg: DictConfig) -> None:
    """A mixture's weights name its tasks (a typo is a config mistake, not the data's) and are not all 0."""
    weights, tasks = value_at(cfg, "dataset.weights"), value_at(cfg, "dataset.tasks")
    if isinstance(weights, dict) and isinstance(tasks, dict) and tasks:
        for name in weights:
            if name not in tasks:
                raise ConfigError(f"dataset.weights names an unknown task {name!r}",
                                  where(cfg, f"dataset.weights.{name}"),
                                  did_you_mean(str(name), tasks) + "; the tasks are the keys of dataset.tasks")
    if isinstance(weights, dict) and weights and not sum(weights.values()) > 0:
        raise ConfigError("dataset.weights must not all be 0", where(cfg, "dataset.weights"),
                          "give at least one task a positive weight")


def _check_rank_choices(cfg: DictConfig) -> None:
    """decoding.rank_choices picks among a task's `choices`: every task scored must list at least two."""
    if value_at(cfg, "decoding.rank_choices") is not True:
        return
    if value_at(cfg, "dataset") is MISSING_VALUE:  # generate, serve: text is asked for, there are no labels
        raise ConfigError("decoding.rank_choices picks among a dataset's labels, and this command has no dataset",
                          where(cfg, "decoding.rank_choices"), "use decoding=greedy or decoding=creative here")
    tasks = value_at(cfg, "dataset.tasks")
    names = [f"dataset.tasks.{n}" for n in tasks] if isinstance(tasks, dict) and tasks else ["dataset"]
    for name in names:
        choices = value_at(cfg, f"{name}.choices")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(
                isinstance(c, str) and c.strip() for c in choices):
            raise ConfigError(f"decoding.rank_choices needs {name}.choices, a list of at least 2 non-empty labels, "
                              f"got {None if choices is MISSING_VALUE else choices!r}",
                              where(cfg, "decoding.rank_choices"),
                              f"list the task's labels ({name}.choices=[positive,negative]), or use decoding=greedy")


def _check_training_length(cfg: DictConfig) -> None:
    epochs, max_steps = value_at(cfg, "hyperparams.epochs"), value_at(cfg, "hyperparams.max_steps")
    if epochs == -1 and max_steps == -1:
        raise ConfigError("hyperparams.epochs=-1 with hyperparams.max_steps=-1 would train forever",
                          where(cfg, "hyperparams.epochs"), "set hyperparams.epochs >= 1 or hyperparams.max_steps > 0")


# Switches that must be true or false (a string such as "yes" would be truthy); None: null also allowed.
SWITCHES: dict[str, bool] = {"model.gradient_checkpointing": False, "model.compile": False,
                             "model.liger_kernel": False, "hyperparams.optimizer.fused": True}


def check_fast_paths(cfg: DictConfig) -> None:
    """The opt-in fast paths: booleans, and combinations the libraries refuse only at the first step."""
    for key, nullable in SWITCHES.items():
        value = value_at(cfg, key)
        if value is MISSING_VALUE or isinstance(value, bool) or (nullable and value is None):
            continue
        raise ConfigError(f"{key} must be true or false{' or null' if nullable else ''}, got {value!r}",
                          where(cfg, key), f"set {key}=true or {key}=false")
    if value_at(cfg, "model.liger_kernel") is True and value_at(cfg, "trainer.accelerator") == "cpu":
        raise ConfigError("model.liger_kernel needs a CUDA GPU, but trainer.accelerator is cpu",
                          where(cfg, "model.liger_kernel"), "set model.liger_kernel=false, or use trainer=gpu")
    precision = str(value_at(cfg, "trainer.precision"))
    if (value_at(cfg, "hyperparams.optimizer.fused") is True and precision in ("16", "16-mixed")
            and value_at(cfg, "trainer.gradient_clip_val") not in (None, 0, MISSING_VALUE)):
        # fp16's grad scaler hands a fused optimizer still-scaled gradients, which cannot be clipped first;
        # Lightning raises at the first step. bf16 has no scaler: the module clips as usual there.
        raise ConfigError("a fused optimizer cannot clip gradients under fp16 mixed precision",
                          where(cfg, "hyperparams.optimizer.fused"),
                          "use trainer.precision=bf16-mixed, set hyperparams.gradient_clip_val=null, "
                          "or hyperparams.optimizer.fused=false")


def check_chat_templates(cfg: DictConfig) -> None:
    for key in ["dataset.chat_template", *(f"dataset.tasks.{t}.chat_template"
                                           for t in OmegaConf.select(cfg, "dataset.tasks", default=None) or {})]:
        value = value_at(cfg, key)
        problem = None if value is MISSING_VALUE else chat_template_problem(value)
        if problem:
            what, hint = problem
            raise ConfigError(f"{key}: {what}", where(cfg, key), hint)


# Checks on the values alone, and checks that import the libraries the values are passed to (torch,
# transformers, peft: seconds). `tunelab train --cfg job` runs only the first; a job imports those
# libraries anyway, so it runs both before anything is built.
LIGHT_CHECKS: tuple[Callable[[DictConfig], None], ...] = (check_ranges, check_fast_paths, check_output_dirs,
                                                          check_run_id, check_attn_implementation, check_strategy)
# What a job about to start reads (local model and data paths): the CLI's pre-flight only, see validate().
LAUNCH_CHECKS: tuple[Callable[[DictConfig], None], ...] = (check_inputs,)
DEEP_CHECKS: tuple[Callable[[DictConfig], None], ...] = (check_choices, check_chat_templates, check_factories,
                                                          check_sharding_names)


def check_values(cfg: DictConfig, deep: bool = True, launch: bool = False) -> None:
    """The checks above, light ones first; the first problem found is raised as a ConfigError (exit 2), or a
    DataError (exit 3) for a data path that does not exist."""
    for check in LIGHT_CHECKS + (LAUNCH_CHECKS if launch else ()) + (DEEP_CHECKS if deep else ()):
        check(cfg)


def check_deep(cfg: DictConfig) -> None:
    """Only the checks that import the libraries, for a caller that ran the light ones already."""
    for check in DEEP_CHECKS:
        check(cfg)
