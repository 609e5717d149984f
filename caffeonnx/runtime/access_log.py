"""`caffeonnx serve --access-log PATH|-`: one line per request, written as its answer ends.

    2026-05-02T10:11:12.345678Z 127.0.0.1:50312 POST /v2/models/encoder/infer 200 146 0.000731

Fields, space-separated: when the request began (UTC, ISO 8601), the client
(host:port), method, path with its query (as sent, percent-encoded), HTTP status,
response body bytes, and seconds from the request reaching the app to its last byte
handed to the connection.  A request the client left before it was answered is
logged with 499 (nginx's "client closed request").  Answers the connection layer gives
by itself (408 for a request not arrived in time, 431 for a head too large, 400 for
bytes that are not HTTP, 503 past --max-connections) are logged too, with `-` for what
is not known (method and path before the head arrived; duration).
"""
from __future__ import annotations

import datetime
import sys
import time
from pathlib import Path
from typing import IO, Any

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.infer_endpoint import Receive, Scope, Send

_LOGGED = "caffeonnx.access_logged"  # set in a request's scope once its line is written


def open_access_log(target: str) -> IO[str]:
    """The stream for --access-log: standard output for '-', else the file, appended to and line-buffered."""
    if target == "-":
        return sys.stdout
    try:
        return open(Path(target), "a", buffering=1, encoding="utf-8")  # open as long as the server runs
    except OSError as exc:
        raise CaffeOnnxError(f"--access-log {target!r}: cannot be opened for appending ({exc.strerror})") from None


def _client(addr: Any) -> str:
    if not addr:
        return "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _target(scope: Scope | None) -> tuple[str, str]:
    """(method, path?query) of a request scope, printable: bytes outside '!'..'~' percent-encoded."""
    if not scope or "method" not in scope:
        return "-", "-"
    raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8")
    query = scope.get("query_string", b"")
    target = raw + (b"?" + query if query else b"")
    return scope["method"], "".join(chr(b) if 0x21 <= b <= 0x7E else f"%{b:02X}" for b in target)


class AccessLog:
    """Writes the lines; called on the event loop's thread only."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, began: float, client: Any, scope: Scope | None, status: int, size: int,
              seconds: float | None) -> None:
        when = datetime.datetime.fromtimestamp(began, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        method, target = _target(scope)
        duration = f"{seconds:.6f}" if seconds is not None else "-"
        self.stream.write(f"{when} {_client(client)} {method} {target} {status} {size} {duration}\n")
        self.stream.flush()
        if scope is not None:
            scope[_LOGGED] = True

    def raw(self, peer: Any, scope: Scope | None, status: int, response: bytes) -> None:
        """A response the connection layer wrote itself (head and body in `response`)."""
        body = len(response) - response.index(b"\r\n\r\n") - 4
        self.write(time.time(), peer, scope, status, body, None)


class AccessLogApp:
    """ASGI middleware: the status and body size of each HTTP response, logged when the app is done with it."""

    def __init__(self, app: Any, log: AccessLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, start = time.time(), time.perf_counter()
        status, size = 0, 0

        async def logged_send(message: Any) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        except Exception:
            status = status or 500  # uvicorn answers 500 for an app that raised before responding
            raise
        finally:
            if not scope.get(_LOGGED):  # the connection layer may have answered (408) and logged it already
                self.log.write(began, scope.get("client"), scope, status or 499, size, time.perf_counter() - start)
