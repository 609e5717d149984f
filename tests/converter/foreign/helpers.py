"""Foreign-ONNX test helpers: build small ONNX models, convert them, and check the Caffe output two ways.

Every check runs the ONNX model with onnxruntime and compares each graph output with
(1) the written prototxt + caffemodel converted back by caffeonnx's Caffe -> ONNX converter
and run with onnxruntime, and (2) tests/caffe_numpy.py, an independent numpy forward of
the Caffe layers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from caffeonnx.converter.caffe_to_onnx import convert_files, load_net, load_weights
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.onnx_to_caffe import CaffeNet, onnx_to_caffe
from caffeonnx.proto import caffe_pb2
from tests import caffe_numpy
from tests.helpers import assert_close

# Layer types of BVLC Caffe 1.0 (its layer registry), independent of the converter's own list.
CAFFE_1_0_LAYERS = frozenset({
    "AbsVal", "Accuracy", "ArgMax", "BatchNorm", "BatchReindex", "Bias", "BNLL", "Concat", "ContrastiveLoss",
    "Convolution", "Crop", "Data", "Deconvolution", "Dropout", "DummyData", "Eltwise", "ELU", "Embed",
    "EuclideanLoss", "Exp", "Filter", "Flatten", "HDF5Data", "HDF5Output", "HingeLoss", "Im2col", "ImageData",
    "InfogainLoss", "InnerProduct", "Input", "Log", "LRN", "LSTM", "MemoryData", "MultinomialLogisticLoss", "MVN",
    "Parameter", "Pooling", "Power", "PReLU", "Python", "Reduction", "ReLU", "Reshape", "RNN", "Scale", "Sigmoid",
    "SigmoidCrossEntropyLoss", "Silence", "Slice", "Softmax", "SoftmaxWithLoss", "Split", "SPP", "TanH",
    "Threshold", "Tile", "WindowData",
})


def make_model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int | str]], outputs: list[str],
               inits: dict[str, np.ndarray] | None = None, opset: int = 17) -> onnx.ModelProto:
    """A float32 ONNX model from nodes, input shapes, output names and initializers."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    return onnx.shape_inference.infer_shapes(model)  # output shapes, which onnx.checker requires


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every graph output of `model` from onnxruntime (CPU)."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def assert_caffe_1_0(net: caffe_pb2.NetParameter) -> None:
    """Every layer type and field is one stock BVLC Caffe 1.0 knows."""
    for lay in net.layer:
        assert lay.type in CAFFE_1_0_LAYERS, f"layer {lay.name!r} has type {lay.type!r}, not in Caffe 1.0"
        assert not lay.pooling_param.HasField("round_mode"), f"layer {lay.name!r} sets round_mode (not in Caffe 1.0)"
        for field in ("clip_param", "swish_param", "permute_param"):
            assert not lay.HasField(field), f"layer {lay.name!r} sets {field} (not in Caffe 1.0)"


def check_conversion(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path: Path, *,
                     batch: int | None = None, extensions: bool = False, via_converter: bool = True,
                     atol: float = 1e-5, rtol: float = 1e-4) -> CaffeNet:
    """Convert, write, read back and compare every graph output with onnxruntime both ways."""
    want = run_onnx(model, feeds)
    result = onnx_to_caffe(model, batch, extensions)
    proto, weights = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    result.save(proto, weights)
    if not extensions:
        assert_caffe_1_0(result.net)
    net, caffemodel = load_net(proto), load_weights(weights)
    blobs = caffe_numpy.forward(net, {k: [b.data for b in v] for k, v in caffemodel.blobs.items()}, feeds)
    for name, value in want.items():
        assert_close(blobs[name], value, f"{name} (caffe_numpy vs onnxruntime)", atol, rtol)
    if via_converter:
        converted = convert_files(proto, weights, ConvertOptions(all_blobs=True))
        sess = ort.InferenceSession(converted.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        for name, value in want.items():
            assert_close(got[name], value, f"{name} (Caffe -> ONNX vs onnxruntime)", atol, rtol)
    return result


def node(op: str, inputs: list[str], outputs: list[str] | None = None, **attrs: object) -> onnx.NodeProto:
    """An ONNX node named after its op and first output (default output: 'y')."""
    outputs = outputs or ["y"]
    return helper.make_node(op, inputs, outputs, name=f"{op.lower()}_{outputs[0]}", **attrs)


def feeds_for(model: onnx.ModelProto, seed: int, positive: bool = False) -> dict[str, np.ndarray]:
    """Seeded float32 inputs for every graph input (positive: |N(0,1)| + 0.5, for Log/Sqrt/Pow)."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        x = rng.standard_normal(shape).astype(np.float32)
        out[value.name] = np.abs(x) + np.float32(0.5) if positive else x
    return out


def layer_types(result: CaffeNet) -> list[str]:
    """The Caffe layer types of a converted net, in order."""
    return [lay.type for lay in result.net.layer]
