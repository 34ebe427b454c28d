"""Compose and validate configs: schemas for value nodes, signatures for `_target_` nodes, did-you-mean.

Validation runs twice by design: once in the CLI before Hydra starts any job (so a sweep with a
typo fails before its first trial), and again inside `train(cfg)` for callers that compose
configs themselves (tests, notebooks).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional, get_args, get_type_hints

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from tunelab import paths
from tunelab.config.signatures import Signatures
from tunelab.errors import ConfigError, TunelabError, did_you_mean

INSTANTIATE_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


# ---- resolvers ------------------------------------------------------------------------------
@functools.cache
def _run_id() -> str:
    # Time for sorting, random bits so two jobs started in the same second never collide (hydra#2925).
    return time.strftime("%Y-%m-%d_%H-%M-%S") + "_" + secrets.token_hex(3)


def register_resolvers() -> None:
    """Resolvers the config tree uses; safe to call more than once."""
    OmegaConf.register_new_resolver("tunelab_run_id", _run_id, replace=True)
    OmegaConf.register_new_resolver(
        "tunelab_path", lambda name: str({"data": paths.data_dir, "assets": paths.assets_dir}[name]()), replace=True
    )


def new_run_id() -> str:
    """The run id of this process (also what `${tunelab_run_id:}` resolves to)."""
    return _run_id()


# ---- schemas of value nodes -----------------------------------------------------------------
class OnNonFinite(str, Enum):
    stop = "stop"
    skip = "skip"


class OnBadRow(str, Enum):
    error = "error"
    skip = "skip"


class Overlength(str, Enum):
    error = "error"
    truncate = "truncate"
    drop = "drop"


class Packing(str, Enum):
    """How training examples share rows of `max_seq_len` tokens (README "Packing")."""

    none = "none"  # one example per row, padded to the longest in the micro-batch
    batch = "batch"  # each micro-batch of `batch_size` examples binned into as few rows as fit
    dataset = "dataset"  # each epoch's examples binned into rows; `batch_size` counts rows


@dataclass
class HyperparamsSchema:
    lr: float = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    epochs: int = MISSING
    max_steps: int = -1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    accumulate_grad_batches: int = 1
    max_seq_len: int = MISSING
    packing: Packing = Packing.none
    gradient_clip_val: Optional[float] = None
    seed: int = 0
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    optimizer: Any = MISSING
    scheduler: Any = None


@dataclass
class SourceSchema:
    path: Optional[str] = None  # required for a single task; a mixture's own node has none
    subset: Optional[str] = None
    splits: dict[str, Optional[str]] = field(default_factory=dict)
    val_size: Optional[float] = None
    test_size: Optional[float] = None
    train_size: Optional[float] = None  # keep a seeded subset of train (sample-efficiency curves)


@dataclass
class DatasetSchema:
    name: str = MISSING
    source: SourceSchema = field(default_factory=SourceSchema)
    # A `_target_` node naming the format function (conf/dataset/format/), called per row.
    format: Any = field(default_factory=lambda: {"_target_": "tunelab.data.formats.prompt_completion",
                                                 "_partial_": True})
    column_map: dict[str, str] = field(default_factory=dict)
    templates: list[Any] = field(default_factory=list)
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None
    train_on_prompt: bool = False
    overlength: Overlength = Overlength.error
    on_bad_row: OnBadRow = OnBadRow.error
    max_bad_fraction: float = 0.05
    metrics: dict[str, Any] = field(default_factory=dict)
    corpus_metrics: dict[str, Any] = field(default_factory=dict)  # (answers, references) -> float, e.g. macro-F1
    # The answer options of a classification task, for rank classification (decoding=choices).
    choices: Optional[list[str]] = None
    # A mixture names tasks (each a dataset config like this one) and their sampling weights.
    tasks: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    samples_per_epoch: Optional[int] = None


@dataclass
class EvalSchema:
    baseline: bool = True
    test: bool = True
    generate_on_val: bool = True
    max_eval_samples: Optional[int] = None


def dataset_spec(node: Any) -> DatasetSchema:
    """A dataset config (a mixture's tasks too) as the typed, validated object, defaults applied once."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    spec: DatasetSchema = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DatasetSchema), plain))
    spec.tasks = {name: dataset_spec(task) for name, task in spec.tasks.items()}
    return spec


SCHEMAS: dict[str, type] = {"hyperparams": HyperparamsSchema, "dataset": DatasetSchema, "eval": EvalSchema}


# ---- locating a key in the user's files -----------------------------------------------------
def _find_in_files(cfg: DictConfig, key_path: str) -> str | None:
    """`file:line` of the YAML that set `key_path`, found from the group choice and config sources."""
    group, _, rest = key_path.partition(".")
    leaf = key_path.rsplit(".", 1)[-1]
    try:
        choice = cfg.hydra.runtime.choices.get(group)
        sources = [s.path for s in cfg.hydra.runtime.config_sources if s.path and s.provider != "schema"]
    except (AttributeError, OmegaConfBaseException):
        choice, sources = None, [str(paths.conf_dir())]
    candidates = [f"{group}/{choice}.yaml"] if choice and rest else []
    candidates.append("train.yaml")
    for source in sources:
        for name in candidates:
            file = Path(str(source).removeprefix("file://")) / name
            if file.is_file():
                for number, line in enumerate(file.read_text().splitlines(), start=1):
                    if re.match(rf"\s*{re.escape(leaf)}\s*:", line):
                        return f"{file}:{number}"
    return None


def _command_line_override(cfg: DictConfig, key_path: str) -> str | None:
    """The command-line override that set `key_path` (`a.b=1`, `+a.b=1`, `++a.b=1`), if one did."""
    try:
        task = list(cfg.hydra.overrides.task)
    except (AttributeError, OmegaConfBaseException):
        # A job's config (no `hydra` node): the CLI's pre-flight already checked it with the command line.
        task = []
    for override in reversed(task):  # the last one wins, as in Hydra
        if re.split(r"[=@]", override.lstrip("+~"), maxsplit=1)[0] == key_path:
            from tunelab.config.redact import redact

            return redact(override)
    return None


def _where(cfg: DictConfig, key_path: str) -> str:
    """`key a.b (override a.b=1 on the command line)` or `key a.b (file.yaml:3)`: where to fix it."""
    override = _command_line_override(cfg, key_path)
    found = f"override {override} on the command line" if override else _find_in_files(cfg, key_path)
    return f"key {key_path}" + (f" ({found})" if found else "")


# ---- validation -----------------------------------------------------------------------------
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
        where = _where(cfg, f"{name}.{err.full_key}")
        raise ConfigError(f"unknown key {key!r}", where, did_you_mean(key, valid)) from None
    except ValidationError as err:
        value = getattr(err, "value", None)
        raise ConfigError(
            f"wrong type or value {value!r}: {err.msg.splitlines()[0]}",
            _where(cfg, f"{name}.{err.full_key}"),
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


def _target_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if path == "" and key == "hydra":
                continue
            child = node._get_node(key)
            yield from _target_nodes(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            yield from _target_nodes(child, f"{path}[{i}]")


def _check_targets(cfg: DictConfig) -> None:
    signatures = Signatures()  # cached on disk: no import of torch & co. once each target has been seen
    try:
        for path, node in _target_nodes(cfg):
            target = str(node._get_node("_target_")._value())
            try:
                params = signatures.params(target)
            except Exception:  # hydra raises ImportError or its own InstantiationException
                from tunelab.config.checks import import_hint

                raise ConfigError(f"cannot import _target_ {target!r}", _where(cfg, f"{path}._target_"),
                                  import_hint(target)) from None
            if params is None:
                continue
            for key in node:
                if key not in INSTANTIATE_KEYS and key not in params:
                    raise ConfigError(f"unknown key {key!r} for {target}", _where(cfg, f"{path}.{key}"),
                                      did_you_mean(str(key), params))
    finally:
        signatures.save()


def _check_format(cfg: DictConfig, key: str) -> None:
    """`<key>.format` must be a format node (a config group since formats became functions), not a name."""
    fmt = OmegaConf.select(cfg, f"{key}.format", default=None)
    if fmt is None or isinstance(fmt, DictConfig):
        return
    options = sorted(p.stem for p in (paths.conf_dir() / "dataset" / "format").glob("*.yaml"))
    raise ConfigError(
        f"{key}.format is a config group, not a value: {fmt!r}", _where(cfg, f"{key}.format"),
        f"choose it with dataset/format={fmt} on the command line or `- format: {fmt}` in the dataset's "
        f"defaults list; {did_you_mean(str(fmt), options)}",
    )


def validate(cfg: DictConfig, deep: bool = True) -> None:
    """Raise ConfigError for unknown keys, wrong types, unimportable targets and out-of-range values in `cfg`.

    `deep=False` skips the checks that import torch & co. (names passed to a library, a dry run of the
    optimizer): for `--cfg job`, which runs nothing.
    """
    for name, schema in SCHEMAS.items():
        _check_schema(cfg, name, schema)
    for task in OmegaConf.select(cfg, "dataset.tasks", default=None) or {}:  # each task of a mixture
        _check_schema(cfg, f"dataset.tasks.{task}", DatasetSchema)
    for key in ["dataset", *(f"dataset.tasks.{t}" for t in OmegaConf.select(cfg, "dataset.tasks", default={}) or {})]:
        _check_format(cfg, key)
    _check_targets(cfg)
    try:  # every interpolation must resolve (a typo in ${...} fails here, not mid-run)
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except OmegaConfBaseException as err:
        if "hydra:" not in str(err) and "HydraConfig was not set" not in str(err):
            raise ConfigError(f"cannot resolve {err.full_key}: {err.msg.splitlines()[0]}",
                              f"key {err.full_key}", "check the ${...} interpolation") from None
    from tunelab.config.checks import check_values

    check_values(cfg, deep)  # number ranges, names the libraries take, chat templates, output dirs


# ---- building objects from nodes -----------------------------------------------------------
def build(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, except that a tunelab error raised by the target keeps its message and
    exit code (Hydra would wrap it into an InstantiationException and a traceback), and a ValueError or
    TypeError from a constructor given the user's values (LoraConfig(r=0), ...) is a config error."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, TunelabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        from lightning_fabric.utilities.exceptions import MisconfigurationException

        # Lightning's own refusal of a setting (trainer=gpu or a DeepSpeed strategy where no GPU is) included.
        if isinstance(err.__cause__, (ValueError, TypeError, MisconfigurationException)):
            match = re.search(r"full_key: (\S+)", str(err))
            target = re.search(r"target '([^']+)'", str(err))
            raise ConfigError(
                f"{target.group(1) if target else 'a target'} refused its arguments: {err.__cause__}",
                f"key {match.group(1)}" if match else "config", "check the values set under this key",
            ) from None
        raise


def build_with(node: Any, **runtime: Any) -> Any:
    """`build(node)`, passing each runtime object in `runtime` only to a target that names it as a parameter
    (a W&B logger takes the run context; a CSV logger does not)."""
    target = get_object(str(node._get_node("_target_")._value()))
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    passed = {k: v for k, v in runtime.items() if k in params}
    # Hydra merges keyword arguments into the node, which turns a dataclass (the run context) into a
    # DictConfig without its methods; a partial called with the objects passes them as they are.
    return build(node, _partial_=True)(**passed) if passed else build(node)


# ---- composition (used by the CLI's pre-flight check, tests and notebooks) -------------------
def compose(
    overrides: list[str] | None = None,
    config_name: str = "train",
    config_dir: str | None = None,
    return_hydra_config: bool = True,
) -> DictConfig:
    """Compose `conf/<config_name>.yaml` with overrides, translating Hydra's errors into ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    overrides = list(overrides or [])
    primary_dir = paths.conf_dir()
    if config_dir and (Path(config_dir) / f"{config_name}.yaml").is_file():
        # A verb whose primary config is the user's own (a new verb, tests/test_verbs.py): Hydra's run finds it
        # in --config-dir, and conf/ still holds the groups it names.
        primary_dir, config_dir = Path(config_dir).resolve(), str(paths.conf_dir())
    if config_dir:
        overrides.append(f"hydra.searchpath=[file://{Path(config_dir).resolve()}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(primary_dir), version_base="1.3"):
            return hydra_compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    except MissingConfigException as err:
        raise _missing_option(err, overrides) from None
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse override: {str(err).splitlines()[0]}", "command line",
                          "overrides look like key=value, group=option, +new_key=value") from None
    except ConfigCompositionException as err:
        raise _bad_override(err, overrides, config_name, config_dir) from None
    except ValueError as err:  # Hydra's own refusal of an override's shape, e.g. `=1` (no key)
        raise ConfigError(f"cannot apply the overrides: {str(err).splitlines()[0]}", "command line",
                          "overrides look like key=value, group=option, +new_key=value") from None
    finally:
        GlobalHydra.instance().clear()


def _missing_option(err: MissingConfigException, overrides: list[str]) -> ConfigError:
    text = str(err)
    match = re.search(r"Could not find '([^']+)'", text)
    wanted = match.group(1) if match else "?"
    group, _, option = wanted.rpartition("/")
    if not group:
        return ConfigError(f"config {wanted!r} not found", "command line", text.splitlines()[0])
    key = group.replace("/", ".")
    typed = [o for o in overrides if re.match(rf"[+~]*{re.escape(group)}(@[^=]*)?=", o)]
    where = f"override {typed[-1]} on the command line" if typed else f"key {key}"
    return ConfigError(f"unknown {group} option {option!r}", where, did_you_mean(option, err.options or []))


def _bad_override(
    err: ConfigCompositionException, overrides: list[str], config_name: str, config_dir: str | None
) -> ConfigError:
    text = str(err)
    match = re.search(r"Could not (?:override|append to|delete from) '([^']+)'", text)
    if not match:
        cause = err.__cause__ or err
        return ConfigError(str(cause).splitlines()[0], "command line")
    key = match.group(1)
    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if not re.match(rf"[+~]*{re.escape(key)}(@[^=]*)?=", o)]
    if len(rest) == len(overrides):  # not from the command line: an `override` in some file's defaults list
        source = re.match(r"In '([^']+)'", text)
        lines = text.splitlines()
        return ConfigError(lines[0], f"defaults list of {source.group(1)}.yaml" if source else "a defaults list",
                           lines[1] if len(lines) > 1 else "check the file's `override /group: option` lines")
    rest = [o for o in rest if not o.startswith("hydra.searchpath=")]
    try:
        cfg = compose(rest, config_name, config_dir, return_hydra_config=False)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        valid = list(node.keys()) if isinstance(node, DictConfig) else []
    except ConfigError:
        node, valid = None, []
    add = f"; to add a key the YAML does not set use +{key}=..."
    if isinstance(node, DictConfig) and "_target_" in node:
        # The YAML names a few of the target's arguments; the user may mean any of the others.
        target = str(node._get_node("_target_")._value())
        accepted = _signature_keys(target)
        if accepted is not None:
            where = f"override {key} on the command line"
            if leaf in accepted:
                return ConfigError(f"{target} takes {leaf!r} but the YAML does not set it", where,
                                   f"add it with +{key}=...")
            return ConfigError(f"unknown key {leaf!r} for {target}", where, did_you_mean(leaf, accepted))
    if not parent:
        groups = _groups()
        valid = sorted(set(valid) | set(groups))
        if difflib.get_close_matches(leaf, groups, n=1, cutoff=0.6):
            add = "; a config group is chosen with group=option"  # a typo of a group: '+' would not help
    return ConfigError(f"unknown key {leaf!r}", f"override {key} on the command line",
                       did_you_mean(leaf, [str(v) for v in valid]) + add)


def _signature_keys(target: str) -> list[str] | None:
    """The keyword arguments `target` accepts, or None when they cannot be listed (**kwargs, builtins)."""
    signatures = Signatures()
    try:
        return signatures.params(target)
    except Exception:  # unimportable: validate() reports the import problem
        return None
    finally:
        signatures.save()


def _groups() -> list[str]:
    return [p.name for p in paths.conf_dir().iterdir() if p.is_dir()]
