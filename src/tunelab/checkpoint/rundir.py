"""A run directory is data, not code: what verbs that read one (generate, export, later eval/serve) may build.

A run directory can come from anyone (a shared drive, a colleague, a download). Its `.hydra/config.yaml`
is read for facts about the run (was the base quantized?), never for permissions: `trust_remote_code`
comes from the command line of the verb being run, templates render in Jinja's sandbox, and a `_target_`
found in the directory is built only when it names a class of a package tunelab already trusts
(`builtins.open` with mode `w` in a saved config would otherwise truncate a file of whoever loads the run;
`torch.load` would unpickle; `*.from_pretrained(trust_remote_code=True)` would import code).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelab.errors import CheckpointError

ALLOWED_PACKAGES = ("tunelab", "transformers", "peft", "torch", "pytorch_lightning", "torchmetrics")
# Inside the trusted packages, what loads or runs code from elsewhere.
DENIED_PREFIXES = ("torch.load", "torch.hub", "torch.jit", "torch.package", "torch.serialization",
                   "torch.utils.cpp_extension", "torch.save", "torch.compile", "torch.ops", "torch.classes")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _targets(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, child in node.items():
            yield from _targets(child, f"{path}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _targets(child, f"{path}[{i}]")


def _refusal(target: Any, args: dict[str, Any]) -> str | None:
    """Why a `_target_` read from a run directory may not be built, or None when it may."""
    if not isinstance(target, str):
        return f"_target_ {target!r} is not a name"
    if target.split(".", 1)[0] not in ALLOWED_PACKAGES:
        return f"_target_ {target!r} is outside the packages a run directory may name ({', '.join(ALLOWED_PACKAGES)})"
    if any(target == p or target.startswith(p + ".") for p in DENIED_PREFIXES):
        return f"_target_ {target!r} loads or runs code"
    if any(k == "trust_remote_code" and v for k, v in args.items()):
        return f"_target_ {target!r} asks for trust_remote_code"
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # hydra raises ImportError or its own exception type
        return f"_target_ {target!r} does not import"
    if not inspect.isclass(obj) and not target.startswith("tunelab."):
        return f"_target_ {target!r} is not a class (a run directory may name config classes, not functions)"
    return None


def instantiate_saved(node: Any, source: Path, key: str) -> Any:
    """Build `node` (read from the run directory file `source` at `key`) if every `_target_` in it passes
    `_refusal`; raise CheckpointError (exit 4) naming the file and key otherwise."""
    from hydra.utils import instantiate

    try:
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
    except OmegaConfBaseException as err:
        raise CheckpointError(f"cannot read {key}: {str(err).splitlines()[0]}", f"file {source}",
                              "the run directory's saved config is damaged") from None
    for path, target_node in _targets(plain, key):
        problem = _refusal(target_node.get("_target_"), target_node)
        if problem:
            raise CheckpointError(f"refusing to build {path} from the run directory: {problem}", f"file {source}",
                                  "a run directory is data; remove the key, or rebuild the run with tunelab train")
    return instantiate(plain)


def check_weight_files(model_dir: Path) -> None:
    """A run's model/ holds safetensors only; a pickled weight file (which runs code when unpickled) is refused."""
    for path in sorted(model_dir.rglob("*")):
        if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
            raise CheckpointError(f"refusing the pickled weight file {path}", f"run directory {model_dir.parent}",
                                  "tunelab writes and reads safetensors only; re-export the weights as safetensors")
