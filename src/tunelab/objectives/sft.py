"""Supervised fine-tuning: next-token cross-entropy on the supervised tokens (an answer, or every token of a
`text` dataset), one sequence per example, padded or packed by `tunelab.data.datamodule.Collator`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.config.schema import Packing
from tunelab.data.datamodule import Collator
from tunelab.data.encode import IGNORE
from tunelab.objectives import Forward, Loss
from tunelab.objectives.routing import router_figures


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over supervised positions, number of them), in fp32."""
    # Prompt tuning (PEFT) returns logits for its virtual tokens too, before the input's: keep the input's.
    logits = logits[:, logits.shape[1] - labels.shape[1]:]
    # The labels move one to the left (the last position predicts nothing), not the logits: slicing the
    # logits made a copy of the largest tensor of the step, and its gradient another (1.7 ms of a 170 ms
    # step on the tiny model; batch × length × vocabulary × 4 bytes each way on a real one). Same sum.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE).flatten()
    total = F.cross_entropy(logits.float().flatten(0, 1), targets, ignore_index=IGNORE, reduction="sum")
    return total, (targets != IGNORE).sum()


def router_aux_loss_coef(model: nn.Module) -> float:
    """MoE routers' load-balancing loss weight (Mixtral, Qwen-MoE configs); 0 for dense models."""
    return float(getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0) or 0.0)


class SFT:
    """The token mean of next-token cross-entropy over an optimizer step's supervised tokens (the default)."""

    def collator(self, pad_id: int, with_prompts: bool, pack: Packing | str = Packing.none, max_len: int = 0,
                 task: str | None = None, choices: list[str] | None = None) -> Collator:
        return Collator(pad_id, with_prompts, pack, max_len, task, choices)

    def train_loss(self, module: Forward, batch: dict[str, Any]) -> Loss:
        out = module.forward_batch(batch)
        total, tokens = summed_token_loss(out.logits, batch["labels"])
        figures = router_figures(module.model, out, batch)  # train/router/*: {} for a dense model; no gradient
        aux = getattr(out, "aux_loss", None)  # a per-batch mean, when the model routes tokens to experts
        coef = router_aux_loss_coef(module.model)
        if aux is None or not coef:  # MoT has no auxiliary loss (balanced by construction): coef 0
            return Loss(total, tokens, figures=figures)
        # × tokens: after the division by the effective batch's token count (TuneModule.on_before_optimizer_step)
        # the step's loss gains coef × (token-weighted mean of aux), as the model's own loss would.
        figures["train/aux_loss"] = aux.detach()
        return Loss(total, tokens, regulariser=coef * aux * tokens, figures=figures)

    def eval_loss(self, module: Forward, batch: dict[str, Any]) -> Loss:
        out = module.forward_batch(batch)
        return Loss(*summed_token_loss(out.logits, batch["labels"]))
