"""The request body limit, whatever the framing: a pure ASGI middleware that counts the bytes it hands on; and
the API key and draining check in front of it (`Guard`).

A `Content-Length` header alone does not bound a body: `Transfer-Encoding: chunked` sends none, and a body may
be longer than it claims (uvicorn stops at the claim, but the middleware does not rely on that). So the limit
is enforced on what the app actually reads. No Starlette/FastAPI import: this module is plain ASGI.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tunelab.serving.requests import APIError

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


async def send_error(send: Send, err: APIError) -> None:
    """`err` as the app's handlers answer it, byte for byte (Starlette's JSONResponse: compact JSON, utf-8)."""
    body = json.dumps(err.body(), ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    headers += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """401 without the API key, 503 (Retry-After: 5) while draining, before any body is read; /health passes.

    Pure ASGI: Starlette's BaseHTTPMiddleware (`@app.middleware("http")`) runs each request through a task group
    and a streamed response wrapper, and py-spy put most of the event loop's ~5 ms of CPU per request there."""

    def __init__(self, app: ASGIApp, api_key: str | None, draining: Callable[[], bool]) -> None:
        self.app, self.api_key, self.draining = app, api_key, draining

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            if self.api_key:
                header = next((v for k, v in scope.get("headers") or () if k == b"authorization"), b"")
                scheme, _, key = header.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip(), self.api_key):
                    await send_error(send, APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                                    code="invalid_api_key", kind="authentication_error"))
                    return
            if self.draining():
                await send_error(send, APIError(503, "the server is shutting down", kind="server_error",
                                                headers={"Retry-After": "5"}))
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Answer 413 (OpenAI-style JSON) to a request whose body is over `limit` bytes, holding at most the limit
    plus one received chunk of it.

    A `Content-Length` over the limit is refused before anything is read. Otherwise each `http.request`
    message the app receives is counted, and the read that passes the limit fails instead of returning its
    chunk; whatever the app answers to that failure (FastAPI makes it a 400) is replaced by the 413. The rest of
    the body stays unread here: uvicorn reads it once the response is sent and drops it, and keeps the
    connection serving. Pure ASGI, not Starlette's BaseHTTPMiddleware, so the body is never read ahead.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self.refuse(send, f"request body of {int(declared)} bytes is over the limit of {self.limit}")
            return
        state = {"read": 0, "over": False, "started": False}

        async def counted_receive() -> Message:
            if state["over"]:  # asked again after the failure: still refused, nothing more is read
                raise APIError(413, "request body over the limit")
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.limit:
                    state["over"] = True  # this chunk is dropped here: the app holds at most `limit` bytes
                    raise APIError(413, "request body over the limit")
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"] and not state["started"]:
                return  # the app's own answer to the failed read; the 413 goes out instead
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await self.refuse(send, f"request body of more than {self.limit} bytes is over the limit of {self.limit}")

    @staticmethod
    async def refuse(send: Send, text: str) -> None:
        """The 413, written as raw ASGI messages (the app's exception handlers are inside this middleware)."""
        await send_error(send, APIError(413, text))
