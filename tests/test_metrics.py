"""Scorers of generated answers: exact values on hand-made cases, including the entity listing format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.evaluation.metrics import entity_f1, exact_match, normalize, parse_entities, token_f1

REPO = Path(__file__).resolve().parents[1]
REF = "person: Mara Quinlan; organisation: Northfield General Hospital; location: Averton"


def test_normalize_and_exact_match() -> None:
    assert normalize("  Tetralogy of  Fallot. ") == "tetralogy of fallot"
    assert exact_match("Gastro-oesophageal reflux disease", "gastro oesophageal reflux disease") == 1.0
    assert exact_match("pulmonary embolism", "physical education") == 0.0
    assert exact_match(" 5 ", "5", normalized=False) == 1.0


def test_token_f1_partial_credit() -> None:
    assert token_f1("pulmonary artery", "pulmonary stenosis") == pytest.approx(0.5)
    assert token_f1("left atrium", "left atrium") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "overtime") == 0.0


def test_parse_entities() -> None:
    assert parse_entities(REF) == [
        ("person", "mara quinlan"),
        ("organisation", "northfield general hospital"),
        ("location", "averton"),
    ]
    assert parse_entities("person: A B, C D; organisation: none; location: none") == [
        ("person", "a b"),
        ("person", "c d"),
    ]
    assert parse_entities("person: none; organisation: none; location: none") == []
    assert parse_entities("I do not know") is None


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (REF, 1.0),
        ("person: mara quinlan ; organisation: Northfield General Hospital; location: Averton.", 1.0),  # normalised
        ("person: Mara Quinlan; organisation: none; location: Averton", 0.8),  # P 2/2, R 2/3
        (
            "person: Mara Quinlan, Tobias Marsh; organisation: Northfield General Hospital; location: Averton",
            6 / 7,
        ),  # P 3/4, R 3/3
        ("person: Averton; organisation: Northfield General Hospital; location: Mara Quinlan", 1 / 3),  # wrong types
        ("person: none; organisation: none; location: none", 0.0),
        ("Mara Quinlan", 0.0),  # not a listing
        ("", 0.0),
    ],
)
def test_entity_f1(prediction: str, expected: float) -> None:
    assert entity_f1(prediction, REF) == pytest.approx(expected)


def test_entity_f1_on_entity_free_sentence() -> None:
    empty = "person: none; organisation: none; location: none"
    assert entity_f1(empty, empty) == 1.0
    assert entity_f1("person: none", empty) == 1.0  # listing no entity, even if it names fewer types
    assert entity_f1("person: Mara Quinlan; organisation: none; location: none", empty) == 0.0
    assert entity_f1("nothing here", empty) == 0.0


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_bundled_entity_targets_parse_back_to_their_lists(split: str) -> None:
    rows = [json.loads(line) for line in (REPO / "data" / "entities" / f"{split}.jsonl").open(encoding="utf-8")]
    assert len(rows) == {"train": 1500, "validation": 200, "test": 200}[split]
    for row in rows:
        expected = [(kind, normalize(name)) for kind in ("person", "organisation", "location") for name in row[kind]]
        assert parse_entities(row["entities"]) == expected, row["id"]
        assert entity_f1(row["entities"], row["entities"]) == 1.0


# ---- library metrics, corpus metrics and bootstrap intervals (issue 10) ----------------------------------
def test_library_overlap_metrics_exact_values() -> None:
    from tunelab.evaluation.metrics import bleu, chrf, corpus_bleu, rouge_l

    # LCS "the cat on the mat": 5 of 6 tokens in each, so P = R = F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert rouge_l("twenty mg twice daily", "twenty mg twice daily") == 1.0
    assert rouge_l("nothing alike", "different words") == 0.0
    assert bleu("store at room temperature", "store at room temperature") == pytest.approx(1.0)
    assert chrf("refrigerate", "refrigerate") == pytest.approx(1.0)
    assert 0.0 < chrf("refrigerated", "refrigerate") < 1.0
    # Corpus BLEU pools n-gram counts: not the mean of sentence BLEUs.
    preds, refs = ["a b c d", "x y"], ["a b c d", "x z"]
    assert corpus_bleu(preds, refs) != pytest.approx((bleu(preds[0], refs[0]) + bleu(preds[1], refs[1])) / 2)


def test_macro_f1_weights_classes_equally() -> None:
    from tunelab.evaluation.metrics import macro_f1

    refs = ["positive"] * 8 + ["negative"] * 2
    always_positive = ["positive"] * 10
    # positive: tp 8, fp 2, fn 0 -> F1 16/18; negative: tp 0 -> 0; macro = 8/18, while accuracy is 0.8.
    assert macro_f1(always_positive, refs) == pytest.approx(8 / 18)
    assert macro_f1(refs, refs) == 1.0
    assert macro_f1(["Positive."] + refs[1:], refs) == 1.0  # normalised like exact_match


def test_bootstrap_ci_known_sample() -> None:
    from tunelab.evaluation.metrics import corpus_ci, macro_f1, mean_ci

    half = [1.0] * 50 + [0.0] * 50
    est = mean_ci(half, resamples=2000, seed=0)
    # Binomial: mean 0.5, standard error sqrt(0.25/100) = 0.05, so the 95% interval is about 0.5 +- 0.098.
    assert est.value == 0.5 and est.n == 100
    assert est.low == pytest.approx(0.402, abs=0.015) and est.high == pytest.approx(0.598, abs=0.015)
    assert mean_ci(half, seed=0) == mean_ci(half, seed=0)  # seeded: the same interval every time
    assert mean_ci([1.0] * 30).as_dict() == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 30}
    # A corpus metric resamples (answer, reference) pairs; all-correct stays at 1.0, a mixed sample spreads.
    refs = ["a", "b"] * 20
    assert corpus_ci(macro_f1, refs, refs, resamples=200).low == 1.0
    mixed = corpus_ci(macro_f1, ["a"] * 40, refs, resamples=200)
    assert mixed.low < mixed.value < mixed.high


def test_corpus_ci_fast_path_equals_rescoring_text():
    import functools

    from tunelab.evaluation.metrics import bootstrap_ci, corpus_bleu, corpus_chrf, corpus_ci

    preds = ["250 mg twice daily", "refrigerated", "Corvane Labs", "x y z", "frozen"] * 8
    refs = ["250 mg once daily", "refrigerated", "Astley Pharma", "x y", "frozen"] * 8
    for metric in (corpus_chrf, corpus_bleu):
        fast = corpus_ci(functools.partial(metric), preds, refs, resamples=50)  # as Hydra's _partial_ builds it
        slow = bootstrap_ci(
            len(preds), lambda idx, m=metric: m([preds[i] for i in idx], [refs[i] for i in idx]), resamples=50
        )
        assert fast.value == pytest.approx(slow.value) and fast.low == pytest.approx(slow.low)
        assert fast.high == pytest.approx(slow.high)


def test_macro_f1_bootstrap_from_class_counts_equals_rescoring_text():
    """ClassCounts is macro_f1's fast path: the same interval to the last digit as re-scoring each resample's text,
    also with the metric's own keyword (normalized=false) and when a resample lacks a class."""
    import functools

    from tunelab.evaluation.metrics import bootstrap_ci, corpus_ci, macro_f1

    refs = ["positive"] * 30 + ["negative"] * 8 + ["neutral"] * 2  # a rare class is missing from some resamples
    preds = ["positive"] * 25 + ["Negative."] * 7 + ["I do not know"] * 6 + ["neutral", "positive"]
    for keywords in ({}, {"normalized": False}):
        metric = functools.partial(macro_f1, **keywords)
        fast = corpus_ci(metric, preds, refs, resamples=300)
        slow = bootstrap_ci(
            len(preds), lambda idx, m=metric: m([preds[i] for i in idx], [refs[i] for i in idx]), resamples=300
        )
        assert fast.as_dict() == slow.as_dict()
    assert (
        corpus_ci(macro_f1, preds, refs).value
        != corpus_ci(functools.partial(macro_f1, normalized=False), preds, refs).value
    )  # "Negative." counts only normalised


