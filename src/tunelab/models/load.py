"""Load tokenizers and causal LMs (the opt-in fast paths applied), and the model of a trained run."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab import libraries
from tunelab.config.chat_templates import chat_template_problem, resolve_chat_template
from tunelab.errors import CheckpointError, ConfigError, did_you_mean

log = logging.getLogger(__name__)


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


def register_architectures() -> None:
    """tunelab's own architectures (`model_type: tunelab_mot`, tunelab.models.mot) in transformers' Auto classes,
    so a directory of one loads like any model, without trust_remote_code. Called by the loaders, not at import
    (nothing happens at import); idempotent."""
    from tunelab.models.mot import register

    register()


def load_tokenizer(
    name_or_path: str,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Any:
    """A Hugging Face tokenizer with a pad token distinct from EOS and the chosen chat template.

    `chat_template` is None (the tokenizer's own), a name of conf/chat_template/, or inline Jinja.
    """
    from transformers import AutoTokenizer

    _check_local(name_or_path, "model.tokenizer_name_or_path")
    register_architectures()  # AutoTokenizer may read the model's config.json
    with _loading(name_or_path, "model.tokenizer_name_or_path"):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if chat_template is not None:
        problem = chat_template_problem(chat_template)
        if problem:
            raise ConfigError(f"dataset.chat_template: {problem[0]}", "key dataset.chat_template", problem[1])
        tokenizer.chat_template = resolve_chat_template(chat_template)
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
    register_architectures()
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
        _, blocks = block_stack(model, "key model.compile")
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


def block_stack(model: nn.Module, key: str = "key method.freeze.last_n_layers") -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList holding the most parameters (decoder layers in every HF LM)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        hint = "use method.freeze.patterns instead" if key.startswith("key method") else f"set {key[4:]}=false"
        raise ConfigError("this model has no stack of layers to choose from", key, hint)
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


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
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        raise ConfigError(f"no trained model in {model_dir}", "key run",
                          "give a run directory written by `tunelab train` (it holds model/)")
    from tunelab.checkpoint.rundir import check_recipe, check_run_files, instantiate_saved, loading, read_json

    check_run_files(run_dir)  # before anything reads a file: links out of the run, headers, JSON, pickles (exit 4)
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
    recipe_file = model_dir / "tunelab_recipe.json"
    recipe = read_json(run_dir, recipe_file) or {}
    check_recipe(recipe_file, recipe)  # generate, serve and export's card index its templates
    with loading(model_dir):  # what a library still raises on a damaged run: one line naming the file, exit 4
        tokenizer = load_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
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


# ---- inference: the weights' dtype and int8 dynamic quantization (eval, generate, serve) --------------
INFERENCE_DTYPES = ("auto", "float32", "bfloat16")
QUANTIZE = ("none", "int8")


def for_inference(model: nn.Module, inference: Mapping[str, Any] | None) -> nn.Module:
    """The model as the `inference` group asks (conf/inference/): cast to `dtype`, and with `quantize=int8` every
    `nn.Linear` replaced by torch's dynamic int8 one (`torch.ao.quantization.quantize_dynamic`: int8 weights,
    activations quantized per batch at run time). Call it once the model is on its device.

    Refused where it cannot apply: int8 off the CPU (torch's dynamic quantized kernels are CPU only), int8 of
    bfloat16 weights, and int8 of a model with an unmerged PEFT adapter or an already quantized base (the
    adapter's layers would be left in float32 beside quantized ones, or dropped)."""
    settings = dict(inference or {})
    dtype, quantize = str(settings.get("dtype", "auto")), str(settings.get("quantize", "none"))
    if dtype not in INFERENCE_DTYPES:
        raise ConfigError(f"inference.dtype={dtype} is not one of {', '.join(INFERENCE_DTYPES)}", "key inference.dtype",
                          did_you_mean(dtype, list(INFERENCE_DTYPES)))
    if quantize not in QUANTIZE:
        raise ConfigError(f"inference.quantize={quantize} is not one of {', '.join(QUANTIZE)}",
                          "key inference.quantize", did_you_mean(quantize, list(QUANTIZE)))
    if dtype != "auto":
        model = model.to(getattr(torch, dtype))
    if quantize == "none":
        return model
    device = next(model.parameters()).device
    key = "key inference.quantize"
    if device.type != "cpu":
        raise ConfigError(f"inference.quantize=int8 is torch's dynamic quantization, which runs on the CPU only, "
                          f"and the model is on {device}", key,
                          "on a GPU use inference.dtype=bfloat16; or run on the CPU (eval: device=cpu)")
    if next(model.parameters()).dtype != torch.float32:
        raise ConfigError(f"inference.quantize=int8 quantizes float32 weights, and these are "
                          f"{next(model.parameters()).dtype}", key, "set inference.dtype=float32 (or auto) with int8")
    if hasattr(model, "peft_config") or getattr(model, "is_quantized", False):
        raise ConfigError("inference.quantize=int8 needs plain linear layers, and this model has an unmerged adapter "
                          "or an already quantized base", key,
                          "merge the adapter first (`tunelab export run=<run>` writes <run>/export; evaluate it with "
                          "model.name_or_path=<run>/export model.random_init=false), or use inference.quantize=none")
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8).eval()
