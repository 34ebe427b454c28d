"""Sharded training (FSDP, DeepSpeed ZeRO) on Lightning's own strategies: what tunelab adds around them.

- `DecoderLayers`: an FSDP wrap policy (and activation-checkpointing policy) that wraps the model's decoder
  layers, their class found in the model it is applied to: no table of class names per architecture.
- `full_state_dict`: the whole model's weights gathered onto rank 0 (a collective: every rank calls it), so
  `model/` holds one consolidated safetensors file however the training state was sharded.
- `clip_gradients`: norm clipping of sharded gradients by the norm of the whole model (FSDP's own method).

The config-time rules (a DeepSpeed strategy without deepspeed installed, combinations a sharded run cannot
save) are `tunelab.config.engine.check_strategy`, which imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp.wrap import CustomPolicy

from tunelab import libraries
from tunelab.errors import ConfigError


def decoder_layer_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The classes of the model's decoder layers: the elements of its ModuleList holding the most parameters
    (the same rule `method.freeze.last_n_layers` uses), so any architecture's blocks are found the same way."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks:
        raise ConfigError(f"{type(model).__name__} has no stack of layers for FSDP to wrap", "key trainer.strategy",
                          "set trainer.strategy.auto_wrap_policy=null (the whole model is one FSDP unit)")
    stack = max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))
    return tuple(dict.fromkeys(type(layer) for layer in stack))


class DecoderLayers(CustomPolicy):
    """Wrap (or checkpoint) every decoder layer: one FSDP unit per layer, so one layer's full weights are
    gathered at a time. The layer class is resolved from the root module the policy is run on."""

    def __init__(self) -> None:
        super().__init__(self._is_layer)
        self.classes: tuple[type[nn.Module], ...] = ()

    def _is_layer(self, module: nn.Module) -> bool:
        return isinstance(module, self.classes)

    # torch's policy hook: FSDP and apply_activation_checkpointing call it with the model they wrap.
    def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module],
                    root_kwargs: dict[str, Any]) -> dict[nn.Module, dict[str, Any]]:
        self.classes = decoder_layer_classes(root_module)
        return super()._run_policy(root_module, ignored_modules, root_kwargs)

    def __repr__(self) -> str:
        return f"DecoderLayers({', '.join(c.__name__ for c in self.classes) or 'unresolved'})"


def full_state_dict(trainer: Any) -> dict[str, Any] | None:
    """The LightningModule's full state dict on rank 0 (other ranks: an empty dict) when the strategy shards the
    weights; None when every rank already holds them whole (single device, DDP, ZeRO-1/2).

    A collective: every rank must call it. FSDP gathers through Lightning's full-state-dict context (the
    same one its checkpoints use: rank 0 only, offloaded to CPU); ZeRO-3 through DeepSpeed's own
    consolidation, layer by layer onto rank 0, in the training dtype (what `save_16bit_model` writes)."""
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        state = strategy.lightning_module_state_dict()
        return state if trainer.is_global_zero else {}
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        state = libraries.deepspeed_full_state_dict(strategy.deepspeed_engine)
        return dict(state) if trainer.is_global_zero and state is not None else {}
    return None


def submodule_state(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of `state` under `prefix.`, with the prefix removed (the HF model inside the LightningModule)."""
    cut = prefix + "."
    return {key[len(cut):]: value for key, value in state.items() if key.startswith(cut)}


def clip_gradients(trainer: Any, max_norm: float) -> bool:
    """Clip by the global norm when FSDP shards the gradients (torch's clip_grad_norm_ would see only this rank's
    shard, so Lightning refuses norm clipping under FSDP); True if done here, False: clip the usual way."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    root = trainer.strategy.model
    if not isinstance(root, FullyShardedDataParallel):
        return False
    root.clip_grad_norm_(max_norm)
    return True
