"""A run directory is data, not code: what verbs that read one (generate, export, later eval/serve) may build.

A run directory can come from anyone (a shared drive, a colleague, a download). Its `.hydra/config.yaml`
is read for facts about the run (was the base quantized?), never for permissions: `trust_remote_code`
comes from the command line of the verb being run, templates render in Jinja's sandbox, and a `_target_`
found in the directory is built only when it is on `ALLOWED_TARGETS`, a short list of config classes, never a
package prefix: `builtins.open` with mode `w` would truncate a file of whoever loads the run, `torch.load` would
unpickle, and even a class of a trusted package can act (`torch.distributed.FileStore(path)` creates a file at
a path the run chooses, and waits forever when its folder does not exist).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelab.errors import CheckpointError

# What a run directory's saved config may build: the config classes `method.quantization` names (QLoRA and the
# other quantized bases transformers loads). Plain data holders: building one opens, loads and runs nothing.
ALLOWED_TARGETS = frozenset({
    "transformers.BitsAndBytesConfig",
    "transformers.utils.quantization_config.BitsAndBytesConfig",
    "transformers.GPTQConfig",
    "transformers.AwqConfig",
    "transformers.HqqConfig",
    "transformers.TorchAoConfig",
})
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
    if target not in ALLOWED_TARGETS:
        return (f"_target_ {target!r} is not one of the config classes a run directory may name "
                f"({', '.join(sorted(ALLOWED_TARGETS))})")
    if any(k == "trust_remote_code" and v for k, v in args.items()):
        return f"_target_ {target!r} asks for trust_remote_code"
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
    try:
        return instantiate(plain)
    except Exception as err:  # noqa: BLE001 - a damaged argument: hydra wraps the class's own error
        raise CheckpointError(f"cannot build {key} from the run directory: {str(err).splitlines()[0]}",
                              f"file {source}", "the run directory's saved config is damaged") from None


def check_weight_files(model_dir: Path) -> None:
    """A run's model/ holds safetensors only; a pickled weight file (which runs code when unpickled) is refused."""
    for path in sorted(model_dir.rglob("*")):
        if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
            raise CheckpointError(f"refusing the pickled weight file {path}", f"run directory {model_dir.parent}",
                                  "tunelab writes and reads safetensors only; re-export the weights as safetensors")
