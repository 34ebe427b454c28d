"""A fine-tuning method as built from `method.*` (a PEFT config, quantization, a freeze rule, or none), applied
to a loaded model; and the counts of what trains."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from tunelab.config.build import build
from tunelab.errors import ConfigError, did_you_mean
from tunelab.models.load import block_stack


@dataclass
class Method:
    """A fine-tuning method as built from `method.*`: the library's own objects, no names to dispatch on.

    peft: a PEFT config (adapter or prompt learning), or None to train the model's own weights.
    quantization: a transformers quantization config the base is loaded with (QLoRA), or None.
    freeze: a callable `freeze(model)` choosing which of the model's own weights train, or None for all.
    """

    peft: Any | None = None
    quantization: Any | None = None
    freeze: Callable[[nn.Module], None] | None = None


def build_method(node: Any) -> Method:
    """Instantiate the `method` config node and refuse incompatible combinations before any model loads."""
    built = build(node, _convert_="all") or {}
    unknown = sorted(set(built) - {f.name for f in fields(Method)})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in the method", f"key method.{unknown[0]}",
                          did_you_mean(unknown[0], [f.name for f in fields(Method)]))
    method = Method(**built)
    if method.quantization is not None:
        if method.peft is None:
            raise ConfigError(
                "a quantized base cannot be fully fine-tuned: 4-bit weights take no gradient updates",
                "key method.quantization",
                "use method=qlora (LoRA on the quantized base), or drop method.quantization",
            )
        if not torch.cuda.is_available():  # checked when the run is built, not at import
            raise ConfigError(
                "method.quantization (bitsandbytes 4-bit, QLoRA) needs a CUDA GPU and none is available",
                "key method.quantization",
                "run on a GPU machine (trainer=gpu), or use method=lora on the CPU",
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("method.quantization needs the bitsandbytes package, which is not installed",
                              "key method.quantization", "pip install 'tunelab[qlora]' (make does it on a GPU box)")
    if method.peft is not None and method.freeze is not None:
        raise ConfigError("method.freeze applies to full fine-tuning; a PEFT adapter already freezes the base",
                          "key method.freeze", "set method.peft=null or method.freeze=null")
    return method


def apply_method(model: nn.Module, method: Method | None = None) -> nn.Module:
    """Wrap the model with the method's PEFT adapter, or train its own weights (all, or those `freeze` keeps)."""
    method = method or Method()
    if method.peft is None:
        model.requires_grad_(True)
        if method.freeze is not None:
            method.freeze(model)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False):
        # PEFT's recipe for a k-bit base: norms in fp32, input grads on, so adapters get gradients.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    try:
        return get_peft_model(model, method.peft)
    except (ValueError, NotImplementedError) as err:  # PEFT refuses bad settings with either
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(
                f"method.peft.target_modules matches no module of this model ({err})",
                "key method.peft.target_modules",
                f"linear modules here: {', '.join(names)}; or use all-linear",
            ) from None
        # PEFT's other refusals are about this config on this model (e.g. dropout on MoE expert weights).
        raise ConfigError(f"PEFT cannot apply method.peft to this model: {err}", "key method.peft",
                          "change the method's settings as the message says, e.g. method.peft.lora_dropout=0") from None


def train_only(model: nn.Module, last_n_layers: int = 0, patterns: list[str] | None = None) -> None:
    """Freeze every weight except those of the last `last_n_layers` blocks and those whose name matches
    one of `patterns` (regular expressions searched in parameter names, e.g. `lm_head|norm`)."""
    stack_name, stack = block_stack(model)
    if not 0 <= last_n_layers <= len(stack):
        raise ConfigError(f"method.freeze.last_n_layers={last_n_layers} but the model has {len(stack)} layers",
                          "key method.freeze.last_n_layers", f"give a number from 0 to {len(stack)}")
    keep = {f"{stack_name}.{i}." for i in range(len(stack) - last_n_layers, len(stack))}
    compiled = [re.compile(p) for p in patterns or []]
    # Every name of a tied tensor counts: `lm_head` selects the embeddings it shares its weight with.
    named = list(model.named_parameters(remove_duplicate=False))
    names = [n for n, _ in named]
    for pattern in compiled:
        if not any(pattern.search(n) for n in names):
            raise ConfigError(
                f"method.freeze.patterns: {pattern.pattern!r} matches no parameter", "key method.freeze.patterns",
                f"parameters look like: {', '.join(names[:3])}, ..., {names[-1]}",
            )
    model.requires_grad_(False)
    for name, param in named:
        if any(name.startswith(k) for k in keep) or any(p.search(name) for p in compiled):
            param.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("method.freeze leaves no parameter to train", "key method.freeze",
                          "raise last_n_layers or add a pattern")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
