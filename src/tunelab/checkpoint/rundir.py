"""A run directory is data, not code: what verbs that read one (generate, export, later eval/serve) may build.

A run directory can come from anyone (a shared drive, a colleague, a download). Its `.hydra/config.yaml`
is read for facts about the run (was the base quantized?), never for permissions: `trust_remote_code`
comes from the command line of the verb being run, templates render in Jinja's sandbox, and a `_target_`
found in the directory is built only when it is on `ALLOWED_TARGETS`, a short list of config classes, never a
package prefix: `builtins.open` with mode `w` would truncate a file of whoever loads the run, `torch.load` would
unpickle, and even a class of a trusted package can act (`torch.distributed.FileStore(path)` creates a file at
a path the run chooses, and waits forever when its folder does not exist).

Files are checked before anything loads them (`check_run_files`): no symbolic link out of the run directory
(`model.safetensors` -> /etc/passwd), nothing but regular files (a FIFO would block the reader forever), each
safetensors header bounded by its file (a length of 2^62, tensors claiming 100 GB), each JSON file parsing; what a
library still raises while loading the run is wrapped (`loading`), so every failure is one line and exit 4.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tunelab.errors import CheckpointError, ConfigError, TunelabError

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
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header lists names, shapes and offsets: real ones are kilobytes
# Bits per element of each safetensors dtype (the format's own list): a tensor's bytes are fixed by dtype x shape.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E5M2FNUZ": 8, "F8_E4M3FNUZ": 8,
              "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
              "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}
# JSON files transformers/peft/tunelab read as objects; a list or a number there fails deep inside a library.
JSON_OBJECTS = frozenset({"config.json", "adapter_config.json", "generation_config.json", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "tunelab_recipe.json", "metrics.json",
                          "model.safetensors.index.json", "added_tokens.json", "vocab.json"})
DAMAGED = "the run directory is damaged; restore the file from a copy of the run, or retrain"


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


# ---- files checked before anything loads them ----------------------------------------------------------------
def find_run(text: str, key: str = "run", download: bool = True) -> Path | None:
    """The finished run directory `key=<text>` names: a path, or a W&B artifact reference resolved to one (None
    for a reference when not `download`: a pre-flight checks only what it can without the network). A missing
    directory is a config error (exit 2), one without model/ a checkpoint error (exit 4)."""
    from tunelab.tracking.artifacts import parse_reference, resolve_run

    if not download and parse_reference(text) is not None:
        return None
    run_dir = resolve_run(text)  # a directory, or a W&B artifact reference resolved to one
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}", f"override {key}={text} on the command line",
                          "give a directory written by `tunelab train` (outputs/runs/<id>)")
    if not (run_dir / "model").is_dir():
        raise CheckpointError(f"{run_dir} is not a run directory: it has no model/", f"key {key}",
                              "give a directory written by `tunelab train` that finished (it holds model/)")
    return run_dir


def checked_file(run_dir: Path, path: Path) -> Path | None:
    """`path` (a file of the run directory `run_dir`) when it is a regular file inside the run, None when absent;
    a symbolic link out of the run, or a FIFO, device or folder where a file belongs, is a CheckpointError."""
    if not os.path.lexists(path):
        return None
    _inside(run_dir.resolve(), path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file", f"file {path}", DAMAGED)
    return path


def read_json(run_dir: Path, path: Path) -> Any:
    """The parsed JSON file `path` of the run `run_dir` (checked as `checked_file` does; None when absent);
    one that does not parse, or is not an object where one belongs, is a CheckpointError naming it."""
    if checked_file(run_dir, path) is None:
        return None
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, OSError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"cannot read {path.name}: {_first_line(err)}", f"file {path}", DAMAGED) from None
    if path.name in JSON_OBJECTS and not isinstance(value, dict):
        raise CheckpointError(f"{path.name} is not a JSON object", f"file {path}", DAMAGED)
    return value


def check_recipe(path: Path, recipe: Any) -> None:
    """A recipe (`model/tunelab_recipe.json`, parsed) of the shape generate, serve and export's card read: templates
    null or a list of objects with a string `prompt`, system_prompt and chat_template null or strings. Anything
    else failed later as a TypeError; it is a CheckpointError naming the file."""
    templates = recipe.get("templates") if isinstance(recipe, dict) else None
    if templates is not None and not (isinstance(templates, list) and all(
            isinstance(t, dict) and isinstance(t.get("prompt"), str) for t in templates)):
        raise CheckpointError(f"{path.name}: 'templates' is not a list of objects with a string 'prompt'",
                              f"file {path}", DAMAGED)
    for key in ("system_prompt", "chat_template"):
        if isinstance(recipe, dict) and not isinstance(recipe.get(key), (str, type(None))):
            raise CheckpointError(f"{path.name}: '{key}' is neither text nor null", f"file {path}", DAMAGED)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """The run's `metrics.json` (checked as `read_json` does; {} when absent) whose values are numbers (a loss
    may be NaN; the `params/*` counts are finite), as the model card formats them; a string, null or a list there
    is a CheckpointError naming the file, not a TypeError in the card."""
    path = Path(run_dir) / "metrics.json"
    metrics = read_json(Path(run_dir).resolve(), path) or {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"metrics.json: {key} is {type(value).__name__}, not a number", f"file {path}",
                                  DAMAGED)
        if key.startswith("params/") and not math.isfinite(value):
            raise CheckpointError(f"metrics.json: {key} is {value}, not a count", f"file {path}", DAMAGED)
    return metrics


def check_run_files(run_dir: Path) -> None:
    """Check what `load_run` reads before it reads it: model/ (every file, base/ included) and .hydra/config.yaml
    lie inside the run (symbolic links included), are regular files, JSON parses, safetensors headers fit their
    files; and no pickled weights. Raises CheckpointError (exit 4) naming the first damaged file."""
    root = Path(run_dir).resolve()
    checked_file(root, Path(run_dir) / ".hydra" / "config.yaml")
    check_model_files(root, Path(run_dir) / "model", run_dir)


def check_model_files(root: Path, model_dir: Path, run_dir: Path) -> None:
    """Every file under `model_dir` lies inside `root`, is a regular file, JSON parses, safetensors headers fit
    their files, and none is pickled (a sentence-transformers folder is checked the same way)."""
    for path in _model_files(root, model_dir):
        checked_file(root, path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(f"refusing the pickled weight file {path}", f"run directory {run_dir}",
                                  "tunelab writes and reads safetensors only; re-export the weights as safetensors")
        if path.suffix == ".safetensors":
            check_safetensors(path)
        elif path.suffix == ".json":
            read_json(root, path)


def check_safetensors(path: Path) -> None:
    """A safetensors header the reader can trust: its 8-byte little-endian length fits the file (and
    MAX_HEADER_BYTES), it is a JSON object, and each tensor's data_offsets lie in the file and hold exactly
    dtype x shape bytes. The library refuses some of this too, but as a traceback, and only once it maps the file."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path.name} has a header length of {length} bytes, but the file holds {size} "
                                  f"bytes (and headers hold at most {MAX_HEADER_BYTES})", f"file {path}", DAMAGED)
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError) as err:
            raise CheckpointError(f"{path.name} has a header that does not parse: {_first_line(err)}",
                                  f"file {path}", DAMAGED) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has a header that is not a JSON object", f"file {path}", DAMAGED)
    data_bytes = size - 8 - length
    for name, info in header.items():
        problem = _tensor_problem(info, data_bytes) if name != "__metadata__" else None
        if problem:
            raise CheckpointError(f"{path.name}: tensor {name!r} {problem}", f"file {path}", DAMAGED)


