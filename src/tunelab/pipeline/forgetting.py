"""The forgetting matrix and its standard figures, as pure functions; and how a pipeline writes them.

R[i][j] is the score on task j after stage i (higher is better); `baseline[j]` is the score of the model
before any stage; `intro[j]` is the stage that first trains task j. With one task per stage
(`intro[j] = j`) the figures are exactly the published ones:

- ACC, average accuracy (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory", eq. 2):
  mean_j R[T][j] over the tasks seen by stage T.
- BWT, backward transfer (same paper): mean over tasks j < T of R[T][j] - R[j][j]; negative = forgetting.
- FWT, forward transfer (same paper): mean over tasks j > 0 of R[j-1][j] - baseline[j].
- Average forgetting (Chaudhry et al. 2018, "Riemannian Walk", eq. 7): f_j = max_{l<T} R[l][j] - R[T][j],
  averaged over tasks j < T. The max runs over the stages at or after the one that learned j
  (a[l][j] is only defined once task j has been seen, as in Mammoth's implementation).

A partial matrix (a pipeline still running, or resumed) gives the figures at its last completed stage.
Several tasks per stage (a multi-task stage, a mixture) map through `intro`; a task introduced at the last
stage has nothing to forget yet, so BWT and forgetting skip it, and are None when no task qualifies.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tunelab.checkpoint.io import atomic_write

Matrix = Sequence[Sequence[float]]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _seen(intro: Sequence[int], last: int) -> list[int]:
    return [j for j, stage in enumerate(intro) if stage <= last]


def average_accuracy(R: Matrix, intro: Sequence[int]) -> float | None:
    """ACC: the mean final score over the tasks trained so far."""
    last = len(R) - 1
    return _mean([R[last][j] for j in _seen(intro, last)]) if R else None


def backward_transfer(R: Matrix, intro: Sequence[int]) -> float | None:
    """BWT (Lopez-Paz & Ranzato 2017): mean of final minus just-learned score, over tasks learned before the end."""
    last = len(R) - 1
    return _mean([R[last][j] - R[intro[j]][j] for j in range(len(intro)) if intro[j] < last])


def task_forgetting(R: Matrix, intro: Sequence[int]) -> list[float | None]:
    """Each task's forgetting (Chaudhry et al. 2018): its best earlier score (once learned) minus its final one."""
    last = len(R) - 1
    return [max(R[k][j] for k in range(intro[j], last)) - R[last][j] if intro[j] < last else None
            for j in range(len(intro))]


def average_forgetting(R: Matrix, intro: Sequence[int]) -> float | None:
    """Average forgetting (Chaudhry et al. 2018) over the tasks learned before the last stage."""
    return _mean([f for f in task_forgetting(R, intro) if f is not None])


def forward_transfer(R: Matrix, baseline: Sequence[float], intro: Sequence[int]) -> float | None:
    """FWT (Lopez-Paz & Ranzato 2017): score on a task just before its stage, minus the untrained model's."""
    last = len(R) - 1
    return _mean([R[intro[j] - 1][j] - baseline[j] for j in range(len(intro)) if 0 < intro[j] <= last])


def summarize(R: Matrix, baseline: Sequence[float], intro: Sequence[int]) -> dict[str, Any]:
    """ACC, BWT, average forgetting and FWT at the last completed stage (None where undefined)."""
    return {"stages_done": len(R), "acc": average_accuracy(R, intro), "bwt": backward_transfer(R, intro),
            "forgetting": average_forgetting(R, intro), "fwt": forward_transfer(R, baseline, intro),
            "task_forgetting": task_forgetting(R, intro) if R else []}


# ---- writing a pipeline's matrix -----------------------------------------------------------------------
def fmt(value: float | None) -> str:
    """A figure as the matrix, the tables and the plot titles show it: 4 decimals, `-` where undefined."""
    return "-" if value is None else f"{value:.4f}"


