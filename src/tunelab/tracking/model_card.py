"""Model cards: a README.md in Hugging Face's model-card format in every `model/` and every export.

The card opens with a YAML metadata block (base model, library `peft` or `transformers`, datasets, tags,
`model-index` with the test split's figures) written through `huggingface_hub`'s own `ModelCardData` and
`EvalResult`, then says what the model is: method and parameter counts, results, the prompt (chat template,
system prompt, training templates), how to load it with plain transformers or PEFT, and the composed
training config with secrets masked. `publish_model` writes it after the test split is scored and logs
`model/` as a W&B model artifact; `write_export_card` writes one for `tunelab export`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.redact import redact, redact_line
from tunelab.job import RunContext

log = logging.getLogger(__name__)
CARD = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name; a local path or interpolation is not one


def _is_hub_id(name: str | None) -> bool:
    """A hub id (`org/name`), not a local directory: only those belong in `base_model` metadata."""
    return bool(name) and _HUB_ID.match(str(name)) is not None and not Path(str(name)).expanduser().exists()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _metric_rows(metrics: Mapping[str, float], prefix: str) -> list[tuple[str, float]]:
    return sorted((k[len(prefix):], float(v)) for k, v in metrics.items() if k.startswith(prefix))


def card_text(model_dir: Path, config: Mapping[str, Any] | None, config_text: str, metrics: Mapping[str, float],
              name: str, note: str | None = None) -> str:
    """The card for the model files in `model_dir` (weights or adapter, tokenizer, recipe)."""
    from huggingface_hub import EvalResult, ModelCardData

    config = config or {}
    adapter = _read_json(model_dir / "adapter_config.json")
    recipe = _read_json(model_dir / "tunelab_recipe.json")
    model_cfg = config.get("model") or {}
    dataset_cfg = config.get("dataset") or {}
    base = adapter.get("base_model_name_or_path") or model_cfg.get("name_or_path")
    base_label = base if _is_hub_id(base) else f"local model `{Path(str(base)).name}`" if base else "unknown"
    if model_cfg.get("random_init"):
        base_label += " (randomly initialised, then trained here)"
    dataset = str(dataset_cfg.get("name") or recipe.get("name") or "unknown")
    method = "full fine-tuning" if not adapter else str(adapter.get("peft_type", "adapter")).lower()
    choice = str(config.get("method_choice") or "")
    trainable, total = metrics.get("params/trainable"), metrics.get("params/total")
    tests = _metric_rows(metrics, "test/")
    results = [EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset, dataset_split="test",
                          metric_type=key, metric_name=f"test/{key}", metric_value=round(value, 6))
               for key, value in tests]
    data = ModelCardData(
        base_model=base if _is_hub_id(base) else None, library_name="peft" if adapter else "transformers",
        datasets=[dataset], pipeline_tag="text-generation", model_name=name, eval_results=results or None,
        tags=["tunelab", "fine-tuned", method.replace(" ", "-"), *([choice] if choice else [])],
    )
    lines = ["---", data.to_yaml(), "---", "", f"# {name}", ""]
    counts = (f" It trained {int(trainable):,} of {int(total):,} parameters ({100 * trainable / total:.2f} %)."
              if trainable and total else "")
    lines += [f"Fine-tuned with tunelab from {base_label} on the `{dataset}` dataset by "
              f"**{method}**.{counts}", ""]
    lines += _objective_line(config)
    if note:
        lines += [note, ""]
    lines += _results_section(metrics)
    lines += _method_section(adapter, trainable, total)
    lines += _prompt_section(model_dir, recipe)
    lines += _loading_section(model_dir, adapter)
    lines += ["## Training config", "",
              "The composed tunelab config (secrets masked); re-run with `tunelab train` and these overrides.", "",
              "```yaml", config_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _objective_line(config: Mapping[str, Any]) -> list[str]:
    """`Objective: **dpo** (beta 0.1, label_smoothing 0.0)`: what the loss was, with its settings."""
    node = dict(config.get("objective") or {})
    target = str(node.pop("_target_", "") or "")
    name = str(config.get("objective_choice") or target.rsplit(".", 1)[-1].lower() or "sft")
    settings = ", ".join(f"{k} {v}" for k, v in node.items() if not str(k).startswith("_"))
    return [f"Objective: **{name}**" + (f" ({settings})" if settings else "") + ".", ""]


def _results_section(metrics: Mapping[str, float]) -> list[str]:
    rows = []
    for split, prefix in (("test (after training)", "test/"), ("test (before training)", "baseline/test/"),
                          ("validation", "val/")):
        rows += [f"| {split} | {key} | {value:.4f} |" for key, value in _metric_rows(metrics, prefix)]
    if not rows:
        return []
    return ["## Results", "", "| split | metric | value |", "|---|---|---:|", *rows, ""]


def _method_section(adapter: Mapping[str, Any], trainable: float | None, total: float | None) -> list[str]:
    lines = ["## Method", ""]
    if trainable and total:
        lines += [f"- trainable parameters: {int(trainable):,}", f"- total parameters: {int(total):,}"]
    if adapter:
        keep = ("peft_type", "r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "target_modules",
                "num_virtual_tokens", "feedforward_modules", "task_type")
        lines += [f"- {k}: `{adapter[k]}`" for k in keep if adapter.get(k) not in (None, False)]
    else:
        lines += ["- every weight of the model was trained (no adapter)" if trainable == total
                  else "- the model's own weights, some frozen (method.freeze)"]
    return [*lines, ""]


def _prompt_section(model_dir: Path, recipe: Mapping[str, Any]) -> list[str]:
    """The prompt exactly as training built it: chat template, system prompt, the prompt template library."""
    template_file = model_dir / "chat_template.jinja"
    chat_template = template_file.read_text() if template_file.is_file() else \
        _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    lines = ["## Prompt template", "",
             "Prompts were built with the chat template saved with this model (`apply_chat_template` uses it):", ""]
    lines += ["```jinja", str(chat_template or "(none: raw text)").rstrip(), "```", ""]
    if recipe.get("system_prompt"):
        lines += [f"System prompt: `{recipe['system_prompt']}`", ""]
    templates: Sequence[Mapping[str, str]] = recipe.get("templates") or []
    if templates:
        lines += ["The user turn was rendered from each example's fields by one of these templates (Jinja); the "
                  "first is what `tunelab generate fields=...` and `tunelab serve` use by default:", ""]
        for index, template in enumerate(templates):
            prompt = [f"   {x}" for x in str(template.get("prompt")).splitlines()]
            lines += [f"{index}. prompt:", "", "   ```jinja", *prompt, "   ```", "",
                      f"   completion: `{template.get('completion')}`", ""]
    return lines


def _tunelab_architecture(model_dir: Path) -> bool:
    """Whether the model (or an adapter's saved base) is one of tunelab's own architectures (tunelab.models.mot)."""
    for config in (model_dir / "config.json", model_dir / "base" / "config.json"):
        try:
            if json.loads(config.read_text()).get("model_type") == "tunelab_mot":
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _loading_section(model_dir: Path, adapter: Mapping[str, Any]) -> list[str]:
    name = "path/to/this/directory"
    chat = ('messages = [{"role": "user", "content": "..."}]\n'
            'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")\n'
            'out = model.generate(ids, max_new_tokens=64)\n'
            'print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))')
    if not adapter:
        code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{name}")  # this directory\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n')
    elif (model_dir / "base").is_dir():
        code = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'base = AutoModelForCausalLM.from_pretrained("{name}/base")  # the base, saved beside the adapter\n'
                f'model = PeftModel.from_pretrained(base, "{name}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n')
    else:
        code = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f'model = AutoPeftModelForCausalLM.from_pretrained("{name}")  # fetches the base model too\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n')
    intro = "With plain transformers" + (" and PEFT" if adapter else "") + " (no tunelab):"
    if _tunelab_architecture(model_dir):  # tunelab's own class: registered with transformers by one call
        code = "import tunelab.models.mot\n\ntunelab.models.mot.register()  # model_type tunelab_mot\n" + code
        intro = "With transformers and tunelab installed (mixture of tokens is tunelab's own architecture):"
    return ["## How to load", "", intro, "",
            "```python", code + chat, "```", "",
            "Or serve it behind an OpenAI-compatible API: `tunelab serve run=<run dir>`.", ""]


def write_card(model_dir: Path, config: Mapping[str, Any] | None, config_text: str, metrics: Mapping[str, float],
               name: str, note: str | None = None) -> Path:
    """Write `<model_dir>/README.md`; returns its path."""
    path = Path(model_dir) / CARD
    path.write_text(card_text(Path(model_dir), config, config_text, metrics, name, note))
    return path


def _config_for_card(cfg: Any) -> tuple[dict[str, Any], str]:
    """(plain config, its YAML) without Hydra's own node, resolved where it can be, secrets masked."""
    from omegaconf import OmegaConf

    keys = [k for k in cfg if k != "hydra"]
    copy = OmegaConf.masked_copy(cfg, keys)
    try:
        plain = OmegaConf.to_container(copy, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that needs Hydra's runtime: keep it as written
        plain = OmegaConf.to_container(copy, resolve=False)
    plain = redact(plain)
    return plain, yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)


def publish_model(cfg: Any, run: RunContext, callbacks: Sequence[Any], loggers: Sequence[Any],
                  metrics: Mapping[str, float]) -> None:
    """After test: write the card into each `model/` the run saved, and log it as a W&B model artifact
    (offline too) with the final metrics as metadata. Rank zero only; nothing happens without `model/`."""
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from tunelab.tracking.artifacts import log_model_artifact
    from tunelab.training.callbacks import SaveHFModel

    if rank_zero_only.rank != 0:
        return
    config, text = _config_for_card(cfg)
    config["method_choice"] = run.choices.get("method")
    config["objective_choice"] = run.choices.get("objective")
    for callback in callbacks:
        model_dir = getattr(callback, "dirpath", None)
        if not isinstance(callback, SaveHFModel) or not (Path(model_dir) / "config.json").is_file() and \
                not (Path(model_dir) / "adapter_config.json").is_file():
            continue
        write_card(Path(model_dir), config, text, metrics, name=run.run_id or Path(model_dir).parent.name)
        for logger in loggers:
            if not isinstance(logger, WandbLogger):
                continue
            try:
                log_model_artifact(logger.experiment, Path(model_dir), metrics)
            except Exception as err:  # noqa: BLE001 - the trained model is on disk; a tracker hiccup must not fail the run
                log.warning("could not log %s as a W&B artifact: %s", model_dir, err)


def write_export_card(run_dir: Path, out: Path, note: str) -> Path:
    """The card of an export: the run's saved config and metrics, the model files now in `out`."""
    saved = run_dir / ".hydra" / "config.yaml"
    text = "".join(redact_line(line) for line in saved.read_text().splitlines(keepends=True)) if saved.is_file() \
        else "# (the run directory holds no .hydra/config.yaml)\n"
    try:
        config = yaml.safe_load(text) if saved.is_file() else {}
    except yaml.YAMLError:
        config = {}
    metrics = _read_json(run_dir / "metrics.json")
    recipe = run_dir / "model" / "tunelab_recipe.json"
    if recipe.is_file() and not (out / recipe.name).exists():
        (out / recipe.name).write_text(recipe.read_text())  # the prompt templates travel with the export
    config = config if isinstance(config, dict) else {}
    return write_card(out, config, text, metrics, name=str(config.get("run_id") or run_dir.name),
                      note=f"Exported by `tunelab export`: {note}.")
