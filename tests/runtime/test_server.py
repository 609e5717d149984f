"""`caffeonnx serve` in a real process, driven by tritonclient.http (PyPI) and raw HTTP."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from caffeonnx.runtime.child import serve_in_child
from caffeonnx.runtime.loadgen import infer_request_bytes
from tests.helpers import assert_close, rng

MODEL = "deep"


@pytest.fixture(scope="module")
def server(deep_encoder_path: Path) -> Iterator[int]:
    """A server with a 1 MiB body limit and batches of up to 64 rows."""
    with serve_in_child(deep_encoder_path, MODEL, "--threads", "1", "--max-body-mb", "1", "--max-batch", "64") as srv:
        yield srv.port


@pytest.fixture()
def client(server: int) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(f"127.0.0.1:{server}")
    yield c
    c.close()


def _infer(client: triton.InferenceServerClient, x: np.ndarray, binary: bool) -> np.ndarray:
    inp = triton.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("encode4", binary_data=binary)
    return client.infer(MODEL, [inp], outputs=[out]).as_numpy("encode4")


def _post(port: int, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(MODEL)
    assert meta["inputs"] == [{"name": "data", "datatype": "FP32", "shape": [-1, 784]}]
    assert meta["outputs"] == [{"name": "encode4", "datatype": "FP32", "shape": [-1, 8]}]
    assert client.get_model_config(MODEL)["max_batch_size"] == 64
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("rows", [1, 16])
def test_codes_match_caffe(client: triton.InferenceServerClient, deep_blobs: dict, binary: bool, rows: int) -> None:
    got = _infer(client, deep_blobs["data"][:rows], binary)
    assert_close(got, deep_blobs["encode4"][:rows], f"encode4 ({'binary' if binary else 'JSON'} tensors)")


def test_default_outputs_without_an_outputs_list(client: triton.InferenceServerClient, deep_blobs: dict) -> None:
    inp = triton.InferInput("data", [3, 784], "FP32")
    inp.set_data_from_numpy(deep_blobs["data"][:3])
    assert_close(client.infer(MODEL, [inp]).as_numpy("encode4"), deep_blobs["encode4"][:3], "encode4")


@pytest.mark.parametrize("name, shape, dtype, message", [
    ("data", [2, 783], "FP32", r"input 'data' has shape \[2, 783\], the model takes \[-1, 784\]"),
    ("data", [2, 784], "FP64", r"input 'data' has datatype FP64, the model takes FP32"),
    ("pixels", [2, 784], "FP32", r"unknown input 'pixels'; the model takes \['data'\]"),
    ("data", [65, 784], "FP32", r"65 rows, over this server's max batch of 64"),
])
def test_bad_tensors_get_400_and_the_server_keeps_serving(client: triton.InferenceServerClient, deep_blobs: dict,
                                                          name: str, shape: list[int], dtype: str, message: str) -> None:
    inp = triton.InferInput(name, shape, dtype)
    inp.set_data_from_numpy(np.zeros(shape, dtype=np.float64 if dtype == "FP64" else np.float32))
    with pytest.raises(InferenceServerException, match=message) as info:
        client.infer(MODEL, [inp])
    assert info.value.status() == "400"
    assert_close(_infer(client, deep_blobs["data"][:2], True), deep_blobs["encode4"][:2], "encode4 after an error")


@pytest.mark.parametrize("body, headers, status, message", [
    (json.dumps({"inputs": [{"name": "data", "shape": [2, 784], "datatype": "FP32", "data": [0.5] * 784}]}).encode(),
     {}, 400, "'data' holds 784 values but shape [2, 784] needs 1568"),
    (b"\x00\x01 garbage, not JSON", {}, 400, "the request body is not valid JSON"),
    (json.dumps({"inputs": [{"name": "data", "shape": [1, 784], "datatype": "FP32",
                             "parameters": {"binary_data_size": 3136}}]}).encode() + b"\0" * 100,
     {"Inference-Header-Content-Length": "-5"}, 400, "Inference-Header-Content-Length -5 is outside the body"),
    (b"\0" * (1 << 20) + b"\0", {}, 413, "is over the 1048576-byte limit"),
])
def test_bad_bodies_get_4xx_with_a_message(server: int, client: triton.InferenceServerClient, deep_blobs: dict,
                                           body: bytes, headers: dict, status: int, message: str) -> None:
    got_status, payload = _post(server, body, headers)
    assert (got_status, message in payload.get("error", "")) == (status, True), payload
    assert_close(_infer(client, deep_blobs["data"][:2], False), deep_blobs["encode4"][:2], "encode4 after an error")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request_bodies_are_accepted(server: int, deep_blobs: dict, encoding: str) -> None:
    import gzip
    import zlib

    x = deep_blobs["data"][:2]
    body = json.dumps({"inputs": [{"name": "data", "shape": [2, 784], "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    status, payload = _post(server, packed, {"Content-Encoding": encoding})
    assert status == 200, payload
    got = np.asarray(payload["outputs"][0]["data"], dtype=np.float32).reshape(2, 8)
    assert_close(got, deep_blobs["encode4"][:2], f"encode4 ({encoding} request)")
    status, payload = _post(server, body, {"Content-Encoding": "br"})
    assert status == 415 and "Content-Encoding 'br' is not supported" in payload["error"]


def test_unknown_model_and_version_are_404(server: int, client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match=r"unknown model 'nope'; this server serves 'deep'") as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404"
    with pytest.raises(InferenceServerException, match=r"has no version '2'"):
        client.get_model_metadata(MODEL, model_version="2")
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("GET", "/v2/nothing/here")
    resp = conn.getresponse()
    assert resp.status == 404 and "/v2/nothing/here" in json.loads(resp.read())["error"]
    status, payload = _post(server, b"{}", {})
    assert (status, payload["error"]) == (400, "the request must be a JSON object with an 'inputs' list")


@pytest.mark.parametrize("seed", [0])
def test_concurrent_clients_get_their_own_codes_and_metrics_count_them(
        server: int, deep_blobs: dict, seed: int) -> None:
    def metric(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def scrape() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()

    before = scrape()
    picks = [rng(seed + k).choice(16, size=int(rng(k).integers(1, 4)), replace=False) for k in range(96)]

    def one(idx: np.ndarray) -> np.ndarray:
        c = triton.InferenceServerClient(f"127.0.0.1:{server}")
        try:
            return _infer(c, deep_blobs["data"][idx], binary=True)
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, picks))
    for idx, got in zip(picks, results):
        assert_close(got, deep_blobs["encode4"][idx], f"encode4{idx.tolist()}")
    after = scrape()
    ok = 'caffeonnx_infer_requests_total{code="200",model="deep"}'
    assert metric(after, ok) - metric(before, ok) == 96
    rows = "caffeonnx_batch_rows_sum"
    assert metric(after, rows) - metric(before, rows) == sum(len(p) for p in picks)
    assert "caffeonnx_infer_request_seconds_bucket" in after


def test_sigterm_finishes_the_request_in_flight_then_exits_0(deep_encoder_path: Path, deep_blobs: dict) -> None:
    # --no-batching: the same codes come back when every request runs alone
    with serve_in_child(deep_encoder_path, MODEL, "--threads", "1", "--no-batching", capture_output=True) as srv, \
            socket.create_connection(("127.0.0.1", srv.port)) as sock:
        port, proc = srv.port, srv.proc
        request = infer_request_bytes("127.0.0.1", port, MODEL, "data", "encode4", deep_blobs["data"][:4])
        sock.sendall(request[:len(request) // 2])  # the request is in flight when SIGTERM arrives
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        sock.sendall(request[len(request) // 2:])
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < reply.index(b"\r\n\r\n") + 4 + _content_length(reply):
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before the whole reply came: {reply!r}"
            reply += chunk
        sock.close()  # uvicorn lets idle keep-alive connections finish before it exits
        output, _ = proc.communicate(timeout=20)
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    json_len = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                        if line.lower().startswith(b"inference-header-content-length")))
    codes = np.frombuffer(body[json_len:], dtype=np.float32).reshape(4, 8)
    assert_close(codes, deep_blobs["encode4"][:4], "encode4 answered during shutdown")
    assert proc.returncode == 0, output
    assert "no batching" in output and "server stopped" in output
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def _content_length(reply: bytes) -> int:
    head = reply.split(b"\r\n\r\n", 1)[0]
    return next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)


def test_load_generator_measures_the_running_server(server: int, deep_blobs: dict) -> None:
    from caffeonnx.runtime.loadgen import run_load

    request = infer_request_bytes("127.0.0.1", server, MODEL, "data", "encode4", deep_blobs["data"][:1])
    load = run_load("127.0.0.1", server, request, concurrency=4, seconds=0.3, warmup=0.1)
    assert load.errors == 0 and load.requests > 0 and len(load.latencies) == load.requests
    assert load.rate == pytest.approx(load.requests / 0.3)
