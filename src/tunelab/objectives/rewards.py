"""Verifiable rewards for `objective=grpo`, with the scorer signature `(answer, reference) -> float`.

A reward is a scorer like those of `tunelab.evaluation.metrics` (exact match is one), so the same `_target_`
that rewards a sampled answer in training scores a greedy answer through the one scoring path in evaluation:
a dataset lists them under `metrics:` and `tunelab eval` reports each (and `total_reward`, their weighted
sum) with a bootstrap CI.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Reward = Callable[[str, str], float]

_INTEGER = re.compile(r"[+-]?\d+")


def integer_format(answer: str, reference: str) -> float:
    """1.0 when the whole answer is one integer (no words, no second number): the format the task asks for.

    A format reward in TRL's sense (its examples check the completion against a regular expression); it does
    not look at the reference, so it rewards answering in the right shape even when the number is wrong."""
    return float(_INTEGER.fullmatch(answer.strip()) is not None)


def total_reward(answer: str, reference: str, rewards: Mapping[str, Reward],
                 weights: Mapping[str, float] | None = None) -> float:
    """The weighted sum of `rewards` (weight 1.0 unless `weights` names it), as GRPO sums them (TRL's
    `sum_then_normalize`): the mean held-out reward is this, averaged by the one scoring path."""
    weights = weights or {}
    return sum(float(weights.get(name, 1.0)) * float(reward(answer, reference)) for name, reward in rewards.items())
