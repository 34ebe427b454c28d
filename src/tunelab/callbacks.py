"""Small Lightning callbacks for side concerns: throughput, and saving the model in Hugging Face format."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from tunelab.models import save_unloadable_base
from tunelab.sharding import full_state_dict, submodule_state


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


class Throughput(pl.Callback):
    """Logs `perf/tokens_per_s` (non-padding input tokens per second of training) and `perf/peak_mem_gb`."""

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._tokens = 0
        self._start: float | None = None
        self._batches = 0
        self.total_tokens = 0
        self.total_batches = 0
        self.total_seconds = 0.0

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
        pl_module.log("perf/tokens_per_s", self._tokens / max(elapsed, 1e-9), on_step=True)
        pl_module.log("perf/peak_mem_gb", peak_memory_gb(pl_module.device), on_step=True)
        self._tokens, self._batches, self._start = 0, 0, None

    def summary(self, accumulate: int, device: torch.device) -> dict[str, float]:
        """Whole-run figures for metrics.json: tokens/s, seconds per optimizer step, peak memory."""
        if not self.total_seconds:
            return {}
        return {"perf/tokens_per_s": self.total_tokens / self.total_seconds,
                "perf/s_per_step": self.total_seconds * accumulate / max(self.total_batches, 1),
                "perf/peak_mem_gb": peak_memory_gb(device),
                "perf/train_s": self.total_seconds}  # training steps only, validation excluded (compare reads it)

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
            # (refused with a sharded strategy by tunelab.checks.check_strategy).
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
    offline files have no stable reader; the CSV logger is opt-in)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not row:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch, **row}) + "\n")
