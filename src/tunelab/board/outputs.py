"""What `tunelab board` reads from an outputs folder, as data: never code, never outside the folder.

The folder's layout is the one the verbs write (README "What a run writes"): `runs/<id>/` (train; a pipeline's
stages below it), `evals/<id>/`, `compare/<id>/<arm>/`, `multiruns/<id>/<job num>/` (a sweep: Hydra's
`multirun.yaml` beside the trials). A directory's kind is the `task_name` of its saved config, or, without one,
told by the files it holds. Every file is parsed as JSON, YAML (safe loader) or CSV with a size cap; a file that
does not parse makes its directory "unreadable: <reason>", never an exception for the page. Links, `..` and
absolute paths never lead out of the folder (`inside`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tunelab.tracking import sweeps, wandb_log

MAX_FILE_BYTES = 32 * 2**20  # a file larger than this is not read into a page (predictions stream line by line)
MAX_DEPTH = 4  # multiruns/<id>/<job>/<stage>: deeper folders are a run's own (model/, checkpoints/)
# Folders a job writes inside itself: never a job of their own, and large (weights, caches).
NOT_JOBS = frozenset(
    {
        ".hydra",
        "checkpoints",
        "model",
        "wandb",
        "csv",
        "tensorboard",
        "mlruns",
        "cache",
        "report",
        "scores",
        "__pycache__",
    }
)
KINDS = ("run", "eval", "sweep", "compare", "pipeline")
TASK_KINDS = {"train": "run", "eval": "eval", "compare": "compare", "pipeline": "pipeline"}


class Unreadable(Exception):
    """A file of a run directory that is missing where needed, too large, or does not parse (the page says why)."""


def inside(root: Path, rel: str) -> Path | None:
    """`rel` (a path relative to `root`, as the page's links carry it) when it stays inside `root` once links are
    resolved; None for an absolute path, `..`, a NUL byte or a link out of the folder."""
    if not isinstance(rel, str) or "\x00" in rel or "\\" in rel:
        return None
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or ".." in parts:
        return None
    base = root.resolve()
    try:
        full = (base / PurePosixPath(*parts)).resolve() if parts else base
    except (OSError, RuntimeError):  # a link loop
        return None
    return full if full == base or full.is_relative_to(base) else None


def read_text(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """A regular file's text (UTF-8, bad bytes replaced), refused over `limit` bytes or when not a plain file."""
    try:
        if path.is_symlink():  # a link may point anywhere (/etc/passwd); a run's own files are plain files
            raise Unreadable(f"{path.name}: a symbolic link, not read")
        if not path.is_file():
            raise Unreadable(f"{path.name}: missing")
        if path.stat().st_size > limit:
            raise Unreadable(f"{path.name}: {path.stat().st_size} bytes, more than the {limit} a page reads")
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as err:
        raise Unreadable(f"{path.name}: {err.strerror or err}") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except ValueError as err:
        raise Unreadable(f"{path.name}: not JSON ({err})") from None


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(read_text(path))  # safe_load: no Python objects, whatever tags the file holds
    except yaml.YAMLError as err:
        raise Unreadable(f"{path.name}: not YAML ({str(err).splitlines()[0]})") from None


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(read_text(path))))


