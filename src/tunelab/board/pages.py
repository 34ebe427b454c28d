"""The HTML of `tunelab board`: plain server-rendered pages, curves as inline SVG, no script.

Every string that comes from disk (a run's name, a config value, a prompt, an answer, a CSV cell) goes through
`e()` (HTML-escaped, quotes included) before it reaches the page, and every link's path through `link()`, so a
run named `<script>` or a prediction holding markup shows as text. The server also sends a Content-Security-Policy
that allows no script at all: escaping is the guard, the policy the second one.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from tunelab.board import outputs
from tunelab.board.outputs import Job, Unreadable

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
VIEW = {"run": "run", "eval": "run", "sweep": "sweep", "compare": "compare", "pipeline": "pipeline"}
SECTIONS = (("run", "Runs"), ("sweep", "Sweeps"), ("compare", "Compares"), ("pipeline", "Pipelines"), ("eval", "Evals"))
HEADLINE = ("val/loss", "val/accuracy", "test/accuracy", "test/exact_match", "test/token_f1")


def e(value: Any) -> str:
    """`value` as HTML text (and safe inside a quoted attribute)."""
    return html.escape(str(value), quote=True)


def link(view: str, **query: Any) -> str:
    """A URL of the board (`/run?path=runs%2Fdemo`), already escaped for an attribute."""
    return e(f"/{view}?{urlencode({k: v for k, v in query.items() if v not in (None, '')}, quote_via=quote)}")


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def layout(title: str, body: str, root: Path) -> str:
    nav = " ".join(f'<a href="/?kind={kind}">{label}</a>' for kind, label in SECTIONS)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)} · tunelab board</title>'
        f'<link rel="stylesheet" href="/board.css"></head><body>'
        f'<header><a class="home" href="/">tunelab board</a> {nav} <span class="root">{e(root)}</span></header>'
        f"<main><h1>{e(title)}</h1>\n{body}\n</main></body></html>\n"
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """A table whose cells are HTML already (the callers escape what they put in)."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def state(job: Job) -> str:
    text = f"unreadable: {job.problem}" if job.state == "unreadable" else job.state
    if job.state == "failed" and job.problem:
        text += f": {job.problem}"
    return f'<span class="state {e(job.state)}">{e(text)}</span>'


def job_link(job: Job) -> str:
    return f'<a href="{link(VIEW[job.kind], path=job.rel)}">{e(job.rel)}</a>'


# ---- the runs list ------------------------------------------------------------------------------------------
def index(root: Path, jobs: list[Job], kind: str | None) -> str:
    shown = [(k, label) for k, label in SECTIONS if kind in (None, "", k)]
    parts = []
    if not jobs:
        parts.append(f"<p>No runs under {e(root)} yet: <code>tunelab train</code> writes one.</p>")
    for section, label in shown:
        found = [j for j in jobs if j.kind == section]
        if not found and kind != section:
            continue
        rows = []
        for job in found:
            figures = [f"{e(m)} {e(fmt(job.metrics[m]))}" for m in HEADLINE if m in job.metrics][:3]
            choices = " ".join(
                f"{e(k)}={e(v)}"
                for k, v in job.choices.items()
                if k in ("model", "method", "dataset", "objective", "pipeline", "strategy")
            )
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.modified)) if job.modified else ""
            rows.append([job_link(job), state(job), choices, "<br>".join(figures), e(when)])
        parts.append(
            f'<section id="{e(section)}"><h2>{e(label)} ({len(found)})</h2>'
            + table(["path", "state", "choices", "figures", "modified"], rows, "jobs")
            + "</section>"
        )
    return layout("Runs" if not kind else dict(SECTIONS).get(kind, "Runs"), "\n".join(parts), root)


