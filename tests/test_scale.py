"""Scale on existing engines: FSDP / DeepSpeed trainer options, SLURM multi-node, the Ray launcher.

What runs here (2 CPU cores, no GPU, no deepspeed, no SLURM): every new option composes and validates, the
FSDP strategy object is built from its YAML, the decoder-layer policy wraps exactly the decoder layers of
real models (through torch's own activation-checkpointing pass), DeepSpeed without its package is exit 2
naming the extra, SLURM task and node counts follow trainer.devices and trainer.num_nodes, checkpoint
directories (what sharded strategies write) are marked, found, linked, pruned and resumed from, and a Ray
sweep (where the `ray` extra is installed). The sharded training runs themselves need GPUs: `gpu` tests.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, make_cfg, shared_cache
from procs import budget
from tunelab import paths
from tunelab.checkpoint.callback import AtomicCheckpointIO, Checkpointing
from tunelab.checkpoint.io import complete_checkpoints, link_last, mark_directory, marker_path
from tunelab.checkpoint.resume import find_resume
from tunelab.cli import preflight
from tunelab.config.build import build
from tunelab.config.compose import compose
from tunelab.config.engine import check_engine
from tunelab.config.validate import validate
from tunelab.errors import CheckpointError, ConfigError

# The trainer options whose strategy shards the model, and the bundled random-init models: read from conf/.
SHARDING = {"pytorch_lightning.strategies.FSDPStrategy", "pytorch_lightning.strategies.DeepSpeedStrategy"}


def _strategy(option: str) -> str | None:
    """The `_target_` of a trainer option's strategy node, inherited through its defaults list (no compose)."""
    node = yaml.safe_load((paths.conf_dir() / "trainer" / f"{option}.yaml").read_text())
    strategy = node.get("strategy")
    if isinstance(strategy, dict) and "_target_" in strategy:
        return strategy["_target_"]
    if strategy is not None and not isinstance(strategy, dict):
        return None  # a name such as `ddp`: Lightning's own, not a sharding node
    parents = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return next((t for t in map(_strategy, parents) if t), None)


TRAINERS = {p.stem: _strategy(p.stem) for p in sorted((paths.conf_dir() / "trainer").glob("*.yaml"))}
SHARDED = [name for name, target in TRAINERS.items() if target in SHARDING]
DEEPSPEED = [name for name in SHARDED if TRAINERS[name].endswith("DeepSpeedStrategy")]
MODELS = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((paths.conf_dir() / "model").glob("*.yaml"))}
RANDOM_INIT = [node["name_or_path"].removeprefix("${paths.assets_dir}/") for node in MODELS.values()
               if node.get("random_init") and str(node["name_or_path"]).startswith("${paths.assets_dir}/")]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def test_sharded_trainer_options_are_discovered():
    assert {"fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= set(SHARDED)  # test_config.py composes every one too
    assert DEEPSPEED and set(DEEPSPEED) < set(SHARDED)
    assert {"tiny-llama", "tiny-moe"} <= set(RANDOM_INIT)  # one per architecture: Llama and Mixtral
    assert all((paths.assets_dir() / name / "config.json").is_file() for name in RANDOM_INIT)


@pytest.mark.parametrize("option", SHARDED)
def test_sharded_option_validates_without_importing_deepspeed(option):
    before = "deepspeed" in sys.modules
    cfg = compose([f"trainer={option}"])
    validate(cfg)  # deep checks included: signatures, Literal names, the optimizer's dry run
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.devices == "auto"
    assert ("deepspeed" in sys.modules) == before  # validation never imported it
    expected = {"fsdp": "FSDPStrategy", "deepspeed_zero2": "DeepSpeedStrategy", "deepspeed_zero3": "DeepSpeedStrategy"}
    assert cfg.trainer.strategy._target_ == f"pytorch_lightning.strategies.{expected[option]}"
    if option.startswith("deepspeed"):
        assert cfg.trainer.strategy.stage == int(option[-1])


def test_fsdp_strategy_is_built_from_its_yaml():
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    from tunelab.models.sharding import DecoderLayers

    strategy = build(compose(["trainer=fsdp"]).trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert isinstance(strategy.kwargs["auto_wrap_policy"], DecoderLayers)
    assert strategy._state_dict_type == "full" and strategy._activation_checkpointing_kwargs == {}
    checkpointed = build(compose(["trainer=fsdp", "trainer.strategy.activation_checkpointing_policy="
                                  "{_target_:tunelab.models.sharding.DecoderLayers}"]).trainer.strategy)
    assert isinstance(checkpointed._activation_checkpointing_kwargs["auto_wrap_policy"], DecoderLayers)


@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.strategy.sharding_strategy=FULL_SHARDD", "did you mean 'FULL_SHARD'"),
    ("trainer.strategy.state_dict_type=shardedd", "did you mean 'sharded'"),  # hidden before by a TYPE_CHECKING alias
])
def test_fsdp_names_are_checked_before_building(override, expected):
    with pytest.raises(ConfigError) as info:
        validate(compose(["trainer=fsdp", override]))
    assert expected in info.value.message() and f"override {override} on the command line" in info.value.message()
    validate(compose(["trainer=fsdp", "trainer.strategy.sharding_strategy=hybrid_shard"]))  # any case, as Lightning


