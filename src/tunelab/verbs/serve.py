"""`tunelab serve run=<run dir>`: an OpenAI-compatible HTTP API over a trained run's model.

Endpoints: `POST /v1/chat/completions` (streamed as server-sent events with `stream: true`),
`POST /v1/completions`, `GET /v1/models`, `GET /health`. Built on FastAPI + uvicorn with
transformers' own `generate` and `TextIteratorStreamer`; the prompt is rendered exactly as
`tunelab generate` renders it (the chat template saved with the run, the recipe's system prompt),
so a greedy answer here equals `generate`'s. A request may send the training template's fields
instead of a message (`"fields": {...}`, an extra body field), as `generate fields=` does.

Limits: `max_tokens` per request, `max_concurrent` generations with `max_waiting` queued behind
them (429 beyond), a body size cap (413); every error is OpenAI-style JSON with its HTTP status,
never a traceback. SIGTERM stops accepting, lets requests in flight finish, and exits.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import CheckpointError, ConfigError, TunelabError
from tunelab.evaluation.evaluate import decoding_settings, prompt_ids
from tunelab.job import RunContext, verb

log = logging.getLogger(__name__)
API_KEY_ENV = "TUNELAB_API_KEY"


# ---- what the server holds ---------------------------------------------------------------------
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
    max_concurrent: int = 2
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
    """The prompt's token ids, rendered by tunelab's one prompt path (`evaluate.prompt_ids`: the chat template,
    which transformers renders in Jinja's sandbox, plus the generation prompt), as generate and eval do."""
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
    return settings


def stop_strings(request: Any) -> list[str]:
    stop = request.stop
    return [] if stop is None else [stop] if isinstance(stop, str) else [s for s in stop if s]


# ---- generation ------------------------------------------------------------------------------------
class _Cancelled:
    """A stopping criterion a streaming request sets when its client goes away, so the thread stops early."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _check_length(served: Served, ids: list[int], settings: Mapping[str, Any]) -> None:
    limit = getattr(getattr(served.model, "config", None), "max_position_embeddings", None)
    if limit and len(ids) + int(settings["max_new_tokens"]) > limit:
        raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({settings['max_new_tokens']}) is over "
                            f"the model's context of {limit} tokens", "messages", "context_length_exceeded")


def run_generate(served: Served, ids: list[int], settings: Mapping[str, Any], streamer: Any = None,
                 cancelled: _Cancelled | None = None) -> tuple[list[int], str]:
    """Generate from `ids` (one sequence); returns (new token ids, finish reason)."""
    from transformers import StoppingCriteriaList

    device = next(served.model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    criteria = StoppingCriteriaList([cancelled]) if cancelled is not None else None
    with torch.no_grad():
        out = served.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            pad_token_id=served.tokenizer.pad_token_id, eos_token_id=served.tokenizer.eos_token_id,
            streamer=streamer, stopping_criteria=criteria, **settings,
        )
    new = out[0, len(ids):].tolist()
    stopped = bool(new) and new[-1] == served.tokenizer.eos_token_id
    return new, "stop" if stopped or len(new) < int(settings["max_new_tokens"]) else "length"


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (excluded, as OpenAI does), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


# ---- the app ---------------------------------------------------------------------------------------
def build_app(served: Served) -> Any:
    """The FastAPI application answering for `served`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False  # set on SIGTERM: new requests get 503 while the ones in flight finish
    slots = asyncio.Semaphore(served.max_concurrent)
    admitted = {"n": 0}  # requests generating or waiting for a slot

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, "the request body is not valid JSON", None, "invalid_json").body(), 400)
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
        return JSONResponse(APIError(422, message, where or None, "invalid_request").body(), 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), kind=kind).body(), err.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)  # the traceback stays here
        return JSONResponse(APIError(500, "internal server error", kind="server_error").body(), 500)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        """API key, body size and draining, before any body is parsed."""
        try:
            if served.api_key and request.url.path != "/health":
                scheme, _, key = request.headers.get("authorization", "").partition(" ")
                if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip(), served.api_key):
                    raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                   code="invalid_api_key", kind="authentication_error")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > served.max_request_bytes:
                raise APIError(413, f"request body of {size} bytes is over the limit of {served.max_request_bytes}")
            if app.state.draining and request.url.path != "/health":
                raise APIError(503, "the server is shutting down", kind="server_error",
                               headers={"Retry-After": "5"})
        except APIError as err:
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        return await call_next(request)

    def check_model(name: str) -> None:
        if name != served.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server has {served.model_id!r}",
                           "model", "model_not_found")

    def admit(count: bool = True) -> None:
        """429 when `max_concurrent` generate and `max_waiting` wait; else count the request in (a stream
        counts itself in once its body starts, so a client gone before that leaves nothing counted)."""
        if admitted["n"] >= served.max_concurrent + served.max_waiting:
            raise APIError(429, f"too many requests: {served.max_concurrent} generating and {served.max_waiting} "
                                "waiting", code="rate_limit_exceeded", kind="rate_limit_error",
                           headers={"Retry-After": "1"})
        admitted["n"] += 1 if count else 0

    async def complete(ids: list[int], settings: dict[str, Any], stops: list[str]) -> tuple[str, str, int]:
        """Non-streamed generation in a worker thread: (text, finish reason, completion tokens)."""
        admit()
        try:
            async with slots:
                new, finish = await run_in_threadpool(run_generate, served, ids, settings)
        finally:
            admitted["n"] -= 1
        text, hit = _cut(served.tokenizer.decode(new, skip_special_tokens=True), stops)
        return text, "stop" if hit else finish, len(new)

    async def stream(ids: list[int], settings: dict[str, Any], stops: list[str],
                     chunk: Any) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text from transformers' TextIteratorStreamer."""
        from transformers import TextIteratorStreamer

        admitted["n"] += 1
        try:
            async with slots:
                streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                                timeout=600)
                cancelled = _Cancelled()
                result: dict[str, Any] = {}

                def work() -> None:
                    try:
                        result["out"] = run_generate(served, ids, settings, streamer, cancelled)
                    except BaseException as err:  # noqa: BLE001 - reported to the stream below
                        result["error"] = err
                        streamer.end()

                thread = threading.Thread(target=work, daemon=True)
                thread.start()
                text, hit = "", False
                try:
                    async for piece in iterate_in_threadpool(streamer):
                        if hit or not piece:
                            continue
                        emitted, (text, hit) = len(text), _cut(text + piece, stops)
                        if len(text) > emitted:
                            yield f"data: {json.dumps(chunk(text[emitted:], None))}\n\n"
                        if hit:
                            cancelled.event.set()
                finally:
                    cancelled.event.set()  # the client went away, or a stop string was seen
                    await run_in_threadpool(thread.join)
                if "error" in result:
                    log.error("streamed generation failed: %r", result["error"])
                    body = APIError(500, "internal server error", kind="server_error").body()
                    yield f"data: {json.dumps(body)}\n\n"
                    return
                yield f"data: {json.dumps(chunk(None, 'stop' if hit else result['out'][1]))}\n\n"
                yield "data: [DONE]\n\n"
        finally:
            admitted["n"] -= 1

    def sse(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "draining" if app.state.draining else "ok", "model": served.model_id,
                "in_flight": admitted["n"]}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.model_id, "object": "model", "created": served.created,
                                            "owned_by": "tunelab"}]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        check_model(name)
        return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "tunelab"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest) -> Any:
        check_model(request.model)
        settings = generation_kwargs(served, request)
        ids = chat_prompt_ids(served.tokenizer, chat_messages(served, request))
        _check_length(served, ids, settings)
        rid, created, stops = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), stop_strings(request)
        if request.stream:
            admit(count=False)
            first = [True]

            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if first[0]:
                    delta["role"], first[0] = "assistant", False
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.model_id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            return sse(stream(ids, settings, stops, chunk))
        text, finish, used = await complete(ids, settings, stops)
        return {"id": rid, "object": "chat.completion", "created": created, "model": served.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": used, "total_tokens": len(ids) + used}}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        check_model(request.model)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise APIError(400, "give one prompt per request", "prompt")
        settings = generation_kwargs(served, request)
        ids = served.tokenizer(prompts[0], add_special_tokens=True)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        _check_length(served, ids, settings)
        rid, created, stops = f"cmpl-{uuid.uuid4().hex}", int(time.time()), stop_strings(request)
        if request.stream:
            admit(count=False)

            def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
                return {"id": rid, "object": "text_completion", "created": created, "model": served.model_id,
                        "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

            return sse(stream(ids, settings, stops, chunk))
        text, finish, used = await complete(ids, settings, stops)
        return {"id": rid, "object": "text_completion", "created": created, "model": served.model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": used, "total_tokens": len(ids) + used}}

    return app


# ---- the command ---------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api_key(cfg: DictConfig) -> str | None:
    key = cfg.api_key if cfg.api_key is not None else os.environ.get(API_KEY_ENV)
    key = str(key).strip() if key is not None else None
    if not _is_loopback(str(cfg.host)) and not key:
        raise ConfigError(f"host={cfg.host} would expose the model beyond this machine without an API key",
                          "key host", f"set {API_KEY_ENV} (or api_key=...) so clients must authenticate, "
                                      "or keep host=127.0.0.1")
    return key or None


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails at once with exit 2."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}", "keys host, port",
                          "pick another port (port=0 takes any free one) or stop what is using it") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def load_served(cfg: DictConfig) -> Served:
    """The model, tokenizer and recipe to serve: from `run=` (a run directory or W&B artifact reference)
    or from a `model=` option as it is."""
    from tunelab.models.load import load_run, load_tokenizer
    from tunelab.tracking.artifacts import resolve_run

    torch.manual_seed(int(cfg.seed))  # a random-init model option is the same model every launch
    if (cfg.run is None) == (cfg.get("model") is None):
        raise ConfigError("give exactly one of run= and model=", "command line",
                          "tunelab serve run=<run dir>, or tunelab serve model=<option>")
    if cfg.run is not None:
        run_dir = resolve_run(str(cfg.run))
        try:  # trust_remote_code only from this command line, never from the run directory (it is data)
            model, tokenizer, recipe = load_run(run_dir, trust_remote_code=bool(cfg.trust_remote_code))
        except TunelabError:
            raise
        except Exception as err:  # noqa: BLE001 - truncated safetensors, wrong shapes, bad JSON: a damaged model/
            first = (str(err).splitlines() or [""])[0]
            raise CheckpointError(f"cannot load the model in {run_dir / 'model'}: {type(err).__name__}: {first}",
                                  "key run", "the run directory looks damaged; retrain or export it again") from None
        name = run_dir.name if Path(str(cfg.run)).exists() else str(cfg.run).rsplit("/", 1)[-1]
    else:
        from tunelab.config.schema import build

        with_trust = OmegaConf.merge(cfg.model, {"trust_remote_code": bool(cfg.trust_remote_code)})
        model = build(with_trust).eval()
        tokenizer = load_tokenizer(str(cfg.model.tokenizer_name_or_path), trust_remote_code=bool(cfg.trust_remote_code),
                                   revision=cfg.model.get("revision"))
        recipe, name = {}, str(cfg.model.name_or_path).rstrip("/").rsplit("/", 1)[-1]
    system_prompt = cfg.system_prompt if cfg.system_prompt is not None else recipe.get("system_prompt")
    return Served(model=model, tokenizer=tokenizer, model_id=str(cfg.served_model_name or name), recipe=recipe,
                  defaults=decoding_settings(OmegaConf.to_container(cfg.decoding, resolve=True)),
                  system_prompt=system_prompt, max_tokens=int(cfg.max_tokens), max_concurrent=int(cfg.max_concurrent),
                  max_waiting=int(cfg.max_waiting), max_request_bytes=int(cfg.max_request_bytes),
                  api_key=_api_key(cfg))


def _check_limits(cfg: DictConfig) -> None:
    for key in ("max_tokens", "max_concurrent", "max_request_bytes"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key} must be a whole number of at least 1, got {cfg[key]!r}", f"key {key}")
    if not isinstance(cfg.max_waiting, int) or cfg.max_waiting < 0:
        raise ConfigError(f"max_waiting must be a whole number of at least 0, got {cfg.max_waiting!r}",
                          "key max_waiting")
    if not isinstance(cfg.port, int) or not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port must be 0..65535, got {cfg.port!r}", "key port", "port=0 takes any free port")


@verb()
def serve(cfg: DictConfig, run: RunContext) -> None:
    """Bind, load the model, and serve until SIGTERM/SIGINT."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"tunelab serve needs {' and '.join(missing)}, which is not installed", "command line",
                          "pip install 'tunelab[serve]' (make installs it)")
    import uvicorn

    _check_limits(cfg)
    _api_key(cfg)  # refuse an exposed server without a key before anything loads
    sock = _bind(str(cfg.host), int(cfg.port))
    try:
        served = load_served(cfg)
    except BaseException:
        sock.close()
        raise
    app = build_app(served)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM/SIGINT: drain, then stop
            app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=int(cfg.graceful_timeout_s),
                            access_log=True, log_config=None)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"tunelab: serving {served.model_id!r} on http://{shown}:{port}/v1 "
          f"(max_tokens {served.max_tokens}, {served.max_concurrent} at once)", flush=True)
    Server(config).run(sockets=[sock])


if __name__ == "__main__":
    from tunelab.cli import run_verb

    run_verb("serve")
