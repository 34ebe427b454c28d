"""Reading a multirun directory (`<multirun dir>/<job num>/`), as data: its trials, what they swept, their ranking
and validation history. `tunelab sweep-report` writes its report from these; `tunelab board` shows them.

Each trial: `metrics.json`, `.hydra/overrides.yaml`, `.hydra/config.yaml` and `.hydra/hydra.yaml`; a trial with
`error.txt` is failed, one without either file is still running (or was killed), one whose files do not parse is
unreadable (its reason kept), so a report works mid-sweep and over a damaged trial.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.tracking import wandb_log

# Overrides that say where or how a sweep ran, not what it trained: left out of the best config.
NOT_CONFIG = ("run_id", "paths.", "hydra.", "hydra/", "hparams_search")


@dataclass
class Trial:
    """One job of a multirun: its overrides, choices, metrics, and state (ok, failed, running)."""

    num: int
    path: Path
    state: str
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)
    optimized_metric: str | None = None
    error: str = ""


# ---- reading the multirun directory ---------------------------------------------------------
def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    text = path.read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:  # a bare *** left by secret masking reads as a YAML alias; read it as a string
        return yaml.safe_load(re.sub(r":[ \t]*\*\*\*[ \t]*$", ": '***'", text, flags=re.M))


def read_trials(sweep_dir: Path) -> list[Trial]:
    """Every numbered job directory under `sweep_dir`, in job order."""
    trials = []
    for path in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        hydra_dir = path / ".hydra"
        try:
            overrides = _read_yaml(hydra_dir / "overrides.yaml") or []
            config = _read_yaml(hydra_dir / "config.yaml") or {}
            hydra_cfg = (_read_yaml(hydra_dir / "hydra.yaml") or {}).get("hydra", {})
            if not (isinstance(overrides, list) and isinstance(config, dict) and isinstance(hydra_cfg, dict)):
                raise ValueError("not the mapping and list Hydra writes")
        except (OSError, ValueError, yaml.YAMLError, AttributeError) as err:
            trials.append(Trial(int(path.name), path, "unreadable", error=f".hydra: {str(err).splitlines()[0]}"))
            continue
        trial = Trial(
            int(path.name),
            path,
            "running",
            [str(o) for o in overrides],
            choices={k: str(v) for k, v in (hydra_cfg.get("runtime", {}).get("choices") or {}).items()},
            optimized_metric=config.get("optimized_metric"),
        )
        if (path / "error.txt").is_file():
            trial.state = "failed"
            lines = (path / "error.txt").read_text().strip().splitlines()
            # a tunelab error's first line says what went wrong; a traceback's last line does
            trial.error = next((x for x in lines if x.startswith("tunelab:")), lines[-1] if lines else "")
        elif (path / "metrics.json").is_file():
            try:
                found = json.loads((path / "metrics.json").read_text())
                trial.metrics = {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}
                trial.state = "ok"
            except (OSError, ValueError, AttributeError) as err:  # a torn or hand-edited file: one trial, not all
                trial.state, trial.error = "unreadable", f"metrics.json: {err}"
        trials.append(trial)
    return trials


def sweep_direction(sweep_dir: Path, metric: str) -> str:
    """`min` or `max`: Optuna's direction when the sweep used it, else from the metric's name."""
    sweeper = (_read_yaml(sweep_dir / "multirun.yaml") or {}).get("hydra", {}).get("sweeper", {})
    direction = sweeper.get("direction")
    if "optuna" in str(sweeper.get("_target_", "")) and isinstance(direction, str):
        return "max" if direction.lower().startswith("max") else "min"
    lowered = metric.lower()
    if any(word in lowered for word in ("loss", "ppl", "perplexity", "error", "mem", "time")):
        return "min"
    return "max"  # accuracy, f1, exact match, rouge, bleu, tokens_per_s: more is better


def swept_keys(trials: list[Trial]) -> list[str]:
    """Override keys whose value differs between trials (what the sweep searched), in command-line order."""
    values: dict[str, set[str]] = {}
    for trial in trials:
        for key, value in split_overrides(trial.overrides):
            values.setdefault(key, set()).add(value)
    return [k for k, v in values.items() if len(v) > 1 and not k.startswith(NOT_CONFIG)]


def split_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for override in overrides:
        key, _, value = override.partition("=")
        pairs.append((key.lstrip("+~"), value))
    return pairs


def rank(trials: list[Trial], metric: str, mode: str) -> list[Trial]:
    """Finished trials with a finite `metric`, best first."""
    scored = [t for t in trials if t.state == "ok" and math.isfinite(t.metrics.get(metric, math.nan))]
    return sorted(scored, key=lambda t: t.metrics[metric], reverse=mode == "max")


# ---- validation-loss history ----------------------------------------------------------------
def val_history(trial: Trial, metric: str = "val/loss") -> list[tuple[int, float]]:
    """(step, value) at each validation: history.jsonl, else the CSV logger, else W&B's offline file."""
    history = trial.path / "history.jsonl"
    if history.is_file():
        points = []
        for line in history.read_text().splitlines():
            try:
                row = json.loads(line)
                points.append((int(row["step"]), float(row[metric])))
            except (ValueError, TypeError, KeyError):  # a line a kill cut short, or one without the metric
                continue
        return points
    for csv_file in trial.path.glob("csv/**/metrics.csv"):
        with csv_file.open() as file:
            return [(int(r["step"]), float(r[metric])) for r in csv.DictReader(file) if r.get(metric)]
    for wandb_file in trial.path.glob("wandb/*run-*/*.wandb"):
        points = [
            (int(h.get("trainer/global_step", h.get("_step", 0))), float(h[metric]))
            for h in wandb_log.history(wandb_file)
            if metric in h
        ]
        if points:
            return points
    return []
