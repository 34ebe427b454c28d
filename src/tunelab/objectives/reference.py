"""Log-probabilities of supervised tokens, under the model being trained and under its reference.

The reference of a preference or RL objective (DPO's π_ref, GRPO's KL anchor) is the model as training found it:
- with an adapter method (LoRA, DoRA, IA3...), the same model with its adapters disabled (peft's
  `disable_adapter()`): no second copy in memory; a run that continues an earlier adapter (adapter_carry=continue)
  would get the base without it, so pipelines merge the earlier stage first (adapter_carry=merge);
- with full fine-tuning or a partly frozen model, a frozen copy taken when the objective is attached to the module
  (`Reference.attach`, before Lightning restores a checkpoint, so a resumed run copies the same starting weights
  again), kept off the module's parameters: it is neither trained, nor saved in checkpoints, nor counted.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.encode import IGNORE


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label_t | tokens before t) in fp32, the supervised mask), both [batch, length - 1]; 0 where unsupervised.

    Position t of the result scores token t + 1 (labels move one left), as TRL's per-token log-probs do."""
    logits = logits[:, logits.shape[1] - labels.shape[1]:]  # prompt tuning prepends virtual tokens' logits
    targets = labels[:, 1:]
    mask = targets != IGNORE
    # -cross_entropy is log_softmax gathered at the target without a [batch, length, vocab] log-prob tensor.
    logps = -F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                             reduction="none").view_as(targets)
    return logps, mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Each row's summed (or, `average`, per-token mean) log-probability of its supervised tokens, fp32 [batch]."""
    logps, mask = token_logprobs(logits, labels)
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def is_adapter_model(model: nn.Module) -> bool:
    """A peft model with adapters that can be switched off (the reference is then the base, no copy)."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


class Reference:
    """The frozen reference of one training run (module docstring): `attach(model)` once, `model(...)` in a
    `with reference.active(model)` block."""

    def __init__(self, frozen: nn.Module | None = None) -> None:
        # a list: an nn.Module attribute of a module would join its state_dict. `frozen`: a copy already taken.
        self._copy: list[nn.Module] = [frozen] if frozen is not None else []

    def attach(self, model: nn.Module) -> None:
        # A deep copy: a forward patched on the instance by a closure over the original model (TRL's fused LM head)
        # would still run the original's weights, so attach before anything patches the model.
        if not is_adapter_model(model) and not self._copy:
            self._copy.append(copy.deepcopy(model).eval().requires_grad_(False))

    @property
    def copied(self) -> bool:
        return bool(self._copy)

    @property
    def module(self) -> nn.Module | None:
        """The frozen copy (full fine-tuning), None for an adapter model's reference (the base itself)."""
        return self._copy[0] if self._copy else None

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model to run as the reference, in inference mode and without gradients."""
        with torch.no_grad():
            if self._copy:
                ref = self._copy[0]
                device = next(model.parameters()).device
                if next(ref.parameters()).device != device:
                    self._copy[0] = ref = ref.to(device)
                yield ref
                return
            if not is_adapter_model(model):
                raise RuntimeError("the reference was not attached: call Reference.attach(model) before training")
            was_training = model.training
            model.eval()  # no adapter dropout in the reference pass (the base has none anyway)
            try:
                with model.disable_adapter():
                    yield model
            finally:
                model.train(was_training)


def reference_logprobs(module: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                       reference: Reference | None = None, per_token: bool = False,
                       average: bool = False) -> torch.Tensor:
    """Log-probabilities of `labels`' supervised tokens under the reference of `module.model` (no gradient).

    `module` is the TuneModule (or anything with `.model`); `reference` is the run's `Reference` (None: the model
    must be a peft model, whose adapters are disabled). Returns per row the summed log-prob [batch] (`average`: the
    per-token mean), or with `per_token` the [batch, length - 1] per-token log-probs (0 where unsupervised; position
    t scores token t + 1), as `token_logprobs` gives for the policy."""
    reference = reference or Reference()
    with reference.active(module.model) as model:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if per_token:
        return token_logprobs(logits, labels)[0]
    return sequence_logprobs(logits, labels, average)