# ---- the libraries we could have used instead (issue 23): what agrees, and where ours differs on purpose --------
def _reviews(field: str) -> list[str]:
    return [json.loads(line)[field] for line in (REPO / "data" / "reviews" / "test.jsonl").open(encoding="utf-8")]


def test_macro_f1_equals_torchmetrics_multiclass_f1():
    import numpy as np
    import torch
    from torchmetrics.functional.classification import multiclass_f1_score

    from tunelab.evaluation.metrics import macro_f1

    refs, rng = _reviews("sentiment"), np.random.default_rng(0)
    labels = {label: i for i, label in enumerate(sorted(set(refs)))}
    for _ in range(20):
        flip, junk = rng.random(len(refs)) < rng.random(), rng.random(len(refs)) < 0.1
        preds = [
            "no idea" if j else ({"positive": "negative", "negative": "positive"}[r] if f else r)
            for r, f, j in zip(refs, flip, junk, strict=True)
        ]
        # an answer that is no label is one extra class, left out of the average
        encoded = torch.tensor([labels.get(p, len(labels)) for p in preds])
        target = torch.tensor([labels[r] for r in refs])
        library = multiclass_f1_score(encoded, target, num_classes=len(labels) + 1, average="none")[:-1].mean()
        assert macro_f1(preds, refs) == pytest.approx(float(library), abs=1e-6)  # float32 in torchmetrics


