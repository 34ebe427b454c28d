"""The forgetting figures against hand-computed examples (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018)."""

from __future__ import annotations

import csv
import json

import pytest

from tunelab.pipeline import forgetting as fg

# R[i][j]: score on task j after stage i; task j is trained at stage j.
R = [[0.6, 0.1, 0.2],
     [0.9, 0.8, 0.3],
     [0.5, 0.7, 0.95]]
BASELINE = [0.1, 0.05, 0.0]
INTRO = [0, 1, 2]


def test_average_accuracy_is_the_mean_of_the_last_row():
    assert fg.average_accuracy(R, INTRO) == pytest.approx((0.5 + 0.7 + 0.95) / 3)


def test_backward_transfer_uses_the_score_just_after_learning():
    # Lopez-Paz & Ranzato: 1/(T-1) sum_{i<T} R[T,i] - R[i,i] = ((0.5 - 0.6) + (0.7 - 0.8)) / 2
    assert fg.backward_transfer(R, INTRO) == pytest.approx(-0.1)


def test_forgetting_uses_the_best_earlier_score():
    # Chaudhry et al.: task 0 peaked at 0.9 after stage 1 (not 0.6 when learned): 0.9 - 0.5; task 1: 0.8 - 0.7
    assert fg.task_forgetting(R, INTRO) == pytest.approx([0.4, 0.1, None])
    assert fg.average_forgetting(R, INTRO) == pytest.approx(0.25)  # BWT says -0.1: the definitions differ here


def test_forgetting_ignores_scores_before_the_task_was_learned():
    # Task 1 scores 0.85 at stage 0, before its own stage: not a memory that could be forgotten.
    high_before = [[0.6, 0.85, 0.2], [0.9, 0.8, 0.3], [0.5, 0.7, 0.95]]
    assert fg.task_forgetting(high_before, INTRO)[1] == pytest.approx(0.1)


def test_forward_transfer_against_the_baseline_row():
    # 1/(T-1) sum_{i>0} R[i-1,i] - b_i = ((0.1 - 0.05) + (0.3 - 0.0)) / 2
    assert fg.forward_transfer(R, BASELINE, INTRO) == pytest.approx(0.175)


def test_a_partial_matrix_gives_the_figures_at_its_last_stage():
    partial = R[:2]
    assert fg.average_accuracy(partial, INTRO) == pytest.approx((0.9 + 0.8) / 2)  # tasks seen so far
    assert fg.backward_transfer(partial, INTRO) == pytest.approx(0.3)  # 0.9 - 0.6: positive transfer
    assert fg.average_forgetting(partial, INTRO) == pytest.approx(-0.3)  # 0.6 - 0.9: improved, negative
    assert fg.forward_transfer(partial, BASELINE, INTRO) == pytest.approx(0.05)


def test_one_stage_for_every_task_has_nothing_to_forget():
    one = [[0.7, 0.9]]
    summary = fg.summarize(one, [0.0, 0.0], [0, 0])
    assert summary["acc"] == pytest.approx(0.8)
    assert summary["bwt"] is None and summary["forgetting"] is None and summary["fwt"] is None


def test_matrix_files_and_comparison(tmp_path):
    rows = [("baseline", {"a": 0.0, "b": 0.1, "a/validation/ppl": 900.0}),
            ("s1", {"a": 0.9, "b": 0.2, "a/validation/ppl": 3.0}),
            ("s2", {"a": 0.4, "b": 0.8, "a/validation/ppl": 9.0})]
    summary = {"pipeline": "p", "strategy": "sequential", "stages_total": 2,
               **fg.summarize([[0.9, 0.2], [0.4, 0.8]], [0.0, 0.1], [0, 1]), "probe_change": 9.0 - 900.0}
    fg.write_matrix(tmp_path / "0", ["a", "b"], ["accuracy", "f1"], rows, "a/validation/ppl", summary)
    with (tmp_path / "0" / "matrix.csv").open() as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["row", "a/accuracy", "b/f1", "a/validation/ppl"]
    assert [r[0] for r in table[1:]] == ["baseline", "s1", "s2"] and float(table[3][1]) == 0.4
    assert json.loads((tmp_path / "0" / "summary.json").read_text())["bwt"] == pytest.approx(-0.5)
    fg.heatmap(tmp_path / "0" / "heatmap.png", ["a", "b"], rows, "t")
    assert (tmp_path / "0" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "summary.json").write_text(json.dumps({**summary, "strategy": "replay", "bwt": -0.1}))
    written = fg.compare(tmp_path)
    assert [p.name for p in written] == ["comparison.csv", "comparison.md", "comparison.png"]
    md = (tmp_path / "comparison.md").read_text()
    assert "| sequential | 2/2 | 0.6000 | -0.5000 | 0.5000 |" in md and "| replay |" in md
