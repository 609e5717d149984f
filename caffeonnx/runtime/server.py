"""`caffeonnx serve`: one encoder over the Open Inference Protocol v2 (KServe / Triton REST).

Starlette on uvicorn.  Endpoints: GET /v2/health/live, /v2/health/ready, /v2,
/v2/models/{name}[/versions/1], .../ready, .../config, .../stats and /v2/models/stats
(Triton's statistics extension, stats.py); POST .../infer with JSON and binary tensors
(see protocol.py); GET /metrics for Prometheus.  With an access log every request
gets one line there (access_log.py).  Concurrent
infer requests are batched (batcher.py).  Client faults get 4xx with
{"error": message}; bodies over the limit get 413 before they are read.

Connections are bounded, because each holds a file descriptor (see ServerConfig):
an idle one is closed after `keep_alive_s`; a request must arrive whole (head and
body) within `request_timeout_s` of its first byte, or gets 408 and is closed; a
head over MAX_HEAD_BYTES gets 431; past `max_connections` a new connection gets
503 and is closed at once.  uvicorn closes idle keep-alive connections only after a
first response and has no read timeout (a half-sent head is kept forever), so
these limits live in `_GuardedHttp`, a subclass of its httptools protocol.
SIGTERM stops accepting, closes idle and half-received connections, answers the
requests in flight, and exits within `shutdown_timeout_s` (what is still open then
gets 503).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import http
import json
import logging
import resource
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO, Any, ClassVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from caffeonnx import __version__
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.access_log import AccessLog, AccessLogApp
from caffeonnx.runtime.batcher import DynamicBatcher
from caffeonnx.runtime.infer_endpoint import INFER_PATH, InferEndpoint, Receive, Scope, Send
from caffeonnx.runtime.protocol import ProtocolError, model_metadata, triton_config
from caffeonnx.runtime.session import EncoderSession
from caffeonnx.runtime.stats import ModelStats

log = logging.getLogger("caffeonnx.serve")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class ServerConfig:
    """What the server exposes and how it batches."""

    name: str = "encoder"
    max_batch: int = 64  # rows per model run (and per request)
    max_delay_ms: float = 1.0  # how long the first request of a batch waits for company
    batching: bool = True
    max_body_bytes: int = 64 << 20
    keep_alive_s: float = 5.0  # an idle connection (none of its requests under way) is closed after this
    request_timeout_s: float = 30.0  # a request's head and body must arrive within this of its first byte
    max_connections: int = 512  # open connections; more are refused with 503 (each one holds a descriptor)
    shutdown_timeout_s: float = 10.0  # SIGTERM: requests still open after this get 503 and the server exits
    access_log: IO[str] | None = None  # one line per request (access_log.py)


MAX_HEAD_BYTES = 64 << 10  # request line + headers; a longer head gets 431 (h11's default is 16 KiB)
FD_RESERVE = 128  # descriptors besides connections: model files, listening socket, threads' pipes, logs


def _raw_response(status: int, message: str) -> bytes:
    """A complete `Connection: close` response with the v2 error body, for the transport directly."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class _GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools connection with the limits uvicorn lacks: connection count, request read deadline, head
    size, and keep-alive from the moment a connection opens (uvicorn starts it after the first response only).

    A subclass of the protocol named in uvicorn's Config(http=...): the hooks are the parser callbacks it already
    implements (on_message_begin / on_headers_complete / on_message_complete) and the asyncio.Protocol methods.
    """

    config_limits: ClassVar[ServerConfig]
    request_log: ClassVar[AccessLog | None] = None  # (uvicorn's protocol has its own `access_log`, a bool)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._deadline: asyncio.TimerHandle | None = None  # armed while a request is being received
        self._started = 0.0  # loop time of the read in which the request being received began
        self._reading = False  # from a request's first byte to its last
        self._in_head = False  # from a request's first byte to the end of its headers
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  (as uvicorn's)
        limit = self.config_limits.max_connections
        if len(self.connections) >= limit:
            self._refused = True
            body = _raw_response(503, f"the server has {limit} open connections, its --max-connections; retry later")
            transport.write(body)
            transport.close()
            if self.request_log is not None:
                self.request_log.raw(transport.get_extra_info("peername"), None, 503, body)
            return
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and not self._reading:
            self._started = self.loop.time()  # a request may begin in this read
        counted = self._in_head  # a head that began in an earlier read: this read is all head until it ends
        super().data_received(data)
        # A timer only when a request is left half-received, or bytes came with nothing to answer: a request that
        # arrives in one read (most of them) costs no timer
        if self._deadline is None and (self._reading or self.cycle is None or self.cycle.response_complete):
            self._deadline = self.loop.call_at(self._started + self.config_limits.request_timeout_s, self._expire)
        if counted and self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._close_with(431, f"the request head is over {MAX_HEAD_BYTES} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._reading = False
        self._disarm()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """Bytes that are not HTTP: the v2 error body instead of uvicorn's plain text."""
        self._close_with(400, f"{msg.rstrip('.')}: the bytes sent are not an HTTP/1.1 request")

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        """The request deadline passed: 408 for a request still arriving; stray bytes on an idle connection: close."""
        self._deadline = None
        answering = self.cycle is not None and not self.cycle.response_complete
        if self._reading:
            self._close_with(408, f"the request did not arrive whole within {self.config_limits.request_timeout_s:g} "
                                  "s (the server's --request-timeout)")
        elif not answering:
            self.transport.close()

    def _close_with(self, status: int, message: str) -> None:
        """Answer `status` unless another response is due first on this connection, then close it."""
        cycle = None if self._in_head else self.cycle  # the cycle of the request being received, once it has one
        earlier = self._in_head and self.cycle is not None and not self.cycle.response_complete  # pipelined
        if not earlier and (cycle is None or not cycle.response_started):
            body = _raw_response(status, message)
            self.transport.write(body)
            if self.request_log is not None:
                scope = getattr(self, "scope", None) if not self._in_head else None
                self.request_log.raw(self.transport.get_extra_info("peername"), scope, status, body)
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() returns http.disconnect and its send() is dropped
            cycle.message_event.set()
        self.transport.close()


