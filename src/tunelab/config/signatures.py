"""The keyword arguments a `_target_` accepts, cached on disk so validating a config imports nothing heavy.

Checking every `_target_` node against its target's signature used to import torch, transformers, peft
and Lightning (about 5 s of CPU) before a typo could be reported or `--cfg job` printed. The signature
of a target only changes when its code does, so it is cached under a key made from the code's version:
the installed distribution's version for a library, the source file's size and mtime for tunelab's own
modules (an editable checkout changes without a version bump). A miss imports the target, as before.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.utils import get_object

from tunelab import paths
from tunelab.checkpoint.io import atomic_write

_FILE = "signatures-v1.json"


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "tunelab" / _FILE


def _version_key(target: str) -> str | None:
    """What changes when the target's code changes, found without importing it; None: unknown, do not cache."""
    top = target.split(".", 1)[0]
    if top == "builtins":
        return f"python-{sys.version}"
    if top == "tunelab":
        package = paths.PACKAGE_DIR
        parts = target.split(".")[1:]
        for cut in range(len(parts), 0, -1):  # the longest module path that exists: tunelab.data.formats.chat
            for candidate in (package.joinpath(*parts[:cut]).with_suffix(".py"),
                              package.joinpath(*parts[:cut], "__init__.py")):
                if candidate.is_file():
                    stat = candidate.stat()
                    return f"{candidate}:{stat.st_size}:{stat.st_mtime_ns}"
        return None
    try:
        return f"{top}-{importlib.metadata.version(top)}"
    except importlib.metadata.PackageNotFoundError:
        return None


def _load() -> dict[str, Any]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}  # a missing or damaged cache is rebuilt, never trusted


def _store(entries: dict[str, Any]) -> None:
    file = _cache_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, json.dumps(entries), durable=False)  # parallel jobs see the old file or the whole new one
    except OSError:
        pass  # a read-only home only costs the import next time


class Signatures:
    """Lookups of `_target_` signatures for one validation pass; new entries are written once, at `save()`."""

    def __init__(self) -> None:
        self.entries = _load()
        self.dirty = False

    def params(self, target: str) -> list[str] | None:
        """The target's keyword parameter names, or None when any keyword is accepted (**kwargs, no signature).

        Raises ImportError (or Hydra's error) when the target cannot be imported.
        """
        key = _version_key(target)
        cached = self.entries.get(target)
        if key is not None and cached is not None and cached.get("key") == key:
            return cached["params"]
        obj = get_object(target)
        try:
            signature = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            params = None  # builtins without a signature: nothing to check against
        else:
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
                params = None
            else:
                params = [p for p in signature if p not in ("self", "args", "kwargs")]
        if key is not None:
            self.entries[target] = {"key": key, "params": params}
            self.dirty = True
        return params

    def save(self) -> None:
        if self.dirty:
            _store(self.entries)
            self.dirty = False
