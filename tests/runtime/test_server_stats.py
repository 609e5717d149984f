"""`caffeonnx serve` statistics (Triton's statistics extension) and --access-log, on a real server process.

The statistics are read with tritonclient.http's get_inference_statistics and checked twice: against Triton's own
schema (tritonclient's generated grpc_service ModelStatisticsResponse, parsed strictly, so an unknown or misspelt
field fails), and against what the test sent: requests, rows, failures, and the invariants between the counters
(every row in exactly one model run; each request's phases within its end-to-end time).
"""
from __future__ import annotations

import datetime
import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.child import serve_in_child
from tests.helpers import rng

service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
MODEL = "deep"


def _infer(port: int, x: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inp = triton.InferInput("data", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(MODEL, [inp]).as_numpy("encode4")
    finally:
        client.close()


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


@pytest.fixture(scope="module")
def traffic(deep_encoder_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One server, a known mix of requests, its statistics and its access log (read after it stopped)."""
    log = tmp_path_factory.mktemp("access") / "access.log"
    x = rng(7).random((16, 784), dtype=np.float32)
    result: dict = {"log": log}
    with serve_in_child(deep_encoder_path, MODEL, "--threads", "1", "--max-batch", "64", "--max-delay-ms", "20",
                        "--access-log", str(log)) as srv:
        port = srv.port
        started_ms = time.time_ns() // 1_000_000
        with ThreadPoolExecutor(8) as pool:  # 8 concurrent requests of 2 rows: batched together, in some runs
            list(pool.map(lambda i: _infer(port, x[2 * i:2 * i + 2]), range(8)))
        for i in range(3):  # 3 lone requests of one row
            _infer(port, x[i:i + 1])
        with pytest.raises(InferenceServerException, match="has shape"):  # a failure of this model: 400
            _infer(port, np.zeros((1, 783), np.float32))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # another model: 404, not counted
        conn.request("POST", "/v2/models/other/infer", body=b"{}")
        assert conn.getresponse().status == 404
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        result["stats"] = client.get_inference_statistics(MODEL)
        result["stats_v1"] = client.get_inference_statistics(MODEL, "1")
        result["stats_all"] = client.get_inference_statistics()
        result["extensions"] = client.get_server_metadata()["extensions"]
        with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
            client.get_inference_statistics("nope")
        with pytest.raises(InferenceServerException, match="has no version '2'"):
            client.get_inference_statistics(MODEL, "2")
        client.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v2/models/deep/config?x=1%202")
        resp = conn.getresponse()
        result["config_bytes"] = len(resp.read())
        result["window_ms"] = (started_ms, time.time_ns() // 1_000_000)
    result["lines"] = log.read_text().splitlines()
    return result


def test_statistics_fit_tritons_schema(traffic: dict) -> None:
    for answer in (traffic["stats"], traffic["stats_v1"], traffic["stats_all"]):
        parsed = json_format.ParseDict(answer, service_pb2.ModelStatisticsResponse())  # unknown fields raise
        assert [(s.name, s.version) for s in parsed.model_stats] == [(MODEL, "1")]
    assert "statistics" in traffic["extensions"]


def test_statistics_count_what_was_sent(traffic: dict) -> None:
    [stat] = traffic["stats"]["model_stats"]
    inf = stat["inference_stats"]
    assert inf["success"]["count"] == 11 and inf["fail"]["count"] == 1  # the 404 of another model is not ours
    assert stat["inference_count"] == 8 * 2 + 3
    runs = stat["execution_count"]
    # the 3 lone requests run alone; the 8 concurrent ones may share runs (how many depends on timing: on a
    # loaded machine they can arrive one by one), so the count is bounded, and the batch stats must add up
    assert 4 <= runs <= 11
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inf[phase]["count"] == 11, phase  # per successful request, as Triton counts them
    assert inf["success"]["ns"] >= sum(inf[p]["ns"] for p in ("queue", "compute_input", "compute_infer",
                                                               "compute_output"))
    assert inf["compute_infer"]["ns"] > 0 and inf["fail"]["ns"] > 0
    batches = stat["batch_stats"]
    assert sum(b["compute_infer"]["count"] for b in batches) == runs
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches) == stat["inference_count"]
    assert {1} <= {b["batch_size"] for b in batches} and max(b["batch_size"] for b in batches) > 2
    assert traffic["window_ms"][0] <= stat["last_inference"] <= traffic["window_ms"][1]


def test_access_log_has_one_line_per_request(traffic: dict) -> None:
    fields = [line.split(" ") for line in traffic["lines"]]
    assert all(len(f) == 7 for f in fields), traffic["lines"][:3]
    for when, client, _method, _path, status, size, seconds in fields:
        datetime.datetime.strptime(when, "%Y-%m-%dT%H:%M:%S.%fZ")
        assert client.startswith("127.0.0.1:") and int(status) >= 200 and int(size) >= 0 and float(seconds) >= 0
    infer = [(f[2], f[3], f[4]) for f in fields if f[3].endswith("/infer")]
    assert sorted(infer) == sorted([("POST", "/v2/models/deep/infer", "200")] * 11
                                   + [("POST", "/v2/models/deep/infer", "400"),
                                      ("POST", "/v2/models/other/infer", "404")])
    stats = [f for f in fields if f[3].endswith("/stats")]
    assert [(f[3], f[4]) for f in stats] == [("/v2/models/deep/stats", "200"), ("/v2/models/deep/versions/1/stats",
                                             "200"), ("/v2/models/stats", "200"), ("/v2/models/nope/stats", "404"),
                                            ("/v2/models/deep/versions/2/stats", "404")]
    [config] = [f for f in fields if "/config" in f[3]]
    assert config[3] == "/v2/models/deep/config?x=1%202" and int(config[5]) == traffic["config_bytes"]
    assert any(f[3] == "/v2/health/ready" for f in fields)  # the readiness polls of serve_in_child too


def test_access_log_to_standard_output(deep_encoder_path: Path) -> None:
    with serve_in_child(deep_encoder_path, MODEL, "--threads", "1", "--access-log", "-", capture_output=True) as srv:
        status, body = _get(srv.port, "/v2/models/deep")
        assert status == 200 and json.loads(body)["name"] == MODEL
    output = srv.proc.communicate(timeout=30)[0]
    [line] = [line for line in output.splitlines() if " /v2/models/deep " in line]
    assert line.split(" ")[2:6] == ["GET", "/v2/models/deep", "200", str(len(body))]


def test_answers_of_the_connection_layer_are_logged_once(deep_encoder_path: Path, tmp_path: Path) -> None:
    """408 (half a head, half a body) and 503 past --max-connections are written by the connection, not the app:
    logged with '-' for what is not known, and the request whose body never came is not logged again as 499."""
    log = tmp_path / "access.log"
    with serve_in_child(deep_encoder_path, MODEL, "--threads", "1", "--request-timeout", "1", "--keep-alive", "5",
                        "--max-connections", "2", "--access-log", str(log)) as srv:
        time.sleep(0.2)  # the readiness poll's connection is gone
        half_head = socket.create_connection(("127.0.0.1", srv.port))
        half_body = socket.create_connection(("127.0.0.1", srv.port))
        half_head.sendall(b"POST /v2/models/deep/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
        half_body.sendall(b"POST /v2/models/deep/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{")
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", srv.port)) as third:
            assert third.recv(4096).startswith(b"HTTP/1.1 503 ")
        for sock in (half_head, half_body):
            with sock:
                sock.settimeout(5)
                assert sock.recv(4096).startswith(b"HTTP/1.1 408 ")
    lines = [line.split(" ") for line in log.read_text().splitlines() if "/v2/health/ready" not in line]
    assert sorted((f[2], f[3], f[4], f[6]) for f in lines) == [
        ("-", "-", "408", "-"), ("-", "-", "503", "-"), ("POST", "/v2/models/deep/infer", "408", "-")]


def test_unwritable_access_log_is_refused_before_the_model_loads(deep_encoder_path: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["serve", str(deep_encoder_path), "--port", "0", "--access-log",
                                   str(tmp_path / "missing" / "access.log")])
    assert isinstance(res.exception, CaffeOnnxError), res.output
    assert "cannot be opened for appending" in str(res.exception)