def test_fsdp_needs_a_gpu_here(tmp_path):
    """Why FSDP has no CPU test: Lightning's FSDPStrategy refuses a CPU accelerator (and torch's FSDP itself needs an
    accelerator device). If this starts to pass, a 2-process CPU FSDP test becomes possible."""
    cfg = make_cfg(tmp_path, ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=none"])
    with pytest.raises(ConfigError, match="requires a GPU accelerator"):
        build(cfg.trainer, callbacks=[], logger=False, default_root_dir=str(tmp_path))


@pytest.mark.parametrize("model", RANDOM_INIT)
def test_decoder_layer_policy_wraps_exactly_the_decoder_layers(model):
    """The policy FSDP and activation checkpointing use, resolved from a real model (plain and under LoRA): through
    torch's own apply_activation_checkpointing, every decoder layer is wrapped and nothing else; loss and
    gradients are unchanged."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    from tunelab.models.load import load_causal_lm
    from tunelab.models.sharding import DecoderLayers
    from tunelab.training.module import TuneModule

    torch.manual_seed(0)
    base = load_causal_lm(str(paths.assets_dir() / model), random_init=True)
    layers = base.config.num_hidden_layers
    for lm in (base, get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear"))):
        root = TuneModule(lm, tokenizer=None, optimizer=torch.optim.AdamW)
        policy = DecoderLayers()
        targets = policy._run_policy(root, set(), {})  # what FSDP wraps
        assert len(targets) == layers
        assert [c.__name__ for c in policy.classes] == [type(lm.get_decoder().layers[0]).__name__]
        assert policy.classes[0].__name__.endswith("DecoderLayer")

        ids = torch.randint(4, lm.config.vocab_size, (2, 12))
        wrapped = copy.deepcopy(root)
        apply_activation_checkpointing(wrapped, auto_wrap_policy=DecoderLayers())
        assert sum(isinstance(m, CheckpointWrapper) for m in wrapped.modules()) == layers
        losses = []
        for module in (root, wrapped):
            module.train()
            torch.manual_seed(1)
            loss = module.model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append((loss.detach(), [p.grad.clone() for p in module.model.parameters() if p.requires_grad]))
        assert torch.allclose(losses[0][0], losses[1][0], atol=1e-6)
        for a, b in zip(losses[0][1], losses[1][1], strict=True):
            assert torch.allclose(a, b, atol=1e-6)


# ---- DeepSpeed: the package is an extra -------------------------------------------------------------
@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed here: the refusal cannot happen")
@pytest.mark.parametrize("option", DEEPSPEED)
def test_deepspeed_without_its_package_is_exit_2_naming_the_extra(option, tmp_path):
    cfg = make_cfg(tmp_path, [f"trainer={option}"])
    validate(cfg)  # the config itself is fine ...
    with pytest.raises(ConfigError) as info:
        check_engine(cfg)  # ... but not runnable here
    assert info.value.exit_code == 2
    text = info.value.message()
    assert text.startswith("tunelab: config error: trainer.strategy is DeepSpeed but the deepspeed package is not")
    assert "pip install -e '.[deepspeed]'" in text
    from tunelab.verbs.train import train

    with pytest.raises(ConfigError, match=r"\.\[deepspeed\]"):  # train() checks it before building anything
        train(cfg)
    assert not (tmp_path / "model").exists()


def test_deepspeed_refuses_gradient_accumulation():
    with pytest.raises(ConfigError) as info:
        validate(compose(["trainer=deepspeed_zero3", "hyperparams.accumulate_grad_batches=4"]))
    text = info.value.message()
    assert "DeepSpeed with hyperparams.accumulate_grad_batches=4" in text
    assert "override hyperparams.accumulate_grad_batches=4 on the command line" in text
    validate(compose(["trainer=fsdp", "hyperparams.accumulate_grad_batches=4"]))  # FSDP: tunelab rescales itself


@pytest.mark.parametrize("option", SHARDED)
def test_sharded_run_refuses_an_adapter_over_a_random_base(option):
    with pytest.raises(ConfigError, match="cannot be saved from a sharded run"):
        validate(compose([f"trainer={option}", "method=lora"]))  # model=tiny is randomly initialised
    validate(compose([f"trainer={option}", "method=lora", "model.random_init=false"]))  # a base on disk is fine


# ---- SLURM: one task per device on every node -------------------------------------------------------
def test_slurm_two_nodes_by_four_gpus_follows_the_trainer():
    from hydra.utils import instantiate

    overrides = ["hydra/launcher=slurm", "trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2"]
    cfg = compose(overrides)
    validate(cfg)
    launcher = instantiate(cfg.hydra.launcher)  # submitit's own launcher object, as Hydra builds it
    assert {k: launcher.params[k] for k in ("nodes", "tasks_per_node", "gpus_per_node")} == {
        "nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4}
    preflight(overrides)  # a single 8-GPU run
    preflight(["-m", *overrides, "hyperparams.lr=1e-4,3e-4"])  # a sweep whose trials are 8-GPU SLURM jobs
    default = instantiate(compose(["hydra/launcher=slurm"]).hydra.launcher)
    assert (default.params["nodes"], default.params["tasks_per_node"]) == (1, 1)  # trainer=default: one GPU


def test_slurm_refuses_devices_it_cannot_count():
    with pytest.raises(ConfigError) as info:
        preflight(["-m", "hydra/launcher=slurm", "trainer=fsdp", "hyperparams.lr=1e-4,3e-4"])  # devices: auto
    text = info.value.message()
    assert "hydra/launcher=slurm needs a number of tasks_per_node but trainer.devices is 'auto'" in text
    assert "give trainer.devices a number" in text
    with pytest.raises(ConfigError, match="starts 2 tasks per node but trainer.devices is 4"):
        preflight(["hydra/launcher=slurm", "trainer=gpu", "trainer.devices=4", "hydra.launcher.tasks_per_node=2"])


@pytest.mark.parametrize("option", SHARDED)
def test_sweep_refuses_a_relaunching_sharded_trial_outside_slurm(option):
    """FSDP and DeepSpeed start extra ranks by re-running the command line, as DDP does (pytorch-lightning#11300)."""
    with pytest.raises(ConfigError, match=r"cannot run trials with trainer.strategy=\w+Strategy on 2 devices"):
        preflight(["-m", f"trainer={option}", "trainer.devices=2", "hyperparams.lr=1e-4,3e-4"])


# ---- checkpoints written as directories of shards ---------------------------------------------------
def _shards(path: Path, ranks: int = 2, size: int = 64) -> Path:
    """A checkpoint directory as an engine writes it: one file per rank (its contents are the engine's business)."""
    (path / "checkpoint").mkdir(parents=True)
    for rank in range(ranks):
        (path / "checkpoint" / f"rank{rank}.pt").write_bytes(bytes([rank]) * size)
    (path / "latest").write_text("checkpoint")
    return path


def test_checkpoint_directories_are_marked_linked_pruned_and_resumed(tmp_path):
    ident = identity_of(["method=full"])
    directory = tmp_path / "run" / "checkpoints"
    callback = Checkpointing(str(directory), keep_last=2)
    info = {"identity": ident, "wandb_id": "abc123", "step_boundary": True, "resumable": True}
    for step in (2, 4, 6):
        path = _shards(directory / f"step{step}.ckpt")
        mark_directory(path, info, step=step, epoch=0)
        link_last(directory, path)
        callback._prune()
    assert sorted(p.name for p in directory.glob("step*.ckpt")) == ["step4.ckpt", "step6.ckpt"]  # whole dirs gone
    assert not marker_path(directory / "step2.ckpt").exists()
    last = directory / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "step6.ckpt"
    found, notes = complete_checkpoints(directory)
    assert [m["step"] for m, _ in found] == [4, 6, 6] and not notes  # last.ckpt counts as step 6 too

    plan = find_resume(str(tmp_path / "run"), tmp_path / "other", ident)  # resume=<run dir>
    assert plan.in_place and plan.info.step == 6 and plan.path.name in ("step6.ckpt", "last.ckpt")
    assert plan.info.tunelab["wandb_id"] == "abc123"  # the same W&B run continues
    plan.check_tensors(torch.nn.Module())  # shard names and shapes are the engine's to check
    direct = find_resume(str(directory / "step4.ckpt"), tmp_path / "other", ident)  # resume=<checkpoint dir>
    assert not direct.in_place and direct.info.step == 4 and direct.path == directory / "step4.ckpt"

    with pytest.raises(CheckpointError, match="is of another model or method: method"):
        find_resume(str(directory / "step4.ckpt"), tmp_path / "other", identity_of(["method=lora"]))

    (directory / "step6.ckpt" / "checkpoint" / "rank1.pt").write_bytes(b"cut")  # a rank's shard cut short
    found, notes = complete_checkpoints(directory)
    assert [m["step"] for m, p in found] == [4] and any("step6.ckpt" in n for n in notes)
    with pytest.raises(CheckpointError, match="step6.ckpt is incomplete"):
        find_resume(str(directory / "step6.ckpt"), tmp_path / "other", ident)

    AtomicCheckpointIO().remove_checkpoint(directory / "step4.ckpt")  # the best-by-metric path under DeepSpeed
    assert not (directory / "step4.ckpt").exists() and not marker_path(directory / "step4.ckpt").exists()


def test_a_checkpoint_directory_without_marker_is_not_resumed(tmp_path):
    directory = tmp_path / "checkpoints"
    _shards(directory / "step2.ckpt")  # the job died after the shards, before the marker
    found, notes = complete_checkpoints(directory)
    assert not found and "no completion marker" in notes[0]
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_resume(str(tmp_path), tmp_path, None)


def identity_of(overrides: list[str]) -> dict:
    from tunelab.checkpoint.resume import identity

    return identity(compose(overrides, return_hydra_config=False))


# ---- Ray: trials as Ray tasks on a local cluster -----------------------------------------------------
@pytest.mark.slow  # starts a local Ray cluster and runs 2 trials (~40 s on 2 cores)
def test_ray_sweep_runs_each_trial_as_a_ray_task(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="needs the `ray` extra (pip install -e '.[ray]')")
    args = ["-m", "hydra/launcher=ray", "hydra.launcher.ray.init.num_cpus=2", "experiment=sweep_smoke",
            "hyperparams.lr=1e-3,3e-3", "logger=none", f"paths.output_dir={tmp_path}", shared_cache()]
    out = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", *args], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=budget(600))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Ray Launcher is launching 2 jobs" in out.stdout + out.stderr
    (sweep,) = (tmp_path / "multiruns").iterdir()
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in trials] == ["0", "1"]
    lrs = set()
    for trial in trials:
        metrics = json.loads((trial / "metrics.json").read_text())
        assert metrics["val/loss"] > 0
        assert (trial / "model" / "model.safetensors").is_file()
        overrides = yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
        lrs |= {float(o.split("=")[1]) for o in overrides if o.startswith("hyperparams.lr=")}
    assert lrs == {1e-3, 3e-3}  # each value ran once, in its own trial


def test_ray_launcher_without_its_plugin_is_exit_2(tmp_path):
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None:
        pytest.skip("the ray extra is installed here: the refusal cannot happen")
    cfg = compose(["hydra/launcher=ray"])
    assert cfg.hydra.launcher.ray.init.num_cpus == 2 and cfg.hydra.launcher.ray.remote.max_calls == 1
    with pytest.raises(ConfigError) as info:
        preflight(["-m", "hydra/launcher=ray", "hyperparams.lr=1e-3,3e-3"], deep=False)
    assert "hydra/launcher=ray needs its Hydra plugin (hydra_ray_launcher)" in info.value.message()
    assert "pip install -e '.[ray]'" in info.value.message()


# ---- on GPUs -----------------------------------------------------------------------------------------
def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _train_on_gpus(tmp_path: Path, option: str, extra: list[str], steps: int = 4) -> subprocess.CompletedProcess:
    args = [f"trainer={option}", "trainer.devices=2", f"hyperparams.max_steps={steps}", "eval.baseline=false",
            "eval.max_eval_samples=8", "logger=none", f"paths.output_dir={tmp_path}", *extra]
    return subprocess.run([str(Path(sys.executable).with_name("tunelab")), "train", *args], env=ENV,
                          capture_output=True, text=True, timeout=budget(900))


def _check_model_dir(run: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = load_file(run / "model" / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(run / "model")  # consolidated: loads with plain transformers
    own = model.state_dict()
    assert {k for k in weights} <= set(own)
    for key, value in weights.items():
        assert value.shape == own[key].shape, key  # whole tensors, not one rank's shard


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs")
def test_fsdp_on_two_gpus_saves_consolidated_weights_and_resumes(tmp_path):
    """FSDP, 2 GPUs: model/ holds whole tensors that load with transformers; the run resumes from its checkpoint.

    last ran: never (no GPU lent)"""
    out = _train_on_gpus(tmp_path / "a", "fsdp", ["callbacks.checkpoint.every_n_steps=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "a" / "runs").iterdir()
    _check_model_dir(run)
    assert json.loads((run / "metrics.json").read_text())["val/loss"] > 0
    out = _train_on_gpus(tmp_path / "a", "fsdp", [f"resume={run}"], steps=6)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2 or not HAS_DEEPSPEED, reason="needs 2 CUDA GPUs and the deepspeed extra")
def test_deepspeed_zero3_on_two_gpus_saves_consolidated_weights(tmp_path):
    """ZeRO-3, 2 GPUs: model/ is consolidated from the shards; checkpoints are marked directories.

    last ran: never (no GPU lent)"""
    out = _train_on_gpus(tmp_path, "deepspeed_zero3", ["callbacks.checkpoint.every_n_steps=2"])
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    _check_model_dir(run)
    found, _ = complete_checkpoints(run / "checkpoints")
    assert found and found[-1][1].is_dir()


def test_readme_and_scale_doc_name_every_sharded_option():
    text = (REPO / "docs" / "SCALE.md").read_text() + (REPO / "README.md").read_text()
    for option in [*SHARDED, "ddp_cpu"]:
        assert f"trainer={option}" in text
    assert "hydra/launcher=ray" in text and "last ran" in text


def test_every_srun_task_agrees_on_one_run_directory():
    """`srun tunelab train ...` starts every rank as its own command line: the id comes from the job step, and
    only rank 0 writes .hydra/; the composed run directory is the same for all 8 ranks."""
    from tunelab.cli import run_overrides
    from tunelab.config.compose import new_run_id

    ranks = [{"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(r)}
             for r in range(8)]
    overrides = [run_overrides(env, "train") for env in ranks]
    assert overrides[0] == ["run_id=slurm-4242-0"]
    assert overrides[3] == ["run_id=slurm-4242-0", "hydra.output_subdir=null", "hydra.job.name=train_rank3"]
    dirs = {str(compose(o).hydra.run.dir) for o in overrides}
    assert len(dirs) == 1 and dirs.pop().endswith("/runs/slurm-4242-0")
    assert run_overrides({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1"}, "train") == [f"run_id={new_run_id()}"]
    assert run_overrides({}, "train") == [f"run_id={new_run_id()}"]
