"""What the server holds and what a request may ask for: request bodies, their checks, the prompt they render.

Every error is an `APIError`: OpenAI-style JSON with its HTTP status, never a traceback.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass
class Served:
    """The model behind the API and the limits it is served with."""

    model: Any
    tokenizer: Any
    model_id: str
    recipe: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # generate() kwargs when a request names none
    system_prompt: str | None = None
    max_tokens: int = 512
    max_concurrent: int = 8
    batching: bool = True  # concurrent requests share forward passes (serving/batching.py)
    max_batch_size: int = 8
    batch_window_ms: float = 5.0
    max_waiting: int = 16
    max_request_bytes: int = 1 << 20
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with a status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- requests ------------------------------------------------------------------------------------
# Unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored, as clients send them routinely.
class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)  # sampling: the same seed gives the same answer
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(default_factory=list)
    fields: dict[str, Any] | None = None  # tunelab: the training template's fields, rendered as the user turn
    template: int = 0  # which template of the run's library renders `fields`


class CompletionRequest(_Sampling):
    prompt: str | list[str]


def _text(content: Any) -> str:
    """A message's content as text: a string, or OpenAI's list of `{"type": "text", "text": ...}` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"only text content parts are supported, got {part.get('type')!r}", "messages")
        texts.append(part["text"])
    return "".join(texts)


def render_fields(recipe: Mapping[str, Any], fields: Mapping[str, Any], template: int) -> str:
    """The user turn rendered from `fields` by the run's training template `template`, in Jinja's sandbox:
    the recipe comes from a run directory, which is data, not code."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    templates = recipe.get("templates") or []
    if not 0 <= template < len(templates):
        raise APIError(400, f"template={template} but the run's recipe has {len(templates)} templates", "template")
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    try:
        return env.from_string(str(templates[template]["prompt"])).render(**fields)
    except jinja2.UndefinedError as err:
        raise APIError(400, f"fields: {err.message}; template {template} is {templates[template]['prompt']!r}",
                       "fields") from None
    except (SecurityError, jinja2.TemplateError) as err:
        raise APIError(400, f"the run's template {template} cannot render: {err}", "fields") from None


def chat_messages(served: Served, request: Any) -> list[dict[str, str]]:
    """The conversation as `generate` builds it: the recipe's system prompt unless the request has one,
    then the request's messages, then the user turn rendered from `fields` if sent."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                for m in request.messages]
    if request.fields is not None:
        messages.append({"role": "user", "content": render_fields(served.recipe, request.fields, request.template)})
    if not messages:
        raise APIError(400, "give messages, or fields to render with the run's training template", "messages")
    if served.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": served.system_prompt})
    return messages


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids, rendered by tunelab's one prompt path (`data.encode.prompt_ids`: the chat template,
    which transformers renders in Jinja's sandbox, plus the generation prompt), as training, generate and eval do."""
    from tunelab.data.encode import prompt_ids

    if not tokenizer.chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions with a raw prompt", "messages")
    return list(prompt_ids(tokenizer, messages))


def generation_kwargs(served: Served, request: Any) -> dict[str, Any]:
    """`generate` keyword arguments: the served defaults, then what the request asks for.
    temperature 0 is greedy; a request that names no temperature gets the server's decoding group."""
    if request.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    settings = dict(served.defaults)
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None:
        if max_tokens > served.max_tokens:
            param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{param}={max_tokens} is over this server's limit of {served.max_tokens}",
                           param, "max_tokens_exceeded")
        settings["max_new_tokens"] = max_tokens
    settings["max_new_tokens"] = min(int(settings.get("max_new_tokens", served.max_tokens)), served.max_tokens)
    if request.temperature is not None:
        for key in ("do_sample", "temperature", "top_p", "top_k"):
            settings.pop(key, None)
        if request.temperature > 0:
            settings.update(do_sample=True, temperature=request.temperature, top_k=0)
    if request.top_p is not None and settings.get("do_sample"):
        settings["top_p"] = request.top_p
    if request.seed is not None and settings.get("do_sample"):
        settings["seed"] = request.seed  # popped before `generate` (serving.generation.seeded)
    return settings


def stop_strings(request: Any) -> list[str]:
    stop = request.stop
    return [] if stop is None else [stop] if isinstance(stop, str) else [s for s in stop if s]


def check_length(served: Served, ids: list[int], settings: Mapping[str, Any]) -> None:
    limit = getattr(getattr(served.model, "config", None), "max_position_embeddings", None)
    if limit and len(ids) + int(settings["max_new_tokens"]) > limit:
        raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({settings['max_new_tokens']}) is over "
                            f"the model's context of {limit} tokens", "messages", "context_length_exceeded")
