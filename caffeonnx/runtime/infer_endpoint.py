"""POST /v2/models/{name}[/versions/{version}]/infer: the server's hot path, as a plain ASGI handler.

Every other endpoint goes through Starlette; this one is called for each inference
request, so it reads the body, parses it (protocol.py), waits for its rows from the
batcher and writes the response with bare ASGI messages: no per-request framework
objects, no middleware layers.  Client faults are answered with their status and
{"error": message}; anything else is a 500 with the traceback logged.  A request
still open when the graceful-shutdown timeout cancels it gets 503.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np

from caffeonnx.runtime.batcher import DynamicBatcher
from caffeonnx.runtime.protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    infer_response,
    parse_infer_request,
)
from caffeonnx.runtime.session import TensorSpec

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

log = logging.getLogger("caffeonnx.serve")
INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]*))?/infer$")
_HEADER_LENGTH = HEADER_LENGTH.lower().encode()
JSON_BYTES_PER_VALUE = 48  # a float32 written by json.dumps takes at most 26 ("-1.2345678901234567e-38, ")
JSON_BYTES_SLACK = 64 << 10  # names, shapes, parameters and nesting


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def error_body(message: str) -> bytes:
    """The JSON body of an error response."""
    return json.dumps({"error": message}).encode()


async def send_response(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    """One complete HTTP response as ASGI messages."""
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    """The request body, inflated when gzip/deflate encoded; ProtocolError(413) past `limit` bytes."""
    declared = headers.get(b"content-length", b"")
    if declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"the request body of {int(declared)} bytes is over the {limit}-byte limit", 413)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"the request body is over the {limit}-byte limit", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate", 415)
    inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"the {encoding} body does not decompress ({exc})") from None
    if len(plain) > limit or inflater.unconsumed_tail:
        raise ProtocolError(f"the decompressed request body is over the {limit}-byte limit", 413)
    return plain


class InferEndpoint:
    """Answers infer requests for one model through a DynamicBatcher."""

    def __init__(self, model: str, inp: TensorSpec, out: TensorSpec, batcher: DynamicBatcher, max_batch: int,
                 max_body_bytes: int, on_done: Callable[[int, float], None]) -> None:
        self.model, self.input, self.output = model, inp, out
        self.batcher = batcher
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        # JSON tensors of max_batch rows fit in this; more would only be parsed into objects to be refused
        self.max_json_bytes = (JSON_BYTES_SLACK + JSON_BYTES_PER_VALUE * max_batch * inp.sample_size
                               if inp.static else None)
        self._on_done = on_done  # (HTTP status, seconds from the start of the request) after each request

    def _rows(self, scope: Scope, body: bytes, headers: dict[bytes, bytes]) -> tuple[InferRequest, np.ndarray]:
        """Check the URL and parse the body: the parsed request and its input rows."""
        if scope["method"] != "POST":
            raise ProtocolError(f"infer takes POST, not {scope['method']}", 405)
        match = INFER_PATH.match(scope["path"])
        name, version = (match.group(1), match.group(2)) if match else ("", None)
        if name != self.model:
            raise ProtocolError(f"unknown model {name!r}; this server serves {self.model!r}", 404)
        if version not in (None, "", "1"):
            raise ProtocolError(f"model {name!r} has no version {version!r}; it serves version 1", 404)
        length = headers.get(_HEADER_LENGTH)
        parsed = parse_infer_request(body, length.decode("latin-1") if length is not None else None,
                                     [self.input], [self.output], max_batch=self.max_batch,
                                     max_json_bytes=self.max_json_bytes)
        return parsed, parsed.inputs[self.input.name]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 200
        try:
            headers = dict(scope["headers"])
            self.batcher.expect(1)  # a batch being filled may wait for this request
            try:
                body = await read_body(receive, headers, self.max_body_bytes)
                parsed, rows = self._rows(scope, body, headers)
            finally:
                self.batcher.expect(-1)
            codes = await self.batcher.submit(rows)
            content, out_headers = infer_response(self.model, parsed, {self.output.name: codes})
            await send_response(send, 200, content, out_headers)
        except ProtocolError as exc:
            status = exc.status
            await send_response(send, status, error_body(exc.message), {"content-type": "application/json"})
        except _ClientGone:
            status = 499  # nginx's "client closed request": nothing to answer
        except asyncio.CancelledError:  # the graceful-shutdown timeout ran out: answer, and end this task here
            status = 503
            await send_response(send, 503, error_body("the server shut down before this request was answered; "
                                                      "retry it"), {"content-type": "application/json"})
        except Exception as exc:  # a bug or a model failure: 500, logged with its traceback
            status = 500
            log.exception("infer failed")
            await send_response(send, 500, error_body(f"internal error: {type(exc).__name__}: {exc}"),
                                {"content-type": "application/json"})
        finally:
            self._on_done(status, time.perf_counter() - start)
