"""Per-step overhead: tunelab's `train` vs Hugging Face `transformers.Trainer` vs a raw PyTorch loop, identical work.

Identical work: the tiny model initialised from the same seed (the order `train` builds things in), the same
batches (the bundled reviews_sentiment train split encoded by tunelab's datamodule, batch 16, its seeded
order), AdamW with tunelab's parameter groups (no decay on 1-D tensors), lr 3e-3, betas (0.9, 0.98), weight
decay 0.01, cosine schedule with 5 % warm-up over the same number of steps, clipping at norm 1.0, the token-mean
loss; full fine-tuning and LoRA (r 16, all linear layers). tunelab runs through its real `train(cfg)` (default
callbacks: checkpointing, throughput, progress bar, LR monitor, model export; CSV logger) and HF Trainer with its
defaults (progress bar, no reporting, no saving); both log every 10 steps. All three run in one process that
first does what `tunelab train`'s entry point does, `keep_freed_memory()` (glibc keeps freed memory for the next
step; without it Lightning's loop page-faulted 2,700-5,800 times a step, see tunelab/training/allocator.py); `--malloc
default` leaves glibc as it is.

Time per step is measured inside the loop: the interval between the starts of consecutive optimizer steps,
over `--steps` steps after `--warmup` untimed ones, so start-up, model building, the end-of-run validation and
saving cancel out and everything a framework does between steps (data, logging, callbacks) counts. Both the
process's CPU time (one thread: the work the loop did, little moved by other processes on a shared machine)
and wall-clock time are taken. Rounds interleave the frameworks, in alternating
order, so a burst of load hits all of them; the table pools the intervals of all rounds (medians). As a check
that the work is the same, each trained model's loss on one fixed validation batch is printed (identical for
full fine-tuning; LoRA's dropout draws differ: HF Trainer reseeds when it is built).

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python bench/overhead.py [--steps 30] [--warmup 8] [--rounds 3]
    .venv/bin/python bench/overhead.py --profile full   # cProfile of tunelab's loop, top entries by own time
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from tunelab.config.build import build
from tunelab.config.compose import compose
from tunelab.models.method import apply_method, build_method
from tunelab.objectives.sft import summed_token_loss
from tunelab.training.allocator import keep_freed_memory
from tunelab.verbs.train import train

KEYS = ("input_ids", "attention_mask", "labels")


def now() -> tuple[float, float]:
    """(wall-clock, process CPU) seconds."""
    return time.perf_counter(), time.process_time()


class StepTimer(pl.Callback):
    """Start time of every training batch of a tunelab run, and the trained model (class-level: `train` builds it)."""

    stamps: list[tuple[float, float]] = []
    model: Any = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        StepTimer.stamps.append(now())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        StepTimer.model = pl_module.model


class Strip:
    """tunelab's collation, keeping only what a model's forward takes (HF Trainer passes every key to it)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        batch = self.collate(items)
        return {k: batch[k] for k in KEYS}


def config(method: str, total: int, run_dir: Path) -> DictConfig:
    cfg = compose([f"method={method}", f"hyperparams.max_steps={total}", "logger=csv", "eval.baseline=false",
                   "eval.test=false", "eval.generate_on_val=false", f"paths.output_dir={run_dir}"],
                  return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    return cfg


def build_like_train(cfg: DictConfig) -> tuple[torch.nn.Module, DataLoader, Any]:
    """Model and data exactly as `train(cfg)` builds them (seed, then tokenizer, data, model), for the baselines."""
    pl.seed_everything(cfg.hyperparams.seed, workers=True, verbose=False)
    method = build_method(cfg.method)
    tokenizer = build(cfg.tokenizer)
    datamodule = build(cfg.datamodule, tokenizer=tokenizer, _convert_="all")
    datamodule.setup("fit")
    model = apply_method(build(cfg.model, quantization_config=method.quantization), method)
    loader = datamodule.train_dataloader()
    plain = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                       collate_fn=Strip(loader.collate_fn))
    return model, plain, datamodule


