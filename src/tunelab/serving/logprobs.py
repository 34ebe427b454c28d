"""Log-probabilities of the tokens a request generates (OpenAI's `logprobs`/`top_logprobs`): recorded during
tunelab's one generation loop, per row of a batch, then shaped as OpenAI's chat or legacy completions answer.

A token's logprob is the log-softmax of the logits its step sampled from, at the request's temperature (for greedy,
the raw log-softmax), before top-k/top-p cut the tail (vLLM's default differs: the raw logits, whatever the
temperature); the answer's tokens are the new tokens but a final end of turn, up to the one that completes the
text where a stop string cut it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

LOWEST = -9999.0  # a logprob of -inf (a token sampling cannot draw) as a finite number: JSON has no -inf


@dataclass
class Logprobs:
    """One request's per-token log-probabilities, filled as it generates: for each new token, its logprob and the
    `top` most likely (token id, logprob) pairs of that step."""

    top: int
    tokens: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


class LogprobRecorder:
    """A stopping criterion that never stops, and its logits processor (`processor`), filling each row's `Logprobs`.

    The processor sees the step's logits before sampling's warpers (temperature, top-k, top-p) and keeps their
    log-softmax at the request's temperature (1 for greedy: the raw log-softmax), the distribution sampling draws
    from before top-k/top-p cut its tail. The criterion, called once the step's tokens are appended and before the
    streamer sees them, reads each row's chosen token out of that step. Rows without a `Logprobs` (None) are
    skipped; a row past its end gets padding entries that its length trims away."""

    def __init__(self, rows: Sequence[Logprobs | None], temperature: float) -> None:
        self.rows, self.temperature = list(rows), float(temperature)
        self.top = max((r.top for r in self.rows if r is not None), default=0)
        self.step: torch.Tensor | None = None
        self.processor = _KeepLogSoftmax(self)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.step is not None:
            chosen = self.step.gather(1, input_ids[:, -1:].to(self.step.device)).squeeze(1).tolist()
            values, ids = ([], []) if not self.top else (t.tolist() for t in self.step.topk(self.top, dim=-1))
            for row, sink in enumerate(self.rows):
                if sink is not None:
                    top = list(zip(ids[row][: sink.top], values[row][: sink.top], strict=True)) if sink.top else []
                    sink.tokens.append((chosen[row], top))
            self.step = None
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _KeepLogSoftmax:
    """`LogprobRecorder`'s logits processor: keeps the step's log-softmax, hands the logits on unchanged."""

    def __init__(self, recorder: LogprobRecorder) -> None:
        self.recorder = recorder

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.recorder.step = torch.log_softmax(scores.float() / self.recorder.temperature, dim=-1)
        return scores


def sampling_temperature(model: Any, settings: Mapping[str, Any]) -> float:
    """The temperature sampling divides the logits by: 1 when greedy (the raw distribution)."""
    if not settings.get("do_sample", getattr(getattr(model, "generation_config", None), "do_sample", False)):
        return 1.0
    temperature = settings.get("temperature", getattr(model.generation_config, "temperature", None))
    return float(temperature) if temperature else 1.0


def with_logprobs(
    model: Any, settings: dict[str, Any], rows: Sequence[Logprobs | None], criteria: list[Any]
) -> list[Any]:
    """Adds a `LogprobRecorder` for `rows` to `settings` (as `generate`'s logits processor) and in front of
    `criteria` when any row asks for logprobs; returns the criteria."""
    from transformers import LogitsProcessorList

    if all(row is None for row in rows):
        return criteria
    recorder = LogprobRecorder(rows, sampling_temperature(model, settings))
    settings["logits_processor"] = LogitsProcessorList([recorder.processor])
    return [recorder, *criteria]


def answer_length(tokenizer: Any, new: Sequence[int], text: str, cut: bool) -> int:
    """How many of `new` the answer's logprobs cover: all but a final end of turn, and where a stop string `cut`
    the text, only up to the token that completes the `text` returned."""
    n = len(new) - (1 if new and new[-1] == tokenizer.eos_token_id else 0)
    return min(n, covering(tokenizer, new[:n], len(text))) if cut else n


def covering(tokenizer: Any, ids: Sequence[int], chars: int) -> int:
    """The fewest leading tokens of `ids` whose text is at least `chars` long."""
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(list(ids[:k]), skip_special_tokens=True)) >= chars:
            return k
    return len(ids)


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOWEST


def _token(tokenizer: Any, token_id: int) -> dict[str, Any]:
    text = tokenizer.decode([token_id])
    return {"token": text, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer: Any, ids: Sequence[int], sink: Logprobs, start: int, end: int) -> dict[str, Any]:
    """OpenAI's chat `logprobs` for tokens `start:end` of `ids`: `{"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}]}], "refusal": null}`."""
    content = []
    for token_id, (logprob, top) in zip(ids[start:end], sink.tokens[start:end], strict=True):
        content.append(
            {
                **_token(tokenizer, token_id),
                "logprob": _value(logprob),
                "top_logprobs": [{**_token(tokenizer, t), "logprob": _value(lp)} for t, lp in top],
            }
        )
    return {"content": content, "refusal": None}


def completion_logprobs(
    tokenizer: Any, ids: Sequence[int], sink: Logprobs, start: int, end: int, prompt_chars: int
) -> dict[str, Any]:
    """OpenAI's legacy completions `logprobs` for tokens `start:end` of `ids`: parallel lists `tokens`,
    `token_logprobs`, `top_logprobs` (the top tokens and the chosen one, token -> logprob) and `text_offset`
    (each token's first character, counted from the start of the prompt, as OpenAI counts it)."""
    tokens, logprobs, tops, offsets = [], [], [], []
    for k in range(start, end):
        token = tokenizer.decode([ids[k]])
        logprob, top = sink.tokens[k]
        tokens.append(token)
        logprobs.append(_value(logprob))
        tops.append({**{tokenizer.decode([t]): _value(lp) for t, lp in top}, token: _value(logprob)})
        offsets.append(prompt_chars + len(tokenizer.decode(list(ids[:k]), skip_special_tokens=True)))
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}
