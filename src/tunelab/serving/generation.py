"""One request's generation: a single prompt through tunelab's one generation loop
(`evaluation.evaluate.generate_tokens`), blocking or streamed into a transformers streamer."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch

from tunelab.evaluation.evaluate import generate_tokens
from tunelab.serving.requests import Served


class Cancelled:
    """A stopping criterion a streaming request sets when its client goes away, so the thread stops early."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def run_generate(served: Served, ids: list[int], settings: Mapping[str, Any], streamer: Any = None,
                 cancelled: Cancelled | None = None) -> tuple[list[int], str]:
    """Generate from `ids` (one sequence); returns (new token ids, finish reason)."""
    from transformers import StoppingCriteriaList

    criteria = StoppingCriteriaList([cancelled]) if cancelled is not None else None
    input_ids = torch.tensor([ids])
    new = generate_tokens(served.model, served.tokenizer, input_ids, torch.ones_like(input_ids), settings, streamer,
                          criteria)[0].tolist()
    stopped = bool(new) and new[-1] == served.tokenizer.eos_token_id
    return new, "stop" if stopped or len(new) < int(settings["max_new_tokens"]) else "length"


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (excluded, as OpenAI does), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)
