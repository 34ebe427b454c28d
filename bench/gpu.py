"""GPU tokens/s, MFU and peak memory: tunelab vs Hugging Face Trainer on a real model's shape, bf16, one command.

The model: Qwen2.5-0.5B's shape (24 layers, width 896, 14 heads / 2 KV heads, MLP 4864, vocabulary 151,936,
tied head; 494M parameters) built in code from transformers' Qwen2Config with random weights: nothing is
downloaded. The data: random token ids, lengths between half and all of `--seq-len` (one full-length row per
batch, so every batch has the same shape), the first 30 % of each row a prompt without loss, right-padded into
the batch tunelab's collator makes (its datamodule needs Hydra, which the GPU image lacks); every configuration
sees the same batches. The work: bf16 mixed precision (fp32
weights), AdamW (fused unless the row says otherwise), lr 3e-4, cosine with 5 % warm-up, clipping at 1.0.

tunelab runs its LightningModule (TuneModule: token-mean loss, its clipping and optimizer groups) with its
Throughput callback in a Lightning Trainer set up as conf/trainer/gpu.yaml + conf/callbacks/default.yaml's
progress bar (built here directly: Hydra is not needed on the GPU machine); the fast paths are tunelab's own
`speed_up` (what model.gradient_checkpointing / compile / liger_kernel do). HF Trainer gets the same model,
optimizer, schedule and batches (bf16=True, logging every 10 steps, no saving).

Time per step is the interval between the starts of consecutive optimizer steps over `--steps` steps after
`--warmup` untimed ones (the GPU synchronised at both ends). Tokens are real (non-padding) tokens; MFU is
tokens/s × (4N + 2·N_trainable) / the device's peak (tunelab.training.callbacks.training_flops_per_token; attention's
own FLOPs left out, so MFU reads low). Peak memory is torch.cuda.max_memory_allocated over the configuration.

    PYTHONPATH=src python3 bench/gpu.py --out $OUT            # GPU machine: every configuration, a few minutes
    PYTHONPATH=src python3 bench/gpu.py --smoke --out /tmp/g  # CPU: a tiny shape, 2 timed steps, same code paths

Writes gpu_bench.json and gpu_bench.md to --out (default: $OUT, else ./gpu-bench-out). Needs torch,
transformers, peft, pytorch_lightning (all in the GPU image); Liger rows run only if liger_kernel imports
(carry its wheel: python3 -m pip download --no-deps liger-kernel -d .whl, see the device notes).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from tunelab.data.encode import IGNORE
from tunelab.models.load import speed_up
from tunelab.training.callbacks import (
    Throughput,
    matmul_parameters,
    model_flops_utilization,
    peak_tflops,
    training_flops_per_token,
)
from tunelab.training.module import TuneModule

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, max_window_layers=21,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
LORA = dict(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
LR, BETAS, WEIGHT_DECAY, WARMUP, CLIP = 3e-4, (0.9, 0.98), 0.01, 0.05, 1.0


@dataclass
class Setup:
    name: str
    loop: str  # tunelab | hf
    method: str  # full | lora
    fast: dict[str, bool] = field(default_factory=dict)  # speed_up's switches
    fused: bool = True


SETUPS = [
    Setup("tunelab full", "tunelab", "full"),
    Setup("HF Trainer full", "hf", "full"),
    Setup("tunelab lora", "tunelab", "lora"),
    Setup("HF Trainer lora", "hf", "lora"),
    Setup("tunelab full (foreach AdamW)", "tunelab", "full", fused=False),
    Setup("tunelab full + gradient checkpointing", "tunelab", "full", {"gradient_checkpointing": True}),
    Setup("tunelab full + compile", "tunelab", "full", {"compile": True}),
    Setup("tunelab lora + compile", "tunelab", "lora", {"compile": True}),
    Setup("tunelab full + liger", "tunelab", "full", {"liger_kernel": True}),
]


def synthetic_batches(vocab: int, seq_len: int, batch_size: int, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Right-padded batches with the keys tunelab's collator gives a training step."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.zeros((batch_size, seq_len), dtype=torch.long)
        labels = torch.full((batch_size, seq_len), IGNORE, dtype=torch.long)
        mask = torch.zeros((batch_size, seq_len), dtype=torch.long)
        for row in range(batch_size):
            length = seq_len if row == 0 else int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=generator))
            prompt = int(0.3 * length)
            ids[row, :length] = torch.randint(4, vocab, (length,), generator=generator)
            labels[row, prompt:length] = ids[row, prompt:length]
            mask[row, :length] = 1
        real = int(mask.sum())
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask, "n_tokens": real,
                        "pad_fraction": 1.0 - real / mask.numel()})
    return batches


class ListLoader(DataLoader):
    """A DataLoader over ready batches (each item is a whole batch), optionally keeping only model inputs."""

    def __init__(self, batches: list[dict[str, Any]], keys: tuple[str, ...] | None = None) -> None:
        chosen = [{k: b[k] for k in keys} for b in batches] if keys else batches
        super().__init__(chosen, batch_size=None, shuffle=False)


def build_model(shape: dict[str, Any], setup: Setup, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:  # initialised on the GPU: 494M parameters on a CPU take a while
        model = AutoModelForCausalLM.from_config(config)
    model = speed_up(model, **setup.fast)
    if setup.method == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(**LORA))
    return model


def factories(fused: bool, device: torch.device) -> tuple[Any, Any]:
    from transformers import get_scheduler

    del device  # fused AdamW runs on the CPU too (torch >= 2.4): the smoke run takes the same path
    optimizer = functools.partial(torch.optim.AdamW, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=fused)
    return optimizer, functools.partial(get_scheduler, name="cosine")


class Stamps(pl.Callback):
    """Step start times; the GPU is synchronised at the window's two ends so queued work is counted."""

    def __init__(self, sync_at: tuple[int, int]) -> None:
        self.sync_at, self.times = sync_at, []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx in self.sync_at and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def run_tunelab(model: torch.nn.Module, setup: Setup, batches: list, total: int, sync_at: tuple[int, int],
                device: torch.device, precision: str) -> list[float]:
    from pytorch_lightning.callbacks import TQDMProgressBar

    optimizer, scheduler = factories(setup.fused, device)
    module = TuneModule(model, tokenizer=None, optimizer=optimizer, scheduler=scheduler, warmup_ratio=WARMUP,
                        generate_on_val=False)
    stamps = Stamps(sync_at)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                         max_steps=total, gradient_clip_val=CLIP, log_every_n_steps=10, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[Throughput(), TQDMProgressBar(refresh_rate=20), stamps])
    trainer.fit(module, train_dataloaders=ListLoader(batches))
    return stamps.times


