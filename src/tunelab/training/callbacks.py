"""Small Lightning callbacks for side concerns: throughput and MFU, and saving the model in Hugging Face format."""

from __future__ import annotations

import json
import logging
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from tunelab.models.load import save_unloadable_base
from tunelab.models.sharding import full_state_dict, submodule_state

log = logging.getLogger(__name__)

# Peak dense (no sparsity) tensor-core throughput of one GPU in TFLOP/s, from NVIDIA's datasheets, by a name in
# what torch.cuda.get_device_name() reports. fp16 equals bf16 on these parts; tf32 is fp32 matmuls on tensor
# cores (torch.set_float32_matmul_precision("high")). First match wins: the more specific names come first.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "H200 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM: the H100's compute, more memory
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "A10": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's peak dense TFLOP/s for a Lightning `precision` ("bf16-mixed", "32-true", ...), or None."""
    if precision.startswith(("bf16", "16")):
        kind = "bf16"
    elif precision.startswith("32"):
        kind = "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        return None
    for name, peaks in PEAK_TFLOPS.items():
        if re.search(rf"\b{re.escape(name)}\b", device_name):  # "A10" is not "A100" nor "A10G"
            return peaks[kind]
    return None


def matmul_parameters(model: nn.Module) -> tuple[float, float]:
    """(N, N_trainable): the parameters each token is multiplied by, all of them and those that train.

    N leaves out the input embedding table (a lookup, no multiply) but counts the output head, also when
    its weight is tied to that table. Mixture-of-experts weights (names with `experts`) count
    `num_experts_per_tok / num_experts` of themselves: only the routed experts run for a token.
    Norm gains and biases are counted too (a rounding error).
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding_weight = getattr(embeddings, "weight", None)
    config = getattr(model, "config", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    routed = getattr(config, "num_experts_per_tok", None)
    n = n_trainable = 0.0
    for name, param in model.named_parameters():  # a tied tensor appears once
        if param is embedding_weight:
            continue
        share = routed / experts if experts and routed and ".experts." in f".{name}." else 1.0
        n += param.numel() * share
        n_trainable += param.numel() * share if param.requires_grad else 0.0
    tied = getattr(head, "weight", None)
    if tied is not None and tied is embedding_weight:  # the head multiplies by the embedding table
        n += tied.numel()
        n_trainable += tied.numel() if tied.requires_grad else 0.0
    return n, n_trainable


def training_flops_per_token(n: float, n_trainable: float) -> float:
    """Model FLOPs of one training token: forward 2N, backward through every weight for the activations' gradients
    2N, and the weights' own gradients 2·N_trainable. Full fine-tuning: 6N (Kaplan et al. 2020); LoRA:
    4N + 2·N_adapter, N including the adapters. Attention's score and value products (12·layers·width·seq per
    token, ~12% of 6N for a 0.5B model at 1024 tokens) are left out, as in the 6N convention: MFU reads low, never
    high. A partly frozen model (method=freeze) needs no gradient below its first trained layer: 4N overcounts it.
    """
    return 4.0 * n + 2.0 * n_trainable


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float) -> float:
    """MFU: the model FLOPs the tokens needed per second over the device's peak (tokens: real ones, no padding)."""
    return tokens_per_s * flops_per_token / peak_flops_per_s


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


class Throughput(pl.Callback):
    """Logs `perf/tokens_per_s` (non-padding input tokens per second of training), `perf/peak_mem_gb`, and
    `perf/mfu` (model FLOPs utilisation, see `training_flops_per_token`) where the device's peak is known:
    `peak_tflops` (per device, for the run's precision), else PEAK_TFLOPS by the GPU's name; on a CPU, only
    when given. Under DDP each rank measures its own tokens against one device's peak."""

    def __init__(self, window: int = 10, peak_tflops: float | None = None) -> None:
        self.window = window
        self.peak_tflops = peak_tflops
        self._peak_flops: float | None = None  # per second, found at the start of training
        self._flops_per_token = 0.0
        self._tokens = 0
        self._start: float | None = None
        self._batches = 0
        self.total_tokens = 0
        self.total_batches = 0
        self.total_seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        peak = self.peak_tflops
        if peak is None and pl_module.device.type == "cuda":
            name = torch.cuda.get_device_name(pl_module.device)
            peak = peak_tflops(name, str(trainer.precision))
            if peak is None:
                log.info("no peak FLOP/s known for %s at precision %s: perf/mfu is not logged "
                         "(set callbacks.throughput.peak_tflops)", name, trainer.precision)
        self._peak_flops = peak * 1e12 if peak else None
        model = getattr(pl_module, "model", pl_module)
        self._flops_per_token = training_flops_per_token(*matmul_parameters(model))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tokens += int(batch["n_tokens"])
        self._batches += 1
        if (batch_idx + 1) % self.window:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        self.total_tokens += self._tokens
        self.total_batches += self._batches
        self.total_seconds += elapsed
        tokens_per_s = self._tokens / max(elapsed, 1e-9)
        pl_module.log("perf/tokens_per_s", tokens_per_s, on_step=True)
        pl_module.log("perf/peak_mem_gb", peak_memory_gb(pl_module.device), on_step=True)
        if self._peak_flops:
            pl_module.log("perf/mfu", model_flops_utilization(tokens_per_s, self._flops_per_token, self._peak_flops),
                          on_step=True)
        self._tokens, self._batches, self._start = 0, 0, None

    def summary(self, accumulate: int, device: torch.device) -> dict[str, float]:
        """Whole-run figures for metrics.json: tokens/s, seconds per optimizer step, peak memory, MFU."""
        if not self.total_seconds:
            return {}
        tokens_per_s = self.total_tokens / self.total_seconds
        mfu = {"perf/mfu": model_flops_utilization(tokens_per_s, self._flops_per_token, self._peak_flops)
               } if self._peak_flops else {}
        return {"perf/tokens_per_s": tokens_per_s,
                "perf/s_per_step": self.total_seconds * accumulate / max(self.total_batches, 1),
                "perf/peak_mem_gb": peak_memory_gb(device),
                "perf/train_s": self.total_seconds,  # training steps only, validation excluded (compare reads it)
                **mfu}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None:  # the epoch's last, partial window still counts towards the totals
            self.total_tokens += self._tokens
            self.total_batches += self._batches
            self.total_seconds += time.perf_counter() - self._start
        self._tokens, self._batches, self._start = 0, 0, None  # validation time is not training time


