"""Training objectives: how encoded examples become a batch, and how loss and figures come from a batch.

An objective is a plain class named by `_target_` in `conf/objective/<name>.yaml` (`objective=sft` is the
default); `train` builds it once and hands it to the datamodule (its `collator`) and to the module. A plain
class, not a dataclass: Hydra merges keyword arguments into the node, which would turn a dataclass into a
config node without its methods. It supplies three methods:

- `collator(pad_id, with_prompts, pack=Packing.none, max_len=0, task=None, choices=None)`: a collate function
  for a DataLoader over the datamodule's encoded examples (lists of them, for `packing: dataset`). Its batch
  (a dict) is what the loss methods receive, plus `pad_fraction` (a float, logged as train/pad_fraction) and,
  for generation-scored validation and test, `prompt_ids`, `prompt_mask` and `references` (see
  `tunelab.data.datamodule.Collator`).
- `train_loss(module, batch) -> Loss` for one training micro-batch, and `eval_loss(module, batch) -> Loss`
  for one validation or test batch (val/loss, test/loss and their ppl are its token mean over the split).
  `module` is the `TuneModule`: `module.forward_batch(batch)` runs the model on a padded, packed or
  flattened batch, `module.model` is the model itself.
- optionally `attach(model)`, called once when the module is built, before any checkpoint is restored (DPO takes
  its frozen reference copy there for full fine-tuning; `tunelab.objectives.reference`).
- optionally `setup(module, stage)`, called from Lightning's setup hook, after the datamodule is set up and before a
  checkpoint is restored (GRPO takes its reference there; DPO with `reference: cached` scores every pair once
  there, `tunelab.objectives.reference_cache`).

The module keeps the normalisation (a `Loss` is a sum; the step divides by the units of the whole effective
batch on every rank), the non-finite check and the logging; it holds no loss formula of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class Loss:
    """One batch's loss as a sum over its units (SFT: supervised tokens), so that the module can take the mean
    over all micro-batches of an optimizer step, not a mean of per-batch means."""

    total: torch.Tensor  # the summed loss; train/loss, val/loss and test/loss are total / units over the step or split
    units: torch.Tensor  # how many units `total` sums over
    regulariser: torch.Tensor | None = None  # added to what backward sees, not to the reported loss; summed alike
    # train_loss: logged on each training step under their full name, e.g. train/aux_loss; eval_loss: batch means
    # averaged over the split weighted by `units`, logged as <prefix>/<name> (val/rewards/margins for DPO's)
    figures: dict[str, torch.Tensor] = field(default_factory=dict)


class Forward(Protocol):
    """What an objective asks of the module: its model, and the model's output on a batch."""

    model: nn.Module

    def forward_batch(self, batch: dict[str, Any]) -> Any: ...


class Objective(Protocol):
    """The seam `TuneModule` and `TuneDataModule` call (this module's docstring)."""

    def collator(self, pad_id: int, with_prompts: bool, pack: Any = ..., max_len: int = ..., task: str | None = ...,
                 choices: list[str] | None = ...) -> Any: ...

    def train_loss(self, module: Forward, batch: dict[str, Any]) -> Loss: ...

    def eval_loss(self, module: Forward, batch: dict[str, Any]) -> Loss: ...
