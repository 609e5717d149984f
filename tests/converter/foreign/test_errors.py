"""Bad or inexpressible foreign ONNX: one clear caffeonnx error, never a traceback or a partial file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files, onnx_to_caffe
from caffeonnx.errors import CaffeOnnxError, InputFileError, LayerError, UnsupportedError
from tests.converter.foreign.helpers import make_model, node

SHAPE = [2, 3, 6, 6]
W = np.random.default_rng(30).standard_normal((4, 3, 3, 3)).astype(np.float32)


def test_every_unsupported_op_is_listed_once_with_node_names() -> None:
    nodes = [node("Erf", ["x"], ["a"]), node("Gather", ["a", "i"], ["b"], axis=1), node("Relu", ["b"], ["c"]),
             node("Gather", ["c", "i"], ["d"], axis=1), node("Erf", ["d"], ["y"])]
    model = make_model(nodes, {"x": SHAPE}, ["y"], {"i": np.array([0, 2], np.int64)})
    with pytest.raises(UnsupportedError) as err:
        onnx_to_caffe(model)
    msg = str(err.value)
    assert "4 node(s)" in msg, msg
    assert "Erf (2: 'erf_a', 'erf_y')" in msg and "Gather (2: 'gather_b', 'gather_d')" in msg, msg
    listed, supported = msg.split("Supported ops: ")
    assert "Relu" not in listed and "Relu" in supported.split(", "), msg


def test_ops_of_other_domains_are_unsupported() -> None:
    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], name="gelu", domain="com.microsoft")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)])
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedError, match=r"com\.microsoft::Gelu \(1: 'gelu'\)"):
        onnx_to_caffe(model)


def test_dynamic_batch_needs_batch() -> None:
    model = make_model([node("Relu", ["x"])], {"x": ["N", 3, 6, 6]}, ["y"])
    with pytest.raises(CaffeOnnxError, match=r"graph input 'x' has a dynamic dimension 0 \('N'\); pass --batch N"):
        onnx_to_caffe(model)
    assert list(onnx_to_caffe(model, batch=5).net.layer[0].input_param.shape[0].dim) == [5, 3, 6, 6]


def test_dynamic_spatial_dim_is_refused_even_with_batch() -> None:
    model = make_model([node("Relu", ["x"])], {"x": ["N", 3, "H", 6]}, ["y"])
    with pytest.raises(CaffeOnnxError, match=r"dynamic dimension 2 \('H'\); Caffe cannot hold it"):
        onnx_to_caffe(model, batch=2)


def test_batch_cannot_override_a_fixed_batch() -> None:
    model = make_model([node("Relu", ["x"])], {"x": SHAPE}, ["y"])
    with pytest.raises(CaffeOnnxError, match=r"fixed batch of 2; --batch 4 cannot change it"):
        onnx_to_caffe(model, batch=4)


def test_non_float_input_is_refused() -> None:
    graph = helper.make_graph([node("Relu", ["x"])], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [2])])
    with pytest.raises(UnsupportedError, match=r"graph input 'x' is INT64"):
        onnx_to_caffe(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))


def test_missing_initializer_is_named() -> None:
    model = make_model([node("Conv", ["x", "W"])], {"x": SHAPE}, ["y"], {"W": W})
    del model.graph.initializer[:]
    with pytest.raises(InputFileError, match=r"node 'conv_y' \(Conv\) reads 'W'.*missing initializer"):
        onnx_to_caffe(model)


def test_nodes_out_of_order_are_malformed() -> None:
    model = make_model([node("Relu", ["x"], ["a"]), node("Relu", ["a"])], {"x": SHAPE}, ["y"])
    first, second = onnx.NodeProto(), onnx.NodeProto()
    first.CopyFrom(model.graph.node[0])
    second.CopyFrom(model.graph.node[1])
    del model.graph.node[:]
    model.graph.node.extend([second, first])
    with pytest.raises(InputFileError, match=r"not in topological order"):
        onnx_to_caffe(model)


def test_checker_failure_is_a_malformed_model() -> None:
    model = make_model([node("Relu", ["x"], ["y"]), node("Sigmoid", ["x"], ["y"])], {"x": SHAPE}, ["y"])
    with pytest.raises(InputFileError, match=r"ONNX model 'test' is malformed \(onnx.checker: .*\); re-export it"):
        onnx_to_caffe(model)


def test_constant_output_is_refused() -> None:
    model = make_model([node("Relu", ["x"], ["a"]), node("Neg", ["c"], ["k"])], {"x": SHAPE}, ["a", "k"],
                       {"c": np.ones(3, np.float32)})
    with pytest.raises(CaffeOnnxError, match=r"graph output 'k' is a constant"):
        onnx_to_caffe(model)


INEXPRESSIBLE = {
    "conv_end_pad_bigger": ([node("Conv", ["x", "W"], pads=[0, 0, 1, 1])], {"W": W}, r"symmetric pad"),
    "pool_dilation": ([node("MaxPool", ["x"], kernel_shape=[2, 2], dilations=[2, 2])], {}, r"no dilation"),
    "pool_end_pad_bigger": ([node("MaxPool", ["x"], kernel_shape=[3, 3], pads=[0, 0, 2, 2])], {},
                            r"more than Caffe's"),
    "deconv_output_padding": ([node("ConvTranspose", ["x", "Wt"], strides=[2, 2], output_padding=[1, 1])],
                              {"Wt": W.transpose(1, 0, 2, 3).copy()}, r"cannot pad its output"),
    "transpose": ([node("Transpose", ["x"], perm=[0, 2, 3, 1])], {}, r"--allow-extensions"),
    "lrn_even": ([node("LRN", ["x"], size=4)], {}, r"odd local_size"),
    "gemm_computed_weight": ([node("Flatten", ["x"], ["f"]), node("Gemm", ["f", "f"], transB=1)], {},
                             r"B is computed"),
    "dropout_training": ([node("Dropout", ["x", "r", "t"])], {"r": np.array(0.5, np.float32),
                                                               "t": np.array(True)}, r"training mode"),
    "step_slice": ([node("Slice", ["x", "s", "e", "a", "st"])], {"s": np.array([0]), "e": np.array([6]),
                                                                 "a": np.array([2]), "st": np.array([2])},
                   r"step 2"),
    "both_broadcast": ([node("Add", ["x", "z"])], {}, r"both inputs"),
}


@pytest.mark.parametrize("case", INEXPRESSIBLE)
def test_what_caffe_cannot_express_is_refused_by_node(case: str) -> None:
    nodes, inits, message = INEXPRESSIBLE[case]
    inputs = {"x": SHAPE} | ({"z": [2, 1, 6, 1]} if case == "both_broadcast" else {})
    if case == "both_broadcast":
        inputs["x"] = [2, 3, 1, 6]
    model = make_model(nodes, inputs, ["y"], inits)
    with pytest.raises(UnsupportedError, match=message) as err:
        onnx_to_caffe(model)
    assert f"node '{nodes[-1].name}' ({nodes[-1].op_type})" in str(err.value)


def test_invalid_attribute_is_a_layer_error() -> None:
    model = make_model([node("Clip", ["x", "lo", "hi"])], {"x": SHAPE}, ["y"],
                       {"lo": np.array(2, np.float32), "hi": np.array(1, np.float32)})
    with pytest.raises(LayerError, match=r"layer 'clip_y' \(Clip\): min 2.0 is above max 1.0"):
        onnx_to_caffe(model)


def test_failed_conversion_writes_no_file(tmp_path: Path) -> None:
    model = make_model([node("Erf", ["x"])], {"x": SHAPE}, ["y"])
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "out"
    with pytest.raises(UnsupportedError):
        convert_to_caffe_files(tmp_path / "m.onnx", out / "net.prototxt", out / "net.caffemodel")
    assert not out.exists() or not any(out.iterdir())


def test_garbage_file_is_an_input_file_error(tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(InputFileError, match=r"m.onnx"):
        convert_to_caffe_files(tmp_path / "m.onnx", tmp_path / "net.prototxt")
    assert not (tmp_path / "net.prototxt").exists()


def test_cli_to_caffe_batch_extensions_and_errors(tmp_path: Path) -> None:
    """The refusal runs the real CLI (exit 2, one error line, no file); the success runs it in-process."""
    model = make_model([node("Transpose", ["x"], perm=[0, 2, 3, 1])], {"x": ["N", 3, 6, 6]}, ["y"])
    onnx.save(model, tmp_path / "m.onnx")
    proto, weights = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    args = ["to-caffe", str(tmp_path / "m.onnx"), "-o", str(proto), "--weights", str(weights), "--batch", "2"]
    refused = subprocess.run([sys.executable, "-m", "caffeonnx.cli", *args], capture_output=True, text=True,
                             timeout=120, check=False)
    assert refused.returncode == 2 and refused.stderr.count("error:") == 1, refused.stderr
    assert "--allow-extensions" in refused.stderr and not proto.exists() and not weights.exists()
    ok = CliRunner().invoke(app, [*args, "--allow-extensions"])
    assert ok.exit_code == 0, ok.output
    assert 'type: "Permute"' in proto.read_text() and weights.exists()
    # Permute is SSD's: a BVLC target refuses it even with extensions, an SSD target takes it
    bvlc = CliRunner().invoke(app, [*args, "--allow-extensions", "--target", "bvlc"])
    assert bvlc.exit_code != 0 and "(Permute, from SSD)" in str(bvlc.exception)
    assert CliRunner().invoke(app, [*args, "--allow-extensions", "--target", "ssd"]).exit_code == 0
