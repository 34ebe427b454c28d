"""Scoring a model on one task's held-out split: `tunelab eval`'s core, and what a pipeline scores each row with.

samples (the one row loop, `prompting.load_samples`) → prompts (the `prompting` group: zero_shot, few_shot,
retrieval) → answers and scores (`evaluate.evaluate`). `tunelab eval`, `tunelab compare` (through eval) and
`tunelab pipeline` all call `score_task`, so a model scored on a task by any of them gets the same number.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config.build import build
from tunelab.data.encode import prompt_ids
from tunelab.errors import ConfigError
from tunelab.evaluation.evaluate import EvalItem, EvalResult, evaluate
from tunelab.evaluation.prompting import Sample, Setting

log = logging.getLogger(__name__)

def prompt_budget(model: Any, decoding: Mapping[str, Any], max_prompt_tokens: int | None = None) -> int:
    """Tokens a prompt may take: `max_prompt_tokens`, else the model's context less the answer budget."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
    return int(max_prompt_tokens or context - int(decoding.get("max_new_tokens", 64)))


@dataclass
class TaskScore:
    """One task's answered rows and aggregates, the scorers they were scored with, and the prompting note."""

    result: EvalResult
    scorers: dict[str, Any]
    corpus: dict[str, Any]
    note: str | None = None


def score_task(model: Any, tokenizer: Any, name: str, task: Mapping[str, Any], samples: Mapping[str, list[Sample]],
               prompting: Any, decoding: Mapping[str, Any], *, split: str = "test", seed: int = 0,
               budget: int | None = None, batch_size: int = 32, max_samples: int | None = None,
               cache_dir: str | Path | None = None, slice_by: Sequence[str] = ()) -> TaskScore:
    """Answer and score the first `max_samples` of `samples[split]` (all when None), prompted by the `prompting`
    config node (built with a `Setting` over the train split), with the task's `metrics` and `corpus_metrics`."""
    if split not in samples:
        raise ConfigError(f"dataset {name!r} has no {split} split", "key split", f"splits: {', '.join(samples)}")
    held_out = samples[split][: max_samples or None]
    if task.get("max_new_tokens"):  # the task's own answer budget (dataset.max_new_tokens)
        decoding = {**decoding, "max_new_tokens": int(task["max_new_tokens"])}
    budget = budget if budget is not None else prompt_budget(model, decoding)
    setting = Setting(tokenizer, samples.get("train", []), budget, Path(cache_dir) if cache_dir else None, seed,
                      prompt_ids)
    strategy = build(prompting, setting=setting)
    items = [_item(strategy(sample), sample, name, tokenizer, slice_by) for sample in held_out]
    summary = getattr(strategy, "summary", None)
    note = f"{name}: {summary()}" if summary and summary() else None
    if note:
        log.warning(note)
    scorers = build(dict(task.get("metrics") or {}), _convert_="all")
    corpus = build(dict(task.get("corpus_metrics") or {}), _convert_="all")
    began = time.perf_counter()
    result = evaluate(model, tokenizer, items, {name: scorers}, decoding, batch_size, {name: task.get("choices") or []})
    log.info("%s: %d answers in %.1f s", name, len(items), time.perf_counter() - began)
    return TaskScore(result, scorers, corpus, note)


def _item(prompt: Any, sample: Sample, task: str, tokenizer: Any, slice_by: Sequence[str]) -> EvalItem:
    meta = {"id": sample.fields.get("id", sample.example.origin), "origin": sample.example.origin,
            "prompt": tokenizer.decode(prompt.ids), **prompt.meta}
    meta.update({field: sample.fields[field] for field in slice_by if field in sample.fields})
    return EvalItem(prompt.ids, sample.example.reference or "", task, meta)
