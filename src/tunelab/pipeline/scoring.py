"""Scoring one row of a pipeline's matrix: every task's test split the way `tunelab eval` scores it (the same
row loop, the same `prompting` group, `evaluation.score.score_task`), and the probe's held-out perplexity."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.errors import ConfigError
from tunelab.evaluation.evaluate import perplexity
from tunelab.evaluation.prompting import Sample, load_samples
from tunelab.evaluation.score import score_task
from tunelab.pipeline.stages import Plan


@torch.no_grad()
def heldout_loss(model: Any, examples: Sequence[Any], pad_id: int, batch_size: int) -> float:
    """Token-mean loss over supervised tokens of `examples` (the probe's perplexity is its exp)."""
    from tunelab.data.datamodule import Collator
    from tunelab.objectives.sft import summed_token_loss

    device = next(model.parameters()).device
    collate = Collator(pad_id, with_prompts=False)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(list(examples[start:start + batch_size]))
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            loss, count = summed_token_loss(out.logits, batch["labels"].to(device))
            total, tokens = total + float(loss), tokens + int(count)
    finally:
        model.train(was_training)
    return total / max(tokens, 1)


class Scorer:
    """Scores a model on the test split of every task of the pipeline (one row of the matrix) and on the probe.

    Each task is scored by `score_task`, as `tunelab eval` scores it with the same model, prompting, decoding,
    seed and batch size; the samples (formatting only, no tokenizer) are read once for all rows.
    """

    def __init__(self, plan: Plan, scoring: Mapping[str, Any], decoding: Mapping[str, Any], seed: int,
                 max_seq_len: int, prompting: Mapping[str, Any] | None = None, cache_dir: str | None = None) -> None:
        self.plan, self.scoring, self.decoding = plan, dict(scoring), dict(decoding)
        self.seed, self.max_seq_len, self.cache_dir = seed, max_seq_len, cache_dir
        self.prompting = dict(prompting or {"_target_": "tunelab.evaluation.prompting.ZeroShot"})
        self._samples: dict[str, dict[str, list[Sample]]] = {}
        self._probe: dict[str, list[Any]] = {}  # one tokenizer for every stage (checked in the plan)

    @classmethod
    def from_config(cls, cfg: DictConfig, plan: Plan) -> Scorer:
        """The scorer of a pipeline config: its `scoring` and `prompting`, the first stage's decoding and seed."""
        first = plan.configs[0]
        return cls(plan, OmegaConf.to_container(cfg.scoring, resolve=True),
                   OmegaConf.to_container(first.decoding, resolve=True), int(first.hyperparams.seed),
                   int(first.hyperparams.max_seq_len), OmegaConf.to_container(cfg.prompting, resolve=True),
                   str(cfg.paths.cache_dir))

    def _probe_examples(self, spec: Mapping[str, Any], split: str, tokenizer: Any) -> list[Any]:
        from tunelab.data.datamodule import encode_task

        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in self._probe:
            source = spec["source"]
            # Held-out splits only: the loss never needs train (unless a held-out split is carved from it).
            keep = None if source.get("test_size") or source.get("val_size") else {"train": None}
            self._probe[key] = encode_task(spec, tokenizer, self.max_seq_len, self.seed, keep)[0].get(split, [])
        return self._probe[key]

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        device = torch.device("cuda" if self.scoring.get("device") == "auto" and torch.cuda.is_available()
                              else "cpu" if self.scoring.get("device") == "auto" else str(self.scoring["device"]))
        model.to(device)
        limit = self.scoring.get("max_samples") or None
        batch_size = int(self.scoring.get("batch_size") or 32)
        row: dict[str, float] = {}
        for name in self.plan.tasks:
            spec = self.plan.task_specs[name]
            if name not in self._samples:
                self._samples[name] = load_samples(spec, self.seed)
            if not self._samples[name].get("test"):
                raise ConfigError(f"task {name!r} has no test split to score", f"dataset {name}",
                                  "name it in dataset.source.splits or carve it with dataset.source.test_size")
            if not spec.get("metrics"):
                raise ConfigError(f"task {name!r} names no metrics", f"dataset {name}", "give it a metrics: node")
            scored = score_task(model, tokenizer, name, spec, self._samples[name], self.prompting, self.decoding,
                                split="test", seed=self.seed, batch_size=batch_size, max_samples=limit,
                                cache_dir=self.cache_dir)
            row[name] = scored.result.metrics[next(iter(scored.scorers))]
            row.update({f"{name}/{metric}": value for metric, value in scored.result.metrics.items()})
        if self.plan.probe is not None:
            column, spec, split = self.plan.probe
            examples = self._probe_examples(spec, split, tokenizer)[:limit]
            if examples:
                row[column] = float(perplexity(heldout_loss(model, examples, tokenizer.pad_token_id, batch_size)))
        return row


def metric_names(plan: Plan) -> list[str]:
    return [next(iter(plan.task_specs[t].get("metrics") or {"score": None})) for t in plan.tasks]
