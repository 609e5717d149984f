"""EncoderSession, encode, serve and bench on the CUDA execution provider (skipped where CUDA cannot start).

CI has no GPU, so these run on a GPU machine (benchmarks/README.md says how and records the
outcome).  Tolerances: float32 on CUDA matches Caffe's codes within the suite's default (atol 1e-5,
rtol 1e-4); TF32 and float16 compute within 2e-2 absolute.
"""
from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.runtime.child import serve_in_child
from caffeonnx.runtime.session import CUDA, EncoderSession, SessionConfig, cuda_available
from tests.helpers import assert_close, rng

pytestmark = pytest.mark.skipif(not cuda_available(), reason="the CUDA execution provider cannot start here")


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_cuda_session_returns_caffes_codes(deep_encoder_path: Path, deep_blobs: dict, rows: int) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cuda"))
    assert sess.provider == CUDA and sess.io_binding and "IOBinding" in sess.describe()
    assert_close(sess.run(deep_blobs["data"][:rows]), deep_blobs["encode4"][:rows], "encode4 (CUDA)")


def test_auto_picks_cuda(deep_encoder_path: Path) -> None:
    assert EncoderSession(deep_encoder_path, SessionConfig(device="auto")).provider == CUDA


@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_graph_replays_read_each_new_batch(deep_encoder_path: Path, deep_blobs: dict, seed: int) -> None:
    """A captured graph reads the bound input buffer on every replay: new data gives new codes."""
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cuda", cuda_graphs=(1, 4)))
    assert "CUDA graphs for batch [1, 4]" in sess.describe()
    data, codes = deep_blobs["data"], deep_blobs["encode4"]
    for _ in range(3):
        for rows in (4, 1, 5):  # 5 is not captured: it runs without a graph
            idx = rng(seed).choice(16, size=rows, replace=False)
            assert_close(sess.run(data[idx]), codes[idx], f"encode4{idx.tolist()} (CUDA graph)")


def test_device_buffers_and_queued_runs(deep_encoder_path: Path, deep_blobs: dict) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cuda", cuda_graphs=(16,)))
    inp, out = sess.device_buffers(16)
    assert inp.device_name() == "cuda" and out.device_name() == "cuda"
    inp.update_inplace(deep_blobs["data"])
    for _ in range(10):
        sess.run_bound(16, wait=False)
    sess.run_bound(16)
    assert_close(out.numpy(), deep_blobs["encode4"], "encode4 (device buffers)")


@pytest.mark.parametrize("fp16, tf32", [(True, False), (False, True)])
def test_reduced_precision_keeps_float32_io(deep_encoder_path: Path, deep_blobs: dict, fp16: bool, tf32: bool) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cuda", fp16=fp16, tf32=tf32, cuda_graphs=(16,)))
    got = sess.run(deep_blobs["data"])
    assert got.dtype == np.float32
    assert_close(got, deep_blobs["encode4"], "encode4 (fp16/TF32)", atol=2e-2, rtol=0)


def test_concurrent_runs_from_threads_stay_correct(deep_encoder_path: Path, deep_blobs: dict) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cuda", cuda_graphs=(4,)))
    picks = [rng(k).choice(16, size=4, replace=False) for k in range(32)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda idx: sess.run(deep_blobs["data"][idx]), picks))
    for idx, got in zip(picks, results):
        assert_close(got, deep_blobs["encode4"][idx], f"encode4{idx.tolist()}")


def test_encode_command_on_cuda(tmp_path: Path, deep_encoder_path: Path, deep_blobs: dict) -> None:
    np.save(tmp_path / "x.npy", deep_blobs["data"])
    res = CliRunner().invoke(app, ["encode", str(deep_encoder_path), str(tmp_path / "x.npy"), "-o",
                                   str(tmp_path / "codes.npy"), "--device", "cuda", "--batch-size", "6"])
    assert res.exit_code == 0, res.output
    assert "CUDAExecutionProvider" in res.output
    assert_close(np.load(tmp_path / "codes.npy"), deep_blobs["encode4"], "encode4 (encode --device cuda)")


@pytest.mark.parametrize("flags", [["--fp16", "--cuda-graph"], ["--tf32", "--cuda-graph"]])
def test_encode_command_precision_and_graph_flags(tmp_path: Path, deep_encoder_path: Path, deep_blobs: dict,
                                                  flags: list[str]) -> None:
    np.save(tmp_path / "x.npy", deep_blobs["data"])
    res = CliRunner().invoke(app, ["encode", str(deep_encoder_path), str(tmp_path / "x.npy"), "-o",
                                   str(tmp_path / "codes.npy"), "--device", "cuda", "--batch-size", "6", *flags])
    assert res.exit_code == 0, res.output
    assert "CUDA graphs for batch [6]" in res.output and ("fp16" if "--fp16" in flags else "TF32 on") in res.output
    assert_close(np.load(tmp_path / "codes.npy"), deep_blobs["encode4"], "encode4 (flags)", atol=2e-2, rtol=0)


def test_server_on_cuda_answers_json_requests(deep_encoder_path: Path, deep_blobs: dict) -> None:
    body = json.dumps({"inputs": [{"name": "data", "shape": [3, 784], "datatype": "FP32",
                                   "data": deep_blobs["data"][:3].ravel().tolist()}]})
    with serve_in_child(deep_encoder_path, "enc", "--fp16", device="cuda", capture_output=True) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/v2/models/enc/infer", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        reply = json.loads(resp.read())
    assert resp.status == 200, reply
    [out] = reply["outputs"]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    assert_close(got, deep_blobs["encode4"][:3], "encode4 (served on CUDA, fp16)", atol=2e-2, rtol=0)


def test_bench_cuda_engines_agree_and_report(deep_encoder_path: Path) -> None:
    import onnx

    from caffeonnx.runtime.bench_cuda import bench_cuda_engines, render_cuda_markdown

    result = bench_cuda_engines(onnx.load(str(deep_encoder_path)), large_batch=512, calls=60, large_calls=6,
                                queue=5, rounds=2)
    assert [(e["engine"], e["precision"]) for e in result["engines"]] == [
        (eng, p) for p in ("fp32", "tf32", "fp16") for eng in ("onnxruntime", "torch eager")]
    for e in result["engines"]:
        assert 0 < e["host_p50_us"] <= e["host_p99_us"] and e["throughput"] > 0, e
    assert result["max_code_difference"]["fp32"] <= 1e-4
    text = render_cuda_markdown(result)
    assert result["gpu"] in text and "batch-1 p50 <= 100 µs" in text
    assert ort.get_device() == "GPU"