def check_descriptors(max_connections: int) -> None:
    """Make room for `max_connections` open sockets under RLIMIT_NOFILE (raising the soft limit up to the hard one),
    or refuse: past the limit accept() fails and the server stops taking connections."""
    need = max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise CaffeOnnxError(f"--max-connections {max_connections} needs about {need} open files, but this "
                                 f"process may open {hard} (ulimit -n); lower --max-connections to "
                                 f"{max(hard - FD_RESERVE, 1)} or less, or raise the limit")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class _Metrics:
    """Prometheus series of one server (own registry, so several apps can live in one process)."""

    def __init__(self, model: str, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("caffeonnx_infer_requests", "Infer requests by HTTP status code.",
                                ["model", "code"], registry=self.registry)
        self.latency = Histogram("caffeonnx_infer_request_seconds", "Infer request latency, body read to response.",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        sizes = sorted({1 << k for k in range(max_batch.bit_length())} | {max_batch})
        self.batch = Histogram("caffeonnx_batch_rows", "Rows per model run (dynamic batching).", ["model"],
                               buckets=sizes, registry=self.registry)
        self.run = Histogram("caffeonnx_model_run_seconds", "Duration of one model run.", ["model"],
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.model = model
        self._batch, self._run, self.request_seconds = (m.labels(model) for m in (self.batch, self.run, self.latency))
        self._codes: dict[int, Counter] = {}

    def on_run(self, rows: int, seconds: float) -> None:
        self._batch.observe(rows)
        self._run.observe(seconds)

    def done(self, status: int, seconds: float) -> None:
        """One infer request answered with HTTP `status` after `seconds` (the latency counts successes only)."""
        child = self._codes.get(status)
        if child is None:
            child = self._codes[status] = self.requests.labels(self.model, str(status))
        child.inc()
        if status == 200:
            self.request_seconds.observe(seconds)


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class InferenceApp:
    """The server's ASGI app: infer requests go to the InferEndpoint, everything else to Starlette."""

    def __init__(self, starlette: Starlette, infer: InferEndpoint, metrics: _Metrics, stats: ModelStats) -> None:
        self.starlette = starlette
        self.infer = infer
        self.metrics = metrics
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/infer") and INFER_PATH.match(scope["path"]):
            await self.infer(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)


def build_app(session: EncoderSession, config: ServerConfig) -> InferenceApp:
    """The ASGI app serving `session` as model `config.name`."""
    metrics = _Metrics(config.name, config.max_batch)
    stats = ModelStats(config.name)
    batcher = DynamicBatcher(session.run, config.max_batch, config.max_delay_ms / 1000, config.batching,
                             on_run=metrics.on_run, on_batch=stats.on_batch)
    state = {"ready": False}
    inputs, outputs = [session.input], [session.output]

    def check_model(request: Request) -> None:
        name = request.path_params["name"]
        if name != config.name:
            raise ProtocolError(f"unknown model {name!r}; this server serves {config.name!r}", 404)
        version = request.path_params.get("version")
        if version not in (None, "", "1"):
            raise ProtocolError(f"model {name!r} has no version {version!r}; it serves version 1", 404)

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if state["ready"] else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "caffeonnx", "version": __version__,
                             "extensions": ["binary_tensor_data", "model_configuration", "statistics"]})

    async def metadata(request: Request) -> Response:
        check_model(request)
        return JSONResponse(model_metadata(config.name, inputs, outputs))

    async def model_ready(request: Request) -> Response:
        check_model(request)
        return Response(status_code=200 if state["ready"] else 503)

    async def model_config(request: Request) -> Response:
        check_model(request)
        delay_us = round(config.max_delay_ms * 1000) if config.batching else 0
        return JSONResponse(triton_config(config.name, inputs, outputs, config.max_batch, delay_us))

    async def model_stats(request: Request) -> Response:
        if "name" in request.path_params:
            check_model(request)
        return JSONResponse({"model_stats": [stats.json()]})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        return _error(f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'error')}", code)

    async def protocol_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProtocolError)
        return _error(exc.message, exc.status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await batcher.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.stop()  # requests already queued are still answered

    model_routes = []
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        model_routes += [
            Route(prefix, metadata), Route(f"{prefix}/ready", model_ready), Route(f"{prefix}/config", model_config),
            Route(f"{prefix}/stats", model_stats),
        ]
    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_metadata),
        Route("/v2/models/stats", model_stats), *model_routes, Route("/metrics", prometheus),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found, ProtocolError: protocol_error})
    def done(status: int, seconds: float) -> None:
        metrics.done(status, seconds)
        stats.on_request(status, seconds)

    infer = InferEndpoint(config.name, session.input, session.output, batcher, config.max_batch,
                          config.max_body_bytes, done)
    return InferenceApp(app, infer, metrics, stats)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything says it serves: a busy port is a one-line user error."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a previous run's TIME_WAIT is no obstacle
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CaffeOnnxError(f"port {port} on {host} is already in use; stop what listens there or choose "
                                 "another --port") from None
        raise CaffeOnnxError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(session: EncoderSession, config: ServerConfig, sock: socket.socket) -> None:
    """Run the server on `sock` (see `listen`) until SIGINT/SIGTERM: uvicorn stops accepting, finishes in-flight
    requests (for at most `config.shutdown_timeout_s`), then returns.

    uvicorn re-raises the signal it caught once it has shut down; for SIGTERM (how orchestrators stop a
    server) a handler installed here swallows it, so a clean stop returns normally and exits with status 0.
    """
    import uvicorn

    access_log = AccessLog(config.access_log) if config.access_log is not None else None
    guarded = type("GuardedHttp", (_GuardedHttp,), {"config_limits": config, "request_log": access_log})
    app: Any = build_app(session, config)
    if access_log is not None:
        app = AccessLogApp(app, access_log)
    # timeout_keep_alive and timeout_graceful_shutdown are annotated int but used as float seconds (call_later,
    # asyncio.timeout); limit_concurrency is left off: it would answer 503 on every connection once the count is
    # reached, where _GuardedHttp refuses only the connections past it.
    uv = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                        http=guarded, ws="none", proxy_headers=False,
                        timeout_keep_alive=config.keep_alive_s,  # type: ignore[arg-type]
                        timeout_graceful_shutdown=config.shutdown_timeout_s)  # type: ignore[arg-type]
    # Everything loaded so far (model, onnx, numpy, torch when imported) lives as long as the server: moving it
    # out of the collector's reach keeps each full collection from walking ~10^5 objects under load.
    gc.collect()
    gc.freeze()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(uv).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
