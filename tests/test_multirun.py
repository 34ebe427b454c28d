"""A `-m` sweep through the console script: one directory and one W&B run per job, grouped, no secret saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from wandb.proto import wandb_internal_pb2 as pb

from conftest import shared_cache
from procs import budget

SECRET = "hf_abcdefghijklmnopqrstuvwxyz123456"


@pytest.mark.slow  # a 4-trial sweep
def test_sweep_makes_one_dir_and_one_wandb_run_per_job(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    args = ["-m", "hyperparams.lr=1e-3,3e-3", "hyperparams.batch_size=4,8", "hyperparams.max_steps=3",
            "eval.baseline=false", "eval.max_eval_samples=8", "eval.generate_on_val=false",
            "decoding.max_new_tokens=4", "hyperparams.eval_batch_size=8", "logger=wandb",
            f"tags=[{SECRET}]", f"paths.output_dir={tmp_path}", shared_cache()]
    out = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=budget(600))
    assert out.returncode == 0, out.stderr[-3000:]

    (sweep,) = (tmp_path / "multiruns").iterdir()  # one sweep directory
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    assert not (tmp_path / "runs").exists()

    seen = set()
    run_ids = []
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert "val/loss" in metrics and "test/loss" in metrics
        assert (job / "model" / "model.safetensors").is_file()
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        combo = tuple(sorted(o for o in overrides if o.startswith(("hyperparams.lr=", "hyperparams.batch_size="))))
        seen.add(combo)
        saved = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())  # still valid YAML after masking
        assert saved["hyperparams"]["max_steps"] == 3

        (wandb_run,) = (job / "wandb").glob("offline-run-*")  # exactly one W&B run per job
        run_id = f"{sweep.name}-{job.name}"  # offline-run-<time>-<run id>
        assert wandb_run.name.endswith(f"-{run_id}")
        run_ids.append(run_id)
        # wandb 0.31 writes no files/config.yaml offline: the run and its config are protobuf records in
        # run-<id>.wandb. A field serialised alone is a byte string found verbatim in the record.
        (record,) = wandb_run.glob(f"run-{run_id}.wandb")
        data = record.read_bytes()
        assert pb.RunRecord(run_group=sweep.name).SerializeToString() in data  # grouped by the sweep id
        assert pb.RunRecord(run_id=run_id).SerializeToString() in data
        lr = next(o for o in combo if o.startswith("hyperparams.lr=")).split("=")[1]
        assert pb.ConfigItem(key="lr", value_json=str(float(lr))).SerializeToString() in data
    assert len(seen) == 4  # every (lr, batch_size) combination ran once
    assert len(set(run_ids)) == 4
    assert "REDACTED" in (sweep / "multirun.yaml").read_text()  # the sweep's own saved config is masked too

    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert "REDACTED" in (jobs[0] / ".hydra" / "overrides.yaml").read_text()
