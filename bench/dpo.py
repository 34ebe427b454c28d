"""DPO step time and peak memory: tunelab against TRL's DPOTrainer, same data, model, batch, length and optimizer.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/dpo.py [--methods lora full] [--steps 10]
        [--warmup 3] [--rounds 2] [--batch-size 8] [--max-seq-len 256] [--out outputs/bench-dpo]

The bundled preference task (data/preference, dataset=brand_replies) on model=tiny_instruct, fp32 on the CPU, one
process with torch.set_num_threads(1) per arm. Every arm is a child process of this one, so its peak memory is its
own; arms alternate (tunelab, TRL, tunelab, TRL, ... for `--rounds`), so a change in the machine's load reaches
both. Arms: `tunelab` (`objective=dpo`, the reference run each step: LoRA's adapter-disabled base, full
fine-tuning's frozen copy), `tunelab cached` (`objective.reference=cached`, full only), `trl` (DPOTrainer; full:
a `ref_model` loaded beside the policy) and `trl precompute` (`precompute_ref_log_probs=True`, full only).

Both sides: the same prompt through the tokenizer's chat template (TRL's conversational shape), batch of
`--batch-size` pairs, `max_length`/`max_seq_len` 256, AdamW (betas 0.9/0.98, weight decay 0.01, lr 3e-3, cosine),
norm clipping 1.0, LoRA r 16 / alpha 32 / dropout 0.05 on all linear layers (TRL's `disable_dropout=False`, so the
LoRA dropout runs on both sides). Each arm loads `--train-pairs` pairs (tunelab: a seeded subset through
`dataset.source.train_size`; TRL: the first rows of the same file), so the batches differ in their pairs but not in
their length distribution: the table gives the mean tokens per step of each arm. Step time is the wall time
between the ends of consecutive optimizer steps (data loading and logging included), median over `--steps` steps
after `--warmup`, as process CPU time (the ratio's basis: with one thread it is the step's work, little moved by
other jobs on the machine) and as wall time. Memory is the process's peak resident set (VmHWM): over the whole
process, and over the training steps alone (reset through /proc/self/clear_refs when training starts, so a pass
before training is not counted there). TRL is a dev-extra dependency: it is imported only here, in the TRL arms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARMS = {"lora": ["tunelab", "trl"], "full": ["tunelab", "tunelab cached", "trl", "trl precompute"]}
LR, BETA = 3e-3, 0.1


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Linux resets VmHWM to the current RSS on `echo 5 > /proc/self/clear_refs`."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Clock:
    """Step-end timestamps, tokens per step and the training-time peak, for either framework."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []  # process CPU time: one thread, so the work of a step, whatever the load
        self.tokens: list[int] = []
        self.start_rss_kb = self.before_hwm_kb = 0
        self.reset = False

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    def start(self) -> None:
        self.start_rss_kb, self.before_hwm_kb = status_kb("VmRSS"), status_kb("VmHWM")
        self.reset = reset_peak()

    def result(self, warmup: int) -> dict[str, Any]:
        steps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][warmup:]
        cpu = [b - a for a, b in zip(self.cpu_ends, self.cpu_ends[1:], strict=False)][warmup:]
        return {"step_s": steps, "median_step_s": statistics.median(steps), "cpu_step_s": cpu,
                "median_cpu_step_s": statistics.median(cpu), "tokens_per_step":
                statistics.mean(self.tokens[warmup + 1:]), "peak_rss_mb": status_kb("VmHWM") / 1024,
                "whole_peak_mb": max(self.before_hwm_kb, status_kb("VmHWM")) / 1024,
                "train_start_rss_mb": self.start_rss_kb / 1024, "peak_reset": self.reset}


CLOCK = Clock()


def _lightning_timer() -> Any:
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            CLOCK.start()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            CLOCK.tokens.append(int(batch["attention_mask"].sum()))
            CLOCK.step_end()

    return StepTimer


def StepTimer() -> Any:  # noqa: N802 - the `_target_` of the tunelab arm's extra callback
    return _lightning_timer()()


