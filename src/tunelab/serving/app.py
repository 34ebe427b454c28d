"""The FastAPI application: the API key, body size (`limits.BodyLimit`), draining and queue limits, OpenAI-style
errors, the endpoints, and server-sent events for `stream: true`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from tunelab.serving.generation import Cancelled, Sequential, counted_streamer, cut_at_stop
from tunelab.serving.limits import BodyLimit, Guard
from tunelab.serving.logprobs import Logprobs, answer_length, chat_logprobs, completion_logprobs
from tunelab.serving.prefix_cache import prefix_cache_for
from tunelab.serving.requests import (
    APIError,
    ChatRequest,
    CompletionRequest,
    Served,
    chat_messages,
    chat_prompt_ids,
    check_fields,
    check_length,
    generation_kwargs,
    logprobs_top,
    stop_strings,
)

log = logging.getLogger(__name__)

def build_app(served: Served) -> Any:
    """The FastAPI application answering for `served`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False  # set on SIGTERM: new requests get 503 while the ones in flight finish
    slots = asyncio.Semaphore(served.max_concurrent)
    prefixes, why = prefix_cache_for(served.model, served.prefix_cache)
    if why:
        log.info("prefix_cache: off for this model (%s)", why)
    if served.batching:
        from tunelab.serving.batching import Batcher

        engine: Any = Batcher(served, served.max_batch_size, served.batch_window_ms / 1000, prefixes)
    else:
        engine = Sequential(served, prefixes)
    app.state.engine = engine
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
        if first.get("type") == "extra_forbidden":
            message = f"{where}: not a field tunelab serve knows"
        # 400, as OpenAI answers a missing, mistyped or out-of-range field (FastAPI's default is 422)
        return JSONResponse(APIError(400, message, where or None, "invalid_request").body(), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), kind=kind).body(), err.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)  # the traceback stays here
        return JSONResponse(APIError(500, "internal server error", kind="server_error").body(), 500)

    # The last added runs first: the API key and draining are checked before the body's size, as before.
    app.add_middleware(BodyLimit, limit=served.max_request_bytes)
    app.add_middleware(Guard, api_key=served.api_key, draining=lambda: app.state.draining)

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

    async def complete(ids: list[int], settings: dict[str, Any], stops: list[str],
                       top: int | None) -> tuple[str, str, list[int], int, Logprobs | None]:
        """Non-streamed generation in a worker thread: (text, finish reason, new tokens, how many of them the
        logprobs cover, the logprobs if asked for)."""
        admit()
        sink = None if top is None else Logprobs(top)
        try:
            async with slots:
                new, finish = await asyncio.wrap_future(engine.submit(ids, settings, logprobs=sink))
        finally:
            admitted["n"] -= 1
        text, hit = cut_at_stop(served.tokenizer.decode(new, skip_special_tokens=True), stops)
        covered = answer_length(served.tokenizer, new, text, hit) if sink is not None else 0
        return text, "stop" if hit else finish, new, covered, sink

    async def stream(ids: list[int], settings: dict[str, Any], stops: list[str], chunk: Any,
                     top: int | None = None, usage: Any = None) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text from transformers' TextIteratorStreamer, carrying the
        logprobs of the tokens generated since the last chunk (`chunk(text, finish, ids, logprobs, start, end)`);
        `usage(completion tokens)`, if given, makes the last chunk before [DONE] (`stream_options.include_usage`)."""
        admitted["n"] += 1
        try:
            async with slots:
                streamer = counted_streamer(served.tokenizer)
                cancelled = Cancelled()
                sink = None if top is None else Logprobs(top)
                future = engine.submit(ids, settings, streamer, cancelled, sink)
                text, hit, sent = "", False, 0  # sent: tokens whose logprobs went out
                try:
                    async for piece, count in iterate_in_threadpool(streamer):
                        if hit or not piece:
                            continue
                        emitted, (text, hit) = len(text), cut_at_stop(text + piece, stops)
                        if len(text) > emitted:
                            upto = sent  # the tokens of the text so far, or the first of the next word with it
                            if sink is not None:
                                upto = max(sent, answer_length(served.tokenizer, streamer.ids[:count], text, hit))
                            body = chunk(text[emitted:], None, streamer.ids, sink, sent, upto)
                            sent = upto
                            yield f"data: {json.dumps(body)}\n\n"
                        if hit:
                            cancelled.event.set()
                finally:
                    cancelled.event.set()  # the client went away, or a stop string was seen
                    error: Exception | None = None
                    try:  # the generation has stopped before the slot is given back
                        new, finish = await asyncio.wrap_future(future)
                    except Exception as err:  # noqa: BLE001 - reported to the stream below
                        error = err
                if error is not None:
                    log.error("streamed generation failed: %r", error)
                    body = APIError(500, "internal server error", kind="server_error").body()
                    yield f"data: {json.dumps(body)}\n\n"
                    return
                end = max(sent, answer_length(served.tokenizer, new, text, hit)) if sink is not None else sent
                yield f"data: {json.dumps(chunk(None, 'stop' if hit else finish, new, sink, sent, end))}\n\n"
                if usage is not None:
                    yield f"data: {json.dumps(usage(len(new)))}\n\n"
                yield "data: [DONE]\n\n"
        finally:
            admitted["n"] -= 1

    def sse(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "draining" if app.state.draining else "ok", "model": served.model_id,
                "in_flight": admitted["n"], "largest_batch": getattr(engine, "largest", 1),
                "prefix_cache": None if prefixes is None else {"prefixes": len(prefixes.store), "hits": prefixes.hits,
                                                               "computed": prefixes.computed}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served.model_id, "object": "model", "created": served.created,
                                            "owned_by": "tunelab"}]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        check_model(name)
        return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "tunelab"}

    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(request: Any, rid: str, created: int, kind: str, prompt: int) -> Any:
        """The last chunk of a stream that asked for `stream_options.include_usage` (empty choices, the usage),
        or None; every chunk before it carries `"usage": null`, as OpenAI's do."""
        if not (request.stream_options and request.stream_options.include_usage):
            return None
        return lambda used: {"id": rid, "object": kind, "created": created, "model": served.model_id,
                             "choices": [], "usage": usage(prompt, used)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest) -> Any:
        check_model(request.model)
        check_fields(request)
        settings = generation_kwargs(served, request)
        ids = chat_prompt_ids(served.tokenizer, chat_messages(served, request))
        check_length(served, ids, settings)
        rid, created, stops = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), stop_strings(request)
        top, tokenizer = logprobs_top(request), served.tokenizer
        if request.stream:
            admit(count=False)
            first = [True]
            last = usage_chunk(request, rid, created, "chat.completion.chunk", len(ids))

            def chunk(text: str | None, finish: str | None, new: list[int], sink: Logprobs | None, start: int,
                      end: int) -> dict[str, Any]:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if first[0]:
                    delta["role"], first[0] = "assistant", False
                logprobs = None if sink is None else chat_logprobs(tokenizer, new, sink, start, end)
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.model_id,
                        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
                return body if last is None else {**body, "usage": None}

            return sse(stream(ids, settings, stops, chunk, top, last))
        text, finish, new, covered, sink = await complete(ids, settings, stops, top)
        logprobs = None if sink is None else chat_logprobs(tokenizer, new, sink, 0, covered)
        return {"id": rid, "object": "chat.completion", "created": created, "model": served.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                             "finish_reason": finish}],
                "usage": usage(len(ids), len(new))}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        check_model(request.model)
        check_fields(request)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise APIError(400, "give one prompt per request", "prompt")
        settings = generation_kwargs(served, request)
        ids = served.tokenizer(prompts[0], add_special_tokens=True)["input_ids"]
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        check_length(served, ids, settings)
        rid, created, stops = f"cmpl-{uuid.uuid4().hex}", int(time.time()), stop_strings(request)
        top, tokenizer, chars = logprobs_top(request), served.tokenizer, len(prompts[0])
        if request.stream:
            admit(count=False)
            last = usage_chunk(request, rid, created, "text_completion", len(ids))

            def chunk(text: str | None, finish: str | None, new: list[int], sink: Logprobs | None, start: int,
                      end: int) -> dict[str, Any]:
                logprobs = None if sink is None else completion_logprobs(tokenizer, new, sink, start, end, chars)
                body = {"id": rid, "object": "text_completion", "created": created, "model": served.model_id,
                        "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}]}
                return body if last is None else {**body, "usage": None}

            return sse(stream(ids, settings, stops, chunk, top, last))
        text, finish, new, covered, sink = await complete(ids, settings, stops, top)
        logprobs = None if sink is None else completion_logprobs(tokenizer, new, sink, 0, covered, chars)
        return {"id": rid, "object": "text_completion", "created": created, "model": served.model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
                "usage": usage(len(ids), len(new))}

    return app
