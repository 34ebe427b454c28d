"""The one LightningModule: a causal LM (full or with a PEFT adapter) trained on supervised tokens.

Loss normalisation: the loss is the mean over the supervised tokens of the whole effective batch
(all micro-batches of one optimizer step, on all ranks). Lightning divides each micro-batch loss
by `accumulate_grad_batches`, a mean of means (axolotl#1100); so each micro-batch returns its
summed token loss and the gradients are rescaled once per step by accumulate × world / tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from tunelab.data.encode import IGNORE
from tunelab.errors import NumericsError

def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over supervised positions, number of them), in fp32."""
    shift_logits = logits[:, :-1].float().flatten(0, 1)
    shift_labels = labels[:, 1:].flatten()
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return total, (shift_labels != IGNORE).sum()


class TuneModule(pl.LightningModule):
    """Trains `model` on token-normalised loss; scores generated answers with the dataset's metrics."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        warmup_ratio: float = 0.0,
        generation: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Callable[[str, str], float]] | None = None,
        on_nonfinite: str = "stop",
        generate_on_val: bool = True,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.warmup_ratio = warmup_ratio
        self.generation = dict(generation or {})
        self.scorers = dict(metrics or {})
        self.on_nonfinite, self.generate_on_val = on_nonfinite, generate_on_val
        self.eval_prefix = "test"  # `train` sets "baseline/test" to score the untrained model
        self._window_loss = torch.zeros(())
        self._window_tokens = 0
        # One set of running means per stage: a state first touched under the test loop's inference mode
        # cannot be updated later by validation.
        self.running = nn.ModuleDict({
            stage: nn.ModuleDict({"loss": MeanMetric(), **{name: MeanMetric() for name in self.scorers}})
            for stage in ("val", "test")
        })

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss_sum, tokens = summed_token_loss(out.logits, batch["labels"])
        if not torch.isfinite(loss_sum):
            if self.on_nonfinite == "skip":
                self.log("train/nonfinite_skipped", 1.0, reduce_fx="sum", on_step=True)
                return None  # Lightning skips backward and the step for this micro-batch
            raise NumericsError(
                f"non-finite loss ({loss_sum.item()}) at step {self.global_step}, batch {batch_idx}",
                "hyperparams.on_nonfinite=stop",
                "lower hyperparams.lr, check the data, or set hyperparams.on_nonfinite=skip",
            )
        self._window_loss = self._window_loss.to(loss_sum.device) + loss_sum.detach()
        self._window_tokens += int(tokens)
        return loss_sum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        tokens = torch.tensor(float(self._window_tokens), device=self._window_loss.device)
        loss = self._window_loss.clone()
        world = self.trainer.world_size
        if world > 1:
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
            loss = self.trainer.strategy.reduce(loss, reduce_op="sum")
        # Grad now holds Σ_microbatch(summed loss)/accumulate, averaged over ranks by DDP.
        scale = self.trainer.accumulate_grad_batches * world / tokens.clamp(min=1.0)
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale)  # an all-masked window gives 0 grads, never NaN
        self.log("train/loss", loss / tokens.clamp(min=1.0), on_step=True, prog_bar=True)
        self.log("train/supervised_tokens", tokens, on_step=True, reduce_fx="sum")
        self._window_loss = torch.zeros((), device=tokens.device)
        self._window_tokens = 0

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                # Biases and norm gains (1-D) are not decayed: decay pulls them to 0, not to "simple".
                (no_decay if param.ndim < 2 else decay).append(param)
        optimizer = self.optimizer_factory(params=[
            {"params": decay}, {"params": no_decay, "weight_decay": 0.0},
        ])
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(
            optimizer=optimizer, num_warmup_steps=math.ceil(self.warmup_ratio * total), num_training_steps=total
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    # ---- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def generate_answers(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
        """Greedy (or configured) answers to left-padded prompts, decoded without special tokens."""
        settings = {k: v for k, v in self.generation.items() if v is not None}
        if not settings.get("do_sample", False):
            settings.pop("temperature", None), settings.pop("top_p", None), settings.pop("top_k", None)
        out = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, **settings,
        )
        return self.tokenizer.batch_decode(out[:, prompt_ids.shape[1]:], skip_special_tokens=True)

    def _eval_step(self, stage: str, batch: dict[str, Any], score: bool) -> None:
        running = self.running[stage]
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss_sum, tokens = summed_token_loss(out.logits, batch["labels"])
        running["loss"].update(loss_sum / tokens.clamp(min=1), weight=tokens)  # a token mean over the split
        if score and self.scorers and "prompt_ids" in batch:
            answers = self.generate_answers(batch["prompt_ids"], batch["prompt_mask"])
            for name, scorer in self.scorers.items():
                values = torch.tensor([scorer(a, r) for a, r in zip(answers, batch["references"])])
                running[name].update(values.to(self.device))

    def _eval_end(self, stage: str, prefix: str, score: bool) -> None:
        for name, metric in self.running[stage].items():
            if name == "loss" or score:
                value = metric.compute()
                self.log(f"{prefix}/{name}", value)
                if name == "loss":
                    self.log(f"{prefix}/ppl", torch.exp(value.clamp(max=30)))
            metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch, self.generate_on_val)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val", "val", self.generate_on_val)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch, True)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test", self.eval_prefix, True)

    # ---- checkpoints: adapters keep only what trains ----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        if len(trainable) < sum(1 for _ in self.model.parameters()):
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
