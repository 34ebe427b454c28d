"""`tunelab eval harness=<task yaml>`: EleutherAI's lm-evaluation-harness (`hf` model) on a run's model, offline.

The task YAML is lm-eval's own format (data/harness/ holds one for a bundled dataset). It is read as data
(`yaml.safe_load`: a `!function` tag, which would import Python from the task's folder, is refused), its
relative `data_files` are resolved against the YAML's folder, and the resolved copy is written into the eval
directory, where lm-eval reads it; the hub is never asked (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1).
The figures go to metrics.json as `harness/<task>/<metric>`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

KEY = "key harness"


def harness_model_dir(run_dir: Path | None, model_path: str | None) -> Path:
    """The plain Hugging Face directory lm-eval's `hf` model loads: the run's export, or its full model."""
    if run_dir is None:
        path = Path(str(model_path or "")).expanduser()
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            raise ConfigError(f"harness= needs a model directory with weights, and {path} has none", KEY,
                              "give run=<run dir> (its export or full model is scored)")
        return path
    for candidate in (run_dir / "export", run_dir / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"{run_dir / 'model'} holds an adapter, and lm-eval's hf model loads a plain model", KEY,
                      f"tunelab export run={run_dir} merges it into {run_dir / 'export'}; then run this again")


def resolved_task(task_yaml: str, out_dir: Path) -> tuple[str, Path]:
    """(task name, folder holding the task YAML with absolute data_files) for lm-eval's TaskManager."""
    import yaml

    source = Path(task_yaml).expanduser()
    if not source.is_file():
        raise ConfigError(f"harness task file not found: {source}", KEY,
                          "e.g. harness=data/harness/reviews_sentiment.yaml (an lm-evaluation-harness task YAML)")
    try:
        task = yaml.safe_load(source.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not a plain YAML task: {str(err).splitlines()[0]}", KEY,
                          "tunelab reads task files as data: no !function tags (run lm_eval for those)") from None
    if not isinstance(task, dict) or not isinstance(task.get("task"), str):
        raise ConfigError(f"{source} has no `task:` name", KEY, "an lm-evaluation-harness task YAML names its task")
    files = (task.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        for split, path in files.items():
            resolved = Path(str(path)) if Path(str(path)).is_absolute() else source.parent / str(path)
            if not resolved.is_file():
                raise ConfigError(f"{source}: data_files.{split} is {path}, which is not a file", KEY,
                                  "relative paths are read from the task YAML's folder")
            files[split] = str(resolved.resolve())
    folder = out_dir / "harness_task"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / source.name).write_text(yaml.safe_dump(task, sort_keys=False))
    return task["task"], folder


def run_harness(model_dir: Path, task_yaml: str, out_dir: Path, limit: int | None, batch_size: int,
                device: str) -> dict[str, float]:
    """lm-eval's `simple_evaluate` with its `hf` model on `model_dir`; `harness/<task>/<metric>` figures."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("harness= needs lm-evaluation-harness, which is not installed", KEY,
                          "pip install 'tunelab[harness]' (make installs it)")
    name, folder = resolved_task(task_yaml, out_dir)
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    before = {key: os.environ.get(key) for key in offline}
    os.environ.update(dict.fromkeys(offline, "1"))  # local files only, never the hub
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        results: Any = simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32", "device": device},
            tasks=[name], task_manager=TaskManager(include_path=str(folder), include_defaults=False), limit=limit,
            batch_size=batch_size, bootstrap_iters=0, log_samples=False, random_seed=0)
    finally:  # the environment as it was: a library caller's process is not left offline
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    figures = results["results"][name]
    return {f"harness/{name}/{key.split(',')[0]}": float(value) for key, value in figures.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key}
