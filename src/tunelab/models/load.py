"""Load tokenizers and causal LMs, and apply a fine-tuning method (a PEFT config, or none)."""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab import libraries
from tunelab.errors import CheckpointError, ConfigError, did_you_mean

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


def chat_template_problem(value: Any) -> tuple[str, str] | None:
    """(what, hint) when `value` is not a usable `dataset.chat_template`: a name of NAMED_CHAT_TEMPLATES, or
    Jinja that parses and reads `messages`. Anything else ("nope", a typo of a name) would be taken as a
    template that renders the same text for every example and trains on it."""
    if value is None or value in NAMED_CHAT_TEMPLATES:
        return None
    names = did_you_mean(str(value), NAMED_CHAT_TEMPLATES)
    hint = f"{names}; or inline Jinja that loops over messages; null: the tokenizer's own"
    if not isinstance(value, str):
        return f"expected a template name or Jinja text, got {type(value).__name__}", hint
    import jinja2
    import jinja2.meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        parsed = ImmutableSandboxedEnvironment().parse(value)
    except jinja2.TemplateSyntaxError as err:
        return f"not a known name and not valid Jinja: {err.message} (line {err.lineno})", hint
    if "messages" not in jinja2.meta.find_undeclared_variables(parsed):
        return f"{value[:40]!r} is neither a known template name nor Jinja that reads `messages`", hint
    return None


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~"))


def _check_local(name_or_path: str, key: str) -> None:
    if name_or_path.startswith((".", "/", "~")) and not Path(name_or_path).expanduser().exists():
        raise ConfigError(
            f"model directory not found: {name_or_path}",
            f"key {key}",
            "give an existing local directory or a hub id such as Qwen/Qwen2.5-0.5B-Instruct",
        )


