"""What the server holds and what a request may ask for: request bodies, their checks, the prompt they render.

Every error is an `APIError`: OpenAI-style JSON with its HTTP status, never a traceback.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt


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
    prefix_cache: bool = True  # shared prompt prefixes' keys and values computed once (serving/prefix_cache.py)
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
# Each field of OpenAI's request bodies is honoured (declared below, with its type and range), accepted as a no-op
# at the values that ask for nothing (`NO_OPS`, each with why that is honest), or refused with a 400 naming it
# (`REFUSED`, and any field OpenAI does not document): a client that asks for tools or JSON mode learns it did not
# get them. Types are checked strictly for the fields added with logprobs (`"5"` is not 5).
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None  # a last chunk with empty choices and the usage, as OpenAI sends
    include_obfuscation: Literal[False] | None = None  # no obfuscation padding is sent; asking for it is refused


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are judged by `check_fields`, which names the field
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)  # sampling: the same seed gives the same answer
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are refused by `check_fields`, naming the message
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(default_factory=list)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)  # OpenAI's range; needs logprobs: true
    fields: dict[str, Any] | None = None  # tunelab: the training template's fields, rendered as the user turn
    template: int = 0  # which template of the run's library renders `fields`


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)  # OpenAI's legacy range: the top 0..5


ANY = object()  # a no-op field accepted with any value
# field: (the values that ask for nothing, why accepting them changes nothing); null is accepted for every one
NO_OPS: dict[str, tuple[Any, str]] = {
    "frequency_penalty": ((0,), "a penalty of 0 is no penalty"),
    "presence_penalty": ((0,), "a penalty of 0 is no penalty"),
    "logit_bias": (({},), "an empty bias changes no logit"),
    "tools": (([],), "an empty tool list offers no tool"),
    "tool_choice": (("none",), "'none' calls no tool"),
    "parallel_tool_calls": ((True, False), "it only matters with tools, which are refused"),
    "response_format": (({"type": "text"},), "plain text is what the model writes"),
    "store": ((False,), "nothing is stored"),
    "modalities": ((["text"],), "text is the one modality"),
    "service_tier": (("auto", "default"), "there is one tier"),
    "user": (ANY, "an end-user id for OpenAI's abuse monitoring; nothing is logged per user here"),
    "safety_identifier": (ANY, "an end-user id for OpenAI's abuse monitoring; nothing is logged per user here"),
    "prompt_cache_key": (ANY, "a cache-routing hint; there is one process and no prompt cache to route to"),
    "metadata": (ANY, "tags for stored completions; nothing is stored"),
    "best_of": ((1,), "one candidate is the best of one"),
    "echo": ((False,), "the prompt is not echoed"),
}
REFUSED = {  # OpenAI fields refused whatever their value, and why
    "audio": "audio output is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "verbosity": "the model has no verbosity setting",
    "reasoning_effort": "the model is not a reasoning model",
    "suffix": "insertion (text after the completion) is not supported",
}
_CHAT_ONLY = {"tools", "tool_choice", "parallel_tool_calls", "response_format", "store", "modalities",
              "service_tier", "safety_identifier", "prompt_cache_key", "metadata", "audio", "functions",
              "function_call", "prediction", "web_search_options", "verbosity", "reasoning_effort"}
_COMPLETIONS_ONLY = {"best_of", "echo", "suffix"}


def check_fields(request: _Sampling) -> None:
    """A 400 naming the first field this server does not honour (see `NO_OPS`, `REFUSED`), or a value out of the
    documented rules that the types alone do not express."""
    chat = isinstance(request, ChatRequest)
    elsewhere = _COMPLETIONS_ONLY if chat else _CHAT_ONLY
    for name, value in (request.model_extra or {}).items():
        if name in elsewhere or (name not in NO_OPS and name not in REFUSED):
            endpoint = "/v1/chat/completions" if chat else "/v1/completions"
            raise APIError(400, f"{name}: not a field of {endpoint} that tunelab serve knows", name,
                           "unsupported_parameter")
        if name in REFUSED:
            raise APIError(400, f"{name}: {REFUSED[name]} by tunelab serve", name, "unsupported_parameter")
        allowed, why = NO_OPS[name]
        if value is not None and allowed is not ANY and not any(_same(value, a) for a in allowed):
            shown = " or ".join(repr(a) for a in allowed)
            raise APIError(400, f"{name}={value!r} is not supported by tunelab serve (only {shown} or null: {why})",
                           name, "unsupported_parameter")
    if chat:
        for i, message in enumerate(request.messages):
            for name in message.model_extra or {}:
                raise APIError(400, f"messages[{i}].{name}: not supported (the chat template renders role and "
                                    "content only)", f"messages[{i}].{name}", "unsupported_parameter")
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")


def _same(value: Any, allowed: Any) -> bool:
    """`value == allowed` with the type kept apart (False is not 0 here, nor 1 True)."""
    if isinstance(allowed, bool) or isinstance(value, bool):
        return value is allowed
    if isinstance(allowed, int | float):
        return isinstance(value, int | float) and value == allowed
    return type(value) is type(allowed) and value == allowed


def logprobs_top(request: _Sampling) -> int | None:
    """How many top alternatives each token's logprobs carry, or None when the request asks for no logprobs."""
    if isinstance(request, ChatRequest):
        return (request.top_logprobs or 0) if request.logprobs else None
    return request.logprobs  # type: ignore[attr-defined]


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
