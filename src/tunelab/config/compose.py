"""Compose configs (`conf/<verb>.yaml` with overrides) and the resolvers the tree uses, translating Hydra's
errors into ConfigError with did-you-mean; used by the CLI's pre-flight check, tests and notebooks."""

from __future__ import annotations

import difflib
import functools
import re
import secrets
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf

from tunelab import libraries, paths
from tunelab.config.signatures import Signatures
from tunelab.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from tunelab.job import RunContext


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
    if config_dir:  # one hydra.searchpath override, the user's own entries kept after it
        overrides = with_search_path(overrides, [f"file://{Path(config_dir).resolve()}"])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(primary_dir), version_base="1.3"):
            return hydra_compose(config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    except MissingConfigException as err:
        raise _missing_option(err, overrides) from None
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse override: {str(err).splitlines()[0]}", "command line",
                          quoting_hint(None)) from None
    except ConfigCompositionException as err:
        raise _bad_override(err, overrides, config_name, config_dir) from None
    except AssertionError as err:  # OmegaConf's refusal to set a key under a null node (hydra.sweeper.params.x=1)
        raise ConfigError(f"cannot apply the overrides: {str(err).splitlines()[0] or 'a parent key is not a mapping'}",
                          "command line", "a parent of the key you set is null or not a mapping: set the parent "
                          "as a whole, e.g. 'hydra.sweeper.params={x: choice(1, 2)}'") from None
    except ValueError as err:  # Hydra's own refusal of an override's shape, e.g. `=1` (no key)
        raise ConfigError(f"cannot apply the overrides: {str(err).splitlines()[0]}", "command line",
                          "overrides look like key=value, group=option, +new_key=value") from None
    finally:
        GlobalHydra.instance().clear()


def with_search_path(overrides: list[str], urls: list[str]) -> list[str]:
    """`overrides` with one `hydra.searchpath` override: `urls` first, then the entries the overrides named (Hydra
    keeps only the last `hydra.searchpath=` given, so a second one would drop the user's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    named, rest = [], []
    for override in overrides:
        try:
            value = OverridesParser.create().parse_override(override).value() if override.startswith(
                "hydra.searchpath=") else None
        except Exception:  # noqa: BLE001 - an unparsable one is left for compose to report as the user typed it
            value = None
        if value is None:
            rest.append(override)
        else:
            named += [str(v) for v in (value if isinstance(value, list) else [value])]
    entries = list(dict.fromkeys([*urls, *named]))
    quoted = ",".join(f"'{e}'" if "'" not in e else f'"{e}"' for e in entries)
    return [*rest, f"hydra.searchpath=[{quoted}]"] if entries else rest


@dataclass(frozen=True)
class SearchPath:
    """Where a command found its configs beyond conf/: `--config-dir` and `hydra.searchpath` entries. A verb that
    composes configs of its own (compare's arms, a pipeline's stages) composes them with the same, so a user's
    dataset or documents option resolves there exactly as on the command line."""

    config_dir: str | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def of(cls, cfg: DictConfig | None = None, run: RunContext | None = None) -> SearchPath:
        """The command's search path: from `cfg.hydra` when composed with it, else from the job's `RunContext`
        (`run.config_sources`, read from Hydra by the entry point); empty when neither says."""
        sources = OmegaConf.select(cfg, "hydra.runtime.config_sources", default=None) if cfg is not None else None
        places = ([(str(s.schema), str(s.path), str(s.provider)) for s in sources] if sources is not None
                  else list(run.config_sources if run is not None else ()))
        conf = paths.conf_dir().resolve()
        config_dir, urls = None, []
        for schema, path, provider in places:
            if schema not in ("file", "pkg") or (schema == "file" and Path(path).resolve() == conf):
                continue
            if provider in ("command-line", "main"):  # --config-dir (compose makes it the primary dir)
                config_dir = config_dir or path
            elif provider.startswith("hydra.searchpath"):
                urls.append(f"{schema}://{path}")
        return cls(config_dir, tuple(urls))

    def compose(self, overrides: list[str], config_name: str) -> DictConfig:
        """`compose` as the command composed its own config: the same config dir and search path."""
        return compose(with_search_path(list(overrides), list(self.urls)), config_name, self.config_dir)


def quoting_hint(override: str | None) -> str:
    """How to quote a value Hydra's grammar refuses (`=`, `,`, quotes, brackets, spaces): in Hydra's quotes, the
    whole override in the shell's, e.g. 'prompt="a=b, c"', written out for `override` when it has a key."""
    general = "overrides look like key=value, group=option, +new_key=value"
    key, eq, value = (override or "").partition("=")
    if not eq or not key or any(c in key for c in " \"'"):
        return (f"{general}; quote a value with spaces or special characters for Hydra and the whole override for "
                "the shell: 'prompt=\"a=b, c\"'")
    # Inside Hydra's quotes only a quote, and the backslashes just before one or at the end, need a backslash.
    escaped = re.sub(r'(\\*)"', r'\1\1\\"', re.sub(r"(\\+)$", r"\1\1", value))
    quoted = shlex.quote(f'{key}="{escaped}"')
    return f"{general}; quote the value for Hydra and the whole override for the shell: {quoted}"


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
        ambiguous = re.search(r"Ambiguous value for argument '(.*)'", str(cause).splitlines()[0])
        if ambiguous:  # `prompt=a, b`: Hydra reads the comma as a sweep or a list
            return ConfigError(str(cause).splitlines()[0], f"override {ambiguous.group(1)} on the command line",
                               quoting_hint(ambiguous.group(1)) + "; a list is key=[a,b], a sweep needs -m")
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
        target = libraries.raw_target(node)
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


# Folders of conf/ holding values a key names (dataset.chat_template=chatml), not groups a command line chooses.
NAMED_VALUES = {"chat_template"}


def _groups() -> list[str]:
    return [p.name for p in paths.conf_dir().iterdir() if p.is_dir() and p.name not in NAMED_VALUES]