@contextmanager
def _loading(name_or_path: str, key: str) -> Iterator[None]:
    """Turn the hub's and the filesystem's errors (unknown id, no network, gated repo, no safetensors)
    into one config error that names the key; a raw traceback is no help to someone with a typo."""
    try:
        yield
    except OSError as err:
        raise ConfigError(
            f"cannot load {name_or_path!r}: {str(err).splitlines()[0]}", f"key {key}",
            "check the hub id or local directory; offline (HF_HUB_OFFLINE=1) only cached or local models load; "
            "gated models need `hf auth login`",
        ) from None


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
    with _loading(name_or_path, "model.tokenizer_name_or_path"):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if chat_template is not None:
        problem = chat_template_problem(chat_template)
        if problem:
            raise ConfigError(f"dataset.chat_template: {problem[0]}", "key dataset.chat_template", problem[1])
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
    quantization_config: Any | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    gradient_checkpointing: bool = False,
    compile: bool = False,
    liger_kernel: bool = False,
) -> nn.Module:
    """A causal LM from a hub id or local directory; with `random_init`, freshly initialised from its config.

    `config_overrides` (random init only) change the architecture before it is built, e.g.
    `+model.config_overrides={hidden_size:256,num_hidden_layers:6}`: a from-scratch model of another size.

    Random init draws from torch's global RNG, which `train` seeds first, so it is reproducible.
    `quantization_config` (a transformers `BitsAndBytesConfig`, from `method.quantization`) loads the
    weights quantized, for QLoRA. `gradient_checkpointing`, `compile` and `liger_kernel` are the opt-in
    fast paths of `speed_up`, applied before a PEFT adapter wraps the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    del tokenizer_name_or_path  # read by the tokenizer node; kept here so the model node stays one place
    _check_local(name_or_path, "model.name_or_path")
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    if quantization_config is not None and random_init:
        raise ConfigError(
            "a quantized base (method.quantization) needs pretrained weights, but model.random_init is true",
            "key model.random_init",
            "save the random model with save_pretrained and point model.name_or_path at it with random_init=false",
        )
    if config_overrides and not random_init:
        raise ConfigError("model.config_overrides change the architecture, so they need model.random_init=true",
                          "key model.config_overrides", "pretrained weights only fit their own config; "
                          "drop the overrides, or train from scratch with model.random_init=true")
    if random_init:
        with _loading(name_or_path, "model.name_or_path"):
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
        for key, value in dict(config_overrides or {}).items():
            if not hasattr(config, key):
                raise ConfigError(f"model.config_overrides.{key}: {type(config).__name__} has no such setting",
                                  f"key model.config_overrides.{key}",
                                  did_you_mean(key, [k for k in config.to_dict() if not k.startswith("_")]))
            setattr(config, key, value)
        libraries.set_attn_implementation(config, attn_implementation)
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except (ValueError, RuntimeError) as err:  # e.g. a hidden size the heads do not divide
            if not config_overrides:
                raise
            raise ConfigError(f"model.config_overrides make an architecture that cannot be built: {err}",
                              "key model.config_overrides", "check the sizes fit together "
                              "(hidden_size = num_attention_heads x head_dim, heads divisible by key/value heads)"
                              ) from None
        model = model.to(torch_dtype) if torch_dtype != "auto" else model
    else:
        with _loading(name_or_path, "model.name_or_path"):
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path,
                dtype=torch_dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                revision=revision,
                use_safetensors=None if _is_local(name_or_path) else True,
                **({"quantization_config": quantization_config} if quantization_config is not None else {}),
            )
    return speed_up(model, gradient_checkpointing=gradient_checkpointing, compile=compile, liger_kernel=liger_kernel)


def speed_up(model: nn.Module, gradient_checkpointing: bool = False, compile: bool = False,
             liger_kernel: bool = False) -> nn.Module:
    """The opt-in fast paths (`model.gradient_checkpointing`, `model.compile`, `model.liger_kernel`), in place.

    Applied to the bare model, before a PEFT adapter wraps it: Liger patches the modules' forwards, adapters
    then wrap the patched linears; the compiled blocks are traced at their first call, after the adapter's
    layers are in place. Each leaves the parameter names as they were, so checkpoints and `save_pretrained`
    do not change.
    """
    if liger_kernel:
        _apply_liger(model)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing",
                              "key model.gradient_checkpointing", "set model.gradient_checkpointing=false")
        # transformers 5.2x renamed gradient_checkpointing_enable (kept as a deprecated alias) to this:
        enable = getattr(model, "activation_checkpointing_enable", None)
        # Non-reentrant checkpointing: gradients reach adapters inside a block whose inputs need no grad.
        kwargs = {"use_reentrant": False}
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not getattr(model, "_require_grads_hook", None):
            # PEFT's recipe for adapters over frozen embeddings (what prepare_model_for_kbit_training does);
            # newer transformers register this hook themselves.
            model.enable_input_require_grads()
    if compile:
        # Each transformer block on its own, not the whole model: the blocks share one graph (compiled once,
        # not once per layer), the loss stays eager in the module, and a graph break in the model's glue
        # code (masks, caches) costs nothing. `nn.Module.compile` keeps parameter names (no `_orig_mod.`).
        _, blocks = _block_stack(model, "key model.compile")
        for block in blocks:
            block.compile()
    return model


def _apply_liger(model: nn.Module) -> None:
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) patched into this model instance, as HF Trainer's
    `use_liger_kernel` does. Its fused linear + cross-entropy only acts when the model computes the loss from
    `labels`; tunelab computes its token-normalised loss from the logits, so that patch is turned off."""
    key = "key model.liger_kernel"
    if not torch.cuda.is_available():
        raise ConfigError("model.liger_kernel needs a CUDA GPU (Liger's kernels are Triton) and none is available",
                          key, "set model.liger_kernel=false on the CPU, or run on a GPU machine (trainer=gpu)")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("model.liger_kernel needs the liger-kernel package, which is not installed", key,
                          "pip install 'tunelab[liger]', or set model.liger_kernel=false")
    from liger_kernel.transformers import monkey_patch

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    supported = getattr(monkey_patch, "MODEL_TYPE_TO_APPLY_LIGER_FN", None)
    if supported is not None and model_type not in supported:  # Liger would only log this and do nothing
        raise ConfigError(f"Liger has no kernels for model type {model_type!r}", key,
                          f"{did_you_mean(str(model_type), list(supported))}; or set model.liger_kernel=false")
    libraries.apply_liger_kernel(model)


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
    from tunelab.config.schema import build

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


def _block_stack(model: nn.Module, key: str = "key method.freeze.last_n_layers") -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList holding the most parameters (decoder layers in every HF LM)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        hint = "use method.freeze.patterns instead" if key.startswith("key method") else f"set {key[4:]}=false"
        raise ConfigError("this model has no stack of layers to choose from", key, hint)
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def train_only(model: nn.Module, last_n_layers: int = 0, patterns: list[str] | None = None) -> None:
    """Freeze every weight except those of the last `last_n_layers` blocks and those whose name matches
    one of `patterns` (regular expressions searched in parameter names, e.g. `lm_head|norm`)."""
    stack_name, stack = _block_stack(model)
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


# ---- trained runs: save what generate/export need, and load it back ---------------------------
def _has_weights(name_or_path: str) -> bool:
    """False only for a local directory without weight files (a random-init model's config dir)."""
    path = Path(name_or_path).expanduser()
    return not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def adapter_base(model: Any) -> nn.Module:
    """The base model of a PEFT model, without its adapter and without touching the model itself:
    prompt learning leaves the base as it was; injected adapters (LoRA, IA3) are removed from a copy."""
    import copy

    if model.peft_config[model.active_adapter].is_prompt_learning:
        return model.get_base_model()
    return copy.deepcopy(model).unload()


def save_unloadable_base(model: nn.Module, dirpath: Path) -> bool:
    """For a PEFT model whose base has no weights at its `base_model_name_or_path` (random init), write the
    base's own weights (adapters removed, not merged) to `dirpath` as safetensors; True if written."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return False
    peft_config = model.peft_config[model.active_adapter]
    if _has_weights(peft_config.base_model_name_or_path or ""):
        return False
    adapter_base(model).save_pretrained(dirpath, safe_serialization=True)
    return True


def load_run(
    run_dir: str | Path, quantize: bool = True, trust_remote_code: bool = False
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, data recipe) of a run written by `tunelab train`, in eval mode.

    `<run>/model` holds a full model or a PEFT adapter (adapter_config.json); an adapter's base comes
    from `<run>/model/base` when the run saved it (random-init bases), else from its base_model_name_or_path.
    The run's `.hydra/config.yaml`, when present, says whether the base was quantized (QLoRA);
    `quantize=False` loads it in full precision instead (what merging needs). The directory is data:
    `trust_remote_code` comes from the caller's command line, never from the run (see tunelab.checkpoint.rundir).
    """
    import json

    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        raise ConfigError(f"no trained model in {model_dir}", "key run",
                          "give a run directory written by `tunelab train` (it holds model/)")
    from tunelab.checkpoint.rundir import check_weight_files, instantiate_saved

    check_weight_files(model_dir)
    saved = run_dir / ".hydra" / "config.yaml"
    options: dict[str, Any] = {"dtype": "auto", "trust_remote_code": trust_remote_code}
    try:
        run_cfg = OmegaConf.load(saved) if saved.is_file() else None
    except Exception as err:  # a hand-edited or damaged file: the model directory alone still loads
        log.warning("ignoring %s, which does not parse (%s)", saved, str(err).splitlines()[0])
        run_cfg = None
    if run_cfg is not None:
        quantization = OmegaConf.select(run_cfg, "method.quantization", default=None)
        if quantize and quantization is not None:
            options["quantization_config"] = instantiate_saved(quantization, saved, "method.quantization")
    tokenizer = load_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
    recipe_file = model_dir / "tunelab_recipe.json"
    try:
        recipe = json.loads(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else {}
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"cannot read the run's recipe: {err}", f"file {recipe_file}",
                              "the file is written by tunelab train; restore it or retrain") from None
    if not isinstance(recipe, dict):
        raise CheckpointError("the run's recipe is not a JSON object", f"file {recipe_file}")
    if not (model_dir / "adapter_config.json").is_file():
        return load_causal_lm(str(model_dir), **options).eval(), tokenizer, recipe
    from peft import PeftConfig, PeftModel

    peft_config = PeftConfig.from_pretrained(str(model_dir))
    base_dir = model_dir / "base"
    base = str(base_dir) if base_dir.is_dir() else peft_config.base_model_name_or_path
    if not _has_weights(base):
        raise CheckpointError(f"the adapter's base model {base} has no weights and the run saved none",
                              f"file {model_dir / 'adapter_config.json'}",
                              "retrain with this version of tunelab (it writes model/base for random-init bases)")
    model = PeftModel.from_pretrained(load_causal_lm(base, **options), str(model_dir))
    return model.eval(), tokenizer, recipe