class SaveHFModel(pl.Callback):
    """At the end of fit, writes `model/`: weights (full model or PEFT adapter, safetensors only),
    tokenizer with the chat template used in training, and the data recipe that generate/eval reuse."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        # FSDP / ZeRO-3 hold only shards on each rank: gather the whole weights onto rank 0 (every rank takes part).
        state = full_state_dict(trainer)
        if not trainer.is_global_zero:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        if state is None:  # every rank holds the whole model (one device, DDP, ZeRO-2)
            pl_module.model.save_pretrained(self.dirpath, safe_serialization=True)
            # An adapter over a random-init base is useless without that base's weights: keep them in model/base
            # (refused with a sharded strategy by tunelab.config.engine.check_strategy).
            save_unloadable_base(pl_module.model, self.dirpath / "base")
        else:  # the gathered weights, consolidated into the usual files (an adapter keeps only its own tensors)
            pl_module.model.save_pretrained(self.dirpath, safe_serialization=True,
                                            state_dict=submodule_state(state, "model"))
        pl_module.tokenizer.save_pretrained(self.dirpath)
        # The data recipe (format, prompt templates, system prompt) so eval/generate build prompts exactly
        # as training did (LlamaFactory#2509: a different template at inference costs accuracy).
        dataset = getattr(trainer.datamodule, "dataset", None)
        recipe = {k: getattr(dataset, k, None) for k in ("name", "format", "templates", "system_prompt",
                                                         "chat_template")}
        (self.dirpath / "tunelab_recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")


class ValHistory(pl.Callback):
    """Appends one JSON line per validation (step, epoch, every `val/*` figure) to `path`.

    A plain-text history that `tunelab sweep-report` can always plot, whichever loggers ran (W&B's
    offline files have no stable reader; the CSV logger is opt-in).

    Across a resume the history stays that of the uninterrupted run: a validation during fit leaves
    `.<name>.pending` (its step) until its line is written. A run interrupted in that validation resumes from
    the checkpoint written just before it, and Lightning does not validate again at the step it resumes at;
    so the resumed run runs that validation first. Lines of steps after the resumed one (a kill loses the
    steps since the last checkpoint) are dropped: they are written again."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    @property
    def pending(self) -> Path:
        return self.path.with_name(f".{self.path.name}.pending")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.pending.write_text(f"{trainer.global_step}\n")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if row:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as file:
                file.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch, **row}) + "\n")
        self.pending.unlink(missing_ok=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.ckpt_path:
            return
        step = trainer.global_step
        redo = self._resume_at(step) if trainer.is_global_zero else False
        if trainer.strategy.broadcast(redo, src=0):  # the validation is collective: every rank runs it or none
            validate_now(trainer)

    def _resume_at(self, step: int) -> bool:
        """Drop the lines after `step`; True if the validation at `step` was interrupted before its line."""
        try:
            pending = int(self.pending.read_text().strip())
        except (OSError, ValueError):
            pending = None
        rows = self.path.read_text().splitlines() if self.path.is_file() else []
        steps = [_row_step(row) for row in rows]
        kept = [row for row, at in zip(rows, steps, strict=True) if at is not None and at <= step]
        if len(kept) != len(rows):  # also a line a kill cut short
            self.path.write_text("".join(f"{row}\n" for row in kept))
        if pending != step:
            self.pending.unlink(missing_ok=True)
        return pending == step and step not in steps


def _row_step(row: str) -> int | None:
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def validate_now(trainer: pl.Trainer) -> None:
    """Run the fit loop's validation now, as Lightning's training loop does between batches (from a hook
    before the first training batch: `on_train_start`)."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    loop.restarting = False  # a fresh validation from its first batch, not the remainder of a restored one
    loop.batch_progress.reset_on_run()
    first_loop_iter = trainer._logger_connector._first_loop_iter
    trainer.validating = True
    try:
        loop.run()
    finally:
        trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter
