#!/usr/bin/env bash
# Small real outputs for `tunelab board`'s screenshots (bench/board_screenshots.py): a run, an eval, a sweep
# with its report, a compare and a pipeline, all of the tiny model on the bundled data, under $1 (default
# /tmp/board-outputs). Minutes on 2 CPU cores; run it under `nice -n 19` on a shared machine.
set -euo pipefail
OUT="${1:-/tmp/board-outputs}"
cd "$(dirname "$0")/.."
TL=(.venv/bin/python -m tunelab.cli)
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true OMP_NUM_THREADS=1
QUICK=(paths.output_dir="$OUT" hyperparams.max_steps=60 trainer.val_check_interval=15 eval.baseline=false
       eval.max_eval_samples=32 callbacks.progress.refresh_rate=0)
"${TL[@]}" train "${QUICK[@]}" run_id=demo
"${TL[@]}" eval run="$OUT/runs/demo" paths.output_dir="$OUT" max_samples=24 run_id=demo-eval
"${TL[@]}" train -m "${QUICK[@]}" hyperparams.max_steps=30 hyperparams.lr=1e-3,3e-3 run_id=lr-sweep
"${TL[@]}" sweep-report dir="$OUT/multiruns/lr-sweep"
"${TL[@]}" compare run="$OUT/runs/demo" paths.output_dir="$OUT" logger=none run_id=demo-compare \
  'overrides=["max_samples=12","decoding.max_new_tokens=4"]'
"${TL[@]}" pipeline paths.output_dir="$OUT" logger=none run_id=chain scoring.max_samples=12 \
  'stage_overrides=["logger=none","hyperparams.max_steps=20","eval.max_eval_samples=8","callbacks.progress.refresh_rate=0"]'