def test_exact_match_and_token_f1_against_torchmetrics_squad():
    """Where SQuAD's normalisation and ours agree, torchmetrics' SQuAD scores as ours do; where it drops an article
    or deletes a hyphen, it differs: why ours is kept (metrics.normalize)."""
    from torchmetrics.functional.text import squad

    from tunelab.evaluation.metrics import exact_match, token_f1

    def library(prediction: str, reference: str) -> tuple[float, float]:
        out = squad(
            [{"prediction_text": prediction, "id": "0"}],
            [{"answers": {"answer_start": [0], "text": [reference]}, "id": "0"}],
        )
        return float(out["exact_match"]) / 100, float(out["f1"]) / 100

    titles = [
        t
        for t in _reviews("title")
        if not {"a", "an", "the"} & set(t.lower().split()) and "-" not in t and "'" not in t
    ][:40]
    assert len(titles) == 40
    for reference, prediction in zip(titles, titles[1:] + titles[:1], strict=True):
        for answer in (reference, reference.upper() + "!", prediction, reference.split()[0]):
            assert library(answer, reference) == pytest.approx(
                (exact_match(answer, reference), token_f1(answer, reference)), abs=1e-6
            )
    assert library("rip off", "Complete rip-off") == (0.0, 0.0)  # "ripoff" there: no token in common
    assert token_f1("rip off", "Complete rip-off") == pytest.approx(0.8)
    assert library("Harbourside Clinic", "the Harbourside Clinic")[0] == 1.0
    assert exact_match("Harbourside Clinic", "the Harbourside Clinic") == 0.0


def test_bootstrap_equals_scipy_percentile_bootstrap():
    """Same seed, same draws: scipy.stats.bootstrap(method="percentile") gives our interval to the last digit, for a
    mean and for a corpus metric over resampled indices."""
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy comes with the dev/rag/sweep extras, not the base")
    import numpy as np

    from tunelab.evaluation.metrics import bootstrap_ci, macro_f1, mean_ci

    scores = [float(x) for x in np.random.default_rng(3).random(250) < 0.4]
    for seed in (0, 1):
        ours = mean_ci(scores, resamples=1000, seed=seed)
        theirs = scipy_stats.bootstrap(
            (np.asarray(scores),), np.mean, n_resamples=1000, method="percentile", rng=np.random.default_rng(seed)
        ).confidence_interval
        assert (ours.low, ours.high) == (float(theirs.low), float(theirs.high))
    refs = _reviews("sentiment")[:120]
    preds = refs[:100] + ["positive"] * 20

    def statistic(idx):
        return macro_f1([preds[i] for i in idx], [refs[i] for i in idx])

    ours = bootstrap_ci(len(refs), statistic, resamples=200, seed=0)
    theirs = scipy_stats.bootstrap(
        (np.arange(len(refs)),),
        statistic,
        n_resamples=200,
        vectorized=False,
        method="percentile",
        rng=np.random.default_rng(0),
    ).confidence_interval
    assert ours.low < ours.high and (ours.low, ours.high) == (float(theirs.low), float(theirs.high))
