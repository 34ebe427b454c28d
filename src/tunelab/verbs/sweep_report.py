"""`tunelab sweep-report dir=<multirun dir>`: rank a sweep's trials, plot them, write the best config.

Reads each trial directory (`<multirun dir>/<job num>/`): `metrics.json`, `.hydra/overrides.yaml`,
`.hydra/config.yaml` and `.hydra/hydra.yaml`; a trial with `error.txt` is failed, one without either
file is still running (or was killed) and is skipped with a note, so the report also works mid-sweep
(the reading is tracking/sweeps.py, which `tunelab board` shares).

Writes into `<multirun dir>/report/`: `trials.csv`, `<metric>_vs_<hyperparameter>.png` per swept
value, `val_loss_curves.png` (top trials), and `conf/experiment/best.yaml`, an experiment that reruns
the best trial with `tunelab train --config-dir <multirun dir>/report/conf experiment=best`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from tunelab.errors import ConfigError, TunelabError
from tunelab.job import RunContext, verb
from tunelab.tracking.sweeps import (
    NOT_CONFIG,
    Trial,
    rank,
    read_trials,
    split_overrides,
    sweep_direction,
    swept_keys,
    val_history,
)

TOP_CURVES = 5  # validation-loss curves drawn for the best trials


# ---- outputs --------------------------------------------------------------------------------
def write_csv(path: Path, trials: list[Trial], keys: list[str], metric_names: list[str]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial", "state", *keys, *metric_names, "error"])
        for trial in trials:
            values = dict(split_overrides(trial.overrides))
            writer.writerow([trial.num, trial.state, *[values.get(k, "") for k in keys],
                             *[trial.metrics.get(m, "") for m in metric_names], trial.error])


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _short(text: str) -> str:
    """4 significant digits for Optuna's long floats (trials.csv keeps them whole)."""
    number = _number(text)
    return f"{number:.4g}" if number is not None and "." in text and len(text) > 8 else text


def trial_label(trial: Trial, keys: list[str]) -> str:
    """A curve's legend entry: the trial's swept values, e.g. `#3 lr=0.001, batch_size=16` (as the console table
    names them; the trial number, as in trials.csv, keeps two trials with equal values apart)."""
    values = dict(split_overrides(trial.overrides))
    parts = [f"{key.removeprefix('hyperparams.')}={_short(values[key])}" for key in keys if key in values]
    return f"#{trial.num} " + ", ".join(parts) if parts else f"trial {trial.num}"


def curves_figure(curves: list[tuple[Trial, list[tuple[int, float]]]], keys: list[str], metric: str) -> Any:
    """Validation-loss curves of the top trials, each named by its swept values, on whole-step ticks."""
    from matplotlib.ticker import MaxNLocator

    from tunelab.charts import pyplot

    fig, ax = pyplot().subplots(figsize=(6, 4), layout="constrained")
    for trial, points in curves:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=trial_label(trial, keys))
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole; a short run got ticks at 2.5
    ax.set_ylabel("val/loss")
    ax.set_title(f"validation loss, top {len(curves)} by {metric}")
    ax.legend(fontsize=8)
    return fig


def plot(report_dir: Path, trials: list[Trial], keys: list[str], metric: str, ranked: list[Trial]) -> list[Path]:
    """Metric against each swept hyperparameter, and validation-loss curves of the top trials."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on clusters and CI
    import matplotlib.pyplot as plt

    written = []
    done = [t for t in trials if t.state == "ok" and metric in t.metrics]
    slug = metric.replace("/", "_")
    for key in keys:
        xs = [dict(split_overrides(t.overrides)).get(key, "") for t in done]
        ys = [t.metrics[metric] for t in done]
        numbers = [_number(x) for x in xs]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        numeric = all(n is not None for n in numbers)
        if numeric and len(set(numbers)) > 8:  # a continuous search (Optuna, W&B random): a true axis
            ax.scatter(numbers, ys)
            if min(numbers) > 0 and max(numbers) / min(numbers) >= 100:
                ax.set_xscale("log")  # learning rates span decades
        else:  # a grid's few values, or group choices: one evenly spaced column per value
            labels = sorted(set(xs), key=lambda x: (_number(x) is None, _number(x) or 0.0, x))
            ax.scatter([labels.index(x) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels, rotation=30 if not numeric else 0)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} by {key} ({len(done)} trials)")
        fig.tight_layout()
        written.append(report_dir / f"{slug}_vs_{key.replace('/', '_')}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    curves = [(t, val_history(t)) for t in ranked[:TOP_CURVES]]
    curves = [(t, points) for t, points in curves if points]
    if curves:
        fig = curves_figure(curves, keys, metric)
        written.append(report_dir / "val_loss_curves.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def best_experiment(trial: Trial) -> str:
    """An experiment YAML (`# @package _global_`) that reruns `trial`: group choices as `override /group`,
    values as nested keys. Keys that say where the sweep ran (paths, run id, hydra, the search) are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    includes: list[str] = []  # experiment/debug files the sweep ran with; Hydra wants them before overrides
    defaults: list[Any] = []
    values: dict[str, Any] = {}
    skipped = []
    for override in OverridesParser.create().parse_overrides(trial.overrides):
        key = override.key_or_group
        if key.startswith(NOT_CONFIG) or override.is_delete() or override.package:
            if not key.startswith(NOT_CONFIG):
                skipped.append(override.input_line)
            continue
        if key in trial.choices:  # a config group: model=, method=, experiment=, ...
            if key in ("experiment", "debug"):
                includes.append(f"/{key}/{override.value()}")  # its own @package _global_ applies
            else:
                defaults.append({f"override /{key}": override.value()})
            continue
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = override.value()
    header = [
        "# @package _global_",
        f"# Best trial {trial.num} of sweep {trial.path.parent.name} (written by tunelab sweep-report).",
    ]
    header += [f"# not carried over (not expressible in an experiment): {s}" for s in skipped]
    body: dict[str, Any] = {}
    if includes or defaults:
        body["defaults"] = [*includes, *defaults, "_self_"]
    body.update(values)
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def _console_table(trials: list[Trial], ranked: list[Trial], keys: list[str], metric_names: list[str],
                   metric: str, mode: str) -> Any:
    from rich.table import Table

    table = Table(title=f"sweep trials ranked by {metric} ({mode})")
    metric_names = metric_names[:4]  # the console shows the main figures; trials.csv has all of them
    for column in ["rank", "trial", *keys, *metric_names]:
        table.add_column(column.removeprefix("hyperparams."), justify="left" if column in keys else "right")
    order = {t.num: i for i, t in enumerate(ranked, start=1)}
    rest = [t for t in trials if t.num not in order]
    for trial in [*ranked, *rest]:
        values = dict(split_overrides(trial.overrides))
        cells = [str(order.get(trial.num, "-")), str(trial.num), *[_short(values.get(k, "")) for k in keys]]
        if trial.state == "failed":
            cells += ["failed"] + [""] * (len(metric_names) - 1)
        elif trial.state == "running":
            cells += ["no metrics.json"] + [""] * (len(metric_names) - 1)
        else:
            cells += [f"{trial.metrics[m]:.4f}" if m in trial.metrics else "" for m in metric_names]
        table.add_row(*cells)
    return table