def numbers(found: Any) -> dict[str, float]:
    """The numeric entries of a metrics mapping (metrics.json holds numbers; anything else is left out)."""
    if not isinstance(found, dict):
        raise Unreadable("metrics.json: not a mapping of metric names to numbers")
    return {str(k): float(v) for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def within(base: Path, path: Path) -> bool:
    """`path` (found by a glob under `base`) is still under `base` once links are resolved."""
    try:
        return path.resolve().is_relative_to(base.resolve())
    except (OSError, RuntimeError):
        return False


@dataclass
class Job:
    """One directory a verb wrote: what it is, how it ended, its choices and figures (what the runs list shows)."""

    rel: str  # its path under the outputs folder, in the page's links
    path: Path
    kind: str  # run | eval | sweep | compare | pipeline
    state: str = "running"  # finished | failed | running | unreadable
    problem: str = ""  # why it is unreadable or failed
    choices: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    modified: float = 0.0


def kind_of(path: Path) -> str | None:
    """What wrote `path`, or None when it is no job's directory."""
    if (path / "multirun.yaml").is_file():
        return "sweep"
    config = path / ".hydra" / "config.yaml"
    if config.is_file():
        try:
            task = (read_yaml(config) or {}).get("task_name")
        except (Unreadable, AttributeError):
            task = None
        if task in TASK_KINDS:
            return TASK_KINDS[task]
    for name, kind in (
        ("compare.csv", "compare"),
        ("plan.json", "pipeline"),
        ("predictions.jsonl", "eval"),
        ("history.jsonl", "run"),
        ("metrics.json", "run"),
    ):
        if (path / name).is_file():
            return kind
    return "run" if config.is_file() else None


def folders(path: Path) -> list[Path]:
    try:
        found = [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    return sorted(p for p in found if p.name not in NOT_JOBS and not p.name.startswith("."))


def find_jobs(root: Path) -> list[Job]:
    """Every job directory under `root` (links not followed), newest first."""
    jobs: list[Job] = []
    root = root.resolve()

    def walk(path: Path, depth: int) -> None:
        for child in folders(path):
            kind = kind_of(child)
            if kind is not None:
                jobs.append(read_job(root, child, kind))
            if depth < MAX_DEPTH:
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 1)
    return sorted(jobs, key=lambda j: (-j.modified, j.rel))


def read_job(root: Path, path: Path, kind: str | None = None) -> Job:
    """`path`'s summary; a file that does not parse makes it `unreadable` with the reason, never an exception."""
    kind = kind or kind_of(path) or "run"
    try:
        rel = path.relative_to(root)
    except ValueError:  # `root` given as written, `path` resolved (or the other way round)
        rel = path.resolve().relative_to(root.resolve())
    job = Job(rel=rel.as_posix(), path=path, kind=kind)
    try:
        job.modified = path.stat().st_mtime
        hydra = path / ".hydra"
        if (hydra / "hydra.yaml").is_file():
            runtime = ((read_yaml(hydra / "hydra.yaml") or {}).get("hydra") or {}).get("runtime") or {}
            job.choices = {
                str(k): str(v) for k, v in (runtime.get("choices") or {}).items() if not str(k).startswith("hydra")
            }
        if (hydra / "overrides.yaml").is_file():
            found = read_yaml(hydra / "overrides.yaml") or []
            job.overrides = [str(o) for o in found] if isinstance(found, list) else []
        done = {
            "run": "metrics.json",
            "eval": "metrics.json",
            "compare": "compare.csv",
            "pipeline": "summary.json",
            "sweep": "multirun.yaml",
        }[kind]
        if (path / "metrics.json").is_file():
            job.metrics = numbers(read_json(path / "metrics.json"))
        if (path / "error.txt").is_file():
            job.state = "failed"
            lines = read_text(path / "error.txt").strip().splitlines()
            job.problem = next((x for x in lines if x.startswith("tunelab:")), lines[-1] if lines else "")
        elif (path / done).is_file():
            job.state = "finished"
            if kind == "pipeline":  # summary.json is rewritten after every stage: finished when all are done
                summary = read_json(path / done)
                if isinstance(summary, dict) and summary.get("stages_done", 0) < summary.get("stages_total", 0):
                    job.state = "running"
    except (Unreadable, AttributeError, TypeError, ValueError) as err:
        job.state, job.problem = "unreadable", str(err)
    return job


def job_at(root: Path, rel: str) -> Job | None:
    """The job the page's `path=` names, or None when it is outside the folder or no directory."""
    path = inside(root, rel)
    if path is None or not path.is_dir():
        return None
    return read_job(root.resolve(), path)


# ---- curves -----------------------------------------------------------------------------------------------
Curves = dict[str, list[tuple[float, float]]]


def _add(curves: Curves, key: str, step: Any, value: Any) -> None:
    try:
        x, y = float(step), float(value)
    except (TypeError, ValueError):
        return
    if math.isfinite(x) and math.isfinite(y):
        curves.setdefault(key, []).append((x, y))


def curves(path: Path) -> tuple[Curves, list[str]]:
    """Every logged series of a run (name -> (step, value)) from what is on disk, and notes on what was not
    readable: history.jsonl (each validation), the CSV logger's metrics.csv, MLflow's file store, and W&B's
    offline run file (tunelab's own reader; nothing is sent anywhere). A series found in two places is taken
    from the first."""
    found: Curves = {}
    notes: list[str] = []

    def merge(source: Curves) -> None:
        for key, points in source.items():
            if key not in found:
                found[key] = sorted(points)

    history = path / "history.jsonl"
    if history.is_file():
        part: Curves = {}
        try:
            for line in read_text(history).splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line a kill cut short: the others still count
                if isinstance(row, dict):
                    for key, value in row.items():
                        if key not in ("step", "epoch"):
                            _add(part, str(key), row.get("step"), value)
        except Unreadable as err:
            notes.append(f"unreadable: {err}")
        merge(part)
    for metrics_csv in sorted(p for p in path.glob("csv/**/metrics.csv") if within(path, p)):
        part = {}
        try:
            for row in csv.DictReader(io.StringIO(read_text(metrics_csv))):
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in (None, ""):
                        _add(part, str(key), row.get("step"), value)
        except (Unreadable, csv.Error) as err:
            notes.append(f"unreadable: {metrics_csv.relative_to(path)}: {err}")
        merge(part)
    for metrics_dir in sorted(p for p in path.glob("mlruns/*/*/metrics") if within(path, p)):
        part = {}
        for metric_file in sorted(p for p in metrics_dir.rglob("*") if p.is_file() and within(path, p)):
            key = metric_file.relative_to(metrics_dir).as_posix()  # `val/loss` is the file metrics/val/loss
            try:
                for line in read_text(metric_file).splitlines():  # "<timestamp> <value> <step>" per line
                    fields = line.split()
                    if len(fields) >= 3:
                        _add(part, key, fields[2], fields[1])
            except Unreadable as err:
                notes.append(f"unreadable: {err}")
        merge(part)
    for run_file in sorted(p for p in path.glob("wandb/*run-*/*.wandb") if within(path, p) and not p.is_symlink()):
        if run_file.stat().st_size > MAX_FILE_BYTES:
            notes.append(f"unreadable: {run_file.name}: larger than {MAX_FILE_BYTES} bytes")
            continue
        part = {}
        for row in wandb_log.history(run_file):  # an unreadable file reads as no rows (wandb_log's contract)
            step = row.get("trainer/global_step", row.get("_step"))
            for key, value in row.items():
                if not key.startswith("_") and key not in ("trainer/global_step", "epoch"):
                    _add(part, key, step, value)
        merge(part)
    return found, notes


# ---- predictions --------------------------------------------------------------------------------------------
# Fields of a predictions.jsonl row that are text or bookkeeping, not a metric's per-example score.
NOT_SCORES = frozenset({"prompt_tokens", "answer_tokens", "latency_s", "gold_rank", "shots", "index", "id", "row"})
TEXT_FIELDS = ("prompt", "reference", "answer")


@dataclass
class Predictions:
    rows: list[dict[str, Any]]  # the page's rows: index, the text fields, scores
    total: int  # rows matching the filter
    scores: list[str]  # the per-example metric names, in the file's order
    bad_lines: int = 0


def score_names(row: dict[str, Any]) -> list[str]:
    return [
        k
        for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_SCORES and k not in TEXT_FIELDS
    ]


def predictions(path: Path, query: str = "", offset: int = 0, limit: int = 50) -> Predictions:
    """Rows `offset`..`offset+limit` of `path` (predictions.jsonl) whose text holds `query` (any case), streamed
    line by line: a large file is never read whole. A line that is not a JSON object is counted, not shown."""
    if path.is_symlink() or not path.is_file():
        raise Unreadable(f"{path.name}: missing or a symbolic link")
    shown: list[dict[str, Any]] = []
    names: list[str] = []
    total = bad = 0
    needle = query.casefold()
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle):
                try:
                    row = json.loads(raw)
                except ValueError:
                    bad += 1
                    continue
                if not isinstance(row, dict):
                    bad += 1
                    continue
                for name in score_names(row):
                    if name not in names:
                        names.append(name)
                if needle and not any(needle in str(row.get(k, "")).casefold() for k in (*TEXT_FIELDS, "dataset")):
                    continue
                if offset <= total < offset + limit:
                    shown.append({"index": number, **row})
                total += 1
    except OSError as err:
        raise Unreadable(f"{path.name}: {err.strerror or err}") from None
    return Predictions(shown, total, names, bad)


# ---- sweeps, compares, pipelines --------------------------------------------------------------------------
@dataclass
class Sweep:
    trials: list[sweeps.Trial]
    ranked: list[sweeps.Trial]
    keys: list[str]
    metric: str
    mode: str


def sweep(path: Path, metric: str | None = None) -> Sweep:
    """A multirun's trials ranked as `tunelab sweep-report` ranks them (the same reader, tracking/sweeps.py)."""
    try:
        trials = sweeps.read_trials(path)
    except OSError as err:
        raise Unreadable(f"{path.name}: {err.strerror or err}") from None
    metric = metric or next((t.optimized_metric for t in trials if isinstance(t.optimized_metric, str)), None)
    metric = metric or "val/loss"
    mode = sweeps.sweep_direction(path, metric)
    return Sweep(trials, sweeps.rank(trials, metric, mode), sweeps.swept_keys(trials), metric, mode)


def images(path: Path) -> Iterator[Path]:
    """The PNG figures a verb wrote into `path` and its report/ folder (links left out)."""
    for folder in (path, path / "report"):
        if folder.is_dir():
            yield from sorted(p for p in folder.glob("*.png") if p.is_file() and not p.is_symlink() and within(path, p))