def write_matrix(out_dir: Path, tasks: Sequence[str], metric_names: Sequence[str],
                 rows: Sequence[tuple[str, Mapping[str, float]]], probe: str | None,
                 summary: Mapping[str, Any]) -> list[Path]:
    """matrix.csv (rows: baseline then each completed stage; columns: tasks, then the probe) and summary.json."""
    header = ["row", *(f"{t}/{m}" for t, m in zip(tasks, metric_names, strict=True))] + ([probe] if probe else [])
    lines = [header]
    for name, scores in rows:
        cells = [scores.get(t) for t in tasks] + ([scores.get(probe)] if probe else [])
        lines.append([name, *("" if c is None else f"{c:.6f}" for c in cells)])
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = out_dir / "matrix.csv"
    from io import StringIO

    buffer = StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    atomic_write(matrix, buffer.getvalue())
    summary_file = out_dir / "summary.json"
    atomic_write(summary_file, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return [matrix, summary_file]


def heatmap_figure(tasks: Sequence[str], rows: Sequence[tuple[str, Mapping[str, float]]], title: str,
                   probe: str | None = None) -> Any:
    """The matrix as a heatmap: one row per evaluated model (baseline first), one column per task, values printed;
    beside it, on the same rows, the probe's perplexity as labelled bars (often the only signal: a random-init
    model scores 0 in every cell while its perplexity shows the forgetting). The title wraps to fit."""
    from tunelab.charts import fit_title, pyplot

    values = [[scores.get(t, float("nan")) for t in tasks] for _, scores in rows]
    probes = [scores.get(probe) for _, scores in rows] if probe else []
    panels = 2 if any(p is not None for p in probes) else 1
    size = (1.8 + 1.5 * len(tasks) + 2.2 * (panels - 1), 1.5 + 0.5 * len(rows))
    fig, axes = pyplot().subplots(1, panels, figsize=size, layout="constrained", squeeze=False,
                                  gridspec_kw={"width_ratios": [len(tasks), 1.4][:panels]})
    ax = axes[0][0]
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after stage")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if panels == 2:
        _probe_panel(axes[0][1], probes, str(probe))
    fit_title(fig, fig.suptitle(title, fontsize=9))
    return fig


def _probe_panel(ax: Any, probes: Sequence[float | None], probe: str) -> None:
    """Horizontal bars of the probe's perplexity, one per matrix row, each labelled; a log axis when the values
    span more than a decade (perplexities run from ~1 to millions once a task is forgotten)."""
    drawn = [p if p is not None else float("nan") for p in probes]
    ax.barh(range(len(probes)), drawn, color="tab:red", alpha=0.75, height=0.6)
    known = [p for p in probes if p is not None and p > 0] or [1.0]
    if max(known) / min(known) > 10:  # from 1, perplexity's floor: on a log axis each bar's length is the loss
        ax.set_xscale("log")
        ax.set_xlim(min(1.0, min(known)), max(known) ** 1.35)  # room for the labels right of the longest bar
    else:
        ax.set_xlim(0, 1.4 * max(known))
    ax.set_ylim(len(probes) - 0.5, -0.5)  # the heatmap's row order: baseline on top
    ax.set_yticks(range(len(probes)), [""] * len(probes))
    ax.tick_params(axis="y", left=False)
    for i, value in enumerate(probes):
        text = "n/a" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
        ax.annotate(text, (value if value is not None else 0, i), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=8, annotation_clip=False)
    ax.set_xlabel(f"probe perplexity\n{probe}", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)


def heatmap(path: Path, tasks: Sequence[str], rows: Sequence[tuple[str, Mapping[str, float]]], title: str,
            probe: str | None = None) -> Path:
    """heatmap.png: `heatmap_figure` written atomically to `path`."""
    from tunelab.charts import pyplot

    fig = heatmap_figure(tasks, rows, title, probe)
    atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=110), durable=False)
    pyplot().close(fig)
    return path


