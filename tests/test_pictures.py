"""The charts people read cold (issue 23, item 5): compare bars carry their values and a zero is seen as a zero,
titles fit inside the figure, the pipeline heatmap draws the probe's perplexity, before/after a fact update is one
chart, sweep curves are named by their values on whole-step ticks. Each is drawn from the same rows the verbs use,
rendered with Agg, and read back from its artists and pixels."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from procs import budget
from procs import run as run_child
from tunelab.charts import pyplot
from tunelab.pipeline import forgetting as fg
from tunelab.verbs import compare as cmp
from tunelab.verbs.preview import lengths_table
from tunelab.verbs.sweep_report import curves_figure, read_trials, val_history

LONG = (
    "knowledge_updated: exact_match per arm (base_model=tiny_instruct, run=2026-12-06_23-59-59_knowledge_raft_e10" * 2
)


def _metrics(em: float, low: float, high: float, changed: float) -> dict[str, float]:
    """What `tunelab eval` with slice_by=[changed] writes for one arm (the keys table_rows reads)."""
    return {
        "test/exact_match": em,
        "test/exact_match/ci_low": low,
        "test/exact_match/ci_high": high,
        "test/changed=True/exact_match": changed,
        "test/changed=True/exact_match/ci_low": max(changed - 0.05, 0),
        "test/changed=True/exact_match/ci_high": changed + 0.05 if changed else 0.0,
        "test/n": 200.0,
    }


BEFORE = {
    "base_zero_shot": _metrics(0.0, 0.0, 0.0, 0.0),
    "finetuned": _metrics(0.395, 0.33, 0.46, 0.3),
    "finetuned_retrieval": _metrics(0.12, 0.08, 0.17, 0.1),
}
AFTER = {
    "base_zero_shot": _metrics(0.0, 0.0, 0.0, 0.0),
    "finetuned": _metrics(0.3, 0.24, 0.36, 0.0),
    "finetuned_retrieval": _metrics(0.1, 0.06, 0.15, 0.04),
}


def _inside(fig, artist) -> bool:
    """Whether the artist, as rendered, lies wholly inside the figure (a cut title does not)."""
    fig.canvas.draw()
    box, page = artist.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    return box.x0 >= page.x0 and box.x1 <= page.x1 and box.y0 >= page.y0 and box.y1 <= page.y1


def _pixel(fig, ax, x: float, y: float, up_px: int = 1) -> np.ndarray:
    """The RGB colour rendered `up_px` pixels above data point (x, y)."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0
    col, row = ax.transData.transform((x, y))
    return image[int(round(image.shape[0] - row)) - up_px, int(round(col))]


def test_every_compare_bar_carries_its_value_and_a_zero_is_drawn():
    rows = cmp.table_rows(BEFORE, "exact_match")
    fig = cmp.chart_figure(rows, "exact_match", LONG)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    # 3 arms x (headline, changed=True): base_zero_shot is 0 in both, so two "0.000" labels.
    assert sorted(labels) == sorted(["0.000", "0.000", "0.395", "0.300", "0.120", "0.100"])
    assert len(ax.containers) >= 2 and sum(len(c.patches) for c in ax.containers if hasattr(c, "patches")) == 6
    for s, container in enumerate(c for c in ax.containers if hasattr(c, "patches")):  # bars with zero height
        zero = container.patches[0]
        x = zero.get_x() + zero.get_width() / 2
        assert np.allclose(_pixel(fig, ax, x, 0.0), zero.get_facecolor()[:3], atol=0.02), s  # its colour, at 0
    title = fig.texts[0]  # the suptitle
    assert _inside(fig, title) and "\n" in title.get_text()  # wrapped, not cut
    assert any(len(line.get_segments()) for line in ax.collections)  # CI whiskers drawn
    pyplot().close(fig)


