"""Value checks run by `validate()` before anything is built: number ranges, names a library takes, output dirs.

The libraries raise deep inside building on values like `AdamW(lr=-1)`, `DataLoader(batch_size=0)` or
`get_scheduler("nope")` (a traceback minutes into a run, or worse, a run that "succeeds" on nothing:
`epochs=0`, `lr=0`). Each number a user sets has a row in RANGES: the key (a pattern over dotted key
paths), what it accepts, and the message names the key, where it was set and the allowed range.
Names (scheduler `name`, Lightning `precision`, PEFT `bias`) are checked against the `Enum`/`Literal`
annotations of the `_target_` they are passed to; the optimizer and scheduler factories are dry-run on
one dummy parameter with the module's own call, so the library refuses its own arguments early.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import os
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelab import libraries
from tunelab.errors import ConfigError, did_you_mean

MISSING_VALUE = object()


@dataclass(frozen=True)
class Range:
    """What a numeric key accepts: bounds (inclusive unless `open`), whole numbers only, null, extra values."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False
    also: tuple[Any, ...] = ()  # special values outside the bounds (-1 for "no limit")
    words: tuple[str, ...] = ()  # strings the key also takes (trainer.devices=auto)
    whole_above_one: bool = False  # a fraction in the bounds, or above 1 a whole count
    booleans: bool = False  # true/false also accepted (trainer.fast_dev_run)
    lists: bool = False  # a list also accepted (trainer.devices=[0, 1])
    note: str = ""  # what the special values mean, for the hint

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool):
            return self.booleans
        if isinstance(value, (list, tuple)):
            return self.lists
        if isinstance(value, str):
            return value in self.words
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        if not math.isfinite(value) or (self.integer and not isinstance(value, int)):
            return False
        if self.whole_above_one and value > 1:
            return isinstance(value, int)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.whole_above_one:
            text = f"a fraction in {'(' if self.low_open else '['}{_num(self.low or 0)}, 1] or a whole count >= 1"
        elif self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = kind
        extras = [repr(a) for a in self.also] + list(self.words) + (["true/false"] if self.booleans else []) + (
            ["a list"] if self.lists else []) + (["null"] if self.nullable else [])
        return text + (f", or {' or '.join(extras)}" if extras else "") + (f" ({self.note})" if self.note else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


POSITIVE = Range(low=0, low_open=True)
NON_NEGATIVE = Range(low=0)
AT_LEAST_ONE = Range(low=1, integer=True)
FRACTION = Range(low=0, high=1)
SEED = Range(low=0, high=2**32 - 1, integer=True)  # numpy's seed range; Lightning seeds numpy with it
DECODING = ("decoding",)  # the one decoding group (train, generate, eval, serve)

# key pattern (fnmatch over dotted paths; `*` spans dots) -> what it accepts. First rows first: a bad
# hyperparams.epochs is reported under its own name, not as the trainer.max_epochs it is interpolated into.
RANGES: dict[str, Range] = {
    "hyperparams.lr": POSITIVE,
    "hyperparams.batch_size": AT_LEAST_ONE,
    "hyperparams.eval_batch_size": AT_LEAST_ONE,
    "hyperparams.epochs": Range(low=1, integer=True, also=(-1,), note="-1: no epoch limit, stop at max_steps"),
    "hyperparams.max_steps": Range(low=1, integer=True, also=(-1,), note="-1: no step limit"),
    "hyperparams.weight_decay": NON_NEGATIVE,
    "hyperparams.warmup_ratio": FRACTION,
    "hyperparams.accumulate_grad_batches": AT_LEAST_ONE,
    "hyperparams.max_seq_len": Range(low=8, integer=True, note="a chat template alone takes a few tokens"),
    "hyperparams.gradient_clip_val": Range(low=0, low_open=True, nullable=True, note="null: no clipping"),
    "hyperparams.seed": SEED,
    "hyperparams.optimizer.lr": POSITIVE,
    "hyperparams.optimizer.weight_decay": NON_NEGATIVE,
    "hyperparams.optimizer.eps": POSITIVE,
    "hyperparams.optimizer.momentum": NON_NEGATIVE,
    "dataset.max_bad_fraction": FRACTION,
    "dataset.tasks.*.max_bad_fraction": FRACTION,
    "dataset.source.val_size": Range(low=0, low_open=True, whole_above_one=True, nullable=True),
    "dataset.source.test_size": Range(low=0, low_open=True, whole_above_one=True, nullable=True),
    "dataset.tasks.*.source.val_size": Range(low=0, low_open=True, whole_above_one=True, nullable=True),
    "dataset.tasks.*.source.test_size": Range(low=0, low_open=True, whole_above_one=True, nullable=True),
    "dataset.samples_per_epoch": Range(low=1, integer=True, nullable=True),
    "dataset.weights.*": NON_NEGATIVE,
    "eval.max_eval_samples": Range(low=1, integer=True, nullable=True, note="null: all"),
    "trainer.max_epochs": Range(low=1, integer=True, also=(-1,), nullable=True),
    "trainer.max_steps": Range(low=1, integer=True, also=(-1,)),
    "trainer.accumulate_grad_batches": AT_LEAST_ONE,
    "trainer.gradient_clip_val": Range(low=0, low_open=True, nullable=True),
    "trainer.val_check_interval": Range(low=0, low_open=True, whole_above_one=True, nullable=True,
                                        note="a fraction of an epoch, or every N training batches"),
    "trainer.check_val_every_n_epoch": Range(low=1, integer=True, nullable=True),
    "trainer.log_every_n_steps": AT_LEAST_ONE,
    "trainer.num_sanity_val_steps": Range(low=0, integer=True, also=(-1,), note="-1: all"),
    "trainer.devices": Range(low=1, integer=True, also=(-1,), words=("auto", "-1"), lists=True,
                           note="-1 or auto: all"),
    "trainer.num_nodes": AT_LEAST_ONE,
    "trainer.overfit_batches": Range(low=0, whole_above_one=True),
    "trainer.limit_*_batches": Range(low=0, whole_above_one=True, nullable=True),
    "trainer.fast_dev_run": Range(low=0, integer=True, booleans=True),
    "callbacks.*.every_n_train_steps": Range(low=0, integer=True, nullable=True),
    "callbacks.*.every_n_epochs": Range(low=0, integer=True, nullable=True),
    "callbacks.*.save_top_k": Range(low=0, integer=True, also=(-1,), note="-1: keep all"),
    "callbacks.*.every_n_steps": Range(low=1, integer=True, nullable=True, note="null: no step interval"),
    "callbacks.*.every_minutes": Range(low=0, low_open=True, nullable=True, note="null: no time interval"),
    "callbacks.*.keep_last": AT_LEAST_ONE,
    "callbacks.*.refresh_rate": Range(low=0, integer=True),
    "callbacks.*.window": AT_LEAST_ONE,
    "callbacks.*.peak_tflops": Range(low=0, low_open=True, nullable=True, note="null: from the GPU's name"),
    "method.peft.r": AT_LEAST_ONE,
    "method.peft.lora_alpha": POSITIVE,
    "method.peft.lora_dropout": Range(low=0, high=1, high_open=True),
    "method.peft.num_virtual_tokens": AT_LEAST_ONE,
    "method.freeze.last_n_layers": Range(low=0, integer=True),
    **{f"{group}.max_new_tokens": AT_LEAST_ONE for group in DECODING},
    **{f"{group}.temperature": POSITIVE for group in DECODING},
    **{f"{group}.top_p": Range(low=0, high=1, low_open=True) for group in DECODING},
    **{f"{group}.top_k": Range(low=0, integer=True, note="0: no top-k cut") for group in DECODING},
    **{f"{group}.repetition_penalty": POSITIVE for group in DECODING},
    **{f"{group}.num_beams": AT_LEAST_ONE for group in DECODING},
    "seed": SEED,  # `tunelab generate seed=...`
    "template": Range(low=0, integer=True),  # `tunelab generate template=...`
    # `tunelab eval` (and each arm of `tunelab compare`)
    "max_samples": Range(low=1, integer=True, nullable=True),
    "batch_size": Range(low=1, integer=True, nullable=True),
    "max_prompt_tokens": Range(low=1, integer=True, nullable=True),
    "prompting.k": Range(low=0, integer=True),
    "bootstrap.resamples": AT_LEAST_ONE,
    "bootstrap.confidence": Range(low=0, high=1, low_open=True, high_open=True),
    # `tunelab serve ...`
    "port": Range(low=0, high=65535, integer=True, note="0: any free port"),
    "max_tokens": AT_LEAST_ONE,
    "max_concurrent": AT_LEAST_ONE,
    "max_waiting": Range(low=0, integer=True),
    "max_request_bytes": AT_LEAST_ONE,
    "graceful_timeout_s": NON_NEGATIVE,
}

# Keys taking one of a few words (None: null allowed); names a `_target_`'s annotation lists are checked by
# check_choices instead.
DTYPES = ("float32", "bfloat16", "float16", "float64")
WORDS: dict[str, tuple[str | None, ...]] = {
    "model.dtype": (*DTYPES, "auto"),
    "dtype": (*DTYPES, None),  # `tunelab export dtype=...`
}

# Keys naming directories a verb writes: refused at once when they cannot be created or written.
OUTPUT_DIRS = ("paths.output_dir", "paths.cache_dir", "out")


def _where(cfg: DictConfig, key: str) -> str:
    from tunelab.config.schema import _where as where

    return where(cfg, key)


def _leaves(node: Any, path: str = "") -> Iterator[str]:
    """Dotted paths of every value in the tree (lists and dicts included, their items too), Hydra's excepted."""
    if isinstance(node, DictConfig):
        for key in node:
            if path == "" and key == "hydra":
                continue
            child = f"{path}.{key}" if path else str(key)
            yield child
            yield from _leaves(libraries.config_child(node, key), child)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _leaves(libraries.config_child(node, i), f"{path}[{i}]")


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, default=MISSING_VALUE, throw_on_missing=True)
    except OmegaConfBaseException:  # an interpolation only Hydra's runtime resolves, or a missing value
        return MISSING_VALUE
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def check_ranges(cfg: DictConfig) -> None:
    """Raise ConfigError for the first number outside its row of RANGES, or a cross-key rule broken."""
    keys = [k for k in _leaves(cfg) if "[" not in k]
    for pattern, allowed in RANGES.items():
        for key in keys:
            if not fnmatch.fnmatchcase(key, pattern):
                continue
            value = _value(cfg, key)
            if value is MISSING_VALUE or allowed.accepts(value):
                continue
            if isinstance(value, str) and not allowed.words:
                hint = f"{key} takes a number, not the string {value!r}; drop the quotes"
            else:
                hint = f"{key} takes {allowed.describe()}"
            raise ConfigError(f"{key} must be {allowed.describe()}, got {value!r}", _where(cfg, key), hint)
        if pattern == "hyperparams.max_steps":  # both epochs and max_steps are in range: their pair too
            _check_training_length(cfg)
    for key, words in WORDS.items():
        value = _value(cfg, key)
        if value is not MISSING_VALUE and value not in words:
            raise ConfigError(f"{key} must be one of {', '.join(str(w).replace('None', 'null') for w in words)}, "
                              f"got {value!r}", _where(cfg, key), did_you_mean(str(value), [w for w in words if w]))
    weights = _value(cfg, "dataset.weights")
    if isinstance(weights, dict) and weights and not sum(weights.values()) > 0:
        raise ConfigError("dataset.weights must not all be 0", _where(cfg, "dataset.weights"),
                          "give at least one task a positive weight")
    _check_rank_choices(cfg)


