"""The opt-in fast paths (gradient checkpointing, torch.compile, Liger kernels, fused AdamW) and the MFU accounting.

Each switch composes and validates; on the CPU it either trains with the same loss as without it or is refused
with a config error (exit 2). The GPU-only figures (speed, memory) live in bench/gpu.py, not here.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import tunelab.verbs.train as train_mod
from conftest import REPO, make_cfg
from tunelab.checkpoint.resume import identity
from tunelab.config.build import build
from tunelab.config.compose import compose
from tunelab.config.validate import validate
from tunelab.errors import ConfigError
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.models.method import apply_method, build_method
from tunelab.training.callbacks import (
    PEAK_TFLOPS,
    matmul_parameters,
    model_flops_utilization,
    peak_tflops,
    training_flops_per_token,
)

TINY = str(REPO / "src/tunelab/assets/tiny-llama")
TINY_CONFIG = json.loads((Path(TINY) / "config.json").read_text())
RUN = ["logger=none", "hyperparams.max_steps=3", "hyperparams.batch_size=8", "eval.baseline=false",
       "eval.test=false", "eval.generate_on_val=false", "eval.max_eval_samples=8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`train` on RUN plus overrides, with one tokenised-data cache for the module; returns metrics.json."""
    cache = tmp_path_factory.mktemp("cache")

    def go(*overrides: str) -> dict:
        run_dir = go.last_dir = tmp_path_factory.mktemp("run")
        return train_mod.train(make_cfg(run_dir, [*RUN, f"paths.cache_dir={cache}", *overrides]))

    return go


# ---- config: each switch composes and validates; what cannot run is refused before anything is built ----------
@pytest.mark.parametrize("overrides", [
    ["model.gradient_checkpointing=true"],
    ["model.compile=true"],
    ["model.liger_kernel=true"],  # accelerator auto: refused only when the model is built on a machine without CUDA
    ["hyperparams.optimizer.fused=true"],
    ["trainer=gpu", "hyperparams.optimizer.fused=true"],  # bf16-mixed: the module clips (Lightning would refuse)
    ["trainer=gpu", "model.liger_kernel=true", "model.gradient_checkpointing=true", "model.compile=true",
     "callbacks.throughput.peak_tflops=989.4"],
])
def test_switches_compose_and_validate(overrides):
    cfg = compose(overrides)
    validate(cfg)
    for override in overrides:
        key, value = override.split("=")
        if "." in key:  # a value, not a group choice: it arrives as given
            assert str(OmegaConf.select(cfg, key)).lower() == value


@pytest.mark.parametrize("overrides, message", [
    (["model.compile=yes"], "model.compile must be true or false"),
    (["hyperparams.optimizer.fused=1"], "hyperparams.optimizer.fused must be true or false or null"),
    (["trainer=cpu", "model.liger_kernel=true"], "model.liger_kernel needs a CUDA GPU, but trainer.accelerator is cpu"),
    (["trainer.precision=16-mixed", "hyperparams.optimizer.fused=true"], "cannot clip gradients under fp16"),
    (["trainer.precision=bf16-mixd"], "unknown precision 'bf16-mixd'"),  # bf16 is checked against Lightning's names
    (["callbacks.throughput.peak_tflops=0"], "callbacks.throughput.peak_tflops must be"),
])
def test_bad_switches_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(compose(overrides))
    assert err.value.exit_code == 2


def test_fp16_fused_without_clipping_is_allowed():
    validate(compose(["trainer.precision=16-mixed", "hyperparams.optimizer.fused=true",
                      "hyperparams.gradient_clip_val=null"]))


