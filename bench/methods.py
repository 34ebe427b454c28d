"""Compare fine-tuning methods on the bundled sentiment task: one epoch each, run one after another.

    .venv/bin/python bench/methods.py [--out outputs/bench-methods] [--methods full lora ...] [--eval-samples 200]
        [--model tiny] [--dataset reviews_sentiment] [--metric test/accuracy]

Prints a BENCHMARKS.md-ready markdown table: trainable parameters, size of the run's model/ directory,
peak memory (perf/peak_mem_gb: process RSS on a CPU), training throughput, whole-run wall time, and
test accuracy. Each run is the ordinary command line, shown under the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNELAB = Path(sys.executable).with_name("tunelab")
# What a method needs beyond the defaults: prompt-learning methods learn few parameters and want a larger
# learning rate (Lester et al. 2021 use 0.3); LoRA/IA3/full keep the default 3e-3.
EXTRA = {
    "prompt_tuning": ["hyperparams.lr=3e-2"],
    "prefix_tuning": ["hyperparams.lr=3e-2"],
}
METHODS = ["full", "lora", "dora", "rslora", "ia3", "prompt_tuning", "prefix_tuning", "freeze"]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_bytes(path: Path) -> int:
    """The trained weights alone: model/*.safetensors, not model/base/ (a random-init adapter base)."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def peak_memory(run: Path) -> float | None:
    rows = list(csv.DictReader((run / "csv/metrics.csv").open())) if (run / "csv/metrics.csv").is_file() else []
    values = [float(r["perf/peak_mem_gb"]) for r in rows if r.get("perf/peak_mem_gb")]
    return max(values) if values else None


def run_one(method: str, out: Path, eval_samples: int, model: str = "tiny", dataset: str = "reviews_sentiment",
            metric: str = "test/accuracy") -> dict:
    run = out / method
    args = [f"model={model}", f"dataset={dataset}", f"method={method}", "hyperparams.epochs=1", "eval.baseline=false",
            "eval.generate_on_val=false",
            f"eval.max_eval_samples={eval_samples}", "logger=csv", f"hydra.run.dir={run}", *EXTRA.get(method, [])]
    start = time.perf_counter()
    done = subprocess.run([str(TUNELAB), "train", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"method": method, "error": done.stderr.strip().splitlines()[-1], "command": args}
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "method": method, "command": args, "wall_s": wall,
        "trainable": int(metrics["params/trainable"]), "total": int(metrics["params/total"]),
        "model_bytes": dir_bytes(run / "model"), "weight_bytes": weight_bytes(run / "model"),
        "peak_mem_gb": peak_memory(run), "tokens_per_s": metrics.get("perf/tokens_per_s"),
        "s_per_step": metrics.get("perf/s_per_step"),
        "accuracy": metrics.get(metric),
    }


def table(results: list[dict]) -> str:
    lines = ["| method | trainable params | % of total | model/ size (trained weights) | peak mem (GB) "
             "| s/step | train tokens/s | run wall time (s) | test metric |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | | |")
            continue
        mem = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f} "
            f"| {r['model_bytes'] / 2**20:.2f} MiB ({r['weight_bytes'] / 2**20:.2f} MiB) | {mem} "
            f"| {r['s_per_step']:.3f} | {tps} "
            f"| {r['wall_s']:.0f} | {acc} |"
        )
    lines.append("")
    lines.append("Commands (each from the repository root):")
    lines.append("")
    for r in results:
        lines.append(f"    tunelab train {' '.join(r['command'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs/bench-methods")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--eval-samples", type=int, default=200, help="test examples scored by generation")
    parser.add_argument("--model", default="tiny", help="a model option: tiny (random init), tiny_base, tiny_instruct")
    parser.add_argument("--dataset", default="reviews_sentiment")
    parser.add_argument("--metric", default="test/accuracy", help="the metrics.json key of the last column")
    args = parser.parse_args()
    results = []
    for method in args.methods:  # sequentially: runs side by side would share the CPU cores
        results.append(run_one(method, args.out, args.eval_samples, args.model, args.dataset, args.metric))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
