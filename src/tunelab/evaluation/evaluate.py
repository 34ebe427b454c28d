"""The one scoring path: render prompts, generate answers, score them against references.

Plain Python (no Lightning, no Hydra globals). `TuneModule`'s validation and test hooks, `tunelab eval`,
pipelines and the server's consistency checks call these functions, so a number means the same thing
wherever it is reported: the same prompt rendering, the same decoding settings, the same scorers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.errors import ConfigError

Scorer = Callable[[str, str], float]

# Keys of the decoding group that only matter when sampling; greedy decoding drops them so transformers
# does not warn that they are ignored.
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")
# Keys of the decoding group that tunelab reads itself and `model.generate` must not see.
_TUNELAB_ONLY = ("rank_choices",)
MAX_LOG_PPL = 30.0  # exp(30) ≈ 1e13


@dataclass
class EvalItem:
    """One example to answer: its rendered prompt, the expected answer, its task, and what to report with it."""

    prompt_ids: list[int]
    reference: str
    task: str = "data"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Per-example rows and aggregate figures (`<metric>` overall, `<task>/<metric>` per task if several)."""

    rows: list[dict[str, Any]]
    metrics: dict[str, float]


def perplexity(mean_loss: torch.Tensor | float) -> torch.Tensor:
    """The one perplexity: exp of a token-mean loss, capped at exp(30) so a diverged model's figure stays finite in
    tables and loggers (validation, test and a pipeline's probe all report it). `float()` it for a number."""
    loss = mean_loss if isinstance(mean_loss, torch.Tensor) else torch.tensor(float(mean_loss), dtype=torch.float64)
    return torch.exp(loss.clamp(max=MAX_LOG_PPL))


def decoding_settings(decoding: Mapping[str, Any]) -> dict[str, Any]:
    """`model.generate` keyword arguments from the decoding group; greedy drops the sampling-only knobs."""
    settings = {k: v for k, v in decoding.items() if v is not None and k not in _TUNELAB_ONLY}
    if not settings.get("do_sample", False):
        for key in _SAMPLING_ONLY:
            settings.pop(key, None)
    return settings


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask: generation continues every row from its last real token."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def generate_tokens(model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, settings: Mapping[str, Any],
                    streamer: Any = None, stopping_criteria: Any = None, cache: Any = None) -> torch.Tensor:
    """The one generation loop: new token ids (rows, new) continuing left-padded prompts.

    `settings` are `model.generate` keyword arguments (`decoding_settings` of a decoding group, or the server's
    per-request ones). Eval, the module's validation, `tunelab generate` and the server (blocking and streamed:
    `streamer` receives the tokens as they come; `stopping_criteria` lets a client that went away stop it)
    all call this, so one prompt with one setting gives one answer everywhere. `cache`, if given, is a KV cache
    already holding the keys and values of the first `cache.get_seq_length()` columns of `ids` (the server's
    cached prefix, `serving.prefix_cache`): generation computes only the rest.
    """
    device = next(model.parameters()).device
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        # A router's auxiliary loss is a training figure: Mixtral computes it in every decode step when the config
        # asks for router logits, over the whole attention mask but the step's one token, and fails for batches > 1.
        settings = {**settings, "output_router_logits": False}
    if cache is not None:  # transformers 5.25 names it `cache` (`past_key_values` is its deprecated alias)
        settings = {**settings, "cache": cache}
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, streamer=streamer, stopping_criteria=stopping_criteria, **settings,
    )
    return out[:, ids.shape[1]:]


def generate_answers(
    model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, decoding: Mapping[str, Any]
) -> list[str]:
    """Answers to left-padded prompts, decoded without special tokens and stripped."""
    return _generate(model, tokenizer, ids, mask, decoding)[0]


def _generate(model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, decoding: Mapping[str, Any]
              ) -> tuple[list[str], list[int]]:
    """(answers, tokens generated per answer)."""
    new = generate_tokens(model, tokenizer, ids, mask, decoding_settings(decoding))
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)], generated_lengths(
        new, tokenizer.eos_token_id)


def generated_lengths(new: torch.Tensor, eos_id: int | None) -> list[int]:
    """Tokens each row of `generate_tokens`' output generated: up to and including its first end of turn (the
    rest is padding; a row that reached max_new_tokens generated them all)."""
    if eos_id is None:
        return [new.shape[1]] * new.shape[0]
    ended = (new == eos_id).long().cumsum(-1) > 0  # True from the first end of turn on
    return ((~ended).sum(-1) + ended[:, -1].long()).tolist() if new.shape[1] else [0] * new.shape[0]


@torch.no_grad()
def choice_logprobs(
    model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, choices: Sequence[str]
) -> torch.Tensor:
    """(prompts, choices) summed log-probability of each choice's tokens plus end of turn after each prompt.

    Every (prompt, choice) pair is one right-padded row of one forward pass; the prompts come left-padded
    (as generation takes them) and are unpadded here.
    """
    device = next(model.parameters()).device
    options = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in choices]
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
    rows = [(p, o) for p in prompts for o in options]
    width = max(len(p) + len(o) for p, o in rows)
    seq = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(seq)
    target = torch.zeros_like(seq, dtype=torch.bool)  # positions whose token is an answer token
    for r, (p, o) in enumerate(rows):
        seq[r, :len(p) + len(o)] = torch.tensor(p + o)
        attn[r, :len(p) + len(o)] = 1
        target[r, len(p):len(p) + len(o)] = True
    logits = model(input_ids=seq.to(device), attention_mask=attn.to(device)).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, seq[:, 1:, None].to(device))[..., 0]
    return (logprobs * target[:, 1:].to(device)).sum(-1).view(len(prompts), len(options)).cpu()


