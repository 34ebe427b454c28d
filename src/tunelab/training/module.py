"""The one LightningModule: a causal LM (full or with a PEFT adapter) trained on what its objective computes.

The loss itself comes from the objective (`tunelab.objectives`, SFT by default) as a sum over units (tokens).
Loss normalisation: the loss is the mean over the units of the whole effective batch (all micro-batches of
one optimizer step, on all ranks). Lightning divides each micro-batch loss by `accumulate_grad_batches`, a mean
of means (axolotl#1100); so each micro-batch returns its summed loss and the gradients are rescaled once per
step by accumulate × world / units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType
from torch import nn
from torchmetrics import MeanMetric

from tunelab import libraries
from tunelab.config.schema import OnNonFinite
from tunelab.data.packing import VARLEN_KEYS, block_causal_mask, flatten_rows, uses_flash_attention
from tunelab.errors import NumericsError
from tunelab.evaluation.evaluate import answer, perplexity, score_answers
from tunelab.objectives import Objective
from tunelab.objectives.sft import SFT


class TuneModule(pl.LightningModule):
    """Trains `model` on its objective's token-normalised loss; scores generated answers with the dataset's metrics."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        warmup_ratio: float = 0.0,
        generation: Mapping[str, Any] | None = None,
        tasks: Mapping[str, Mapping[str, Callable[[str, str], float]]] | None = None,
        on_nonfinite: str = "stop",
        generate_on_val: bool = True,
        objective: Objective | None = None,
        answer_tokens: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.objective: Objective = objective if objective is not None else SFT()  # conf/objective/
        attach = getattr(self.objective, "attach", None)
        if attach is not None:  # e.g. DPO's frozen reference copy: taken now, before a checkpoint is restored
            attach(model)
        # from_pretrained returns a model in eval mode, and Lightning (>= 2.2) keeps each submodule's mode as it finds
        # it ("Found N module(s) in eval mode at the start of training"): without this, a pretrained model trained
        # with its dropout off, and a mixture-of-tokens model fine-tuned routing sparsely instead of mixing.
        model.train()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.warmup_ratio = warmup_ratio
        self.generation = dict(generation or {})
        # task -> its own max_new_tokens (dataset.max_new_tokens), for tasks whose answers outrun the decoding's
        self.task_generation = {task: {**self.generation, "max_new_tokens": n} for task, n in
                                (answer_tokens or {}).items()}
        # task -> metric name -> scorer(answer, reference); one task unless the dataset is a mixture
        self.tasks = {name: dict(scorers) for name, scorers in (tasks or {"data": {}}).items()}
        self.scorers = {n: s for scorers in self.tasks.values() for n, s in scorers.items()}
        self.on_nonfinite, self.generate_on_val = on_nonfinite, generate_on_val
        self.eval_prefix = "test"  # `train` sets "baseline/test" to score the untrained model
        # Checkpoints of adapter/partly frozen runs hold only what trains (on_save_checkpoint): resume loads
        # them non-strictly, the frozen rest being rebuilt from the model config and seed.
        self.strict_loading = all(p.requires_grad for p in model.parameters())
        self._window_loss = torch.zeros(())
        self._window_tokens = 0
        self._window_pad, self._window_batches = 0.0, 0
        self._total_steps = 0  # set by configure_optimizers; until then every step logs
        # One set of running means per stage: a state first touched under the test loop's inference mode
        # cannot be updated later by validation.
        # Per-task means only for mixtures: metric names are `val/<task>/<metric>` and overall `val/<metric>`.
        groups = {"overall": self.scorers, **(self.tasks if len(self.tasks) > 1 else {})}
        # The objective's own eval figures (DPO's rewards/...): a unit-weighted mean over the split, created on first
        # sight; a plain dict, so they stay out of the module's state_dict and checkpoints.
        self.figure_means: dict[str, dict[str, MeanMetric]] = {"val": {}, "test": {}}
        self.running = nn.ModuleDict({
            stage: nn.ModuleDict({
                group: nn.ModuleDict({"loss": MeanMetric(), **{name: MeanMetric() for name in scorers}})
                for group, scorers in groups.items()
            })
            for stage in ("val", "test")
        })

    def setup(self, stage: str) -> None:
        # An objective that compares with the starting model (GRPO's KL to a frozen copy) takes it here: Lightning
        # calls setup before it restores a checkpoint, so a resumed run's reference is the starting model too.
        prepare = getattr(self.objective, "setup", None)
        if prepare is not None:
            prepare(self, stage)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # FlashAttention kernels take a packed batch padding-free: one row of real tokens, boundaries as
        # cu_seq_lens. sdpa/eager keep the 4D block mask (restarting position ids alone leak: PITFALLS).
        if isinstance(batch, dict) and "segment_ids" in batch and uses_flash_attention(self.model):
            return flatten_rows(batch)
        return batch

    def forward_batch(self, batch: dict[str, Any]) -> Any:
        """The model's output on a padded batch, or on a packed one (block-diagonal mask, restarted positions;
        or, flattened for a FlashAttention kernel, example boundaries and restarted positions).

        No KV cache: a loss needs none, and building one per forward made torch.compile recompile each block
        once per layer (its guards test each layer's cache) until it gave up and ran eagerly."""
        if "cu_seq_lens_q" in batch:
            return self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                              **{key: batch[key] for key in VARLEN_KEYS})
        if "segment_ids" in batch:
            dtype = next(self.model.parameters()).dtype
            mask = block_causal_mask(batch["segment_ids"], dtype if dtype.is_floating_point else torch.float32)
            return self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                              use_cache=False)
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss = self.objective.train_loss(self, batch)
        self._window_pad += float(batch["pad_fraction"])
        self._window_batches += 1
        if not torch.isfinite(loss.total):
            if OnNonFinite(self.on_nonfinite) is OnNonFinite.skip:
                self.log("train/nonfinite_skipped", 1.0, reduce_fx="sum", on_step=True)
                return None  # Lightning skips backward and the step for this micro-batch
            raise NumericsError(
                f"non-finite loss ({loss.total.item()}) at step {self.global_step}, batch {batch_idx}",
                "hyperparams.on_nonfinite=stop",
                "lower hyperparams.lr, check the data, or set hyperparams.on_nonfinite=skip",
            )
        self._window_loss = self._window_loss.to(loss.total.device) + loss.total.detach()
        self._window_tokens += int(loss.units)
        if loss.figures and (self._trainer is None or self._logs_this_step()):  # ~0.8 ms a log: only when kept
            for name, value in loss.figures.items():
                self.log(name, value, on_step=True)
        loss_sum = loss.total if loss.regulariser is None else loss.total + loss.regulariser
        trainer = self._trainer  # None when a test calls the step without a Trainer
        if trainer is not None and trainer.strategy.handles_gradient_accumulation:
            # DeepSpeed keeps the gradients in its own buffers (param.grad is empty in on_before_optimizer_step), so
            # normalise before backward: by this micro-batch's supervised tokens on all ranks, which is the step's
            # token mean since checks.check_strategy holds DeepSpeed runs to one micro-batch per step.
            everywhere = trainer.strategy.reduce(loss.units.float(), reduce_op="sum")
            return loss_sum * trainer.world_size / everywhere.clamp(min=1.0)
        return loss_sum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        tokens = torch.tensor(float(self._window_tokens), device=self._window_loss.device)
        world = self.trainer.world_size
        totals = torch.stack([self._window_loss.to(tokens.dtype), tokens])
        if world > 1:  # one all-reduce for both, on every rank every step (a rank-dependent skip could hang)
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss, tokens = totals[0], totals[1]
        # Grad now holds Σ_microbatch(summed loss)/accumulate, averaged over ranks by DDP.
        scale = self.trainer.accumulate_grad_batches * world / tokens.clamp(min=1.0)
        for group in [] if self.trainer.strategy.handles_gradient_accumulation else optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale)  # an all-masked window gives 0 grads, never NaN
        if self._logs_this_step():
            self.log("train/loss", loss / tokens.clamp(min=1.0), on_step=True, prog_bar=True)
            self.log("train/supervised_tokens", tokens, on_step=True, reduce_fx="sum")
            self.log("train/pad_fraction", self._window_pad / max(self._window_batches, 1), on_step=True)
        self._window_loss = torch.zeros((), device=tokens.device)
        self._window_tokens = 0
        self._window_pad, self._window_batches = 0.0, 0

    def _logs_this_step(self) -> bool:
        """Whether this optimizer step's figures reach a logger (every trainer.log_every_n_steps, as Lightning's
        own LR monitor asks) or the run's final metrics (the last step). Each `self.log` costs ~0.8 ms of
        Lightning bookkeeping (cProfile); three a step, thrown away on 9 steps of 10, were tunelab's per-step
        overhead over HF Trainer (bench/overhead.py)."""
        trainer = self.trainer
        return libraries.should_update_logs(trainer) or trainer.global_step + 1 >= self._total_steps

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        from tunelab.models.sharding import clip_gradients

        # FSDP shards the gradients: the global norm needs FSDP's own method (Lightning refuses norm clipping there).
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and clip_gradients(self.trainer,
                                                                                             gradient_clip_val):
            return
        plugin = self.trainer.precision_plugin
        if (gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None
                and getattr(optimizer, "_step_supports_amp_scaling", False)):
            # Lightning refuses to clip for an optimizer that could unscale fp16 gradients itself (fused AdamW)
            # under any mixed precision, bf16 too, where there is no scaler and clipping is plain clipping.
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val,
                                     GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                # Biases and norm gains (1-D) are not decayed: decay pulls them to 0, not to "simple".
                (no_decay if param.ndim < 2 else decay).append(param)
        optimizer = self.optimizer_factory(params=[
            {"params": decay}, {"params": no_decay, "weight_decay": 0.0},
        ])
        total = self._total_steps = int(self.trainer.estimated_stepping_batches)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(
            optimizer=optimizer, num_warmup_steps=math.ceil(self.warmup_ratio * total), num_training_steps=total
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    # ---- evaluation: the loss from the objective, answers and scores through tunelab.evaluation.evaluate --
    def _eval_step(self, stage: str, batch: dict[str, Any], score: bool) -> None:
        task = batch.get("task", next(iter(self.tasks)))
        groups = [self.running[stage]["overall"]] + ([self.running[stage][task]] if task in self.running[stage] else [])
        loss = self.objective.eval_loss(self, batch)
        for running in groups:  # token means over the whole split, not means of batch means
            running["loss"].update(loss.total / loss.units.clamp(min=1), weight=loss.units)
        for name, value in loss.figures.items():
            means = self.figure_means[stage]
            if name not in means:
                means[name] = MeanMetric().to(self.device)
            means[name].update(value.detach().float(), weight=loss.units)
        scorers = self.tasks.get(task, self.scorers)
        if score and scorers and "prompt_ids" in batch:
            # The one scoring path (tunelab eval, pipelines and the server use the same two calls).
            answers = answer(self.model, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"],
                             self.task_generation.get(task, self.generation), batch.get("choices"))
            for name, values in score_answers(answers, batch["references"], scorers).items():
                for running in groups:
                    running[name].update(torch.tensor(values, device=self.device))

    def _eval_end(self, stage: str, prefix: str, score: bool) -> None:
        for group, metrics in self.running[stage].items():
            base = prefix if group == "overall" else f"{prefix}/{group}"
            for name, metric in metrics.items():
                if metric.update_count and (name == "loss" or score):
                    value = metric.compute()
                    self.log(f"{base}/{name}", value, add_dataloader_idx=False)
                    if name == "loss":
                        self.log(f"{base}/ppl", perplexity(value), add_dataloader_idx=False)
                metric.reset()
        for name, metric in self.figure_means[stage].items():
            if metric.update_count:
                self.log(f"{prefix}/{name}", metric.compute(), add_dataloader_idx=False)
            metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, self.generate_on_val)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val", "val", self.generate_on_val)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, True)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test", self.eval_prefix, True)

    # ---- checkpoints: adapters keep only what trains ----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        if len(trainable) < sum(1 for _ in self.model.parameters()):
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