def test_before_and_after_a_fact_update_in_one_chart(tmp_path):
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    cmp.write_report(tmp_path / "before", BEFORE, "exact_match", "knowledge")
    before = cmp.read_table(tmp_path / "before")
    assert before[1]["arm"] == "finetuned" and before[1]["exact_match (changed=True)"] == pytest.approx(0.3)
    after = cmp.table_rows(AFTER, "exact_match")
    assert cmp.before_after_key(before, after, "exact_match") == "exact_match (changed=True)"
    fig = cmp.before_after_figure(before, after, "exact_match", LONG)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["before", "after"]
    # Per arm the changed facts before then after: base 0/0, finetuned 0.3 -> 0 (forgot the new answer), RAG 0.1/0.04.
    assert sorted(t.get_text() for t in ax.texts) == sorted(["0.000", "0.300", "0.100", "0.000", "0.000", "0.040"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base\nzero\nshot", "finetuned", "finetuned\nretrieval"]
    assert _inside(fig, fig.texts[0])
    pyplot().close(fig)
    cmp.write_report(tmp_path / "after", AFTER, "exact_match", "knowledge_updated", before, "before")
    assert (tmp_path / "after" / "before_after.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_a_before_dir_without_a_table_before_scoring(tmp_path):
    began = time.monotonic()
    proc = run_child(
        [
            sys.executable,
            "-m",
            "tunelab.cli",
            "compare",
            f"before={tmp_path}",
            "logger=none",
            f"paths.output_dir={tmp_path}",
        ],
        120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"tunelab: config error: no compare.csv in {tmp_path}, key before")
    assert "Traceback" not in proc.stderr and time.monotonic() - began < budget(60)


def test_heatmap_title_fits_and_the_probe_perplexity_is_drawn():
    tasks = ["terms_general", "terms_medical"]
    probe = "terms_general/validation/ppl"
    rows = [
        (name, {"terms_general": a, "terms_medical": b, probe: ppl})
        for name, a, b, ppl in (
            ("baseline", 0.0, 0.0, 2070.0),
            ("general", 0.0, 0.0, 83.0),
            ("medical", 0.0, 0.0, 572.0),
        )
    ]
    fig = fg.heatmap_figure(tasks, rows, "terminology · sequential · " + LONG, probe)
    assert _inside(fig, fig.texts[0]) and "\n" in fig.texts[0].get_text()
    panel = fig.axes[1]  # the heatmap, the probe panel, then the colour bar
    assert [t.get_text() for t in panel.texts] == ["2,070", "83.00", "572"]  # the only signal here: every cell is 0
    assert probe in panel.get_xlabel() and panel.get_xscale() == "log"
    pyplot().close(fig)
    fig = fg.heatmap_figure(tasks, [(n, {k: v for k, v in s.items() if k != probe}) for n, s in rows], "t", None)
    assert len(fig.axes) == 2  # no probe: the heatmap and its colour bar
    pyplot().close(fig)


def _trial(sweep: Path, num: int, overrides: list[str], history: list[tuple[int, float]]) -> None:
    trial = sweep / str(num)
    (trial / ".hydra").mkdir(parents=True)
    (trial / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
    (trial / ".hydra" / "config.yaml").write_text("{}\n")
    (trial / "metrics.json").write_text(json.dumps({"val/loss": history[-1][1]}))
    (trial / "history.jsonl").write_text("".join(json.dumps({"step": s, "val/loss": v}) + "\n" for s, v in history))


def test_sweep_curves_are_named_by_their_values_on_whole_steps(tmp_path):
    _trial(
        tmp_path, 0, ["hyperparams.lr=0.001", "hyperparams.batch_size=16", "run_id=a"], [(1, 2.0), (2, 1.7), (3, 1.6)]
    )
    _trial(
        tmp_path, 1, ["hyperparams.lr=0.003", "hyperparams.batch_size=8", "run_id=b"], [(1, 1.9), (2, 1.5), (3, 1.4)]
    )
    trials = read_trials(tmp_path)
    fig = curves_figure([(t, val_history(t)) for t in trials], ["hyperparams.lr", "hyperparams.batch_size"], "val/loss")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "#0 lr=0.001, batch_size=16",
        "#1 lr=0.003, batch_size=8",
    ]
    fig.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)  # 1, 2, 3: never 1.5 or 2.25
    pyplot().close(fig)


def test_length_table_keeps_every_header_whole_at_80_columns():
    columns = (
        "split",
        "examples",
        "supervised",
        "p50",
        "p90",
        "p95",
        "p99",
        "max",
        "pad % padded",
        "pad % packed",
        "pad % dataset",
    )
    rows = [[s, "2000", "4000", "57", "71", "74", "79", "86", "21.1", "12.0", "6.6"] for s in ("train", "validation")]
    for width in (80, 200):
        console = Console(width=width, record=True, force_terminal=False)
        console.print(lengths_table("token lengths", columns, rows, console.width))
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= width
        for name in (*columns, "train", "validation"):
            assert name in text, (width, name)
        tall = "│ pad % dataset │" in text  # one figure a row
        assert tall == (width == 80) and ("┃ examples ┃" in text) == (width == 200), width  # wide: one split a row