def test_liger_without_cuda_is_refused_when_the_model_is_built(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: Liger's kernels may run")
    with pytest.raises(ConfigError, match="needs a CUDA GPU") as err:
        load_causal_lm(TINY, random_init=True, liger_kernel=True)
    assert err.value.exit_code == 2 and "model.liger_kernel=false" in err.value.hint


def test_resume_identity_ignores_how_the_model_runs():
    """Turning checkpointing on after an out-of-memory, or compile off, resumes the same run's checkpoint."""
    plain = identity(compose([]))
    assert identity(compose(["model.gradient_checkpointing=true", "model.compile=true"])) == plain
    assert "gradient_checkpointing" not in plain["model"]


# ---- gradient checkpointing: the same loss and gradients, from recomputed activations ------------------------
@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One real training batch of the bundled sentiment task, encoded by tunelab's datamodule."""
    cfg = compose([f"paths.cache_dir={tmp_path_factory.mktemp('cache')}", "hyperparams.batch_size=8"])
    tokenizer = load_tokenizer(TINY)
    datamodule = build(cfg.datamodule, tokenizer=tokenizer, _convert_="all")
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def _loss_and_grads(batch: dict, method: str, checkpointing: bool) -> tuple[torch.Tensor, dict, int]:
    from tunelab.objectives.sft import summed_token_loss

    torch.manual_seed(0)
    model = load_causal_lm(TINY, random_init=True, gradient_checkpointing=checkpointing)
    torch.manual_seed(1)  # LoRA's init and its dropout draw the same numbers with and without checkpointing
    model = apply_method(model, build_method(compose([f"method={method}"]).method)).train()
    mlp_calls = []
    first_mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
    forward = first_mlp.forward

    def counted(*args, **kwargs):  # a wrapper, not a forward hook: hooks do not fire in the recompute
        mlp_calls.append(1)
        return forward(*args, **kwargs)

    first_mlp.forward = counted
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    loss_sum, tokens = summed_token_loss(out.logits, batch["labels"])
    (loss_sum / tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss_sum / tokens, grads, len(mlp_calls)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(batch, method):
    loss, grads, calls = _loss_and_grads(batch, method, checkpointing=False)
    loss_ckpt, grads_ckpt, calls_ckpt = _loss_and_grads(batch, method, checkpointing=True)
    assert (calls, calls_ckpt) == (1, 2)  # checkpointed: the block ran again in backward
    assert abs(loss.item() - loss_ckpt.item()) < 1e-5
    assert grads.keys() == grads_ckpt.keys() and grads  # LoRA: adapters get gradients through frozen embeddings
    worst = max((grads[n] - grads_ckpt[n]).abs().max().item() for n in grads)
    assert worst < 1e-5, worst


def test_gradient_checkpointing_trains_the_same_steps(run):
    """Three real optimizer steps through `train`, LoRA (adapters over a frozen base): the same losses."""
    plain = run("method=lora")
    checkpointed = run("method=lora", "model.gradient_checkpointing=true")
    assert abs(plain["train/loss"] - checkpointed["train/loss"]) < 1e-5
    assert abs(plain["val/loss"] - checkpointed["val/loss"]) < 1e-5


# ---- fused AdamW: runs on the CPU, and under bf16 mixed precision it still clips -----------------------------
def test_fused_adamw_under_bf16_clips_like_the_unfused_one(run):
    """Lightning refuses to clip for a fused optimizer under any mixed precision (a RuntimeError at the first
    step, measured); the module clips itself where there is no grad scaler (bf16)."""
    bf16 = ["trainer.accelerator=cpu", "trainer.precision=bf16-mixed"]
    unfused = run(*bf16)
    fused = run(*bf16, "hyperparams.optimizer.fused=true")
    unclipped = run(*bf16, "hyperparams.optimizer.fused=true", "hyperparams.gradient_clip_val=null")
    assert abs(fused["train/loss"] - unfused["train/loss"]) < 1e-4
    assert abs(unclipped["train/loss"] - unfused["train/loss"]) > 1e-3  # clipping is active in these steps


# ---- torch.compile: each block compiled, the same loss -----------------------------------------------------------
@pytest.mark.slow  # the compiler takes 30-60 s on this 2-core machine
def test_compile_trains_with_the_same_loss(run):
    import torch._dynamo

    eager = run()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run("model.compile=true")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # Training shapes vary with the batch's longest row: one static graph, one dynamic, one without grad (val);
    # LoRA adds one (the first block's input needs no grad). Many more would mean a recompile per layer or per
    # batch (a KV cache built in training did that), and at 8 dynamo gives up and runs eagerly.
    assert 1 <= graphs <= 3, graphs
    assert compiled["train/loss"] == pytest.approx(eager["train/loss"], rel=1e-4)
    assert compiled["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-4)


# ---- MFU: the FLOP count of a training token, and the device's peak ------------------------------------------
def _tiny_matmul_params(config: dict) -> int:
    """Weights a token is multiplied by in the tiny Llama, from config.json: blocks, final norm, output head."""
    h, i, hd, layers = (config[k] for k in ("hidden_size", "intermediate_size", "head_dim", "num_hidden_layers"))
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    block = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return layers * block + h + config["vocab_size"] * h


def test_flops_per_token_full_finetuning_is_6n():
    torch.manual_seed(0)
    model = load_causal_lm(TINY, random_init=True)
    n = _tiny_matmul_params(TINY_CONFIG)
    # Tied head: the embedding table is left out as a lookup and counted once as the head's multiply.
    assert matmul_parameters(model) == (n, n)
    assert training_flops_per_token(*matmul_parameters(model)) == 6 * n


def test_flops_per_token_untied_head_leaves_the_embedding_out():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(TINY, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    assert total == _tiny_matmul_params(TINY_CONFIG) + TINY_CONFIG["vocab_size"] * TINY_CONFIG["hidden_size"]
    assert matmul_parameters(model) == (_tiny_matmul_params(TINY_CONFIG),) * 2


def test_flops_per_token_lora_is_4n_plus_2_adapter():
    torch.manual_seed(0)
    model = apply_method(load_causal_lm(TINY, random_init=True), build_method(compose(["method=lora"]).method))
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = _tiny_matmul_params(TINY_CONFIG) + adapter
    assert matmul_parameters(model) == (n, adapter)
    assert training_flops_per_token(n, adapter) == 4 * n + 2 * adapter
    assert training_flops_per_token(n, adapter) < 0.7 * training_flops_per_token(n, n)


def test_flops_per_token_counts_only_the_routed_experts():
    torch.manual_seed(0)
    model = load_causal_lm(str(REPO / "src/tunelab/assets/tiny-moe"), random_init=True)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    config = model.config
    n, _ = matmul_parameters(model)
    everything = sum(p.numel() for p in model.parameters())  # tied: the table once, here as the head
    assert experts and n == everything - experts + experts * config.num_experts_per_tok / config.num_local_experts


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.4),
    ("NVIDIA H200", "bf16-mixed", 989.4),
    ("NVIDIA H100 PCIe", "bf16-mixed", 756.0),
    ("NVIDIA H100 NVL", "16-mixed", 835.0),
    ("NVIDIA A100-SXM4-80GB", "bf16-true", 312.0),
    ("NVIDIA A100-SXM4-80GB", "32-true", 19.5),  # float32 matmul precision "highest": no TF32
    ("NVIDIA L40S", "bf16-mixed", 362.1),
    ("NVIDIA L4", "bf16-mixed", 121.0),
    ("NVIDIA A10", "bf16-mixed", 125.0),
    ("NVIDIA A10G", "bf16-mixed", None),  # not in the table: no guess
    ("Tesla V100-SXM2-16GB", "16-mixed", None),
    ("NVIDIA H100 80GB HBM3", "64-true", None),
])
def test_peak_tflops_by_device_name(name, precision, expected):
    assert torch.get_float32_matmul_precision() == "highest"
    assert peak_tflops(name, precision) == expected


def test_peak_tflops_tf32_when_float32_matmuls_use_tensor_cores():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert peak_tflops("NVIDIA H200", "32-true") == PEAK_TFLOPS["H200"]["tf32"] == 494.7
    finally:
        torch.set_float32_matmul_precision(before)


def test_mfu_arithmetic():
    # 0.5B-parameter model (6N = 3e9 FLOPs a token) at 100k tokens/s on a 989.4 TFLOP/s GPU: 30.3 %.
    assert model_flops_utilization(1e5, 3e9, 989.4e12) == pytest.approx(0.3032, abs=1e-4)


def test_throughput_logs_mfu_with_a_given_peak(run):
    """On the CPU perf/mfu appears only with callbacks.throughput.peak_tflops; it is tokens/s × 6N / peak."""
    plain = run()
    assert "perf/mfu" not in plain
    metrics = run("callbacks.throughput.peak_tflops=0.1")
    n = _tiny_matmul_params(TINY_CONFIG)
    assert metrics["perf/mfu"] == pytest.approx(metrics["perf/tokens_per_s"] * 6 * n / 0.1e12, rel=1e-9)
    assert 0 < metrics["perf/mfu"] < 1


def test_train_figures_are_logged_on_logging_steps_and_the_last(run):
    """The module logs train/* only when a logger writes them (every log_every_n_steps) and at the last step
    (the run's final train/loss): a `self.log` costs ~0.8 ms, most of tunelab's per-step overhead before."""
    metrics = run("logger=csv", "trainer.log_every_n_steps=2")  # 3 steps: the CSV gets step 2's figures
    with (run.last_dir / "csv" / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    assert [int(row["step"]) for row in rows] == [1]  # Lightning's step column counts from 0
    assert 0 <= float(rows[0]["train/pad_fraction"]) < 1 and float(rows[0]["train/supervised_tokens"]) > 0
    assert math.isfinite(metrics["train/loss"])  # step 3, the last, reached the final metrics
    assert metrics["train/loss"] != pytest.approx(float(rows[0]["train/loss"]))



# ---- the job process keeps freed memory for the next step (glibc) --------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_keep_freed_memory_sets_glibc_thresholds_unless_the_environment_chose(monkeypatch):
    """Its effect (2,700-5,800 page faults a step -> 1 on the tiny model) is measured in bench/overhead.py; a toy
    allocation pattern in a test process faulted 256-1,534 times a step by default, run to run: not a test."""
    from tunelab.training.allocator import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False  # the environment's choice stands
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert keep_freed_memory() is True  # glibc took both settings
    from tunelab import job

    assert "keep_freed_memory()" in inspect.getsource(job.hydra_verb)  # the job entry point asks for it
    assert train_mod.train.needs.training  # for the verb that declares a training process
