"""Sample efficiency of a pretrained start: test metric after fine-tuning on 50, 200 and all training examples,
from random init (`model=tiny`) and from the bundled pretrained bases, the same number of steps for every run.

    .venv/bin/python bench/sample_efficiency.py [--out outputs/bench-sample-efficiency] [--steps 150] [--jobs 1]
        [--tasks reviews_rating terms_general] [--models tiny tiny_base tiny_instruct] [--sizes 50 200 all]

Prints a markdown table (one row per task and start, one column per training-set size) and the command of
every run. Each run is the ordinary command line with `dataset.source.train_size`; runs are independent,
so `--jobs 2` runs two at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TUNELAB = Path(sys.executable).with_name("tunelab")
METRIC = {"reviews_rating": "test/accuracy", "reviews_sentiment": "test/accuracy", "reviews_title": "test/f1",
          "entities": "test/entity_f1"}  # default: test/exact_match


def command(task: str, model: str, size: str, steps: int, out: Path, eval_samples: int) -> list[str]:
    return [str(TUNELAB), "train", f"dataset={task}", f"model={model}",
            f"dataset.source.train_size={'null' if size == 'all' else size}",
            f"hyperparams.max_steps={steps}", "hyperparams.epochs=100000", "eval.baseline=false",
            "eval.generate_on_val=false", f"eval.max_eval_samples={eval_samples}", "logger=none",
            "+trainer.check_val_every_n_epoch=100000",  # validate once, after training: tiny subsets make short epochs
            f"hydra.run.dir={out / task / model / size}"]


def run(cmd: list[str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    run_dir = Path(cmd[-1].split("=", 1)[1])
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "wall_s": time.perf_counter() - start}
    return {**json.loads((run_dir / "metrics.json").read_text()), "wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-sample-efficiency"))
    parser.add_argument("--tasks", nargs="+", default=["reviews_rating", "terms_general"])
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny_base", "tiny_instruct"])
    parser.add_argument("--sizes", nargs="+", default=["50", "200", "all"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-samples", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    grid = [(t, m, s) for t in args.tasks for m in args.models for s in args.sizes]
    cmds = {key: command(*key, args.steps, args.out, args.eval_samples) for key in grid}
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(grid, pool.map(run, cmds.values()), strict=True))
    for key, result in results.items():
        (args.out / "/".join(key)).mkdir(parents=True, exist_ok=True)
        (args.out / "/".join(key) / "bench.json").write_text(json.dumps({"command": cmds[key][1:], **result}))
    print(f"| task (metric) | start | {' | '.join(f'{s} examples' for s in args.sizes)} |")
    print(f"|---|---|{'---:|' * len(args.sizes)}")
    for task in args.tasks:
        metric = METRIC.get(task, "test/exact_match")
        for model in args.models:
            cells = []
            for size in args.sizes:
                r = results[(task, model, size)]
                cells.append(f"{r[metric]:.3f}" if metric in r else f"error: {r.get('error')}")
            print(f"| {task} ({metric}) | {model} | {' | '.join(cells)} |")
    print(f"\n{args.steps} optimizer steps each (batch {16}); commands:")
    for cmd in cmds.values():
        print("    tunelab " + " ".join(cmd[1:]))


if __name__ == "__main__":
    main()
