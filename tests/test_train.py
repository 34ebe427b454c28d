"""Smoke runs of `train(cfg)` on the tiny model: run directory layout, metrics, what LoRA trains, loss falls."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from omegaconf import open_dict

from conftest import make_cfg, shared_cache
from tunelab import paths
from tunelab.models.method import count_parameters
from tunelab.verbs.train import train

# Small and quick: a few steps, few eval samples, short generations.
FAST = ["hyperparams.batch_size=8", "hyperparams.eval_batch_size=8", "eval.max_eval_samples=8",
        "eval.generate_on_val=false", "decoding.max_new_tokens=4"]
FORBIDDEN = (".bin", ".pt", ".pth", ".pkl", ".pickle")


class SnapshotWeights(pl.Callback):
    """Keeps every parameter of the wrapped model at the start and at the end of fit (class-level, for the test)."""

    before: dict[str, torch.Tensor] = {}
    after: dict[str, torch.Tensor] = {}
    counts: tuple[int, int] = (0, 0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        SnapshotWeights.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}
        SnapshotWeights.counts = count_parameters(pl_module.model)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        SnapshotWeights.after = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def _files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.is_file()]


def _check_metrics(run_dir: Path, metrics: dict, keys: list[str]) -> None:
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))  # what train() returned is what it wrote
    for key in keys:
        assert key in saved and math.isfinite(saved[key]), (key, saved)
    assert saved["params/trainable"] <= saved["params/total"]


def test_full_finetune_run_layout_and_metrics(tmp_path):
    cfg = make_cfg(tmp_path, ["method=full", "logger=none", "hyperparams.max_steps=4", "eval.baseline=true", *FAST])
    metrics = train(cfg)
    _check_metrics(tmp_path, metrics, ["val/loss", "test/loss", "test/accuracy", "baseline/test/accuracy",
                                       "baseline/test/loss"])
    assert metrics["val/loss"] < metrics["baseline/test/loss"]  # 4 steps already beat the random init
    assert metrics["params/trainable"] == metrics["params/total"]  # full fine-tuning trains everything
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
    model_dir = tmp_path / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (model_dir / name).is_file(), name
    assert not (model_dir / "adapter_model.safetensors").exists()
    assert (model_dir / "chat_template.jinja").read_text() == \
        (paths.assets_dir() / "tiny-llama" / "chat_template.jinja").read_text()
    assert not (tmp_path / ".hydra").exists()  # only the CLI (Hydra) writes .hydra/
    assert not [p for p in _files(tmp_path) if p.suffix in FORBIDDEN]


def test_lora_trains_only_adapters_with_the_hand_counted_size(tmp_path):
    cfg = make_cfg(tmp_path, ["method=lora", "logger=csv", "hyperparams.max_steps=8", "eval.baseline=false",
                              "eval.test=false",
                              "trainer.log_every_n_steps=1", *FAST])
    with open_dict(cfg):
        cfg.callbacks.snapshot = {"_target_": f"{__name__}.SnapshotWeights"}
    metrics = train(cfg)

    # Hand count from config.json: r * (in + out) per adapted projection, 7 projections per layer.
    model_cfg = json.loads((paths.assets_dir() / "tiny-llama" / "config.json").read_text())
    hidden, inter, head = model_cfg["hidden_size"], model_cfg["intermediate_size"], model_cfg["head_dim"]
    q_out, kv_out = model_cfg["num_attention_heads"] * head, model_cfg["num_key_value_heads"] * head
    assert (hidden, inter, model_cfg["num_hidden_layers"], q_out, kv_out) == (192, 512, 4, 192, 96)
    shapes = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden),  # q k v o
              (hidden, inter), (hidden, inter), (inter, hidden)]  # gate up down
    r = cfg.method.peft.r
    expected = model_cfg["num_hidden_layers"] * sum(r * (i + o) for i, o in shapes)
    assert expected == 221184
    assert SnapshotWeights.counts[0] == expected == metrics["params/trainable"]
    assert metrics["params/total"] == SnapshotWeights.counts[1]

    before, after = SnapshotWeights.before, SnapshotWeights.after
    assert before.keys() == after.keys() and before
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora = {n for n in before if "lora_" in n}
    assert sum(before[n].numel() for n in lora) == expected
    assert changed == lora  # every adapter tensor moved; no base weight, norm or embedding did

    model_dir = tmp_path / "model"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (model_dir / name).is_file(), name
    assert not (model_dir / "model.safetensors").exists()  # the adapter, not a merged copy, at the top level
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["r"] == r and adapter["peft_type"] == "LORA"
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert not [p for p in _files(tmp_path) if p.suffix in FORBIDDEN]
    _check_metrics(tmp_path, metrics, ["val/loss"])  # test/* are checked on the full run

    # Loss falls: the csv logger's train/loss at the end is below its first value.
    with (tmp_path / "csv" / "metrics.csv").open() as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert len(losses) == 8  # one per optimizer step with log_every_n_steps=1
    assert losses[0] > math.log(model_cfg["vocab_size"]) - 1  # a random init starts near ln(vocab)
    assert losses[-1] < losses[0] - 1.0, losses


def test_cli_run_writes_hydra_dir(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    args = ["method=full", "logger=none", "hyperparams.max_steps=2", "eval.baseline=false", "eval.test=false",
            *FAST, f"paths.output_dir={tmp_path}", shared_cache()]
    out = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    hydra_dir = run_dir / ".hydra"
    assert {p.name for p in hydra_dir.iterdir()} >= {"config.yaml", "hydra.yaml", "overrides.yaml"}
    overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text())
    assert "hyperparams.max_steps=2" in overrides and f"run_id={run_dir.name}" in overrides
    saved = yaml.safe_load((hydra_dir / "config.yaml").read_text())
    assert saved["hyperparams"]["max_steps"] == 2 and saved["method"]["peft"] is None
    assert (run_dir / "model" / "model.safetensors").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "val/loss" in metrics and "test/loss" not in metrics  # eval.test=false skips the test split
    assert not [p for p in _files(run_dir) if p.suffix in FORBIDDEN]


@pytest.mark.slow  # two DDP processes
@pytest.mark.parametrize("entry", [[str(Path(sys.executable).with_name("tunelab"))],
                                   [sys.executable, "-m", "tunelab.cli"]], ids=["console_script", "python_m"])
def test_ddp_on_two_cpu_processes_is_one_job_with_one_run_directory(tmp_path, entry):
    """The testable stand-in for multi-GPU data parallelism: gloo DDP, 2 ranks, one run directory. Lightning
    starts rank 1 by re-running the command line, which under `python -m tunelab.cli` once lost the verb."""
    out = subprocess.run(
        [*entry, "train", "trainer=ddp_cpu", "hyperparams.max_steps=3",
         "eval.baseline=false", "eval.max_eval_samples=8", "logger=none", f"paths.output_dir={tmp_path}",
         shared_cache()],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1  # rank 1 joined rank 0's directory instead of making its own
    assert (runs[0] / "train_ddp_process_1.log").is_file()
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert {"val/loss", "test/loss", "test/accuracy"} <= set(metrics)


@pytest.mark.slow  # three trainings, up to 2 epochs each
def test_resumed_run_matches_the_uninterrupted_one(tmp_path):
    """Stop after epoch 1, resume from checkpoints/last.ckpt: the final weights equal those of one
    uninterrupted 2-epoch run (optimizer state restored, epoch 2 sees the same shuffle)."""
    from safetensors.torch import load_file

    from tunelab.verbs.train import train

    common = ["eval.baseline=false", "eval.test=false", "eval.generate_on_val=false", "logger=none",
              "+trainer.limit_train_batches=6", "+trainer.limit_val_batches=1", "hyperparams.batch_size=4",
              "hyperparams.scheduler.name=constant", "hyperparams.warmup_ratio=0"]  # schedule independent of length
    train(make_cfg(tmp_path / "straight", [*common, "hyperparams.epochs=2"]))
    train(make_cfg(tmp_path / "first", [*common, "hyperparams.epochs=1"]))
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(make_cfg(tmp_path / "resumed", [*common, "hyperparams.epochs=2", f"resume={checkpoint}"]))
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    first = load_file(tmp_path / "first" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert any(not torch.equal(straight[k], first[k]) for k in straight)  # epoch 2 did change the weights
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-6), key
