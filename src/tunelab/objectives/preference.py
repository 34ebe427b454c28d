"""Preference objectives on (prompt, chosen, rejected) pairs: DPO (against a reference) and SimPO (reference-free).

A batch of B pairs is 2B padded rows, the chosen replies then the rejected ones (TRL's concatenated layout), so one
forward scores both. The loss is a sum over pairs (`Loss.units` = pairs): the module's step divides by the pairs of
the whole effective batch, so `train/loss` is the mean pair loss, as TRL's `loss` is with one micro-batch per step.
Figures keep TRL's names (`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`,
`logps/chosen`, `logps/rejected`) under `train/`, `val/` and `test/`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.config.schema import Packing
from tunelab.data.datamodule import Collator
from tunelab.data.encode import IGNORE, Encoded
from tunelab.errors import ConfigError, DataError, did_you_mean
from tunelab.objectives import Forward, Loss, reference_cache
from tunelab.objectives.reference import Reference, is_adapter_model, reference_logprobs, sequence_logprobs


class PairCollator:
    """B preference pairs → 2B right-padded rows (chosen then rejected); validation and test batches also carry the
    prompts and chosen replies for generation-scored metrics (Collator's `prompt_ids`, `prompt_mask`, `references`)."""

    def __init__(self, pad_id: int, with_prompts: bool, pack: Packing | str = Packing.none, max_len: int = 0,
                 task: str | None = None, choices: list[str] | None = None) -> None:
        if Packing(pack) is not Packing.none:
            raise ConfigError("a preference objective scores whole chosen and rejected replies; packing is not "
                              "supported", "key hyperparams.packing", "set hyperparams.packing=none")
        self.rows = Collator(pad_id, False)
        self.prompts = Collator(pad_id, with_prompts, task=task, choices=choices) if with_prompts else None

    def __call__(self, items: list[Encoded]) -> dict[str, Any]:
        unpaired = next((item.origin for item in items if item.rejected_ids is None), None)
        if unpaired is not None:
            raise DataError(f"{unpaired}: not a preference pair (no rejected reply)",
                            hint="a preference objective needs dataset/format=preference rows: prompt, chosen, "
                                 "rejected")
        rejected = [Encoded(i.rejected_ids or [], i.rejected_labels or [], None, None, i.origin) for i in items]
        batch = self.rows([*items, *rejected])
        # which pairs these are, for reference log-probs cached before training (DPO's reference: cached); hex
        # strings, which Lightning leaves alone when it moves or measures a batch
        batch["pair_keys"] = [reference_cache.pair_key(item).hex() for item in items]
        if self.prompts is not None:
            extra = self.prompts(items)
            batch.update({k: extra[k] for k in ("prompt_ids", "prompt_mask", "references", "task", "choices")
                          if k in extra})
        return batch


def pair_figures(chosen: torch.Tensor, rejected: torch.Tensor, logps: torch.Tensor, prefix: str) -> dict[str,
                                                                                                        torch.Tensor]:
    """TRL's figures from per-pair rewards (and the policy's sequence log-probs), as batch means."""
    c_logps, r_logps = logps.detach().chunk(2)
    return {f"{prefix}rewards/chosen": chosen.mean(), f"{prefix}rewards/rejected": rejected.mean(),
            f"{prefix}rewards/accuracies": (chosen > rejected).float().mean(),
            f"{prefix}rewards/margins": (chosen - rejected).mean(),
            f"{prefix}logps/chosen": c_logps.mean(), f"{prefix}logps/rejected": r_logps.mean()}


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log σ(logits), or with label smoothing ε the conservative form (cDPO): -(1-ε) log σ(x) - ε log σ(-x)."""
    loss = -F.logsigmoid(logits)
    return loss if not label_smoothing else (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)


class _PairObjective:
    """What DPO and SimPO share: the pair collator, one forward over 2B rows, the figures."""

    average = False  # sequence log-prob: summed (DPO) or the per-token mean (SimPO)

    def collator(self, pad_id: int, with_prompts: bool, pack: Packing | str = Packing.none, max_len: int = 0,
                 task: str | None = None, choices: list[str] | None = None) -> PairCollator:
        return PairCollator(pad_id, with_prompts, pack, max_len, task, choices)

    def attach(self, model: nn.Module) -> None:
        """Called by TuneModule when it is built (before any checkpoint is restored)."""

    def _loss(self, module: Forward, batch: dict[str, Any], prefix: str) -> Loss:
        logits = module.forward_batch(batch).logits
        logps = sequence_logprobs(logits, batch["labels"], self.average)
        losses, chosen, rejected = self.pair_losses(module, batch, logps)
        return Loss(losses.sum(), torch.tensor(losses.numel(), device=losses.device),
                    figures=pair_figures(chosen.detach(), rejected.detach(), logps, prefix))

    def pair_losses(self, module: Forward, batch: dict[str, Any],
                    logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def train_loss(self, module: Forward, batch: dict[str, Any]) -> Loss:
        return self._loss(module, batch, "train/")

    def eval_loss(self, module: Forward, batch: dict[str, Any]) -> Loss:
        return self._loss(module, batch, "")  # the module prefixes val/, test/ or baseline/test/


REFERENCES = ("model", "cached")  # DPO's `reference` choices (README "Preference tuning")


class DPO(_PairObjective):
    """Direct preference optimisation (Rafailov et al. 2023), TRL's `loss_type="sigmoid"`: per pair
    -log σ(β[(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]), rewards β(log π - log π_ref).
    `label_smoothing` ε > 0 gives the conservative form (cDPO) for noisy labels.

    `reference`: `model` runs the reference beside the policy on every step (an adapter method's base with the
    adapter disabled; under full fine-tuning a frozen copy of the starting model); `cached` scores every pair once
    under the starting model before training and keeps the log-probs in the run directory
    (`tunelab.objectives.reference_cache`): no copy in memory and one forward less per step.

    `sft_weight` w > 0 adds w times the chosen replies' token-mean NLL over the batch to each pair's loss (RPO, Pang
    et al. 2024; TRL's `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, w]`, formerly `rpo_alpha`): when chosen
    and rejected differ in a few tokens, plain DPO lowers both replies' likelihood while it widens the margin, and
    the NLL term holds the chosen one up."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, reference: str = "model",
                 sft_weight: float = 0.0) -> None:
        if not beta > 0:
            raise ConfigError(f"beta must be > 0, got {beta}", "key objective.beta", "DPO's usual range is 0.01-0.5")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}",
                              "key objective.label_smoothing", "0 for plain DPO")
        if not 0 <= sft_weight < float("inf"):
            raise ConfigError(f"sft_weight must be >= 0 and finite, got {sft_weight}", "key objective.sft_weight",
                              "0 for plain DPO; RPO's paper uses 1.0")
        if reference not in REFERENCES:
            raise ConfigError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}",
                              "key objective.reference", did_you_mean(str(reference), REFERENCES))
        self.beta, self.label_smoothing, self.sft_weight = float(beta), float(label_smoothing), float(sft_weight)
        self.reference_kind = reference
        self.reference = Reference()
        self.cache: reference_cache.CachedReference | None = None

    def attach(self, model: nn.Module) -> None:
        if self.reference_kind == "model":
            self.reference.attach(model)  # full fine-tuning: a frozen copy now; an adapter model: nothing to copy

    def setup(self, module: Any, stage: str) -> None:
        """`reference: cached`: read or compute the log-probs now, before Lightning restores a checkpoint (the
        model is the starting model) and before the first batch."""
        if self.reference_kind != "cached" or self.cache is not None:
            return
        model = module.model
        starting = Reference() if is_adapter_model(model) else Reference(frozen=model)

        def reference_pass(batch: dict[str, Any]) -> torch.Tensor:
            device = next(model.parameters()).device
            rows = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            was_training = model.training
            model.eval()  # the reference is scored without dropout, as the frozen copy is
            try:
                return reference_logprobs(module, rows["input_ids"], rows["attention_mask"], rows["labels"], starting)
            finally:
                model.train(was_training)

        self.cache = reference_cache.prepare(module, self.collator(module.tokenizer.pad_token_id, False),
                                             reference_pass)

    def pair_losses(self, module: Forward, batch: dict[str, Any],
                    logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.reference_kind == "cached":
            if self.cache is None:
                raise RuntimeError("reference: cached needs its log-probs first: the objective's setup runs in "
                                   "Lightning's fit, validate and test (TuneModule.setup)")
            ref = self.cache.lookup(batch["pair_keys"], logps.device)
        else:
            ref = reference_logprobs(module, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                     self.reference)
        chosen, rejected = (self.beta * (logps - ref)).chunk(2)
        losses = smoothed_sigmoid_loss(chosen - rejected, self.label_smoothing)
        if self.sft_weight:
            # TRL's "sft" term: one token mean over all chosen replies of the micro-batch, added to every pair
            tokens = (batch["labels"][: len(losses), 1:] != IGNORE).sum().clamp(min=1)
            losses = losses + self.sft_weight * -logps[: len(losses)].sum() / tokens
        return losses, chosen, rejected


class SimPO(_PairObjective):
    """SimPO (Meng et al. 2024), reference-free, TRL's CPO trainer with `loss_type="simpo"` and `cpo_alpha=0`: per
    pair -log σ(β(mean log π(c) - mean log π(r)) - γ) over per-token mean log-probs; rewards β · mean log π."""

    average = True

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0) -> None:
        if not beta > 0:
            raise ConfigError(f"beta must be > 0, got {beta}", "key objective.beta", "SimPO's paper uses 2-10")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}",
                              "key objective.label_smoothing", "0 for plain SimPO")
        self.beta, self.gamma, self.label_smoothing = float(beta), float(gamma), float(label_smoothing)

    def pair_losses(self, module: Forward, batch: dict[str, Any],
                    logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen, rejected = (self.beta * logps).chunk(2)
        return smoothed_sigmoid_loss(chosen - rejected - self.gamma, self.label_smoothing), chosen, rejected
