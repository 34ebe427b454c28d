"""Packing: several examples share one row without seeing each other.

Restarting position ids alone does not isolate examples under `sdpa` or `eager` attention (measured:
logits off by 0.39 on a tiny Llama; see shared/PITFALLS.md). Each packed row therefore gets a
block-diagonal causal mask, passed as a 4D additive float mask, which both kernels honour
(difference to separate forward passes ~6e-7), plus position ids that restart per example.
"""

from __future__ import annotations

import torch


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to at most `capacity` (first-fit decreasing)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask from segment ids (B, L): 0 where a token may attend, dtype-min elsewhere.

    Padding has segment id -1 and attends only to itself, so no softmax row is empty (no NaN).
    """
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    allowed = (same & causal) | torch.eye(length, dtype=torch.bool, device=segments.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
