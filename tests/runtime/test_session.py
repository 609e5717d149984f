"""EncoderSession on the CPU provider: Caffe's codes, IOBinding buffers, validation, fp16 rewrite."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from caffeonnx.errors import CaffeOnnxError, TensorError, UnsupportedError
from caffeonnx.runtime.encoder import extract_encoder
from caffeonnx.runtime.fp16 import to_fp16
from caffeonnx.runtime.session import CPU, EncoderSession, SessionConfig, _cuda_options, cuda_available
from tests.helpers import assert_close, rng

CUDA_WORKS = cuda_available()


@pytest.mark.parametrize("io_binding", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_cpu_session_returns_caffes_codes(deep_encoder_path: Path, deep_blobs: dict, io_binding: bool, rows: int) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cpu", io_binding=io_binding, intra_threads=1))
    assert sess.provider == CPU and sess.describe().startswith(CPU)
    assert (sess.input.name, sess.input.sample_shape, sess.output.name, sess.output.sample_shape) == \
        ("data", (784,), "encode4", (8,))
    assert_close(sess.run(deep_blobs["data"][:rows]), deep_blobs["encode4"][:rows], "encode4")


@pytest.mark.skipif(CUDA_WORKS, reason="CUDA starts here: auto picks it")
def test_auto_falls_back_to_cpu_and_cuda_is_refused_clearly(deep_encoder_path: Path) -> None:
    assert EncoderSession(deep_encoder_path, SessionConfig(device="auto")).provider == CPU
    with pytest.raises(CaffeOnnxError, match="device 'cuda' was asked for but the CUDA execution provider could not"):
        EncoderSession(deep_encoder_path, SessionConfig(device="cuda"))


def test_io_binding_results_are_not_overwritten_by_the_next_run(deep_encoder_path: Path, deep_blobs: dict) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cpu", io_binding=True))
    first = sess.run(deep_blobs["data"][:4])
    second = sess.run(deep_blobs["data"][4:8])
    assert_close(first, deep_blobs["encode4"][:4], "encode4[:4]")
    assert_close(second, deep_blobs["encode4"][4:8], "encode4[4:8]")


def test_device_buffers_run_without_host_arrays(deep_encoder_path: Path, deep_blobs: dict) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cpu", io_binding=True))
    inp, out = sess.device_buffers(16)
    inp.update_inplace(ort.OrtValue.ortvalue_from_numpy(deep_blobs["data"]))
    sess.run_bound(16)
    assert out.shape() == [16, 8]
    assert_close(out.numpy(), deep_blobs["encode4"], "encode4 (bound buffers)")
    with pytest.raises(CaffeOnnxError, match=r"no buffers are bound for batch 3"):
        sess.run_bound(3)


@pytest.mark.parametrize("seed", [0, 1])
def test_concurrent_runs_from_threads_stay_correct(deep_encoder_path: Path, deep_blobs: dict, seed: int) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cpu", io_binding=True))
    data = deep_blobs["data"]
    picks = [rng(seed).choice(16, size=4, replace=False) for _ in range(24)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda idx: sess.run(data[idx]), picks))
    for idx, got in zip(picks, results):
        assert_close(got, deep_blobs["encode4"][idx], f"encode4{idx.tolist()}")


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 784), np.float64), r"input 'data' has dtype 'float64', the model takes 'float32'; convert"),
    (np.zeros((2, 783), np.float32), r"input 'data' has shape \(2, 783\), the model takes \['N', 784\]"),
    (np.zeros((2, 28, 28), np.float32), r"has shape \(2, 28, 28\), the model takes \['N', 784\]"),
    ([[0.0] * 784], r"input 'data' must be a numpy array, got list"),
])
def test_bad_inputs_raise_tensor_errors(deep_encoder_path: Path, bad: object, message: str) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cpu"))
    with pytest.raises(TensorError, match=message):
        sess.run(bad)


def test_fixed_batch_model_checks_the_batch(tmp_path: Path, deep_blobs: dict) -> None:
    from caffeonnx.converter.caffe_to_onnx import convert_files
    from caffeonnx.converter.context import ConvertOptions
    from tests.runtime.conftest import DEEP

    model = convert_files(DEEP / "net.prototxt", DEEP / "weights.caffemodel", ConvertOptions(batch=4)).to_proto()
    sess = EncoderSession(extract_encoder(model)[0], SessionConfig(device="cpu", warmup=(1, 4)))
    assert_close(sess.run(deep_blobs["data"][:4]), deep_blobs["encode4"][:4], "encode4")
    with pytest.raises(TensorError, match=r"has shape \(3, 784\), the model takes \[4, 784\]"):
        sess.run(deep_blobs["data"][:3])


def test_empty_batch_gives_empty_codes(deep_encoder_path: Path) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cpu"))
    codes = sess.run(np.zeros((0, 784), np.float32))
    assert codes.shape == (0, 8) and codes.dtype == np.float32


def test_thread_settings_reach_onnxruntime(deep_encoder_path: Path) -> None:
    sess = EncoderSession(deep_encoder_path, SessionConfig(device="cpu", intra_threads=1, inter_threads=1, spin=False))
    opts = sess._sess.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert "1 intra-op threads" in sess.describe()


def test_whole_autoencoder_is_refused_with_advice(deep_ae_path: Path) -> None:
    from caffeonnx.converter.caffe_to_onnx import convert_files
    from caffeonnx.converter.context import ConvertOptions
    from tests.runtime.conftest import DEEP

    model = convert_files(DEEP / "net.prototxt", DEEP / "weights.caffemodel", ConvertOptions(all_blobs=True)).to_proto()
    with pytest.raises(UnsupportedError, match=r"one input and one output.*'caffeonnx encoder' first"):
        EncoderSession(model, SessionConfig(device="cpu"))


@pytest.mark.parametrize("config, message", [
    (SessionConfig(device="tpu"), r"device must be one of \('auto', 'cpu', 'cuda'\), got 'tpu'"),
    (SessionConfig(device="cpu", fp16=True), (r"--fp16 is a CUDA setting and CUDA is not available here \(running "
                                             r"on CPUExecutionProvider\); drop --fp16")),
    (SessionConfig(device="cpu", tf32=True), r"--tf32 is a CUDA setting .*; drop --tf32"),
    (SessionConfig(device="cpu", cuda_graphs=(1,)), r"CUDA graphs \(--cuda-graph\) need the CUDA provider"),
])
def test_invalid_configurations_are_refused(deep_encoder_path: Path, config: SessionConfig, message: str) -> None:
    with pytest.raises(CaffeOnnxError, match=message):
        EncoderSession(deep_encoder_path, config)


def test_cuda_options_make_tf32_and_graphs_explicit() -> None:
    assert _cuda_options(SessionConfig())["use_tf32"] == "0"
    opts = _cuda_options(SessionConfig(device_id=1, tf32=True, cuda_graphs=(1, 64)))
    assert (opts["device_id"], opts["use_tf32"], opts["enable_cuda_graph"]) == ("1", "1", "1")


@pytest.mark.parametrize("seed", [0, 1])
def test_fp16_rewrite_keeps_float32_io_and_codes(deep_encoder_path: Path, deep_blobs: dict, seed: int) -> None:
    model = onnx.load(str(deep_encoder_path))
    half = to_fp16(model)
    assert [i.type.tensor_type.elem_type for i in (*half.graph.input, *half.graph.output)] == [1, 1]
    assert {t.data_type for t in half.graph.initializer} == {onnx.TensorProto.FLOAT16}
    x = deep_blobs["data"][rng(seed).choice(16, size=6, replace=False)]
    got = ReferenceEvaluator(half).run(None, {"data": x})[0]
    want = ReferenceEvaluator(model).run(None, {"data": x})[0]
    assert got.dtype == np.float32
    assert_close(got, want, "encode4 (fp16 compute)", atol=2e-2, rtol=2e-2)  # fp16 has ~3 significant digits


def test_fp16_rewrite_casts_outputs_that_are_also_consumed(deep_ae: onnx.ModelProto, deep_blobs: dict) -> None:
    from caffeonnx.converter.caffe_to_onnx import convert_files
    from caffeonnx.converter.context import ConvertOptions
    from tests.runtime.conftest import DEEP

    model = convert_files(DEEP / "net.prototxt", DEEP / "weights.caffemodel", ConvertOptions(all_blobs=True)).to_proto()
    half = to_fp16(model)
    outs = dict(zip([o.name for o in half.graph.output],
                    ReferenceEvaluator(half).run(None, {"data": deep_blobs["data"][:3]})))
    for name in ("encode4", "decode1neuron"):
        assert_close(outs[name], deep_blobs[name][:3], f"{name} (fp16 compute)", atol=3e-2, rtol=3e-2)


def test_fp16_rewrite_takes_the_mobilenet_fork_activations() -> None:
    """HardSwish / HardSigmoid (MobileNet v3 ports) and DepthToSpace (PixelShuffle) compute in float16 too."""
    from tests.helpers import convert_text

    text = ('input: "data"\ninput_shape { dim: 1 dim: 8 dim: 3 dim: 3 }\n'
            'layer { name: "hs" type: "HardSwish" bottom: "data" top: "hs" }\n'
            'layer { name: "hsig" type: "HardSigmoid" bottom: "hs" top: "hsig" }\n'
            'layer { name: "ps" type: "PixelShuffle" bottom: "hsig" top: "ps" pixelshuffle_param { upscale_factor: 2 } }\n')
    model = convert_text(text).to_proto()
    half = to_fp16(model)
    x = rng(3).normal(size=(1, 8, 3, 3)).astype(np.float32) * 4
    got = ReferenceEvaluator(half).run(None, {"data": x})[0]
    assert_close(got, ReferenceEvaluator(model).run(None, {"data": x})[0], "ps (fp16 compute)", atol=2e-3, rtol=2e-3)


def test_fp16_rewrite_refuses_unknown_ops() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    with pytest.raises(UnsupportedError, match=r"fp16 compute is not available for op\(s\) \['Erf'\]"):
        to_fp16(helper.make_model(graph, ir_version=9))
