"""The HTTP side of `tunelab board`: the standard library's ThreadingHTTPServer, GET only, read-only.

Routes: `/` (runs list, `?kind=` one section), `/run`, `/sweep`, `/compare`, `/pipeline`, `/predictions`
(each `?path=<job under the outputs folder>`), `/file?path=` (a PNG, CSV, text or JSON file a verb wrote, under the
folder only), `/board.css`. A path that leaves the folder is 403, one that does not exist 404; anything else that
goes wrong while reading a directory is a page that says "unreadable: <reason>" (500), never a traceback.
"""

from __future__ import annotations

import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tunelab.board import outputs, pages
from tunelab.board.outputs import Unreadable

# What `/file` serves, by suffix; anything else (weights, checkpoints, pickles) is refused.
FILE_TYPES = {
    ".png": "image/png",
    ".csv": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".json": "text/plain; charset=utf-8",
    ".jsonl": "text/plain; charset=utf-8",
    ".yaml": "text/plain; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
}
# No script may run on these pages (there is none); images and the stylesheet come from the board itself.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
VIEWS = ("run", "sweep", "compare", "pipeline", "predictions")


class Refused(Exception):
    def __init__(self, status: HTTPStatus, text: str) -> None:
        super().__init__(text)
        self.status = status


def _job(root: Path, query: dict[str, list[str]]) -> outputs.Job:
    rel = (query.get("path") or [""])[0]
    path = outputs.inside(root, rel)
    if path is None:
        raise Refused(HTTPStatus.FORBIDDEN, f"refused: {rel!r} is not a folder under the outputs folder")
    if not path.is_dir():
        raise Refused(HTTPStatus.NOT_FOUND, f"not found: {rel}")
    return outputs.read_job(root, path)


def render(root: Path, route: str, query: dict[str, list[str]]) -> tuple[HTTPStatus, str, bytes]:
    """(status, content type, body) for GET `route?query`: the one function the handler and tests call."""
    html = "text/html; charset=utf-8"
    first = {k: v[0] for k, v in query.items() if v}
    try:
        if route == "/":
            return HTTPStatus.OK, html, pages.index(root, outputs.find_jobs(root), first.get("kind")).encode()
        if route == "/board.css":
            return HTTPStatus.OK, "text/css; charset=utf-8", pages.CSS.encode()
        if route == "/file":
            return _file(root, first.get("path", ""))
        if route.lstrip("/") not in VIEWS:
            raise Refused(HTTPStatus.NOT_FOUND, f"no page {route}")
        job = _job(root, query)
        view = route.lstrip("/")
        if view == "predictions":
            if not (job.path / "predictions.jsonl").is_file():
                raise Refused(HTTPStatus.NOT_FOUND, f"no predictions.jsonl in {job.rel} (tunelab eval writes one)")
            try:
                offset = max(0, int(first.get("offset", "0")))
            except ValueError:
                offset = 0
            body = pages.predictions(root, job, first.get("q", ""), offset)
        elif view == "sweep":
            body = pages.sweep(root, job, first.get("metric"))
        elif view == "compare":
            body = pages.compare(root, job)
        elif view == "pipeline":
            body = pages.pipeline(root, job)
        else:
            body = pages.run(root, job)
        return HTTPStatus.OK, html, body.encode()
    except Refused as err:
        return err.status, html, pages.problem(root, err.status.phrase, str(err)).encode()
    except (Unreadable, OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        # a directory damaged in a way no reader foresaw: the page says so; the board keeps serving
        text = f"unreadable: {type(err).__name__}: {err}"
        return HTTPStatus.INTERNAL_SERVER_ERROR, html, pages.problem(root, "unreadable", text).encode()


def _file(root: Path, rel: str) -> tuple[HTTPStatus, str, bytes]:
    path = outputs.inside(root, rel)
    if path is None:
        raise Refused(HTTPStatus.FORBIDDEN, f"refused: {rel!r} is not a file under the outputs folder")
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise Refused(HTTPStatus.FORBIDDEN, f"refused: the board shows figures and text files, not {path.suffix!r}")
    if not path.is_file():
        raise Refused(HTTPStatus.NOT_FOUND, f"not found: {rel}")
    return HTTPStatus.OK, kind, outputs.read_text(path).encode() if kind.startswith("text/") else _bytes(path)


def _bytes(path: Path) -> bytes:
    if path.stat().st_size > outputs.MAX_FILE_BYTES:
        raise Unreadable(f"{path.name}: larger than {outputs.MAX_FILE_BYTES} bytes")
    return path.read_bytes()


class Handler(BaseHTTPRequestHandler):
    root: Path = Path("outputs")
    server_version = "tunelab-board"
    sys_version = ""

    def do_GET(self, body_too: bool = True) -> None:  # noqa: N802 - the name http.server dispatches to
        parts = urlsplit(self.path)
        status, kind, body = render(self.root, parts.path or "/", parse_qs(parts.query))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if body_too:
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET(body_too=False)

    def _read_only(self) -> None:
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED, "the board is read-only")

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        print(f"board: {self.address_string()} {format % args}", file=sys.stderr, flush=True)


def make_server(root: Path, host: str, port: int) -> ThreadingHTTPServer:
    """A server over `root`, bound (port 0: any free one) but not yet serving."""
    handler = type("BoardHandler", (Handler,), {"root": root})
    if ":" in host:
        import socket

        class Server6(ThreadingHTTPServer):
            address_family = socket.AF_INET6

        return Server6((host, port), handler)
    return ThreadingHTTPServer((host, port), handler)