def optimizer_and_schedule(cfg: DictConfig, model: torch.nn.Module, total: int) -> tuple[Any, Any]:
    """What TuneModule.configure_optimizers builds from the same config nodes."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = build(cfg.hyperparams.optimizer)(params=[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    scheduler = build(cfg.hyperparams.scheduler)(optimizer=optimizer, num_training_steps=total,
                                                  num_warmup_steps=math.ceil(cfg.hyperparams.warmup_ratio * total))
    return optimizer, scheduler


def run_raw(cfg: DictConfig, total: int) -> tuple[list[tuple[float, float]], torch.nn.Module]:
    model, loader, _ = build_like_train(cfg)
    optimizer, scheduler = optimizer_and_schedule(cfg, model, total)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    stamps = []
    for step, batch in enumerate(loader):
        stamps.append(now())
        if step == total:
            break
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        loss_sum, tokens = summed_token_loss(out.logits, batch["labels"])
        (loss_sum / tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.hyperparams.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return stamps, model


def run_hf(cfg: DictConfig, total: int, out_dir: Path) -> tuple[list[tuple[float, float]], torch.nn.Module]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, loader, _ = build_like_train(cfg)
    optimizer, scheduler = optimizer_and_schedule(cfg, model, total)
    stamps: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append(now())

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=total, per_device_train_batch_size=cfg.hyperparams.batch_size,
        max_grad_norm=cfg.hyperparams.gradient_clip_val, logging_steps=10, report_to="none", save_strategy="no",
        eval_strategy="no", use_cpu=True, seed=cfg.hyperparams.seed, remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, optimizers=(optimizer, scheduler), callbacks=[Timer()])
    trainer.get_train_dataloader = lambda: trainer.accelerator.prepare(loader)  # the same batches, HF's wrapping
    trainer.train()
    return stamps, model


def run_tunelab(cfg: DictConfig, total: int) -> tuple[list[tuple[float, float]], torch.nn.Module]:
    StepTimer.stamps, StepTimer.model = [], None
    with open_dict(cfg):
        cfg.callbacks.step_timer = {"_target_": f"{__name__}.StepTimer"}
    train(cfg)
    return StepTimer.stamps[: total], StepTimer.model


@torch.no_grad()
def check_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    loss_sum, tokens = summed_token_loss(out.logits, batch["labels"])
    return float(loss_sum / tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="untimed optimizer steps first")
    parser.add_argument("--rounds", type=int, default=3, help="each configuration this many times, interleaved")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--out", default=None, help="write the raw intervals as JSON here")
    parser.add_argument("--profile", default=None, metavar="METHOD", help="profile one tunelab run instead")
    parser.add_argument("--malloc", choices=("job", "default"), default="job",
                        help="job: glibc settings of `tunelab train`'s process; default: glibc's own")
    args = parser.parse_args()
    if args.malloc == "job":
        keep_freed_memory()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    total = args.warmup + args.steps + 1  # the timed intervals end at the start of one more step
    scratch = Path(tempfile.mkdtemp(prefix="tunelab-overhead-"))

    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        run_tunelab(config(args.profile, total, scratch / "profile"), total)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return

    methods = args.methods.split(",")
    runners = {"raw loop": lambda cfg, d: run_raw(cfg, total), "HF Trainer": lambda cfg, d: run_hf(cfg, total, d),
               "tunelab": lambda cfg, d: run_tunelab(cfg, total)}
    intervals: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (wall, CPU) seconds of each step
    losses: dict[tuple[str, str], list[float]] = {}
    _, _, datamodule = build_like_train(config("full", total, scratch / "probe"))
    check_batch = {k: v for k, v in next(iter(datamodule.val_dataloader()[0])).items() if k in KEYS}
    for round_ in range(args.rounds):
        order = list(runners) if round_ % 2 == 0 else list(reversed(runners))
        for method in methods:
            for name in order:
                run_dir = scratch / f"{name.replace(' ', '_')}-{method}-{round_}"
                stamps, model = runners[name](config(method, total, run_dir), run_dir)
                timed = stamps[args.warmup: args.warmup + args.steps + 1]
                assert len(timed) == args.steps + 1, (name, len(stamps))
                gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(timed[:-1], timed[1:], strict=True)]
                intervals.setdefault((name, method), []).extend(gaps)
                losses.setdefault((name, method), []).append(check_loss(model, check_batch))
                print(f"round {round_} {method:4} {name:10} CPU {1000 * statistics.median(c for _, c in gaps):.1f}"
                      f" ms/step, wall {1000 * statistics.median(w for w, _ in gaps):.1f}", flush=True)

    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} rounds, "
          f"{torch.get_num_threads()} thread(s), malloc {args.malloc}\n")
    print("| method | loop | CPU ms/step | wall ms/step | vs raw loop (CPU, wall) | vs HF Trainer (CPU, wall) "
          "| loss on a fixed batch, per round |")
    print("|---|---|---:|---:|---:|---:|---|")

    def medians(name: str, method: str) -> tuple[float, float]:
        values = intervals[name, method]
        return statistics.median(c for _, c in values), statistics.median(w for w, _ in values)

    for method in methods:
        raw, hf = medians("raw loop", method), medians("HF Trainer", method)
        for name in runners:
            cpu, wall = medians(name, method)
            print(f"| {method} | {name} | {1000 * cpu:.1f} | {1000 * wall:.1f} | "
                  f"{raw[0] / cpu:.3f}, {raw[1] / wall:.3f} | {hf[0] / cpu:.3f}, {hf[1] / wall:.3f} | "
                  f"{', '.join(f'{x:.4f}' for x in losses[name, method])} |")
    print("\nratios: baseline time / this loop's time (above 1: faster than the baseline)")
    if args.out:
        Path(args.out).write_text(json.dumps({f"{n}/{m}": v for (n, m), v in intervals.items()}, indent=1))


if __name__ == "__main__":
    main()
