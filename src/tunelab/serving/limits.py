"""The request body limit, whatever the framing: a pure ASGI middleware that counts the bytes it hands on.

A `Content-Length` header alone does not bound a body: `Transfer-Encoding: chunked` sends none, and a body may
be longer than it claims (uvicorn stops at the claim, but the middleware does not rely on that). So the limit
is enforced on what the app actually reads. No Starlette/FastAPI import: this module is plain ASGI.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tunelab.serving.requests import APIError

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


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
        body = json.dumps(APIError(413, text).body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