def _tensor_problem(info: Any, data_bytes: int) -> str | None:
    if not isinstance(info, dict):
        return "has no dtype, shape and data_offsets"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        return f"has an unknown dtype {dtype!r}"
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        return f"has a shape that is not a list of sizes: {shape!r}"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(n) is int for n in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        return f"has data_offsets {offsets!r} outside the file's {data_bytes} bytes of data"
    need = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
    if offsets[1] - offsets[0] != need:
        return f"claims {need} bytes ({dtype} x {shape}) but data_offsets hold {offsets[1] - offsets[0]}"
    return None


@contextmanager
def loading(path: Path) -> Iterator[None]:
    """What a library raises while loading the run's files under `path` (a damaged file the checks above let
    through) as a CheckpointError naming the file; tunelab's own errors pass as they are."""
    try:
        yield
    except TunelabError:
        raise
    except Exception as err:  # noqa: BLE001 - any library's failure on a damaged run is the run's, not a bug
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
            raise  # too little memory is not a damaged run (the headers were checked against their files)
        filename = getattr(err, "filename", None)
        raise CheckpointError(f"cannot load the run's model ({type(err).__name__}: {_first_line(err)})",
                              f"file {filename}" if filename else f"model directory {path}", DAMAGED) from None


def _model_files(root: Path, model_dir: Path) -> Iterator[Path]:
    """Every file under `model_dir`, following symbolic links only to folders inside `root` (each once)."""
    _inside(root, model_dir)
    seen: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(model_dir, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen:  # a link back to a folder already walked: walk it once
            dirnames[:] = []
            continue
        seen.add(real)
        for name in dirnames:  # checked before os.walk enters it
            _inside(root, Path(dirpath) / name)
        yield from (Path(dirpath) / name for name in sorted(filenames))


def _inside(root: Path, path: Path) -> None:
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as err:  # a loop of links
        raise CheckpointError(f"cannot follow {path}: {_first_line(err)}", f"file {path}", DAMAGED) from None
    if not real.is_relative_to(root):
        raise CheckpointError(f"refusing {path}: a symbolic link to {real}, outside the run directory", f"file {path}",
                              "a run directory is data: copy the file into the run instead of linking it")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