# ---- curves ---------------------------------------------------------------------------------------------------
def chart(series: Mapping[str, Sequence[tuple[float, float]]], title: str, xlabel: str = "optimizer step") -> str:
    """Line chart of `series` (name -> points) as inline SVG: one polyline per series, its points marked."""
    width, height, left, right, top, bottom = 640, 260, 64, 16, 30, 40
    points = [p for pts in series.values() for p in pts]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.1 - 0.1, y1 + abs(y1) * 0.1 + 0.1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{e(title)}</title>',
        f'<text x="{left}" y="18" class="title">{e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="none" stroke="#bbb"/>',
    ]
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" class="tick">{e(f"{y:.4g}")}</text>'
        )
    # Steps are whole: ticks at distinct whole steps (a one-point run got ticks at 19.5 and 20.5 before)
    for x in sorted({round(x0 + (x1 - x0) * i / 4) for i in range(5)}):
        if x0 <= x <= x1:
            out.append(
                f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle" class="tick">{x}</text>'
            )
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle" class="tick">{e(xlabel)}</text>'
    )
    for n, (name, pts) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(
            f'<polyline class="series" data-series="{e(name)}" points="{coords}" fill="none" '
            f'stroke="{color}" stroke-width="2"/>'
        )
        if len(pts) <= 40:
            out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in pts)
        out.append(
            f'<rect x="{width - right - 180}" y="{top + 8 + 16 * n}" width="10" height="10" fill="{color}"/>'
            f'<text x="{width - right - 165}" y="{top + 17 + 16 * n}" class="legend">{e(name)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def curve_charts(found: Mapping[str, Sequence[tuple[float, float]]]) -> str:
    """The loss chart (train and validation loss together) and one chart per other validation figure."""
    loss = {k: found[k] for k in ("train/loss", "val/loss") if k in found}
    charts = [chart(loss, "loss")] if loss else []
    others = [k for k in found if k.startswith("val/") and k != "val/loss"][:4]
    charts += [chart({k: found[k]}, k) for k in others]
    return "".join(f'<div class="figure">{c}</div>' for c in charts)


# ---- one run or eval -----------------------------------------------------------------------------------------------
def metrics_table(metrics: Mapping[str, float]) -> str:
    names = sorted(metrics, key=lambda k: (not k.startswith("test/"), not k.startswith("val/"), k))
    return table(["metric", "value"], [[e(k), e(fmt(metrics[k]))] for k in names], "metrics")


def figures(job: Job) -> str:
    return "".join(
        f'<figure><img src="{link("file", path=f"{job.rel}/{p.relative_to(job.path).as_posix()}")}" '
        f'alt="{e(p.name)}"><figcaption>{e(p.name)}</figcaption></figure>'
        for p in outputs.images(job.path)
    )


def children(root: Path, job: Job) -> str:
    """The jobs below this one: a pipeline's stages, a compare's arms."""
    found = [outputs.read_job(root, p) for p in outputs.folders(job.path) if outputs.kind_of(p)]
    if not found:
        return ""
    rows = [
        [
            job_link(j),
            e(j.kind),
            state(j),
            *(
                ['<a href="' + link("predictions", path=j.rel) + '">predictions</a>']
                if (j.path / "predictions.jsonl").is_file()
                else [""]
            ),
        ]
        for j in found
    ]
    return "<h2>Inside</h2>" + table(["path", "kind", "state", ""], rows, "jobs")


def config_block(job: Job) -> str:
    try:
        text = outputs.read_text(job.path / ".hydra" / "config.yaml")
    except Unreadable as err:
        return f'<p class="state unreadable">config: unreadable: {e(err)}</p>'
    return (
        f'<details open><summary>composed config (.hydra/config.yaml)</summary><pre class="config">{e(text)}</pre>'
        "</details>"
    )


def run(root: Path, job: Job) -> str:
    parts = [f"<p>{e(job.kind)} · {state(job)}</p>"]
    if job.overrides:
        parts.append("<p>overrides: " + " ".join(f"<code>{e(o)}</code>" for o in job.overrides) + "</p>")
    if (job.path / "predictions.jsonl").is_file():
        parts.append(f'<p><a class="predictions" href="{link("predictions", path=job.rel)}">predictions</a></p>')
    try:
        found, notes = outputs.curves(job.path)
    except (OSError, Unreadable) as err:
        found, notes = {}, [f"unreadable: {err}"]
    if found:
        parts.append('<h2>Curves</h2><div class="figures">' + curve_charts(found) + "</div>")
    elif job.kind == "run":
        parts.append("<p>No curves on disk yet (history.jsonl, csv/, mlruns/ or wandb/).</p>")
    parts += [f'<p class="state unreadable">{e(n)}</p>' for n in notes]
    if job.metrics:
        parts.append("<h2>Figures</h2>" + metrics_table(job.metrics))
    pictures = figures(job)
    if pictures:
        parts.append(f'<div class="figures">{pictures}</div>')
    parts.append(children(root, job))
    if (job.path / ".hydra").is_dir():
        parts.append("<h2>Config</h2>" + config_block(job))
    return layout(job.rel, "\n".join(parts), root)


# ---- a sweep ---------------------------------------------------------------------------------------------------------
def sweep(root: Path, job: Job, metric: str | None) -> str:
    from tunelab.tracking import sweeps

    found = outputs.sweep(job.path, metric)
    order = {t.num: i for i, t in enumerate(found.ranked, start=1)}
    rest = [t for t in found.trials if t.num not in order]
    rows = []
    for trial in [*found.ranked, *rest]:
        values = dict(sweeps.split_overrides(trial.overrides))
        rel = f"{job.rel}/{trial.num}"
        status = trial.state if not trial.error else f"{trial.state}: {trial.error}"
        value = trial.metrics.get(found.metric)
        rows.append(
            [
                e(order.get(trial.num, "-")),
                f'<a href="{link("run", path=rel)}">{e(trial.num)}</a>',
                *[e(values.get(k, "")) for k in found.keys],
                e(fmt(value) if value is not None else ""),
                f'<span class="state {e(trial.state)}">{e(status)}</span>',
            ]
        )
    parts = [
        f"<p>{len(found.trials)} trials ranked by {e(found.metric)} ({e(found.mode)}; "
        f"<code>metric=</code> in the address ranks by another)</p>",
        table(["rank", "trial", *found.keys, found.metric, "state"], rows, "ranked"),
    ]
    tops = {
        f"trial {t.num} "
        + " ".join(
            f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sweeps.split_overrides(t.overrides) if k in found.keys
        ): sweeps.val_history(t)
        for t in found.ranked[:5]
    }
    tops = {k: v for k, v in tops.items() if v}
    if tops:
        parts.append('<h2>Validation loss, best trials</h2><div class="figure">' + chart(tops, "val/loss") + "</div>")
    pictures = figures(job)
    if pictures:
        parts.append(f'<h2>Report figures</h2><div class="figures">{pictures}</div>')
    return layout(f"sweep {job.rel}", "\n".join(parts), root)


# ---- a compare, a pipeline -------------------------------------------------------------------------------------------
def csv_table(path: Path) -> str:
    try:
        rows = outputs.read_csv(path)
    except Unreadable as err:
        return f'<p class="state unreadable">unreadable: {e(err)}</p>'
    if not rows:
        return f'<p class="state unreadable">unreadable: {e(path.name)}: empty</p>'

    def cell(text: str) -> str:
        try:
            return e(fmt(float(text)))
        except ValueError:
            return e(text)

    return table(rows[0], ([cell(c) for c in row] for row in rows[1:]), path.stem)


def text_file(path: Path) -> str:
    try:
        return f"<p>{e(outputs.read_text(path).strip())}</p>" if path.is_file() else ""
    except Unreadable as err:
        return f'<p class="state unreadable">unreadable: {e(err)}</p>'


def compare(root: Path, job: Job) -> str:
    parts = [
        f"<p>{state(job)}</p>",
        "<h2>Arms</h2>",
        csv_table(job.path / "compare.csv"),
        text_file(job.path / "reading.txt"),
    ]
    pictures = figures(job)
    if pictures:
        parts.append(f'<div class="figures">{pictures}</div>')
    parts.append(children(root, job))
    return layout(f"compare {job.rel}", "\n".join(parts), root)


def pipeline(root: Path, job: Job) -> str:
    parts = [f"<p>{state(job)}</p>", "<h2>Forgetting matrix</h2>", csv_table(job.path / "matrix.csv")]
    if (job.path / "summary.json").is_file():
        try:
            summary = outputs.read_json(job.path / "summary.json")
            flat = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            parts.append(metrics_table(flat))
        except (Unreadable, AttributeError) as err:
            parts.append(f'<p class="state unreadable">unreadable: {e(err)}</p>')
    pictures = figures(job)
    if pictures:
        parts.append(f'<div class="figures">{pictures}</div>')
    parts.append(children(root, job))
    return layout(f"pipeline {job.rel}", "\n".join(parts), root)


# ---- predictions ----------------------------------------------------------------------------------------------
PAGE = 50


def predictions(root: Path, job: Job, query: str, offset: int) -> str:
    found = outputs.predictions(job.path / "predictions.jsonl", query, offset, PAGE)
    form = (
        f'<form method="get" action="/predictions"><input type="hidden" name="path" value="{e(job.rel)}">'
        f'<input type="search" name="q" value="{e(query)}" placeholder="text in prompt, reference or answer">'
        '<button type="submit">filter</button></form>'
    )
    rows = []
    for row in found.rows:
        scores = "<br>".join(f"{e(k)} {e(fmt(row[k]))}" for k in found.scores if isinstance(row.get(k), (int, float)))
        rows.append(
            [
                e(row["index"]),
                e(row.get("dataset", "")),
                f"<details><summary>{e(str(row.get('prompt', ''))[-120:])}</summary>"
                f"<pre>{e(row.get('prompt', ''))}</pre></details>",
                f"<pre>{e(row.get('reference', ''))}</pre>",
                f"<pre>{e(row.get('answer', ''))}</pre>",
                scores,
            ]
        )
    pager = []
    if offset > 0:
        pager.append(
            f'<a href="{link("predictions", path=job.rel, q=query, offset=max(0, offset - PAGE))}">previous</a>'
        )
    if offset + PAGE < found.total:
        pager.append(f'<a href="{link("predictions", path=job.rel, q=query, offset=offset + PAGE)}">next</a>')
    shown = f"{offset + 1}–{offset + len(found.rows)}" if found.rows else "none"
    parts = [
        f'<p><a href="{link("run", path=job.rel)}">{e(job.rel)}</a> · rows {shown} of {found.total}'
        + (f" matching “{e(query)}”" if query else "")
        + (f" · {found.bad_lines} unreadable lines left out" if found.bad_lines else "")
        + "</p>",
        form,
        table(["#", "dataset", "prompt", "reference", "answer", "scores"], rows, "predictions"),
        f'<p class="pager">{" ".join(pager)}</p>',
    ]
    return layout(f"predictions {job.rel}", "\n".join(parts), root)


def problem(root: Path, title: str, text: str) -> str:
    return layout(title, f'<p class="state unreadable">{e(text)}</p>', root)


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}
header{background:#23395d;color:#fff;padding:8px 16px}header a{color:#fff;margin-right:14px;text-decoration:none}
header .home{font-weight:bold}header .root{float:right;opacity:.7;font-family:monospace}
main{padding:8px 16px}h1{font-size:20px;word-break:break-all}h2{font-size:16px;margin-top:22px}
table{border-collapse:collapse;margin:6px 0;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f5f8}td pre{margin:0;white-space:pre-wrap;max-width:420px}
pre.config{background:#f7f7f7;padding:8px;max-height:480px;overflow:auto}
.state.finished{color:#1a7f37}.state.failed,.state.unreadable{color:#b42318}.state.running{color:#9a6700}
.figures{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}figure img{max-width:640px;border:1px solid #ddd}
svg.chart{background:#fff;border:1px solid #ddd}svg .title{font-weight:bold;font-size:13px}
svg .tick,svg .legend{font-size:11px}details summary{cursor:pointer}code{background:#f3f3f3;padding:0 3px}
form input[type=search]{width:320px}.pager a{margin-right:12px}
"""
