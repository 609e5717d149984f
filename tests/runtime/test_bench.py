"""The benchmark's parts: the torch baseline computes the same codes, the reports say what was measured."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.errors import CaffeOnnxError, UnsupportedError
from caffeonnx.runtime.bench import TorchEngine, deep_ae_encoder, render_markdown, run_bench
from caffeonnx.runtime.encoder import extract_encoder, save_model
from caffeonnx.runtime.session import EncoderSession, SessionConfig
from caffeonnx.runtime.torch_encoder import TorchEncoder
from tests.helpers import assert_close, rng


def test_torch_baseline_returns_caffes_codes(deep_encoder_path: Path, deep_blobs: dict) -> None:
    net = TorchEncoder(onnx.load(str(deep_encoder_path))).eval()
    with torch.inference_mode():
        got = net(torch.from_numpy(deep_blobs["data"])).numpy()
    assert_close(got, deep_blobs["encode4"], "encode4 (torch eager)")


@pytest.mark.parametrize("seed", [0, 1])
def test_bench_encoder_is_the_784_1000_500_250_30_net_and_engines_agree(seed: int) -> None:
    model = deep_ae_encoder(seed)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    assert inits == {"w1": [1000, 784], "encode1.bias": [1000], "w2": [500, 1000], "encode2.bias": [500],
                     "w3": [250, 500], "encode3.bias": [250], "w4": [30, 250], "encode4.bias": [30]}
    x = rng(seed).random((5, 784), dtype=np.float32)
    ort_codes = EncoderSession(model, SessionConfig(device="cpu")).run(x)
    torch_codes = TorchEngine(model, "data", "encode4")(x)
    assert ort_codes.shape == (5, 30)
    assert_close(torch_codes, ort_codes, "encode4 torch vs onnxruntime", atol=1e-4, rtol=1e-3)


def test_torch_baseline_refuses_ops_it_does_not_cover() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")])
    with pytest.raises(UnsupportedError, match=r"not 'Conv'"):
        TorchEncoder(helper.make_model(graph, ir_version=9))


def test_engine_bench_reports_ratios_and_markdown(deep_encoder_path: Path) -> None:
    result = run_bench(deep_encoder_path, threads=(1, 2), large_batch=256, server=False)
    assert [s["threads"] for s in result["models"]] == [1, 2]
    summary = result["models"][0]
    assert [e["engine"] for e in summary["engines"]] == ["onnxruntime", "torch eager"]
    for e in summary["engines"]:
        assert 0 < e["latency_p50_us"] <= e["latency_p99_us"] and e["throughput"] > 0, e
    by = {e["engine"]: e for e in summary["engines"]}
    rounds = np.array(by["onnxruntime"]["round_p50_us"]) / np.array(by["torch eager"]["round_p50_us"])
    assert len(rounds) == 20
    assert summary["latency_ratio"] == pytest.approx(np.median(rounds))
    q1, q3 = summary["latency_ratio_quartiles"]
    assert q1 <= summary["latency_ratio"] <= q3
    assert "passed" not in summary and "targets" not in result, "the benchmark reports measurements only"
    assert result["server"] is None
    report = render_markdown(result)
    assert f"| {deep_encoder_path} | 1 | onnxruntime |" in report and f"| {deep_encoder_path} | 2 | torch eager |" in report
    assert f"{deep_encoder_path}, 2 thread(s): ORT / torch batch-1 p50 latency (median of rounds; IQR" in report
    assert "target" not in report.lower() and "| NO |" not in report and "| yes |" not in report, report


def test_cli_bench_writes_json_and_markdown(deep_encoder_path: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["bench", str(deep_encoder_path), "--no-server", "--large-batch", "128",
                                   "--threads", "1", "-o", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.json").exists() and "## Ratios" in (tmp_path / "r.md").read_text()
    assert "target" not in res.output.lower() and "target" not in (tmp_path / "r.json").read_text(), res.output


@pytest.mark.parametrize("args, says", [
    (["--threads", "1,x"], "--concurrency and --threads expect integers like 1,8,32"),
    (["--threads", "0"], "--threads, --server-threads, --large-batch, --seconds and every --concurrency must be"),
    (["--device", "tpu"], "bench --device must be cpu or cuda, got 'tpu'"),
])
def test_cli_bench_bad_options_are_user_errors(deep_encoder_path: Path, args: list[str], says: str) -> None:
    """Refused before any measuring, as CaffeOnnxError (which the CLI prints as one line, exit 2)."""
    res = CliRunner().invoke(app, ["bench", str(deep_encoder_path), "--no-server", *args])
    assert isinstance(res.exception, CaffeOnnxError), res.exception
    assert says in str(res.exception)


def test_bench_engine_is_the_trainers_graph_module_and_returns_caffes_codes(deep_encoder_path: Path,
                                                                             deep_blobs: dict) -> None:
    engine = TorchEngine(onnx.load(str(deep_encoder_path)), "data", "encode4")
    assert_close(engine(deep_blobs["data"]), deep_blobs["encode4"], "encode4 (GraphModule, inference mode)")


CONV_AE = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "deconv" type: "Deconvolution" bottom: "pool" top: "deconv"
  convolution_param { num_output: 1 kernel_size: 4 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "recon" type: "Sigmoid" bottom: "deconv" top: "recon" }
"""


def test_bench_runs_a_conv_encoder_the_old_fully_connected_baseline_refused(tmp_path: Path) -> None:
    from tests.helpers import convert_text

    enc, choice = extract_encoder(convert_text(CONV_AE, seed=2).to_proto())
    assert choice.code == "pool"
    save_model(enc, tmp_path / "conv_encoder.onnx")
    with pytest.raises(UnsupportedError, match=r"not 'Conv'"):
        TorchEncoder(enc)
    result = run_bench(tmp_path / "conv_encoder.onnx", threads=(1,), large_batch=16, server=False)
    engines = {e["engine"]: e for e in result["models"][0]["engines"]}
    assert set(engines) == {"onnxruntime", "torch eager"}
    assert all(e["throughput"] > 0 and e["latency_p50_us"] > 0 for e in engines.values()), engines
