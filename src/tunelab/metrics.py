"""Scorers of generated answers against references: each returns 1.0 or 0.0 (or a fraction) per example."""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace (SQuAD-style normalisation)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str, normalized: bool = True) -> float:
    """1.0 when the answer equals the reference (after normalisation by default); for labels this is accuracy."""
    if normalized:
        return float(normalize(prediction) == normalize(reference))
    return float(prediction.strip() == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 between answer and reference (SQuAD's F1), for free-form answers."""
    return _f1(normalize(prediction).split(), normalize(reference).split())


def _f1(pred: list, ref: list) -> float:
    """F1 of two multisets; two empty ones agree perfectly."""
    if not pred or not ref:
        return float(pred == ref)
    common = sum(min(pred.count(t), ref.count(t)) for t in set(pred))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)



def parse_entities(text: str) -> list[tuple[str, str]] | None:
    """`person: A, B; organisation: C; location: none` as [(type, entity), ...], both normalised.

    `none` entries are dropped and segments without a `type:` prefix skipped, so a half-right answer
    keeps its credit; None when no segment has the format at all (the answer is not a listing).
    """
    pairs, listed = [], False
    for segment in text.split(";"):
        kind, sep, names = segment.partition(":")
        kind = normalize(kind)
        if not sep or not kind:
            continue
        listed = True
        for name in names.split(","):
            name = normalize(name)
            if name and name != "none":
                pairs.append((kind, name))
    return pairs if listed else None


def entity_f1(prediction: str, reference: str) -> float:
    """F1 over (type, entity) pairs of the `type: a, b; type: c` format, per example.

    Both listing no entity scores 1.0; an answer that is not a listing scores 0.0 even there, so
    an empty or rambling answer cannot earn credit on entity-free sentences.
    """
    pred, ref = parse_entities(prediction), parse_entities(reference) or []
    return 0.0 if pred is None else _f1(pred, ref)