def _check_rank_choices(cfg: DictConfig) -> None:
    """decoding.rank_choices picks among a task's `choices`: every task scored must list at least two."""
    if _value(cfg, "decoding.rank_choices") is not True:
        return
    if _value(cfg, "dataset") is MISSING_VALUE:  # generate, serve: text is asked for, there are no labels
        raise ConfigError("decoding.rank_choices picks among a dataset's labels, and this command has no dataset",
                          _where(cfg, "decoding.rank_choices"), "use decoding=greedy or decoding=creative here")
    tasks = _value(cfg, "dataset.tasks")
    names = [f"dataset.tasks.{n}" for n in tasks] if isinstance(tasks, dict) and tasks else ["dataset"]
    for name in names:
        choices = _value(cfg, f"{name}.choices")
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(
                isinstance(c, str) and c.strip() for c in choices):
            raise ConfigError(f"decoding.rank_choices needs {name}.choices, a list of at least 2 non-empty labels, "
                              f"got {None if choices is MISSING_VALUE else choices!r}",
                              _where(cfg, "decoding.rank_choices"),
                              f"list the task's labels ({name}.choices=[positive,negative]), or use decoding=greedy")


def _check_training_length(cfg: DictConfig) -> None:
    epochs, max_steps = _value(cfg, "hyperparams.epochs"), _value(cfg, "hyperparams.max_steps")
    if epochs == -1 and max_steps == -1:
        raise ConfigError("hyperparams.epochs=-1 with hyperparams.max_steps=-1 would train forever",
                          _where(cfg, "hyperparams.epochs"), "set hyperparams.epochs >= 1 or hyperparams.max_steps > 0")


