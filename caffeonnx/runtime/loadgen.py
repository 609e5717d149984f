"""A light HTTP load generator for the server benchmark: keep-alive connections, prebuilt requests.

Each of `concurrency` connections sends the same binary-tensor infer request
(as tritonclient.http would), waits for the response and sends the next, for a
fixed time; the client does as little work as possible so that the measurement
is the server's.  Latency is request sent to response fully read.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import numpy as np

from caffeonnx.runtime.protocol import HEADER_LENGTH


def infer_request_bytes(host: str, port: int, model: str, input_name: str, output_name: str, x: np.ndarray) -> bytes:
    """One complete HTTP/1.1 infer request with the input as a binary tensor and a binary output."""
    head = json.dumps({
        "inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
    }).encode()
    body = head + np.ascontiguousarray(x, dtype=np.float32).tobytes()
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/octet-stream\r\n{HEADER_LENGTH}: {len(head)}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@dataclass
class LoadResult:
    """What `concurrency` closed-loop clients saw during one measurement window."""

    concurrency: int
    seconds: float
    requests: int
    errors: int
    latencies: np.ndarray  # seconds, one per successful request

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


async def _client(host: str, port: int, request: bytes, warm_until: float, stop_at: float,
                  latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if start >= warm_until:
                if status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(status)
    finally:
        writer.close()


async def _run(host: str, port: int, request: bytes, concurrency: int, warmup: float, seconds: float) -> LoadResult:
    now = time.perf_counter()
    warm_until, stop_at = now + warmup, now + warmup + seconds
    latencies: list[float] = []
    errors: list[int] = []
    await asyncio.gather(*(_client(host, port, request, warm_until, stop_at, latencies, errors)
                           for _ in range(concurrency)))
    return LoadResult(concurrency, seconds, len(latencies), len(errors), np.array(latencies))


def run_load(host: str, port: int, request: bytes, concurrency: int, seconds: float, warmup: float = 0.5) -> LoadResult:
    """Closed-loop load: `concurrency` connections for `seconds` after `warmup` (uvloop when installed)."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    return runner(_run(host, port, request, concurrency, warmup, seconds))
