"""Validate a composed config: schemas for value nodes, signatures for `_target_` nodes, did-you-mean.

Validation runs twice by design: once in the CLI before Hydra starts any job (so a sweep with a
typo fails before its first trial), and again inside `train(cfg)` for callers that compose
configs themselves (tests, notebooks).
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from enum import Enum
from typing import get_args, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from tunelab import paths
from tunelab.config.checks import check_values
from tunelab.config.locate import where
from tunelab.config.schema import SCHEMAS, DatasetSchema, Packing
from tunelab.config.targets import check_targets
from tunelab.errors import ConfigError, did_you_mean


def _check_schema(cfg: DictConfig, name: str, schema: type) -> None:
    """Check the node at key path `name` against a dataclass schema (unknown keys, types, enum values)."""
    node = OmegaConf.select(cfg, name, default=None)
    if not isinstance(node, DictConfig):  # absent, or another verb's plain value (compare's `dataset: <option>`)
        return
    try:
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node, resolve=False))
    except ConfigKeyError as err:
        key = str(err.key) if err.key is not None else ""
        parent = err.full_key.rsplit(".", 1)[0] if "." in str(err.full_key) else ""
        valid = _schema_fields(schema, parent)
        location = where(cfg, f"{name}.{err.full_key}")
        raise ConfigError(f"unknown key {key!r}", location, did_you_mean(key, valid)) from None
    except ValidationError as err:
        value = getattr(err, "value", None)
        raise ConfigError(
            f"wrong type or value {value!r}: {err.msg.splitlines()[0]}",
            where(cfg, f"{name}.{err.full_key}"),
            _type_hint(err, f"{name}.{err.full_key}"),
        ) from None


def _type_hint(err: ValidationError, key_path: str) -> str:
    """What the key accepts: did-you-mean over an enum's values, else the expected type."""
    try:
        expected = get_type_hints(err.object_type)[str(err.key)]
    except (TypeError, KeyError, NameError):
        return "give a value of the type this key expects"
    options = [a for a in get_args(expected) if a is not type(None)] or [expected]
    enum = next((o for o in options if isinstance(o, type) and issubclass(o, Enum)), None)
    if enum is Packing and str(err.value) in ("True", "False"):  # the key was a bool before it named a mode
        meant = "batch" if str(err.value) == "True" else "none"
        return f"{key_path} names a mode now: {meant} is what {str(err.value).lower()} meant; valid: " + ", ".join(
            member.value for member in Packing)
    if enum is not None:
        return did_you_mean(str(err.value), [member.value for member in enum])
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    nullable = type(None) in get_args(expected)
    return f"{key_path} takes {names}" + (" or null" if nullable else "") + f", not {err.value!r}"


def _schema_fields(schema: type, parent: str) -> list[str]:
    for part in [p for p in parent.split(".") if p]:
        sub = {f.name: f for f in fields(schema)}.get(part)
        if sub is None or not is_dataclass(sub.default_factory() if callable(sub.default_factory) else None):
            return []
        schema = type(sub.default_factory())
    return [f.name for f in fields(schema)]


def _check_format(cfg: DictConfig, key: str) -> None:
    """`<key>.format` must be a format node (a config group since formats became functions), not a name."""
    fmt = OmegaConf.select(cfg, f"{key}.format", default=None)
    if fmt is None or isinstance(fmt, DictConfig):
        return
    options = sorted(p.stem for p in (paths.conf_dir() / "dataset" / "format").glob("*.yaml"))
    raise ConfigError(
        f"{key}.format is a config group, not a value: {fmt!r}", where(cfg, f"{key}.format"),
        f"choose it with dataset/format={fmt} on the command line or `- format: {fmt}` in the dataset's "
        f"defaults list; {did_you_mean(str(fmt), options)}",
    )


def validate(cfg: DictConfig, deep: bool = True, launch: bool = False) -> None:
    """Raise ConfigError for unknown keys, wrong types, unimportable targets and out-of-range values in `cfg`.

    `deep=False` skips the checks that import torch & co. (names passed to a library, a dry run of the
    optimizer): for `--cfg job`, which runs nothing. `launch=True` adds the checks of what a job about to
    start reads (local model and data paths exist; a missing data path is a DataError): the CLI's pre-flight.
    """
    for name, schema in SCHEMAS.items():
        _check_schema(cfg, name, schema)
    for task in OmegaConf.select(cfg, "dataset.tasks", default=None) or {}:  # each task of a mixture
        _check_schema(cfg, f"dataset.tasks.{task}", DatasetSchema)
    for key in ["dataset", *(f"dataset.tasks.{t}" for t in OmegaConf.select(cfg, "dataset.tasks", default={}) or {})]:
        _check_format(cfg, key)
    check_targets(cfg)
    try:  # every interpolation must resolve (a typo in ${...} fails here, not mid-run)
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except OmegaConfBaseException as err:
        if "hydra:" not in str(err) and "HydraConfig was not set" not in str(err):
            raise ConfigError(f"cannot resolve {err.full_key}: {err.msg.splitlines()[0]}",
                              f"key {err.full_key}", "check the ${...} interpolation") from None
    check_values(cfg, deep, launch)  # number ranges, names the libraries take, chat templates, places