def run_tunelab(method: str, cached: bool, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from omegaconf import open_dict

    from tunelab.config.compose import compose
    from tunelab.verbs.train import train

    overrides = ["model=tiny_instruct", f"method={method}", "objective=dpo", f"objective.beta={BETA}",
                 f"objective.reference={'cached' if cached else 'model'}", "dataset=brand_replies",
                 f"hyperparams.batch_size={args.batch_size}", f"hyperparams.max_seq_len={args.max_seq_len}",
                 f"hyperparams.lr={LR}", f"hyperparams.max_steps={args.warmup + args.steps + 1}",
                 "eval.baseline=false", "eval.test=false", "eval.generate_on_val=false", "eval.max_eval_samples=16",
                 f"dataset.source.train_size={args.train_pairs}", "logger=none", "+trainer.limit_val_batches=0",
                 "callbacks.checkpoint.every_n_steps=null",
                 "callbacks.checkpoint.every_minutes=null", "callbacks.progress.refresh_rate=0",
                 "+callbacks.bench_timer._target_=__main__.StepTimer", f"paths.output_dir={out}",
                 f"paths.cache_dir={args.out / 'cache'}"]  # the tokenised pairs, encoded once for every round
    cfg = compose(overrides)
    with open_dict(cfg):
        cfg.paths.run_dir = str(out)
    train(cfg)
    return {"command": "tunelab train " + " ".join(o for o in overrides if "bench_timer" not in o
                                                   and not o.startswith("paths."))}


def run_trl(method: str, precompute: bool, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunelab import paths
    from tunelab.models.load import load_causal_lm, load_tokenizer

    instruct = str(paths.assets_dir() / "tiny-instruct")
    lines = (REPO / "data/preference/train.jsonl").read_text().splitlines()[: args.train_pairs]
    rows = [json.loads(line) for line in lines]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    tokenizer = load_tokenizer(instruct)  # tunelab's: the same pad token as the tunelab arm
    model = load_causal_lm(instruct)
    extra: dict[str, Any] = {}
    if method == "lora":
        extra["peft_config"] = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                          target_modules="all-linear", bias="none")
    elif not precompute:
        extra["ref_model"] = load_causal_lm(instruct)
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_length=args.max_seq_len,
                       max_steps=args.warmup + args.steps + 1, learning_rate=LR, lr_scheduler_type="cosine",
                       warmup_steps=1, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98, max_grad_norm=1.0,
                       optim="adamw_torch", beta=BETA, logging_steps=10**6, save_strategy="no", report_to="none",
                       use_cpu=True, bf16=False, fp16=False, seed=42, dataloader_num_workers=0,
                       disable_dropout=False, precompute_ref_log_probs=precompute)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            CLOCK.start()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            CLOCK.step_end()

    class Counting(DPOTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            CLOCK.tokens.append(int(inputs["attention_mask"].sum()))
            return super().training_step(model, inputs, *rest, **kw)

    trainer = Counting(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                       callbacks=[Timer()], **extra)
    trainer.train()
    return {"command": f"DPOTrainer({method}{', precompute_ref_log_probs=True' if precompute else ''})"}


def child(arm: str, method: str, args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        info = (run_tunelab(method, arm.endswith("cached"), args, out) if arm.startswith("tunelab")
                else run_trl(method, arm.endswith("precompute"), args, out))
    print("BENCH " + json.dumps({"arm": arm, "method": method, **info, **CLOCK.result(args.warmup)}), flush=True)


def run_arm(arm: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", arm, "--methods", method, "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
           "--train-pairs", str(args.train_pairs), "--out", str(args.out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if done.returncode or not lines:
        return {"arm": arm, "method": method, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return {**json.loads(lines[-1][6:]), "process_s": time.perf_counter() - start}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| method | arm | median step CPU (s) | median step wall (s) | steps | tokens/step "
             "| peak RSS, whole process (MB) | peak RSS in the steps (MB) | rise over train start (MB) "
             "| step CPU vs TRL | peak vs TRL |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["arm"]), []).append(r)
    summary: dict[tuple[str, str], dict[str, float]] = {}
    for key, runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            continue
        steps = [s for r in ok for s in r["step_s"]]
        summary[key] = {"step": statistics.median(steps), "n": len(steps),
                        "cpu": statistics.median(s for r in ok for s in r["cpu_step_s"]),
                        "tokens": statistics.mean(r["tokens_per_step"] for r in ok),
                        "whole": statistics.median(r["whole_peak_mb"] for r in ok),
                        "peak": statistics.median(r["peak_rss_mb"] for r in ok),
                        "rise": statistics.median(r["peak_rss_mb"] - r["train_start_rss_mb"] for r in ok)}
    for (method, arm), s in summary.items():
        base = summary.get((method, "trl"))
        ratio = f"{s['cpu'] / base['cpu']:.2f}" if base else "-"
        mem = f"{s['peak'] / base['peak']:.2f}" if base else "-"
        lines.append(f"| {method} | {arm} | {s['cpu']:.3f} | {s['step']:.3f} | {s['n']} | {s['tokens']:.0f} "
                     f"| {s['whole']:.0f} | {s['peak']:.0f} | {s['rise']:.0f} | {ratio} | {mem} |")
    errors = [r for r in results if "error" in r]
    lines += [f"\nfailed: {r['method']} {r['arm']}: {r['error']}" for r in errors]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm and round")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing starts")
    parser.add_argument("--rounds", type=int, default=2, help="times each arm runs, alternating with the others")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--train-pairs", type=int, default=400, help="pairs of the train split each arm loads "
                        "(tokenising all 2,000 took minutes per arm on the loaded machine)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench-dpo")
    parser.add_argument("--arms", nargs="+", help="only these arms (default: every arm of each method)")
    parser.add_argument("--table", nargs="+", type=Path, help="print the table of saved results.json files and stop")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.methods[0], args)
        return
    if args.table:
        print(table([r for path in args.table for r in json.loads(path.read_text())]))
        return
    results = []
    for _ in range(args.rounds):
        for method in args.methods:
            for arm in [a for a in ARMS[method] if not args.arms or a in args.arms]:
                results.append(run_arm(arm, method, args))
                print(json.dumps({k: v for k, v in results[-1].items() if k != "step_s"}), file=sys.stderr,
                      flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