def print_matrix(tasks: Sequence[str], rows: Sequence[tuple[str, Mapping[str, float]]], probe: str | None,
                 summary: Mapping[str, Any], title: str) -> None:
    """The matrix and its figures as a rich table (plain text in a pipe)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("after stage")
    for task in tasks:
        table.add_column(task, justify="right")
    if probe:
        table.add_column(f"probe: {probe}", justify="right", overflow="fold")
    for name, scores in rows:
        table.add_row(name, *(fmt(scores.get(t)) for t in tasks), *([fmt(scores.get(probe))] if probe else []))
    console = Console()
    console.print(table)
    console.print("  ".join(f"{key.upper()} {fmt(summary.get(key))}" for key in ("acc", "bwt", "forgetting", "fwt")))


# ---- comparing strategies: the pipelines of one multirun -----------------------------------------------
COMPARED = ("acc", "bwt", "forgetting", "fwt", "probe_change")


def read_pipelines(sweep_dir: Path) -> list[dict[str, Any]]:
    """summary.json of every pipeline under `sweep_dir` (a multirun's job directories), in job order."""
    found = []
    def order(path: Path) -> tuple[bool, int, str]:
        name = path.parent.name
        return (not name.isdigit(), int(name) if name.isdigit() else 0, name)

    for path in sorted(sweep_dir.glob("*/summary.json"), key=order):
        summary = json.loads(path.read_text())
        found.append({**summary, "dir": str(path.parent)})
    return found


def compare(sweep_dir: Path, pipelines: Sequence[Mapping[str, Any]] | None = None) -> list[Path]:
    """comparison.csv, comparison.md and comparison.png in `sweep_dir`: ACC / BWT / forgetting / FWT per strategy."""
    pipelines = list(pipelines if pipelines is not None else read_pipelines(sweep_dir))
    if not pipelines:
        return []
    header = ["strategy", "pipeline", "stages_done", *COMPARED, "dir"]
    rows = [[p.get("strategy", "?"), p.get("pipeline", "?"), p.get("stages_done"), *(p.get(k) for k in COMPARED),
             p["dir"]] for p in pipelines]
    from io import StringIO

    buffer = StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    atomic_write(sweep_dir / "comparison.csv", buffer.getvalue())
    md = ["| strategy | stages | ACC | BWT | forgetting | FWT | probe change |", "|---|---:|---:|---:|---:|---:|---:|"]
    for p in pipelines:
        md.append(f"| {p.get('strategy', '?')} | {p.get('stages_done')}/{p.get('stages_total', '?')} | "
                  + " | ".join(fmt(p.get(k)) for k in COMPARED) + " |")
    atomic_write(sweep_dir / "comparison.md", "\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = ("acc", "bwt", "forgetting")
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(pipelines), 3.8))
    width = 0.8 / len(figures)
    for k, key in enumerate(figures):
        xs = [i + (k - (len(figures) - 1) / 2) * width for i in range(len(pipelines))]
        ys = [p.get(key) if p.get(key) is not None else 0.0 for p in pipelines]
        bars = ax.bar(xs, ys, width, label={"acc": "ACC", "bwt": "BWT", "forgetting": "forgetting"}[key])
        for bar, p in zip(bars, pipelines, strict=True):
            value = p.get(key)
            ax.annotate("n/a" if value is None else f"{value:.2f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom" if bar.get_height() >= 0 else "top", fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(pipelines)), [str(p.get("strategy", "?")) for p in pipelines])
    ax.set_title(f"{pipelines[0].get('pipeline', '')}: ACC, BWT and forgetting by strategy", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(sweep_dir / "comparison.png", lambda file: fig.savefig(file, format="png", dpi=110), durable=False)
    plt.close(fig)
    return [sweep_dir / "comparison.csv", sweep_dir / "comparison.md", sweep_dir / "comparison.png"]


def print_comparison(pipelines: Sequence[Mapping[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("strategy", "stages", "ACC", "BWT", "forgetting", "FWT", "probe change"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for p in pipelines:
        table.add_row(str(p.get("strategy", "?")), f"{p.get('stages_done')}/{p.get('stages_total', '?')}",
                      *(fmt(p.get(k)) for k in COMPARED))
    Console().print(table)
