"""Checks of `_target_` nodes: the target imports, its keys are its arguments, names are those its annotations
list, and the optimizer and scheduler factories accept their settings.

Names (scheduler `name`, Lightning `precision`, PEFT `bias`) are checked against the `Enum`/`Literal`
annotations of the `_target_` they are passed to; the optimizer and scheduler factories are dry-run on
one dummy parameter with the module's own call, so the library refuses its own arguments early.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterator
from enum import Enum
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunelab import libraries
from tunelab.config.locate import MISSING_VALUE, value_at, where
from tunelab.config.signatures import Signatures
from tunelab.errors import ConfigError, did_you_mean

INSTANTIATE_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """(dotted path, node) of every `_target_` node in the tree, Hydra's own excepted."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if path == "" and key == "hydra":
                continue
            child = libraries.config_child(node, key)
            yield from target_nodes(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            yield from target_nodes(child, f"{path}[{i}]")


def check_targets(cfg: DictConfig) -> None:
    """Every `_target_` imports and every key of its node is one of its arguments (from the signature cache)."""
    signatures = Signatures()  # cached on disk: no import of torch & co. once each target has been seen
    try:
        for path, node in target_nodes(cfg):
            target = libraries.raw_target(node)
            try:
                params = signatures.params(target)
            except Exception:  # hydra raises ImportError or its own InstantiationException
                raise ConfigError(f"cannot import _target_ {target!r}", where(cfg, f"{path}._target_"),
                                  import_hint(target)) from None
            if params is None:
                continue
            for key in node:
                if key not in INSTANTIATE_KEYS and key not in params:
                    raise ConfigError(f"unknown key {key!r} for {target}", where(cfg, f"{path}.{key}"),
                                      did_you_mean(str(key), params))
    finally:
        signatures.save()


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

    for path, node in target_nodes(cfg):
        try:
            hints = _hints(get_object(libraries.raw_target(node)))
        except Exception:  # unimportable: check_targets reports it
            continue
        for key in node:
            if key in INSTANTIATE_KEYS or key not in hints:
                continue
            choices = _choices(hints[key])
            if not choices:
                continue
            value = value_at(cfg, f"{path}.{key}")
            if value is MISSING_VALUE or isinstance(value, bool) or not isinstance(value, (str, int)):
                continue
            if value in choices:
                continue
            names = [str(c) for c in choices]
            raise ConfigError(f"unknown {key} {value!r} for {libraries.raw_target(node)}",
                              where(cfg, f"{path}.{key}"), did_you_mean(str(value), names))


def check_factories(cfg: DictConfig) -> None:
    """Dry-run `hyperparams.optimizer` and `hyperparams.scheduler` as the module calls them, on one dummy
    parameter: the library refuses bad arguments (betas=[2, 0], a scheduler that needs more kwargs) now."""
    optimizer_node = OmegaConf.select(cfg, "hyperparams.optimizer", default=None)
    if not isinstance(optimizer_node, DictConfig) or "_target_" not in optimizer_node:
        return  # nothing to dry-run (serve, generate): torch is not imported for nothing
    import torch
    from hydra.utils import instantiate

    location = where(cfg, "hyperparams.optimizer")
    try:
        optimizer = instantiate(optimizer_node)(params=[{"params": [torch.nn.Parameter(torch.zeros(1))]}])
    except Exception as err:  # the library's own refusal: ValueError, TypeError, an InstantiationException
        raise ConfigError(f"the optimizer refuses its settings: {_cause(err)}", location,
                          "check the values under hyperparams.optimizer (a _partial_ node the module completes "
                          "with the model's parameters)") from None
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"hyperparams.optimizer builds a {type(optimizer).__name__}, not a torch optimizer",
                          location, "use a torch.optim class such as torch.optim.AdamW with _partial_: true")
    scheduler_node = OmegaConf.select(cfg, "hyperparams.scheduler", default=None)
    if scheduler_node is None:
        return
    location = where(cfg, "hyperparams.scheduler")
    try:
        scheduler = instantiate(scheduler_node)(optimizer=optimizer, num_warmup_steps=1, num_training_steps=10)
    except Exception as err:
        raise ConfigError(f"the scheduler refuses its settings: {_cause(err)}", location,
                          "it is called with optimizer, num_warmup_steps and num_training_steps; extra arguments "
                          "of transformers schedulers go in +hyperparams.scheduler.scheduler_specific_kwargs") from None
    step = getattr(scheduler, "step", None)
    required = [p for p in inspect.signature(step).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                ] if callable(step) else []
    if required:  # ReduceLROnPlateau-like: steps on a metric, but tunelab steps the schedule every optimizer step
        raise ConfigError(f"the scheduler {type(scheduler).__name__} steps on a metric ({required[0].name}); "
                          "tunelab steps the schedule every optimizer step", location,
                          "pick a step-wise schedule: linear, cosine, constant_with_warmup, ...")


def _cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err).splitlines()[0] if str(err) else type(err).__name__
