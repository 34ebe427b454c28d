"""`tunelab generate run=<run dir> prompt="..."`: answer with a trained run's model, streamed to stdout.

The prompt is built exactly as in training (LlamaFactory#2509): the tokenizer saved in `<run>/model`
carries the chat template used in training, and `tunelab_recipe.json` the dataset's system prompt and
prompt templates (`fields=` renders one of them). `interactive=true` chats from stdin until EOF.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tunelab.data.encode import prompt_ids
from tunelab.errors import CheckpointError, ConfigError
from tunelab.evaluation.evaluate import decoding_settings, generate_tokens, left_pad
from tunelab.job import RunContext, verb
from tunelab.models.load import for_inference, load_run
from tunelab.tracking.artifacts import resolve_run


def user_message(recipe: Mapping[str, Any], prompt: str | None, fields: Any, template: int) -> str:
    """The user's turn: `prompt` as given, or `fields` rendered by the run's training template `template`."""
    if (prompt is None) == (fields is None):
        raise ConfigError("give exactly one of prompt= and fields=", "command line",
                          'prompt="your message", or fields=\'{"title": "...", "text": "..."}\'')
    if prompt is not None:
        return str(prompt)
    if isinstance(fields, str):
        try:
            fields = json.loads(fields)
        except json.JSONDecodeError as err:
            raise ConfigError(f"fields is not a JSON object: {err}", "key fields",
                              'e.g. fields=\'{"title": "Great", "text": "Works well."}\'') from None
    if not isinstance(fields, Mapping):
        raise ConfigError(f"fields must be an object, got {type(fields).__name__}", "key fields")
    templates = recipe.get("templates") or []
    if not 0 <= template < len(templates):
        raise ConfigError(f"template={template} but the run's recipe has {len(templates)} templates", "key template",
                          "use prompt= for a raw message" if not templates else f"give 0..{len(templates) - 1}")
    import jinja2

    from tunelab.data.formats import compile_templates

    try:
        return compile_templates(templates)[template][0].render(**fields)
    except jinja2.UndefinedError as err:
        raise ConfigError(f"fields: {err.message}", "key fields",
                          f"template {template}: {templates[template]['prompt']!r}") from None
    except jinja2.exceptions.SecurityError as err:  # the recipe is data: its templates render in the sandbox
        raise CheckpointError(f"template {template} of the run's recipe tried an unsafe operation: {err}",
                              "file model/tunelab_recipe.json", "a run directory is data; restore its recipe") from None


def answer(model: Any, tokenizer: Any, messages: list[dict[str, str]], settings: Mapping[str, Any],
           stream: bool = True) -> str:
    """The assistant's next turn for `messages`, streamed to stdout as it is generated."""
    import jinja2
    from transformers import TextStreamer

    try:  # transformers renders the run's chat template in Jinja's sandbox; a refusal is the run's fault
        ids, mask = left_pad([prompt_ids(tokenizer, messages)], tokenizer.pad_token_id)  # as evaluation renders it
    except jinja2.TemplateError as err:
        raise CheckpointError(f"the run's chat template cannot render: {type(err).__name__}: {err}",
                              "file model/chat_template.jinja (or tokenizer_config.json)",
                              "a run directory is data; restore the template saved by tunelab train") from None
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    new = generate_tokens(model, tokenizer, ids, mask, decoding_settings(settings), streamer)
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()


def chat(model: Any, tokenizer: Any, system: list[dict[str, str]], settings: Mapping[str, Any],
         lines: Iterable[str]) -> list[dict[str, str]]:
    """Interactive mode: each line is a user turn (a line ending in a backslash continues on the next);
    the conversation so far goes with it."""
    messages = list(system)
    print("chat with the model; end a line with \\ to continue it; Ctrl-D ends", file=sys.stderr)
    pending: list[str] = []
    for raw in lines:
        line = raw.rstrip("\n")
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        text = "\n".join([*pending, line])
        pending = []
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": answer(model, tokenizer, messages, settings)})
    return messages


@verb()
def generate(cfg: DictConfig, run: RunContext) -> list[dict[str, str]]:
    """Load the run, build the prompt as training did, and answer; returns the conversation."""
    if cfg.run is None:
        raise ConfigError("no run given", "key run", "tunelab generate run=<run dir> prompt=\"...\"")
    torch.manual_seed(cfg.seed)
    # a run directory or a W&B artifact reference; trust_remote_code only from this command line
    trust = bool(cfg.get("trust_remote_code", False))
    model, tokenizer, recipe = load_run(resolve_run(str(cfg.run)), trust_remote_code=trust)
    model = for_inference(model, cfg.get("inference"))
    system_prompt = cfg.system_prompt if cfg.system_prompt is not None else recipe.get("system_prompt")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    settings = OmegaConf.to_container(cfg.decoding, resolve=True)
    if cfg.interactive:
        return chat(model, tokenizer, system, settings, sys.stdin)
    fields = OmegaConf.to_container(cfg.fields) if isinstance(cfg.fields, DictConfig) else cfg.fields
    messages = [*system, {"role": "user", "content": user_message(recipe, cfg.prompt, fields, cfg.template)}]
    return [*messages, {"role": "assistant", "content": answer(model, tokenizer, messages, settings)}]


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("generate")