def report(sweep_dir: Path, metric: str | None = None, mode: str | None = None) -> dict[str, Any]:
    """Build the report; returns what it found and wrote (also used by tests)."""
    if not sweep_dir.is_dir():
        raise TunelabError(f"no multirun directory {str(sweep_dir)!r}", "command line",
                         "give a sweep directory such as outputs/multiruns/<run id>")
    trials = read_trials(sweep_dir)
    if not trials:
        raise TunelabError(f"no trial directories (0/, 1/, ...) in {sweep_dir}", "command line",
                         "give the directory Hydra printed after 'Launching jobs, sweep output dir :'")
    metric = metric or next((t.optimized_metric for t in trials if t.optimized_metric), None) or "val/loss"
    mode = mode or sweep_direction(sweep_dir, metric)
    keys = swept_keys(trials)
    names = sorted({m for t in trials for m in t.metrics if m.startswith(("val/", "test/"))})
    names = [metric, *[m for m in names if m != metric and m.startswith("val/")],
             *[m for m in names if m != metric and not m.startswith("val/")]]
    ranked = rank(trials, metric, mode)
    report_dir = sweep_dir / "report"
    report_dir.mkdir(exist_ok=True)
    write_csv(report_dir / "trials.csv", trials, keys, names)
    plots = plot(report_dir, trials, keys, metric, ranked)
    notes = [f"trial {t.num}: no metrics.json yet (still running or killed); skipped"
             for t in trials if t.state == "running"]
    notes += [f"trial {t.num}: {t.state}: {t.error}" for t in trials if t.state in ("failed", "unreadable")]
    if ranked and not (report_dir / "val_loss_curves.png").is_file():
        notes.append("no validation history found (history.jsonl, csv logger, W&B file): curves skipped")
    best_file = None
    if ranked:
        best_file = report_dir / "conf" / "experiment" / "best.yaml"
        best_file.parent.mkdir(parents=True, exist_ok=True)
        best_file.write_text(best_experiment(ranked[0]))
    return {"trials": trials, "ranked": ranked, "keys": keys, "metric": metric, "mode": mode,
            "metric_names": names, "plots": plots, "notes": notes, "best_file": best_file}


@verb()
def sweep_report(cfg: DictConfig, run: RunContext) -> dict[str, Any]:
    """`tunelab sweep-report dir=<multirun dir> [metric=M] [mode=min|max]` (conf/sweep_report.yaml)."""
    if cfg.dir is None:
        raise ConfigError("no multirun directory given", "key dir",
                          "tunelab sweep-report dir=outputs/multiruns/<run id>")
    if cfg.mode not in (None, "min", "max"):
        raise ConfigError(f"mode must be min or max, got {cfg.mode!r}", "key mode",
                          "mode=min | mode=max; null: the sweep's direction")
    return print_report(Path(str(cfg.dir)), cfg.metric, cfg.mode)


def print_report(sweep_dir: Path, metric: str | None = None, mode: str | None = None) -> dict[str, Any]:
    """Build the report (`report`) and print its table, notes and the rerun command; returns what `report` did."""
    found = report(sweep_dir, metric, mode)
    from rich.console import Console

    from tunelab.console import print_whole

    console = Console()
    console.print(_console_table(found["trials"], found["ranked"], found["keys"], found["metric_names"],
                                 found["metric"], found["mode"]))
    for note in found["notes"]:
        console.print(f"note: {note}", highlight=False)
    report_dir = sweep_dir / "report"
    print_whole(console, f"report: {report_dir} (trials.csv, {len(found['plots'])} plots)")
    if found["best_file"]:
        best = found["ranked"][0]
        value = best.metrics[found["metric"]]
        console.print(f"best: trial {best.num}, {found['metric']} = {value:.6g}", highlight=False)
        print_whole(console, f"rerun: tunelab train --config-dir {report_dir.resolve() / 'conf'} experiment=best")
    else:
        console.print(f"no finished trial has {found['metric']}; no best config written", highlight=False)
    return found


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("sweep-report")
