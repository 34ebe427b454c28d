"""Load tokenizers and causal LMs, and apply a fine-tuning method (a PEFT config, or none)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

# Named chat templates a dataset may pick instead of the tokenizer's own (`dataset.chat_template`).
# Jinja, rendered by the tokenizer exactly as a model's own template would be.
NAMED_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ message['content'] + '\n' }}{% endif %}"
        "{% endfor %}"
    ),
}


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~"))


def _check_local(name_or_path: str, key: str) -> None:
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise ConfigError(
            f"model directory not found: {name_or_path}",
            f"key {key}",
            "give an existing local directory or a hub id such as Qwen/Qwen2.5-0.5B-Instruct",
        )


def load_tokenizer(
    name_or_path: str,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Any:
    """A Hugging Face tokenizer with a pad token distinct from EOS and the chosen chat template.

    `chat_template` is None (the tokenizer's own), a name from NAMED_CHAT_TEMPLATES, or inline Jinja.
    """
    from transformers import AutoTokenizer

    _check_local(name_or_path, "model.tokenizer_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, revision=revision
    )
    if chat_template is not None:
        tokenizer.chat_template = NAMED_CHAT_TEMPLATES.get(chat_template, chat_template)
    if tokenizer.eos_token is None:
        raise ConfigError(
            f"tokenizer {name_or_path} has no eos_token", "key model.tokenizer_name_or_path",
            "pick a tokenizer with an end-of-sequence token; the model must learn to stop",
        )
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # pad == eos would mask EOS out of the labels and the model never learns to stop (trl#976).
        # Labels are built from explicit masks here, so a separate pad id is cosmetic but keeps logs clear.
        for candidate in ("<|pad|>", "<|finetune_right_pad_id|>", "<pad>", tokenizer.unk_token):
            if candidate and candidate in tokenizer.get_vocab() and candidate != tokenizer.eos_token:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    tokenizer_name_or_path: str | None = None,
    random_init: bool = False,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> nn.Module:
    """A causal LM from a hub id or local directory; with `random_init`, freshly initialised from its config.

    Random init draws from torch's global RNG, which `train` seeds first, so it is reproducible.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    del tokenizer_name_or_path  # read by the tokenizer node; kept here so the model node stays one place
    _check_local(name_or_path, "model.name_or_path")
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    if random_init:
        config = AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
        config._attn_implementation = attn_implementation
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return model.to(torch_dtype) if torch_dtype != "auto" else model
    return AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        revision=revision,
        use_safetensors=None if _is_local(name_or_path) else True,
    )


def apply_method(model: nn.Module, peft_config: Any | None) -> nn.Module:
    """Wrap the model with a PEFT adapter; `None` means full fine-tuning (every weight trains)."""
    if peft_config is None:
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(
                f"method.peft.target_modules matches no module of this model ({err})",
                "key method.peft.target_modules",
                f"linear modules here: {', '.join(names)}; or use all-linear",
            ) from None
        raise


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