def run_hf(model: torch.nn.Module, setup: Setup, batches: list, total: int, sync_at: tuple[int, int],
           device: torch.device, out_dir: Path) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    optimizer_factory, scheduler_factory = factories(setup.fused, device)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    scheduler = scheduler_factory(optimizer=optimizer, num_warmup_steps=math.ceil(WARMUP * total),
                                  num_training_steps=total)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in sync_at and torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(out_dir), max_steps=total, bf16=True, max_grad_norm=CLIP,
                             logging_steps=10, report_to="none", save_strategy="no", eval_strategy="no",
                             use_cpu=device.type != "cuda", remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, optimizers=(optimizer, scheduler), callbacks=[Timer()])
    loader = ListLoader(batches, keys=("input_ids", "attention_mask", "labels"))
    trainer.get_train_dataloader = lambda: trainer.accelerator.prepare(loader)
    trainer.train()
    return times


def measure(setup: Setup, args: argparse.Namespace, shape: dict[str, Any], batches: list,
            device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {"name": setup.name, "loop": setup.loop, "method": setup.method, **setup.fast,
                           "fused_adamw": setup.fused}
    if setup.fast.get("liger_kernel") and (device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None):
        return {**row, "skipped": "needs CUDA and liger-kernel installed"}
    total = args.warmup + args.steps + 1
    sync_at = (args.warmup, args.warmup + args.steps)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    model = build_model(shape, setup, device)
    n, n_trainable = matmul_parameters(model)
    if setup.loop == "tunelab":
        times = run_tunelab(model, setup, batches, total, sync_at, device, "bf16-mixed")
    else:
        times = run_hf(model, setup, batches, total, sync_at, device, Path(args.out) / "hf-scratch")
    window = times[args.warmup: args.warmup + args.steps + 1]
    seconds = window[-1] - window[0]
    tokens = sum(b["n_tokens"] for b in batches[args.warmup: args.warmup + args.steps])
    tokens_per_s = tokens / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_tflops(name, "bf16-mixed") if device.type == "cuda" else None
    flops = training_flops_per_token(n, n_trainable)
    row.update(ms_per_step=1000 * seconds / args.steps, tokens_per_s=tokens_per_s,
               mfu=model_flops_utilization(tokens_per_s, flops, peak * 1e12) if peak else None,
               peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
               n_matmul_params=n, n_trainable=n_trainable, flops_per_token=flops,
               wall_s=time.perf_counter() - started)
    del model
    gc.collect()
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    by_name = {r["name"]: r for r in rows}
    lines = [f"{meta['device']}, {meta['shape']}, batch {meta['batch_size']} × {meta['seq_len']} tokens, "
             f"{meta['steps']} timed steps after {meta['warmup']}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}, peak {fmt(meta['peak_tflops'], '.1f')} TFLOP/s bf16", "",
             "| configuration | ms/step | tokens/s | MFU | peak mem (GiB) | vs HF Trainer (same method) | wall (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['name']} | {r.get('skipped') or 'error: ' + r['error']} | | | | | |")
            continue
        hf = by_name.get(f"HF Trainer {r['method']}", {})
        ratio = r["tokens_per_s"] / hf["tokens_per_s"] if hf.get("tokens_per_s") else None
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(f"| {r['name']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} | {fmt(mfu, '.1f')}"
                     f"{'' if mfu is None else ' %'} | {fmt(r['peak_mem_gib'], '.1f')} | {fmt(ratio, '.3f')} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 timed steps, CPU allowed")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-bench-out")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; smoke 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default 16; smoke 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="longest row (default 1024; smoke 64)")
    parser.add_argument("--only", default=None, help="comma-separated configuration names to run")
    args = parser.parse_args()
    smoke = args.smoke
    args.steps = args.steps or (2 if smoke else 20)
    args.warmup = args.warmup or (1 if smoke else 5)
    args.batch_size = args.batch_size or (4 if smoke else 16)
    args.seq_len = args.seq_len or (64 if smoke else 1024)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        sys.exit("bench/gpu.py: no CUDA device; run with --smoke to check it on a CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers of mixed precision on tensor cores
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = TINY if smoke else QWEN25_05B
    batches = synthetic_batches(shape["vocab_size"], args.seq_len, args.batch_size, args.warmup + args.steps + 1)
    setups = [s for s in SETUPS if not args.only or s.name in args.only.split(",")]
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {"device": name, "shape": "tiny (smoke)" if smoke else "Qwen2.5-0.5B (random init)",
            "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peak_tflops": peak_tflops(name, "bf16-mixed") if device.type == "cuda" else None,
            "real_tokens_per_step": sum(b["n_tokens"] for b in batches) / len(batches)}
    rows = []
    started = time.perf_counter()
    for setup in setups:
        try:
            row = measure(setup, args, shape, batches, device)
        except Exception as err:  # one broken configuration must not cost the others' figures
            traceback.print_exc()
            row = {"name": setup.name, "loop": setup.loop, "method": setup.method,
                   "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # partial results
    meta["total_s"] = time.perf_counter() - started
    (out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, meta)
    (out / "gpu_bench.md").write_text(table)
    print(table)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
