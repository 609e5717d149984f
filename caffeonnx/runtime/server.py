"""`caffeonnx serve`: one encoder over the Open Inference Protocol v2 (KServe / Triton REST).

Starlette on uvicorn.  Endpoints: GET /v2/health/live, /v2/health/ready, /v2,
/v2/models/{name}[/versions/1], .../ready, .../config; POST .../infer with JSON
and binary tensors (see protocol.py); GET /metrics for Prometheus.  Concurrent
infer requests are batched (batcher.py).  Client faults get 4xx with
{"error": message}; bodies over the limit get 413 before they are read; SIGTERM
stops accepting, finishes the requests in flight, then exits.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import logging
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from caffeonnx import __version__
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.batcher import DynamicBatcher
from caffeonnx.runtime.infer_endpoint import INFER_PATH, InferEndpoint, Receive, Scope, Send
from caffeonnx.runtime.protocol import ProtocolError, model_metadata, triton_config
from caffeonnx.runtime.session import EncoderSession

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

    def done(self, status: int, seconds: float | None) -> None:
        """One infer request answered with HTTP `status` (and its latency when it succeeded)."""
        child = self._codes.get(status)
        if child is None:
            child = self._codes[status] = self.requests.labels(self.model, str(status))
        child.inc()
        if seconds is not None:
            self.request_seconds.observe(seconds)


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class InferenceApp:
    """The server's ASGI app: infer requests go to the InferEndpoint, everything else to Starlette."""

    def __init__(self, starlette: Starlette, infer: InferEndpoint, metrics: _Metrics) -> None:
        self.starlette = starlette
        self.infer = infer
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/infer") and INFER_PATH.match(scope["path"]):
            await self.infer(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)


def build_app(session: EncoderSession, config: ServerConfig) -> InferenceApp:
    """The ASGI app serving `session` as model `config.name`."""
    metrics = _Metrics(config.name, config.max_batch)
    batcher = DynamicBatcher(session.run, config.max_batch, config.max_delay_ms / 1000, config.batching,
                             on_run=metrics.on_run)
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
                             "extensions": ["binary_tensor_data", "model_configuration"]})

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
        ]
    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_metadata),
        *model_routes, Route("/metrics", prometheus),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found, ProtocolError: protocol_error})
    infer = InferEndpoint(config.name, session.input, session.output, batcher, config.max_batch,
                          config.max_body_bytes, metrics.done)
    return InferenceApp(app, infer, metrics)


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
    requests, then returns.

    uvicorn re-raises the signal it caught once it has shut down; for SIGTERM (how orchestrators stop a
    server) a handler installed here swallows it, so a clean stop returns normally and exits with status 0.
    """
    import uvicorn

    uv = uvicorn.Config(build_app(session, config), log_level="warning", access_log=False,
                        lifespan="on", timeout_graceful_shutdown=30, proxy_headers=False)
    # Everything loaded so far (model, onnx, numpy, torch when imported) lives as long as the server: moving it
    # out of the collector's reach keeps each full collection from walking ~10^5 objects under load.
    gc.collect()
    gc.freeze()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(uv).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