# ---- names and arguments of `_target_`s --------------------------------------------------------
def _choices(annotation: Any) -> list[Any]:
    """The values an annotation enumerates (Literal values, Enum values), through Optional/Union."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return list(typing.get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [m.value for m in annotation]
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return [c for arg in typing.get_args(annotation) for c in _choices(arg)]
    return []


def _hints(obj: Any) -> dict[str, Any]:
    target = obj.__init__ if isinstance(obj, type) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # an unresolvable forward reference (a TYPE_CHECKING-only alias), a C callable
        pass
    try:  # one such alias must not hide the parameters whose annotations are real objects (Lightning's FSDPStrategy)
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.annotation for p in parameters
            if p.annotation is not inspect.Parameter.empty and not isinstance(p.annotation, str)}


def check_choices(cfg: DictConfig) -> None:
    """A string passed to a `_target_` argument annotated with an Enum or Literal must be one of its values."""
    from hydra.utils import get_object

    from tunelab.config.schema import INSTANTIATE_KEYS, _target_nodes

    for path, node in _target_nodes(cfg):
        try:
            hints = _hints(get_object(libraries.raw_target(node)))
        except Exception:  # unimportable: _check_targets reports it
            continue
        for key in node:
            if key in INSTANTIATE_KEYS or key not in hints:
                continue
            choices = _choices(hints[key])
            if not choices:
                continue
            value = _value(cfg, f"{path}.{key}")
            if value is MISSING_VALUE or isinstance(value, bool) or not isinstance(value, (str, int)):
                continue
            if value in choices:
                continue
            names = [str(c) for c in choices]
            raise ConfigError(f"unknown {key} {value!r} for {libraries.raw_target(node)}",
                              _where(cfg, f"{path}.{key}"), did_you_mean(str(value), names))


def check_factories(cfg: DictConfig) -> None:
    """Dry-run `hyperparams.optimizer` and `hyperparams.scheduler` as the module calls them, on one dummy
    parameter: the library refuses bad arguments (betas=[2, 0], a scheduler that needs more kwargs) now."""
    import torch
    from hydra.utils import instantiate

    optimizer_node = OmegaConf.select(cfg, "hyperparams.optimizer", default=None)
    if not isinstance(optimizer_node, DictConfig) or "_target_" not in optimizer_node:
        return
    where = _where(cfg, "hyperparams.optimizer")
    try:
        optimizer = instantiate(optimizer_node)(params=[{"params": [torch.nn.Parameter(torch.zeros(1))]}])
    except Exception as err:  # the library's own refusal: ValueError, TypeError, an InstantiationException
        raise ConfigError(f"the optimizer refuses its settings: {_cause(err)}", where,
                          "check the values under hyperparams.optimizer (a _partial_ node the module completes "
                          "with the model's parameters)") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"hyperparams.optimizer builds a {type(optimizer).__name__}, not a torch optimizer",
                          where, "use a torch.optim class such as torch.optim.AdamW with _partial_: true")
    scheduler_node = OmegaConf.select(cfg, "hyperparams.scheduler", default=None)
    if scheduler_node is None:
        return
    where = _where(cfg, "hyperparams.scheduler")
    try:
        scheduler = instantiate(scheduler_node)(optimizer=optimizer, num_warmup_steps=1, num_training_steps=10)
    except Exception as err:
        raise ConfigError(f"the scheduler refuses its settings: {_cause(err)}", where,
                          "it is called with optimizer, num_warmup_steps and num_training_steps; extra arguments "
                          "of transformers schedulers go in +hyperparams.scheduler.scheduler_specific_kwargs") from None
    step = getattr(scheduler, "step", None)
    required = [p for p in inspect.signature(step).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                ] if callable(step) else []
    if required:  # ReduceLROnPlateau-like: steps on a metric, but tunelab steps the schedule every optimizer step
        raise ConfigError(f"the scheduler {type(scheduler).__name__} steps on a metric ({required[0].name}); "
                          "tunelab steps the schedule every optimizer step", where,
                          "pick a step-wise schedule: linear, cosine, constant_with_warmup, ...")


def _cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def check_chat_templates(cfg: DictConfig) -> None:
    from tunelab.models.load import chat_template_problem

    for key in ["dataset.chat_template", *(f"dataset.tasks.{t}.chat_template"
                                           for t in OmegaConf.select(cfg, "dataset.tasks", default=None) or {})]:
        value = _value(cfg, key)
        problem = None if value is MISSING_VALUE else chat_template_problem(value)
        if problem:
            what, hint = problem
            raise ConfigError(f"{key}: {what}", _where(cfg, key), hint)


def check_output_dirs(cfg: DictConfig) -> None:
    """Directories a verb will write must be creatable: the nearest existing ancestor is a writable directory."""
    for key in OUTPUT_DIRS:
        value = _value(cfg, key)
        if value is MISSING_VALUE or value is None:
            continue
        path = Path(str(value)).expanduser().absolute()
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            problem = f"{existing} is a file, not a directory"
        elif not os.access(existing, os.W_OK | os.X_OK):
            problem = f"{existing} is not writable"
        else:
            continue
        raise ConfigError(f"cannot write to {path}: {problem}", _where(cfg, key),
                          f"point {key} at a directory you can write")


# ---- scale: strategies and launchers ------------------------------------------------------------
# Strategies whose training state is split across ranks (`_target_`s of trainer.strategy).
FSDP = "pytorch_lightning.strategies.FSDPStrategy"
DEEPSPEED = "pytorch_lightning.strategies.DeepSpeedStrategy"


def strategy_target(cfg: DictConfig) -> str | None:
    """The `_target_` of trainer.strategy, or None when it is a name (`ddp`, `auto`) or absent."""
    node = OmegaConf.select(cfg, "trainer.strategy", default=None)
    if isinstance(node, DictConfig) and "_target_" in node:
        return libraries.raw_target(node)
    return None


def check_strategy(cfg: DictConfig) -> None:
    """What a sharded strategy cannot do with the rest of the config."""
    target = strategy_target(cfg)
    if target not in (FSDP, DEEPSPEED):
        return
    accumulate = _value(cfg, "hyperparams.accumulate_grad_batches")
    if target == DEEPSPEED and accumulate not in (MISSING_VALUE, 1):
        # DeepSpeed owns accumulation and the gradients; the module then normalises each micro-batch by its
        # own tokens (all ranks), which is the token mean of the whole step only when a step is one micro-batch.
        raise ConfigError(f"DeepSpeed with hyperparams.accumulate_grad_batches={accumulate}: DeepSpeed accumulates "
                          "gradients itself, where tunelab cannot average the loss over the whole step's tokens",
                          _where(cfg, "hyperparams.accumulate_grad_batches"),
                          "set hyperparams.accumulate_grad_batches=1 and raise hyperparams.batch_size, or use "
                          "trainer=fsdp")
    if _value(cfg, "model.random_init") is True and OmegaConf.select(cfg, "method.peft", default=None) is not None:
        # model/base (the random base beside the adapter) is written from an unsharded copy of the model.
        raise ConfigError("an adapter over a randomly initialised base cannot be saved from a sharded run: the "
                          "base's weights exist only as shards", "keys model.random_init, method, trainer.strategy",
                          "use method=full, or train the adapter with trainer=default or trainer=ddp_cpu")


def check_sharding_names(cfg: DictConfig) -> None:
    """FSDP's sharding_strategy is a name of torch's ShardingStrategy (Lightning annotates it with a type-checking
    alias, so check_choices cannot see it; a typo would fail as a KeyError inside the Trainer)."""
    value = _value(cfg, "trainer.strategy.sharding_strategy")
    if strategy_target(cfg) != FSDP or not isinstance(value, str):
        return
    from torch.distributed.fsdp import ShardingStrategy

    names = [member.name for member in ShardingStrategy]
    if value.upper() not in names:
        raise ConfigError(f"unknown sharding_strategy {value!r} for FSDP",
                          _where(cfg, "trainer.strategy.sharding_strategy"), did_you_mean(value.upper(), names))


def check_engine(cfg: DictConfig) -> None:
    """The engine a valid config names must be installed to run it: a DeepSpeed strategy needs the `deepspeed`
    package. Looked up without importing it (its import probes CUDA); not part of validate(), so the config
    tree composes and validates on machines without it. Exit 2 naming the extra, never a traceback."""
    import importlib.util

    if strategy_target(cfg) == DEEPSPEED and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("trainer.strategy is DeepSpeed but the deepspeed package is not installed",
                          _where(cfg, "trainer.strategy"),
                          "install the extra: pip install -e '.[deepspeed]' (needs CUDA; `make setup` adds it where "
                          "nvidia-smi finds a GPU), or use trainer=fsdp")


# Switches that must be true or false (a string such as "yes" would be truthy); None: null also allowed.
SWITCHES: dict[str, bool] = {"model.gradient_checkpointing": False, "model.compile": False,
                             "model.liger_kernel": False, "hyperparams.optimizer.fused": True}


def check_fast_paths(cfg: DictConfig) -> None:
    """The opt-in fast paths: booleans, and combinations the libraries refuse only at the first step."""
    for key, nullable in SWITCHES.items():
        value = _value(cfg, key)
        if value is MISSING_VALUE or isinstance(value, bool) or (nullable and value is None):
            continue
        raise ConfigError(f"{key} must be true or false{' or null' if nullable else ''}, got {value!r}",
                          _where(cfg, key), f"set {key}=true or {key}=false")
    if _value(cfg, "model.liger_kernel") is True and _value(cfg, "trainer.accelerator") == "cpu":
        raise ConfigError("model.liger_kernel needs a CUDA GPU, but trainer.accelerator is cpu",
                          _where(cfg, "model.liger_kernel"), "set model.liger_kernel=false, or use trainer=gpu")
    precision = str(_value(cfg, "trainer.precision"))
    if (_value(cfg, "hyperparams.optimizer.fused") is True and precision in ("16", "16-mixed")
            and _value(cfg, "trainer.gradient_clip_val") not in (None, 0, MISSING_VALUE)):
        # fp16's grad scaler hands a fused optimizer still-scaled gradients, which cannot be clipped first;
        # Lightning raises at the first step. bf16 has no scaler: the module clips as usual there.
        raise ConfigError("a fused optimizer cannot clip gradients under fp16 mixed precision",
                          _where(cfg, "hyperparams.optimizer.fused"),
                          "use trainer.precision=bf16-mixed, set hyperparams.gradient_clip_val=null, "
                          "or hyperparams.optimizer.fused=false")


# Checks on the values alone, and checks that import the libraries the values are passed to (torch,
# transformers, peft: seconds). `tunelab train --cfg job` runs only the first; a job imports those
# libraries anyway, so it runs both before anything is built.
LIGHT_CHECKS: tuple[Callable[[DictConfig], None], ...] = (check_ranges, check_fast_paths, check_output_dirs,
                                                          check_strategy)
DEEP_CHECKS: tuple[Callable[[DictConfig], None], ...] = (check_choices, check_chat_templates, check_factories,
                                                          check_sharding_names)


def check_values(cfg: DictConfig, deep: bool = True) -> None:
    """The checks above, light ones first; the first problem found is raised as a ConfigError (exit 2)."""
    for check in LIGHT_CHECKS + (DEEP_CHECKS if deep else ()):
        check(cfg)


def import_hint(target: str) -> str:
    """For an unimportable `_target_`: did-you-mean over the names its module (or package) does have."""
    import importlib

    module_name, _, name = target.rpartition(".")
    while module_name:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a misspelt package: try its parent
            name = module_name.rpartition(".")[2]
            module_name = module_name.rpartition(".")[0]
            continue
        public = [n for n in dir(module) if not n.startswith("_")]
        hint = did_you_mean(name, public)
        close = hint.split("?")[0] if hint.startswith("did you mean") else ""
        if close:
            return close.replace("did you mean '", f"did you mean '{module_name}.").replace(
                " or '", f" or '{module_name}.") + "?"
        return f"{module_name} has no {name!r}; check the spelling of the module and class"
    return "check the spelling of the module and class"
