"""`tunelab export run=<run dir> [out=<dir>] [merge=...] [push_to_hub=<repo>]`: a plain Hugging Face model directory,
uploaded to the Hugging Face Hub when push_to_hub names a repository (tracking/hub.py).

Adapters that live inside the base's weights (LoRA, DoRA, IA3) are merged (`merge_and_unload`), so
the result loads with `AutoModelForCausalLM.from_pretrained` and no tunelab or PEFT. Prompt and prefix
tuning add virtual tokens that no weight can hold: those export the adapter and its base side by side.
A quantized (QLoRA) run is merged into a base loaded in full precision, not into its 4-bit weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tunelab.checkpoint.rundir import read_metrics
from tunelab.errors import ConfigError
from tunelab.job import RunContext, verb
from tunelab.models.load import adapter_base, load_run
from tunelab.tracking.artifacts import resolve_run
from tunelab.tracking.hub import check_push, push
from tunelab.tracking.model_card import write_export_card


def _mergeable(model: Any) -> bool:
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return config is not None and not config.is_prompt_learning


def _save_hf(model: Any, tokenizer: Any, out: Path) -> None:
    """Weights (safetensors), config, generation config that stops at the chat's end-of-turn, tokenizer."""
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
        generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)  # with the chat template used in training


# What marks a directory as a run (train writes these): an export may not land inside another run at all.
RUN_MARKERS = (".hydra/config.yaml", "checkpoints", "metrics.json", "model/tunelab_recipe.json")
# What a run holds of its own: even the run's own export may not replace these.
RUN_OWNED = frozenset({".hydra", "checkpoints", "model", "wandb", "metrics.json", "history.jsonl", "error.txt"})


def _enclosing_run(path: Path) -> Path | None:
    """The run directory `path` (resolved) lies in or is, if any."""
    for folder in (path, *path.parents):
        if any((folder / marker).exists() for marker in RUN_MARKERS):
            return folder
    return None


def _check_out(out: Path, run_dir: Path) -> None:
    """`out` is deleted and rewritten: it may be a new directory or an earlier export, never a symlink, never part of
    a run (`out=<run>/model` would replace the run's own weights), never inside another run, never the working dir."""
    if out.is_symlink():
        raise ConfigError(f"out={out} is a symbolic link; refusing to write through it", "key out",
                          "give a real directory path")
    resolved, own = out.resolve(), run_dir.resolve()
    holder = _enclosing_run(resolved)
    if holder is not None and holder != own:
        raise ConfigError(f"out={out} lies inside another run directory ({holder}); refusing to write there",
                          "key out", "give a directory outside any run, or leave out= unset (<run>/export)")
    if holder == own and (resolved == own or resolved.relative_to(own).parts[0] in RUN_OWNED):
        raise ConfigError(f"out={out} is the run being exported or part of it, and is not an earlier export; "
                          "refusing to replace it", "key out",
                          "leave out= unset (<run>/export) or give a directory outside the run")
    if resolved in own.parents:
        raise ConfigError(f"out={out} holds the run being exported; refusing to replace it", "key out",
                          "give a new directory, or an earlier export's directory to overwrite it")
    if out.exists():
        looks_exported = (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
        if not out.is_dir() or (any(out.iterdir()) and not looks_exported):
            raise ConfigError(f"out={out} exists and is not an earlier export; refusing to replace it", "key out",
                              "give a new directory, or an earlier export's directory to overwrite it")


@verb()
def export(cfg: DictConfig, run: RunContext) -> Path:
    """Write the run's model to `cfg.out` (default `<run>/export`); returns that directory."""
    if cfg.run is None:
        raise ConfigError("no run given", "key run", "tunelab export run=<run dir> [out=<dir>]")
    run_dir = resolve_run(str(cfg.run))  # a run directory, or a W&B model artifact reference
    out = Path(cfg.out) if cfg.out is not None else run_dir / "export"
    _check_out(out, run_dir)  # before the model loads: a refusal costs nothing
    check_push(cfg)  # checked in the pre-flight (the verb table); again for a library call, before the model loads
    read_metrics(run_dir)  # the card formats them: a damaged metrics.json is exit 4 before anything is written
    model, tokenizer, _ = load_run(run_dir, quantize=False, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    is_adapter = hasattr(model, "peft_config")
    if cfg.merge and is_adapter and not _mergeable(model):
        kind = model.peft_config[model.active_adapter].peft_type.value
        raise ConfigError(
            f"a {kind} adapter cannot be merged into the base weights: it adds virtual tokens, not weight deltas",
            "key merge",
            "export with merge=null or merge=false (adapter + base, load with peft.AutoPeftModelForCausalLM)",
        )
    if cfg.dtype is not None:
        model = model.to(getattr(torch, cfg.dtype))
    if out.exists():
        shutil.rmtree(out)
    if is_adapter and cfg.merge is not False and _mergeable(model):
        model = model.merge_and_unload()
        note = "merged the adapter into the base weights"
    elif is_adapter:
        # The adapter directory, with its config pointing at the base written beside it.
        _save_hf(adapter_base(model), tokenizer, out / "base")
        model.peft_config[model.active_adapter].base_model_name_or_path = str((out / "base").resolve())
        why = "this adapter cannot live in the base weights" if not _mergeable(model) else "merge=false"
        note = (f"not merged: {why}; the adapter is in {out} and its base in {out / 'base'}; "
                "load with peft.AutoPeftModelForCausalLM.from_pretrained")
    else:
        note = "full fine-tuning: the weights are the model"
    _save_hf(model, tokenizer, out)
    write_export_card(run_dir, out, note)
    print(f"tunelab: exported {run_dir} to {out} ({note})")
    if cfg.get("push_to_hub"):
        url = push(out, str(cfg.push_to_hub), private=bool(cfg.get("private", True)),
                   message=f"tunelab export of {run_dir.name} ({note})")
        print(f"tunelab: pushed {out} to {url}", flush=True)
    return out


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("export")
