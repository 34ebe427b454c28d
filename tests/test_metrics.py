"""Scorers of generated answers: exact values on hand-made cases, including the entity listing format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.metrics import entity_f1, exact_match, normalize, parse_entities, token_f1

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
        ("person", "mara quinlan"), ("organisation", "northfield general hospital"), ("location", "averton"),
    ]
    assert parse_entities("person: A B, C D; organisation: none; location: none") == [
        ("person", "a b"), ("person", "c d"),
    ]
    assert parse_entities("person: none; organisation: none; location: none") == []
    assert parse_entities("I do not know") is None


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        (REF, 1.0),
        ("person: mara quinlan ; organisation: Northfield General Hospital; location: Averton.", 1.0),  # normalised
        ("person: Mara Quinlan; organisation: none; location: Averton", 0.8),  # P 2/2, R 2/3
        ("person: Mara Quinlan, Tobias Marsh; organisation: Northfield General Hospital; location: Averton",
         6 / 7),  # P 3/4, R 3/3
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
