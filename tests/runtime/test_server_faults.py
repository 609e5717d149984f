"""`caffeonnx serve` under client mistakes, stalled and idle sockets, non-finite outputs and SIGTERM (issue 12).

Every test talks to a real server process over real sockets; the limits are set small (1 s timeouts, 8
connections) so that each fault shows within a second or two.
"""
from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton

from caffeonnx.runtime.child import ChildServer, cli_command, serve_in_child

MODEL = "deep"
LIMITS = ("--threads", "1", "--keep-alive", "1", "--request-timeout", "1", "--max-connections", "8")
ONE_ROW = {"name": "data", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}


@pytest.fixture(scope="module")
def server(deep_encoder_path: Path) -> Iterator[ChildServer]:
    """A batching server with 1 s keep-alive and request timeouts and at most 8 connections."""
    with serve_in_child(deep_encoder_path, MODEL, *LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def unbatched_server(deep_encoder_path: Path) -> Iterator[ChildServer]:
    """The same server with batching off: every request runs alone."""
    with serve_in_child(deep_encoder_path, MODEL, "--no-batching", *LIMITS) as srv:
        yield srv


def _post(port: int, payload: dict | bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _until_closed(sock: socket.socket, since: float, limit: float = 10) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when that was (seconds after `since`)."""
    sock.settimeout(limit)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    return reply, time.monotonic() - since


def _binary_request(x: np.ndarray, binary_output: bool) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "data", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "encode4", "parameters": {"binary_data": binary_output}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize("which", ["server", "unbatched_server"])
def test_an_empty_batch_is_answered_with_an_empty_output(request: pytest.FixtureRequest, which: str) -> None:
    server: ChildServer = request.getfixturevalue(which)
    status, payload = _post(server.port, {"inputs": [{**ONE_ROW, "shape": [0, 784], "data": []}]})
    assert status == 200, payload
    assert payload["outputs"] == [{"name": "encode4", "datatype": "FP32", "shape": [0, 8], "data": []}]
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        inp = triton.InferInput("data", [0, 784], "FP32")
        inp.set_data_from_numpy(np.zeros((0, 784), np.float32), binary_data=True)
        codes = client.infer(MODEL, [inp], outputs=[triton.InferRequestedOutput("encode4")]).as_numpy("encode4")
    finally:
        client.close()
    assert codes.shape == (0, 8) and codes.dtype == np.float32


@pytest.mark.parametrize("body, message", [
    (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "the request body is not valid JSON (recursion limit exceeded"),
    (json.dumps({"inputs": [{**ONE_ROW, "shape": [10 ** 400, 784]}]}).encode(),
     "request field inputs[0].shape: 'shape' must be a list of non-negative integers (int64), got [1000"),
    (json.dumps({"inputs": [{**ONE_ROW, "data": [10 ** 400] + [0] * 783}]}).encode(),
     "input 'data': 'data' is not a list of FP32 numbers (int too large to convert to float)"),
    (json.dumps({"inputs": [{**ONE_ROW, "data": None, "parameters": {"binary_data_size": 10 ** 400}}]}).encode(),
     "request field inputs[0].parameters.binary_data_size: Input should be less than or equal to 9223372036854775807"),
    (json.dumps({"inputs": [{**ONE_ROW, "datatype": ["FP32"]}]}).encode(),
     "request field inputs[0].datatype: Input should be a valid string, got ['FP32']"),
    (json.dumps({"inputs": [ONE_ROW], "outputs": 5}).encode(),
     "request field outputs: Input should be a valid list, got 5"),
    (json.dumps({"inputs": [ONE_ROW], "parameters": {"binary_data_output": "false"}}).encode(),
     "request field parameters.binary_data_output: Input should be a valid boolean, got 'false'"),
    (json.dumps({"inputs": [ONE_ROW], "outputs": [{"name": "encode4", "parameters": {"binary_data": 1}}]}).encode(),
     "request field outputs[0].parameters.binary_data: Input should be a valid boolean, got 1"),
    (json.dumps({"inputs": [{**ONE_ROW, "data": [float("nan")] * 784}]}).encode(),
     "the request body is not valid JSON (expected value"),
    (json.dumps({"inputs": [{**ONE_ROW, "data": [1e300] * 784}]}).encode(),
     "input 'data': 'data' holds values that are not finite FP32 numbers"),
])
def test_client_mistakes_get_400_naming_the_field(server: ChildServer, body: bytes, message: str) -> None:
    status, payload = _post(server.port, body)
    assert (status, payload.get("error", "")[:len(message)]) == (400, message), payload
    assert _post(server.port, {"inputs": [ONE_ROW]})[0] == 200


def test_json_larger_than_max_batch_rows_can_need_gets_413_before_it_is_parsed(server: ChildServer) -> None:
    body = json.dumps({"inputs": [{**ONE_ROW, "data": [0] * 1_300_000}]}).encode()  # 3.9 MB, 64 x 784 needs 2.5
    expected = (f"the JSON part of the request is {len(body)} bytes, over the 2473984 bytes that a request of this "
                "server's max batch can need; send binary tensors or fewer rows")
    assert _post(server.port, body) == (413, {"error": expected})


def test_binary_data_output_must_be_a_boolean_and_false_means_json(server: ChildServer) -> None:
    status, payload = _post(server.port, {"inputs": [ONE_ROW], "parameters": {"binary_data_output": False}})
    assert status == 200 and len(payload["outputs"][0]["data"]) == 8, payload


def test_non_finite_outputs_go_out_as_binary_or_are_refused_in_json(server: ChildServer) -> None:
    x = np.full((2, 784), np.nan, np.float32)
    body, headers = _binary_request(x, binary_output=True)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    n = int(resp.getheader("Inference-Header-Content-Length"))
    assert resp.status == 200 and np.isnan(np.frombuffer(raw[n:], np.float32)).all()
    expected = ("output 'encode4' holds 16 non-finite value(s) (NaN or ±Infinity), which JSON cannot carry; request "
                "it as binary data (\"binary_data\": true) to receive them")
    assert _post(server.port, *_binary_request(x, binary_output=False)) == (422, {"error": expected})


STALLED = {  # what the client sends before it stalls -> the response it gets before the server closes
    b"POST /v2/models/deep/infer HTTP/1.1\r\nHost: x\r\nContent-Le": b"HTTP/1.1 408 ",  # half a head
    b"POST /v2/models/deep/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{": b"HTTP/1.1 408 ",  # half a body
    b"": b"",  # nothing at all: closed by the keep-alive timeout, without a response
}


def test_stalled_requests_are_closed_within_the_timeout(server: ChildServer) -> None:
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in STALLED]
    for sock, sent in zip(socks, STALLED):
        sock.sendall(sent)
    start = time.monotonic()
    for sock, (sent, expected) in zip(socks, STALLED.items()):
        with sock:
            reply, seconds = _until_closed(sock, start)
        assert 0.8 < seconds < 3.0, f"{sent!r}: closed after {seconds:.2f} s"
        assert reply.startswith(expected) and (not expected or b"--request-timeout" in reply), (sent, reply)


def test_an_endless_head_gets_431(server: ChildServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /v2 HTTP/1.1\r\n")
        try:
            for _ in range(100):  # 100 KiB of headers, in reads the server cannot take as one
                sock.sendall(b"X-Filler: " + b"a" * 1000 + b"\r\n")
                time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply, _ = _until_closed(sock, time.monotonic())
    assert reply.startswith(b"HTTP/1.1 431 ") and b"the request head is over 65536 bytes" in reply, reply


def test_bytes_that_are_not_http_get_a_v2_error_body(server: ChildServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00 a TLS hello\r\n\r\n")
        reply, _ = _until_closed(sock, time.monotonic())
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head, head
    assert json.loads(body) == {"error": "Invalid HTTP request received: the bytes sent are not an HTTP/1.1 request"}


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_idle_sockets_are_bounded_by_max_connections(server: ChildServer) -> None:
    time.sleep(1.2)  # earlier tests' connections have timed out
    before = _descriptors(server.proc.pid)
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        time.sleep(0.3)
        held = _descriptors(server.proc.pid) - before
        refused = []
        for sock in socks:
            sock.settimeout(0.05)
            try:
                refused.append(sock.recv(4096))
            except TimeoutError:
                pass
        assert held <= 8, f"{held} descriptors for 40 idle sockets with --max-connections 8"
        assert len(refused) == 32 and all(r.startswith(b"HTTP/1.1 503 ") or r == b"" for r in refused), refused[:3]
        time.sleep(1.5)  # the 8 held ones pass the 1 s keep-alive
        assert _descriptors(server.proc.pid) <= before
        assert _post(server.port, {"inputs": [ONE_ROW]})[0] == 200
    finally:
        for sock in socks:
            sock.close()


def test_sigterm_closes_stalled_requests_answers_the_rest_and_exits_within_the_bound(
        deep_encoder_path: Path) -> None:
    with serve_in_child(deep_encoder_path, MODEL, "--threads", "1", "--shutdown-timeout", "1", "--request-timeout", "30",
                        "--keep-alive", "30", capture_output=True) as srv:
        idle, half_head, half_body = (socket.create_connection(("127.0.0.1", srv.port)) for _ in range(3))
        half_head.sendall(b"POST /v2/models/deep/infer HTTP/1.1\r\nHost: x\r\n")
        half_body.sendall(b"POST /v2/models/deep/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{")
        time.sleep(0.3)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        (idle_reply, idle_s), (head_reply, head_s) = _until_closed(idle, start), _until_closed(half_head, start)
        body_reply, body_s = _until_closed(half_body, start)
        output, _ = srv.proc.communicate(timeout=10)
        exit_s = time.monotonic() - start
    assert (idle_reply, head_reply) == (b"", b"") and max(idle_s, head_s) < 0.5, (idle_s, head_s)
    assert body_reply.startswith(b"HTTP/1.1 503 ") and b"the server shut down before this request" in body_reply
    assert 0.9 < body_s < 2.5, body_s
    assert srv.proc.returncode == 0 and "server stopped" in output, output
    assert exit_s < 4.0, f"exited {exit_s:.2f} s after SIGTERM with --shutdown-timeout 1"


def test_more_connections_than_the_open_files_limit_allows_are_refused_before_serving(deep_encoder_path: Path) -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.run(cli_command("serve", str(deep_encoder_path), "--port", "0", "--max-connections", "1000"),
                          capture_output=True, text=True, timeout=60, preexec_fn=low_limit, check=False)
    expected = ("error: --max-connections 1000 needs about 1128 open files, but this process may open 256 (ulimit -n); "
                "lower --max-connections to 128 or less, or raise the limit")
    assert (proc.returncode, proc.stderr.strip()) == (2, expected)
