"""Reading a composed config for a message: where a key was set (file:line or the command line), its value,
and the dotted paths of every value in the tree."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelab import libraries, paths

MISSING_VALUE = object()  # what `value_at` returns for a key that is absent, missing or not yet resolvable


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
        task = list(cfg.hydra.overrides.task) + list(cfg.hydra.overrides.hydra)  # `hydra.run.dir=` is Hydra's own
    except (AttributeError, OmegaConfBaseException):
        # A job's config (no `hydra` node): the CLI's pre-flight already checked it with the command line.
        task = []
    for override in reversed(task):  # the last one wins, as in Hydra
        if re.split(r"[=@]", override.lstrip("+~"), maxsplit=1)[0] == key_path:
            from tunelab.config.redact import redact

            return redact(override)
    return None


def where(cfg: DictConfig, key_path: str) -> str:
    """`key a.b (override a.b=1 on the command line)` or `key a.b (file.yaml:3)`: where to fix it."""
    override = _command_line_override(cfg, key_path)
    found = f"override {override} on the command line" if override else _find_in_files(cfg, key_path)
    return f"key {key_path}" + (f" ({found})" if found else "")


def leaves(node: Any, path: str = "") -> Iterator[str]:
    """Dotted paths of every value in the tree (lists and dicts included, their items too), Hydra's excepted."""
    if isinstance(node, DictConfig):
        for key in node:
            if path == "" and key == "hydra":
                continue
            child = f"{path}.{key}" if path else str(key)
            yield child
            yield from leaves(libraries.config_child(node, key), child)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from leaves(libraries.config_child(node, i), f"{path}[{i}]")


def value_at(cfg: DictConfig, key: str) -> Any:
    """The resolved value at `key` (containers as plain dicts and lists), or MISSING_VALUE."""
    try:
        value = OmegaConf.select(cfg, key, default=MISSING_VALUE, throw_on_missing=True)
    except OmegaConfBaseException:  # an interpolation only Hydra's runtime resolves, or a missing value
        return MISSING_VALUE
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
