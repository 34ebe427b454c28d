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
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum(min(pred.count(t), ref.count(t)) for t in set(pred))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)
