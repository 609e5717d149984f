"""Cutting autoencoders at their code blob: Caffe's own blobs, metadata, foreign ONNX, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from caffeonnx.converter import metadata
from caffeonnx.errors import CaffeOnnxError, InputFileError
from caffeonnx.runtime.encoder import KEY_ENCODER, choose_code, extract_encoder, extract_encoder_file
from tests.helpers import assert_close, convert_text, rng

ENCODER_LAYERS = ["data", "encode1", "encode1neuron", "encode2", "encode2neuron", "encode3", "encode3neuron", "encode4"]


def _run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("code", [None, "encode4"])
def test_deep_tied_ae_encoder_returns_caffes_encode4(deep_ae_path: Path, deep_blobs: dict, tmp_path: Path,
                                                       code: str | None) -> None:
    out = tmp_path / "enc.onnx"
    choice = extract_encoder_file(deep_ae_path, out, code)
    assert (choice.code, choice.width) == ("encode4", 8)
    onnx.checker.check_model(str(out), full_check=True)
    got = _run(out, {"data": deep_blobs["data"]})
    assert list(got) == ["encode4"], f"encoder outputs {list(got)}, expected only the code blob 'encode4'"
    assert_close(got["encode4"], deep_blobs["encode4"], "encode4")  # atol 1e-5, rtol 1e-4 (case.json)


def test_deep_tied_ae_encoder_drops_decoder_nodes_and_params(deep_ae: onnx.ModelProto) -> None:
    enc, _ = extract_encoder(deep_ae)
    assert [n.name for n in enc.graph.node] == ENCODER_LAYERS[1:]
    assert [t.name for t in enc.graph.initializer] == [
        "w1", "encode1.bias", "w2", "encode2.bias", "w3", "encode3.bias", "w4", "encode4.bias"]
    assert [i.name for i in enc.graph.input] == ["data"]
    dims = enc.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 8], "the code output keeps the dynamic batch"


def test_deep_tied_ae_encoder_metadata_is_consistent(deep_ae: onnx.ModelProto) -> None:
    enc, _ = extract_encoder(deep_ae)
    assert [r.name for r in metadata.layer_records(enc)] == ENCODER_LAYERS
    params = metadata.param_records(enc)
    assert [p["name"] for p in params] == [t.name for t in enc.graph.initializer]
    users = {p["name"]: [u[0] for u in p["users"]] for p in params}
    assert users["w1"] == ["encode1"], f"decoder users must be dropped from tied w1: {users['w1']}"
    net = metadata.caffe_net_from(enc)
    assert net is not None and [layer.name for layer in net.layer] == ENCODER_LAYERS
    info = json.loads(metadata.read_metadata(enc)[KEY_ENCODER])
    assert info["code"] == "encode4" and info["input"] == "data" and info["reconstruction"] == "decode1neuron"
    assert info["dropped_layers"][0] == "decode4" and len(info["dropped_layers"]) == 8


@pytest.mark.parametrize("code", ["encode1", "encode2neuron", "encode3neuron", "decode4neuron"])
def test_named_code_blob_returns_that_caffe_blob(deep_ae: onnx.ModelProto, deep_blobs: dict, code: str) -> None:
    enc, choice = extract_encoder(deep_ae, code)
    assert choice.code == code and choice.reconstruction is None
    got = _run(enc, {"data": deep_blobs["data"][:5]})  # a batch other than Caffe's 16
    assert_close(got[code], deep_blobs[code][:5], code)


def test_all_blobs_conversion_cuts_at_the_same_code(deep_blobs: dict) -> None:
    from caffeonnx.converter.caffe_to_onnx import convert_files
    from caffeonnx.converter.context import ConvertOptions
    from tests.runtime.conftest import DEEP

    model = convert_files(DEEP / "net.prototxt", DEEP / "weights.caffemodel", ConvertOptions(all_blobs=True)).to_proto()
    enc, choice = extract_encoder(model)
    assert choice.code == "encode4"
    assert_close(_run(enc, {"data": deep_blobs["data"]})["encode4"], deep_blobs["encode4"], "encode4")


INPLACE_AE = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 20 } } }
layer { name: "enc" type: "InnerProduct" bottom: "data" top: "code" param { name: "W" }
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "code" top: "code" }
layer { name: "dec" type: "InnerProduct" bottom: "code" top: "recon" param { name: "W" }
  inner_product_param { num_output: 20 transpose: true } }
layer { name: "out" type: "Sigmoid" bottom: "recon" top: "out" }
"""