def rank_choices(
    model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, choices: Sequence[str]
) -> list[str]:
    """For each left-padded prompt, the choice whose tokens (plus end of turn) the model finds most likely.

    Rank classification, as lm-evaluation-harness scores multiple-choice tasks: the summed log-probability of
    each option as the assistant's whole answer, so a model that knows the label but does not follow "answer
    with one word" is still measured.
    """
    return [choices[int(i)] for i in choice_logprobs(model, tokenizer, ids, mask, choices).argmax(-1)]


def answer(
    model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, decoding: Mapping[str, Any],
    choices: Sequence[str] | None = None,
) -> list[str]:
    """Answers to left-padded prompts: generated, or with `decoding.rank_choices` the most likely of `choices`."""
    return answer_with_lengths(model, tokenizer, ids, mask, decoding, choices)[0]


def answer_with_lengths(
    model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, decoding: Mapping[str, Any],
    choices: Sequence[str] | None = None,
) -> tuple[list[str], list[int]]:
    """`answer`'s answers and the tokens each answer adds to the context: those generated up to and including end
    of turn, or with rank classification the chosen label's tokens plus end of turn (what `choice_logprobs` scores).
    With the prompt's tokens, what one answer costs in context window."""
    if decoding.get("rank_choices"):
        if not choices:  # checks.py refuses this config first; a direct caller gets the same message
            raise ConfigError("decoding.rank_choices needs the dataset's choices, and this dataset lists none",
                              "keys decoding.rank_choices and dataset.choices",
                              "list the labels in the dataset config (choices: [positive, negative]), "
                              "or use decoding=greedy")
        chosen = rank_choices(model, tokenizer, ids, mask, choices)
        return chosen, [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in chosen]
    return _generate(model, tokenizer, ids, mask, decoding)


def score_answers(
    answers: Sequence[str], references: Sequence[str], scorers: Mapping[str, Scorer]
) -> dict[str, list[float]]:
    """Each metric's per-example scores."""
    pairs = list(zip(answers, references, strict=True))
    return {name: [float(scorer(a, r)) for a, r in pairs] for name, scorer in scorers.items()}


def aggregate(rows: Sequence[Mapping[str, Any]], metric_names: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Mean of each metric over all rows, and per task when there are several tasks."""
    metrics: dict[str, float] = {}
    by_task: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    names = sorted({n for names in metric_names.values() for n in names})
    for name in names:
        values = [row[name] for row in rows if name in row]
        if values:
            metrics[name] = sum(values) / len(values)
    if len(by_task) > 1:
        for task, task_rows in by_task.items():
            for name in metric_names.get(task, ()):
                metrics[f"{task}/{name}"] = sum(r[name] for r in task_rows) / len(task_rows)
    return metrics


def evaluate(
    model: Any,
    tokenizer: Any,
    items: Sequence[EvalItem],
    scorers: Mapping[str, Mapping[str, Scorer]],
    decoding: Mapping[str, Any],
    batch_size: int = 32,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> EvalResult:
    """Answer every item (batched, greedy unless decoding samples) and score it with its task's scorers.

    Each batch holds items of one task of similar prompt lengths: a task's items sorted by prompt length (stably,
    so the batches depend only on the task's items, not on how tasks interleave) cut into `batch_size` rows. A
    left-padded batch pays for its longest prompt in every row; sorted, it pays little padding (bench/serve.py's
    eval rows). The rows come back in the items' order.
    """
    was_training = model.training
    model.eval()
    by_task: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_task.setdefault(item.task, []).append(i)
    batches = []
    for indices in by_task.values():
        indices.sort(key=lambda i: len(items[i].prompt_ids))  # stable: equal lengths keep the items' order
        batches += [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    placed: list[dict[str, Any] | None] = [None] * len(items)
    try:
        for batch in batches:
            group = [items[i] for i in batch]
            task = group[0].task
            ids, mask = left_pad([item.prompt_ids for item in group], tokenizer.pad_token_id)
            began = time.perf_counter()
            answers, lengths = answer_with_lengths(model, tokenizer, ids, mask, decoding, (choices or {}).get(task))
            latency = (time.perf_counter() - began) / len(group)  # per answer, batched
            scores = score_answers(answers, [item.reference for item in group], scorers.get(task, {}))
            for row, (i, item, text) in enumerate(zip(batch, group, answers, strict=True)):
                placed[i] = {**item.meta, "task": item.task, "reference": item.reference, "answer": text,
                             "prompt_tokens": len(item.prompt_ids), "answer_tokens": lengths[row],
                             "latency_s": latency, **{name: values[row] for name, values in scores.items()}}
    finally:
        model.train(was_training)
    rows = [row for row in placed if row is not None]
    return EvalResult(rows, aggregate(rows, {task: list(s) for task, s in scorers.items()}))
