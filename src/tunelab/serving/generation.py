"""One request's generation: a single prompt through tunelab's one generation loop
(`evaluation.evaluate.generate_tokens`), blocking or streamed into a transformers streamer; `Sequential` runs each
request in its own thread (`serve.batching=false`), `batching.Batcher` groups concurrent ones into one call."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from typing import Any

import torch

from tunelab.evaluation.evaluate import generate_tokens
from tunelab.serving.requests import Served

_SEED_LOCK = threading.Lock()  # torch's global RNG is one per process: one seeded generation at a time


class Cancelled:
    """A stopping criterion a streaming request sets when its client goes away, so the thread stops early."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def seeded(settings: dict[str, Any]) -> Iterator[None]:
    """Pops a request's `seed` (not a `generate` keyword) and, if there was one, seeds torch's RNG for the
    generation inside, holding a lock so no other seeded generation draws from it meanwhile."""
    seed = settings.pop("seed", None)
    if seed is None:
        yield
        return
    with _SEED_LOCK:
        torch.manual_seed(int(seed))
        yield


def finish_reason(new: list[int], eos: int, max_new_tokens: int) -> str:
    """OpenAI's finish reason: "stop" at end of turn (or before the limit), "length" at the limit."""
    stopped = bool(new) and new[-1] == eos
    return "stop" if stopped or len(new) < max_new_tokens else "length"


def run_generate(served: Served, ids: list[int], settings: Mapping[str, Any], streamer: Any = None,
                 cancelled: Cancelled | None = None) -> tuple[list[int], str]:
    """Generate from `ids` (one sequence); returns (new token ids, finish reason)."""
    from transformers import StoppingCriteriaList

    criteria = StoppingCriteriaList([cancelled]) if cancelled is not None else None
    input_ids = torch.tensor([ids])
    settings = dict(settings)
    with seeded(settings):
        new = generate_tokens(served.model, served.tokenizer, input_ids, torch.ones_like(input_ids), settings,
                              streamer, criteria)[0].tolist()
    return new, finish_reason(new, served.tokenizer.eos_token_id, int(settings["max_new_tokens"]))


class Sequential:
    """Each request generates in a thread of its own (`serve.batching=false`): concurrent requests share the
    cores, not the forward passes."""

    def __init__(self, served: Served) -> None:
        self.served = served

    def submit(self, ids: list[int], settings: Mapping[str, Any], streamer: Any = None,
               cancelled: Cancelled | None = None) -> Future:
        future: Future = Future()

        def work() -> None:
            try:
                result = run_generate(self.served, ids, settings, streamer, cancelled)
            except BaseException as err:  # noqa: BLE001 - handed to whoever awaits the future
                if streamer is not None:
                    streamer.end()
                if not future.cancelled():
                    future.set_exception(err)
                return
            if not future.cancelled():  # a request whose client went away cancels its future
                future.set_result(result)

        threading.Thread(target=work, daemon=True).start()
        return future


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (excluded, as OpenAI does), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)
