"""Checks of the places and names a user gives, on the values alone (nothing heavy is imported): the directories a
verb writes, the run id that names one, the attention implementation a model is loaded with, and (at launch) the
local model and data paths a job reads.

They run in the pre-flight, before torch and transformers load (seconds idle, minutes on a busy machine), so a
typo is refused at once instead of after the imports; the loaders keep their own checks for callers that skip it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tunelab.config.locate import MISSING_VALUE, value_at, where
from tunelab.errors import ConfigError, DataError, did_you_mean

# Keys naming directories a verb writes (Hydra's run and sweep directories included): refused at once when they
# cannot be created or written, instead of a traceback from Hydra's or the verb's first mkdir.
OUTPUT_DIRS = ("paths.output_dir", "paths.cache_dir", "out", "hydra.run.dir", "hydra.sweep.dir")
# The kernel's own file systems: as root every access check passes there, yet nothing can be created.
SYSTEM_DIRS = (Path("/proc"), Path("/sys"))

# A run id names a directory under outputs/ (and a W&B run, a lock, a pipeline): a plain name, never a path.
RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,+=@-]{0,127}")

# `attn_implementation` values transformers 5 accepts (modeling_utils.AttentionInterface and
# get_correct_attn_implementation); null leaves the choice to transformers (sdpa where the model supports it).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
                        "flex_attention", "paged|eager")
# A kernel from the hub (`kernels-community/flash-attn2`, `org/repo@v1:name`), as transformers' is_kernel matches it.
HUB_KERNEL = re.compile(r"[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?")
# What the loaders treat as a local path rather than a hub id (models/load.py, data/sources.py).
LOCAL_PREFIXES = (".", "/", "~")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def output_dir_problem(path: Path) -> str | None:
    """Why a directory cannot be created or written at `path` (None: it can): a file on the way, a
    directory without write permission, or the kernel's /proc and /sys."""
    path = path.expanduser().absolute()
    try:
        real = path.resolve()
        for system in SYSTEM_DIRS:
            if real == system or system in real.parents:
                return f"{system} is the kernel's own file system, where no output directory can be made"
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is a file, not a directory"
    except (OSError, RuntimeError) as err:  # a symlink loop, a directory that cannot be searched
        return f"cannot look at it: {err}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_output_dirs(cfg: DictConfig) -> None:
    """Directories a verb will write must be creatable: the nearest existing ancestor is a writable directory."""
    for key in OUTPUT_DIRS:
        value = value_at(cfg, key)
        if value is MISSING_VALUE or value is None:
            continue
        path = Path(str(value)).expanduser().absolute()
        problem = output_dir_problem(path)
        if problem:
            raise ConfigError(f"cannot write to {path}: {problem}", where(cfg, key),
                              f"point {key} at a directory you can write")


def check_run_id(cfg: DictConfig) -> None:
    """`run_id` names a directory under outputs/: `../../x` or `a/b` would put the run somewhere else."""
    value = value_at(cfg, "run_id")
    if value is MISSING_VALUE or value is None:
        return
    text = str(value)
    if RUN_ID.fullmatch(text) and ".." not in text:
        return
    shown = text if len(text) <= 60 else text[:57] + "..."
    raise ConfigError(f"run_id must be a plain name, got {shown!r}", where(cfg, "run_id"),
                      "use letters, digits and . _ - (no '/', no '..', not starting with '.', at most 128 "
                      "characters), e.g. run_id=lr-sweep-1; to choose the directory, set paths.output_dir")


def check_attn_implementation(cfg: DictConfig) -> None:
    """model.attn_implementation is a name transformers knows, or a hub kernel id; refused before transformers
    loads (it would refuse it only after loading the model's weights)."""
    value = value_at(cfg, "model.attn_implementation")
    if value is MISSING_VALUE or value is None:
        return
    text = str(value).removeprefix("paged|")  # transformers drops a `paged|` prefix (deprecated) before checking
    if text in ATTN_IMPLEMENTATIONS or (isinstance(value, str) and HUB_KERNEL.fullmatch(value)):
        return
    raise ConfigError(f"unknown model.attn_implementation {value!r}", where(cfg, "model.attn_implementation"),
                      did_you_mean(str(value), ATTN_IMPLEMENTATIONS)
                      + "; null lets transformers choose, and <org>/<repo> names a kernel from the hub")


def _model_paths(cfg: DictConfig) -> None:
    seen = set()
    for key in ("model.name_or_path", "model.tokenizer_name_or_path"):
        value = value_at(cfg, key)
        if not isinstance(value, str) or value in seen:
            continue
        seen.add(value)  # the tokenizer's path interpolates the model's: report it once, under the key set
        if value.startswith(LOCAL_PREFIXES) and not Path(value).expanduser().exists():
            raise ConfigError(f"model directory not found: {value}", where(cfg, key),
                              "give an existing local directory or a hub id such as Qwen/Qwen2.5-0.5B-Instruct")


def _data_paths(cfg: DictConfig) -> None:
    tasks = OmegaConf.select(cfg, "dataset.tasks", default=None) or {}
    for node in ["dataset", *(f"dataset.tasks.{t}" for t in tasks)]:
        key = f"{node}.source.path"
        value = value_at(cfg, key)
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser()
        if path.exists():
            continue
        if path.suffix.lower() in DATA_SUFFIXES:  # the words data/sources.py uses for the same refusal
            raise DataError(f"data file not found: {path}", where(cfg, key), f"check {key}")
        if value.startswith(LOCAL_PREFIXES):  # anything else is a hub id, left to the loader
            raise DataError(f"data path not found: {path}", where(cfg, key), f"check {key}")


def check_inputs(cfg: DictConfig) -> None:
    """The local model and data paths a job reads exist (a hub id is left to its loader). Only at launch: a
    pipeline validates its later stages, which start from models not trained yet, while planning."""
    _model_paths(cfg)
    _data_paths(cfg)
