"""Checks of the engine a config runs on: sharded strategies (FSDP, DeepSpeed) and what they cannot do with
the rest of the config, their own names, and whether the engine's package is installed."""

from __future__ import annotations

from enum import Enum

from omegaconf import DictConfig, OmegaConf

from tunelab import libraries
from tunelab.config.locate import MISSING_VALUE, value_at, where
from tunelab.errors import ConfigError, did_you_mean


class Sharded(str, Enum):
    """Lightning strategies whose training state is split across ranks: the class name, and the `_target_`
    of trainer.strategy that names it."""

    FSDPStrategy = "pytorch_lightning.strategies.FSDPStrategy"
    DeepSpeedStrategy = "pytorch_lightning.strategies.DeepSpeedStrategy"


def strategy_target(cfg: DictConfig) -> str | None:
    """The `_target_` of trainer.strategy, or None when it is a name (`ddp`, `auto`) or absent."""
    node = OmegaConf.select(cfg, "trainer.strategy", default=None)
    if isinstance(node, DictConfig) and "_target_" in node:
        return libraries.raw_target(node)
    return None


def sharded_strategy(cfg: DictConfig) -> Sharded | None:
    """The sharded strategy trainer.strategy names, or None for any other (or none)."""
    target = strategy_target(cfg)
    return Sharded(target) if target in {member.value for member in Sharded} else None


def check_strategy(cfg: DictConfig) -> None:
    """What a sharded strategy cannot do with the rest of the config."""
    sharded = sharded_strategy(cfg)
    if sharded is None:
        return
    accumulate = value_at(cfg, "hyperparams.accumulate_grad_batches")
    if sharded is Sharded.DeepSpeedStrategy and accumulate not in (MISSING_VALUE, 1):
        # DeepSpeed owns accumulation and the gradients; the module then normalises each micro-batch by its
        # own tokens (all ranks), which is the token mean of the whole step only when a step is one micro-batch.
        raise ConfigError(f"DeepSpeed with hyperparams.accumulate_grad_batches={accumulate}: DeepSpeed accumulates "
                          "gradients itself, where tunelab cannot average the loss over the whole step's tokens",
                          where(cfg, "hyperparams.accumulate_grad_batches"),
                          "set hyperparams.accumulate_grad_batches=1 and raise hyperparams.batch_size, or use "
                          "trainer=fsdp")
    if value_at(cfg, "model.random_init") is True and OmegaConf.select(cfg, "method.peft", default=None) is not None:
        # model/base (the random base beside the adapter) is written from an unsharded copy of the model.
        raise ConfigError("an adapter over a randomly initialised base cannot be saved from a sharded run: the "
                          "base's weights exist only as shards", "keys model.random_init, method, trainer.strategy",
                          "use method=full, or train the adapter with trainer=default or trainer=ddp_cpu")


def check_sharding_names(cfg: DictConfig) -> None:
    """FSDP's sharding_strategy is a name of torch's ShardingStrategy (Lightning annotates it with a type-checking
    alias, so check_choices cannot see it; a typo would fail as a KeyError inside the Trainer)."""
    value = value_at(cfg, "trainer.strategy.sharding_strategy")
    if sharded_strategy(cfg) is not Sharded.FSDPStrategy or not isinstance(value, str):
        return
    from torch.distributed.fsdp import ShardingStrategy

    names = [member.name for member in ShardingStrategy]
    if value.upper() not in names:
        raise ConfigError(f"unknown sharding_strategy {value!r} for FSDP",
                          where(cfg, "trainer.strategy.sharding_strategy"), did_you_mean(value.upper(), names))


def check_engine(cfg: DictConfig) -> None:
    """The engine a valid config names must be installed to run it: a DeepSpeed strategy needs the `deepspeed`
    package. Looked up without importing it (its import probes CUDA); not part of validate(), so the config
    tree composes and validates on machines without it. Exit 2 naming the extra, never a traceback."""
    import importlib.util

    if sharded_strategy(cfg) is Sharded.DeepSpeedStrategy and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("trainer.strategy is DeepSpeed but the deepspeed package is not installed",
                          where(cfg, "trainer.strategy"),
                          "install the extra: pip install -e '.[deepspeed]' (needs CUDA; `make setup` adds it where "
                          "nvidia-smi finds a GPU), or use trainer=fsdp")
