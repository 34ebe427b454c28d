"""What a run prints: its cost before training and a short summary after (rich, plain in a pipe)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import WandbLogger
from rich.console import Console
from rich.table import Table
from torch import nn

from tunelab.console import print_whole

log = logging.getLogger(__name__)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def memory_estimate(trainable: int, total: int, model: nn.Module) -> dict[str, float]:
    """GB for weights, gradients and AdamW state (activations not included); logged as params/*_gb."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {
        "weights_gb": total * _BYTES.get(dtype, 4) / 2**30,
        "grads_gb": trainable * _BYTES.get(dtype, 4) / 2**30,
        "adamw_gb": trainable * 8 / 2**30,  # two fp32 moments per trainable parameter
    }


def parameters(trainable: int, total: int, model: nn.Module) -> None:
    """Trainable/total parameters and a memory estimate for weights, gradients and AdamW state."""
    estimate = memory_estimate(trainable, total, model)
    weight_gb, grad_gb, adam_gb = estimate["weights_gb"], estimate["grads_gb"], estimate["adamw_gb"]
    Console(stderr=True).print(
        f"[bold]parameters[/]: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%) · "
        f"memory estimate: weights {weight_gb:.3f} GB + grads {grad_gb:.3f} GB + AdamW {adam_gb:.3f} GB"
        " (activations not included)", soft_wrap=True,  # one line: the terminal wraps it, rich does not cut it
    )


def summary(run_dir: Path, metrics: dict[str, float], stats: dict[str, Any], loggers: list[Any]) -> None:
    """A short end-of-run table: test metrics before/after training, and where the outputs are."""
    console = Console()
    table = Table(title="tunelab: held-out test split", show_lines=False)
    table.add_column("metric")
    table.add_column("before training", justify="right")
    table.add_column("after training", justify="right")
    for key in sorted(k for k in metrics if k.startswith("test/")):
        before = metrics.get(f"baseline/{key}")
        table.add_row(key, "-" if before is None else f"{before:.4f}", f"{metrics[key]:.4f}")
    if table.row_count:
        console.print(table)
    for key in ("val/loss", "perf/tokens_per_s"):
        if key in metrics:
            console.print(f"{key}: {metrics[key]:.4f}")
    print_whole(console, f"run directory: {run_dir}")
    if (run_dir / "model").is_dir():
        print_whole(console, f"model:         {run_dir / 'model'}")
    print_whole(console, f"metrics:       {run_dir / 'metrics.json'}")
    for logger in loggers:
        save_dir = getattr(logger, "save_dir", None)
        if isinstance(logger, WandbLogger) and save_dir:
            offline = sorted(Path(save_dir).glob("wandb/offline-run-*"))
            if offline:
                print_whole(console, f"W&B (offline): upload with  wandb sync {offline[-1]}")