@pytest.mark.parametrize("seed", [0, 1])
def test_in_place_code_is_the_blob_after_the_in_place_layer(seed: int) -> None:
    converted = convert_text(INPLACE_AE, seed=seed)
    enc, choice = extract_encoder(converted.to_proto())
    assert choice.code == "code", f"picked {choice.code!r}; Caffe's blob 'code' holds the ReLU output"
    x = rng(seed).standard_normal((7, 20)).astype(np.float32)
    w, b = (converted.weights[n] for n in ("W", "enc.bias"))
    want = np.maximum(x @ w.T + b, 0)
    assert (want == 0).any(), "test data must exercise the ReLU"
    assert_close(_run(enc, {"data": x})["code"], want, "code")


def _loss_only_model(seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Foreign ONNX: x(N,10) -> Gemm(4) -> Sigmoid -> Gemm(10) -> squared error with x -> scalar loss, plus an unused label."""
    g = rng(seed)
    w1, b1 = g.standard_normal((4, 10)).astype(np.float32), g.standard_normal(4).astype(np.float32)
    w2 = g.standard_normal((10, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Sigmoid", ["h"], ["hs"]),
        helper.make_node("Gemm", ["hs", "w2"], ["r"], transB=1),
        helper.make_node("Sub", ["r", "x"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["loss"], keepdims=0),
        helper.make_node("Identity", ["label"], ["label_out"]),
    ]
    graph = helper.make_graph(
        nodes, "loss_ae",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("label", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("label_out", TensorProto.FLOAT, ["N"])],
        [numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("b1", b1), ("w2", w2))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return model, {"w1": w1, "b1": b1}


@pytest.mark.parametrize("seed", [0, 3])
def test_loss_only_foreign_model_is_cut_at_its_bottleneck(seed: int) -> None:
    model, w = _loss_only_model(seed)
    enc, choice = extract_encoder(model)
    assert (choice.code, choice.reconstruction, choice.width) == ("hs", "r", 4), "the code is taken after its sigmoid"
    assert [i.name for i in enc.graph.input] == ["x"], "the unused label input must be dropped"
    assert sorted(t.name for t in enc.graph.initializer) == ["b1", "w1"]
    x = rng(seed + 10).standard_normal((3, 10)).astype(np.float32)
    assert_close(_run(enc, {"x": x})["hs"], 1 / (1 + np.exp(-(x @ w["w1"].T + w["b1"]))), "hs")


def test_code_errors_name_the_blob_and_the_choices(deep_ae: onnx.ModelProto) -> None:
    with pytest.raises(CaffeOnnxError, match=r"--code 'nope' is no value of the model.*'encode4'"):
        extract_encoder(deep_ae, "nope")
    with pytest.raises(CaffeOnnxError, match=r"--code 'data' is a graph input"):
        extract_encoder(deep_ae, "data")
    with pytest.raises(CaffeOnnxError, match=r"--code 'w1' is an initializer"):
        extract_encoder(deep_ae, "w1")


def test_a_net_without_reconstruction_asks_for_code() -> None:
    text = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 12 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }
    """
    with pytest.raises(CaffeOnnxError, match=r"found no code blob.*--code BLOB"):
        choose_code(convert_text(text).to_proto())


def test_missing_or_garbage_model_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="does not exist"):
        extract_encoder_file(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\x00 not a protobuf")
    with pytest.raises(InputFileError, match="not a readable ONNX model"):
        extract_encoder_file(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
