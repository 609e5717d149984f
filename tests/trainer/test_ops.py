"""Every torch kernel against onnxruntime on single-node graphs (seeded; atol 1e-5, rtol 1e-4)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.defs
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import caffeonnx.converter.layers as converter_layers
from caffeonnx.errors import UnsupportedError
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.ops import supported_ops
from tests.helpers import assert_close, rng


@dataclass
class Const:
    """An input stored as an initializer (a Parameter if float, a constant otherwise)."""

    value: np.ndarray


def f32(*shape: int, seed: int = 0, positive: bool = False) -> np.ndarray:
    """Seeded float32 test data (strictly positive when asked)."""
    x = rng(seed).normal(size=shape).astype(np.float32)
    return np.abs(x) + 0.1 if positive else x


def i64(*values: int) -> Const:
    return Const(np.array(values, dtype=np.int64))


def single_node_model(op: str, inputs: list[np.ndarray | Const | None], attrs: dict, n_out: int) -> onnx.ModelProto:
    """A graph with one `op` node; runtime inputs become graph inputs, Const ones initializers."""
    names, graph_inputs, inits = [], [], []
    for i, x in enumerate(inputs):
        if x is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if isinstance(x, Const):
            inits.append(numpy_helper.from_array(x.value, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(x.dtype), x.shape))
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, name="n", **attrs)
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model


X = f32(2, 3, 4, 5)
IMG = f32(2, 4, 7, 6, seed=1)
SCATTER_AT = np.stack([rng(k).permutation(12)[:5] for k in range(6)]).reshape(2, 3, 5)  # distinct per row
# Fast R-CNN ROIs [batch, x1, y1, x2, y2] in image pixels (spatial_scale 0.5 on IMG's 7x6 map): inside, past the
# map's edge, a one-pixel box, inverted corners, and one scaling to exact halves (5.5, 6.5: C's round goes up).
ROIS = np.array([[0, 1.2, 0.8, 9.4, 12.6], [1, 4.2, 2.2, 15.8, 17.4], [1, 6.2, 6.2, 6.4, 6.6], [0, 8.6, 9.2, 2.2, 3.8],
                 [1, 0.0, 0.0, 11.0, 13.0]], np.float32)
# NMS: 2 images x 14 boxes [y1, x1, y2, x2] in clusters (overlaps around the thresholds), some with inverted corners,
# a pair with IoU exactly 0.5 (= the threshold: kept, the test is strict) and equal scores (visited by box index).
_centre = rng(7).uniform(0.3, 0.7, (2, 3, 2))[:, rng(8).integers(0, 3, 12)] + rng(9).normal(0, 0.05, (2, 12, 2))
_half = rng(10).uniform(0.08, 0.2, (2, 12, 2))
NMS_BOXES = np.concatenate([np.concatenate([_centre - _half, _centre + _half], -1),
                            np.broadcast_to(np.array([[0, 0, 1, 2], [0, 0, 1, 1]], np.float64), (2, 2, 4))], 1)
NMS_BOXES[:, 1::5] = NMS_BOXES[:, 1::5][..., [2, 3, 0, 1]]  # corners given the other way round
NMS_BOXES = NMS_BOXES.astype(np.float32)
NMS_SCORES = rng(11).uniform(0, 1, (2, 3, 14)).astype(np.float32)
NMS_SCORES[:, :, [3, 8, 12, 13]] = NMS_SCORES[:, :, [5]]  # ties
NMS_SCORES[1, 0, 6] = 0.25  # exactly the score threshold: not a candidate (it would be kept)
NMS_CENTRES = np.concatenate([_centre, 2 * _half], -1).astype(np.float32)  # [x_c, y_c, w, h]
CASES: list[tuple[str, str, list, dict, int]] = [
    *[(op, op, [X], {}, 1) for op in ("Abs", "Neg", "Exp", "Floor", "Ceil", "Sign", "Erf", "Sin", "Cos", "Sigmoid",
                                      "Tanh", "Relu", "Softsign", "Softplus", "Identity", "Round")],
    ("Log", "Log", [f32(3, 4, positive=True)], {}, 1),
    ("Sqrt", "Sqrt", [f32(3, 4, positive=True)], {}, 1),
    ("Reciprocal", "Reciprocal", [f32(3, 4, positive=True)], {}, 1),
    *[(op, op, [X, f32(4, 5, seed=2)], {}, 1) for op in ("Add", "Sub", "Mul", "Max", "Min")],
    ("Div", "Div", [X, f32(1, 3, 1, 1, seed=2, positive=True)], {}, 1),
    ("Pow", "Pow", [f32(3, 4, positive=True), f32(3, 1, seed=3)], {}, 1),
    ("Pow_const", "Pow", [X, Const(np.array(2.0, dtype=np.float32))], {}, 1),
    ("Sum3", "Sum", [X, f32(5, seed=1), f32(3, 1, 1, seed=2)], {}, 1),
    ("Mean2", "Mean", [X, f32(5, seed=1)], {}, 1),
    ("Greater", "Greater", [X, f32(5, seed=1)], {}, 1),
    ("Where", "Where", [X > 0, X, f32(5, seed=1)], {}, 1),
    *[(op, op, [X, f32(5, seed=1)], {}, 1) for op in ("Equal", "Less", "GreaterOrEqual", "LessOrEqual")],
    *[(op, op, [X > 0, f32(5, seed=1) > 0], {}, 1) for op in ("And", "Or", "Xor")],
    ("Not", "Not", [X > 0], {}, 1),
    ("IsNaN", "IsNaN", [np.array([1.0, np.nan, np.inf], np.float32)], {}, 1),
    ("IsInf_negative", "IsInf", [np.array([1.0, -np.inf, np.inf], np.float32)], {"detect_positive": 0}, 1),
    ("Mod_fmod", "Mod", [X, f32(5, seed=1, positive=True)], {"fmod": 1}, 1),
    ("Mod_int", "Mod", [np.array([-7, 7, 5], np.int64), np.array([3, -3, 5], np.int64)], {}, 1),
    ("CastLike", "CastLike", [X, np.zeros(1, np.int64)], {}, 1),
    ("Size", "Size", [X], {}, 1),
    ("ConstantOfShape", "ConstantOfShape", [i64(2, 3)], {"value": numpy_helper.from_array(np.array([1.5], np.float32))}, 1),
    ("Range", "Range", [Const(np.array(1, np.int64)), Const(np.array(9, np.int64)), Const(np.array(3, np.int64))], {}, 1),
    ("TopK", "TopK", [X, i64(2)], {"axis": 2}, 2),
    # equal values come lower index first (ONNX's rule, which graphs use as a stable sort)
    ("TopK_ties_smallest", "TopK", [np.array([[3, 1, 3, 2, 1, 3, 1], [0, 0, 0, 0, 0, 0, 0]], np.int64), i64(5)],
     {"axis": 1, "largest": 0}, 2),
    ("TopK_ties_largest", "TopK", [Const(np.array([[0.5, 2, 0.5, 2, 2, 0.5, 1, 0.5]] * 2, np.float32).T), i64(6)],
     {"axis": 0}, 2),
    ("ThresholdedRelu", "ThresholdedRelu", [X], {"alpha": 0.5}, 1),
    ("Gelu", "Gelu", [X], {}, 1),
    ("ReduceMin", "ReduceMin", [X, i64(1)], {}, 1),
    ("ReduceLogSum", "ReduceLogSum", [f32(3, 4, positive=True), i64(1)], {}, 1),
    ("LeakyRelu", "LeakyRelu", [X], {"alpha": 0.3}, 1),
    ("Elu", "Elu", [X], {"alpha": 0.7}, 1),
    ("Selu", "Selu", [X], {}, 1),
    ("HardSigmoid", "HardSigmoid", [X], {"alpha": 0.3, "beta": 0.4}, 1),
    ("PRelu", "PRelu", [IMG, Const(f32(4, 1, 1, seed=4))], {}, 1),
    ("Clip", "Clip", [X, Const(np.array(-0.5, np.float32)), Const(np.array(0.7, np.float32))], {}, 1),
    ("Clip_max_only", "Clip", [X, None, Const(np.array(0.2, np.float32))], {}, 1),
    ("Cast", "Cast", [X], {"to": TensorProto.INT64}, 1),
    ("Gemm", "Gemm", [f32(6, 5), Const(f32(4, 5, seed=1)), Const(f32(4, seed=2))], {"transB": 1}, 1),
    ("Gemm_transA_alpha", "Gemm", [f32(5, 6), f32(5, 4, seed=1), Const(f32(6, 4, seed=2))],
     {"transA": 1, "alpha": 0.5, "beta": 2.0}, 1),
    ("Gemm_noC", "Gemm", [f32(6, 5), f32(5, 3, seed=1)], {}, 1),
    ("MatMul", "MatMul", [f32(2, 6, 5), f32(5, 3, seed=1)], {}, 1),
    ("Transpose", "Transpose", [X], {"perm": [0, 2, 3, 1]}, 1),
    ("Transpose_default", "Transpose", [X], {}, 1),
    ("Reshape", "Reshape", [X, i64(0, -1, 5)], {}, 1),
    ("Flatten", "Flatten", [X], {"axis": 2}, 1),
    ("Squeeze", "Squeeze", [f32(2, 1, 3, 1), i64(1, -1)], {}, 1),
    ("Unsqueeze", "Unsqueeze", [f32(2, 3), i64(0, -1)], {}, 1),
    ("Concat", "Concat", [X, f32(2, 2, 4, 5, seed=1)], {"axis": 1}, 1),
    ("Split_sizes", "Split", [X, i64(2, 2)], {"axis": 2}, 2),
    ("Split_equal_uneven", "Split", [f32(2, 7)], {"axis": 1, "num_outputs": 3}, 3),
    ("Slice", "Slice", [X, i64(1, -4), i64(3, 100), i64(1, 3), i64(1, 2)], {}, 1),
    ("Slice_negative_step", "Slice", [X, i64(-1, 3), i64(-100, 0), i64(2, 3), i64(-1, -2)], {}, 1),
    ("Gather", "Gather", [X, i64(2, -1, 0)], {"axis": 1}, 1),
    ("Gather_scalar", "Gather", [X, Const(np.array(-2, np.int64))], {"axis": 3}, 1),
    ("Gather_scalar_of_vector", "Gather", [f32(5), Const(np.array(3, np.int64))], {"axis": 0}, 1),
    ("GatherElements", "GatherElements", [f32(3, 4), Const(np.array([[0, 3], [1, 1], [-1, 2]], np.int64))], {"axis": 1}, 1),
    ("ScatterElements", "ScatterElements", [f32(2, 3, 12), Const(SCATTER_AT), f32(2, 3, 5, seed=3)], {"axis": 2}, 1),
    ("ScatterElements_negative", "ScatterElements", [f32(2, 3, 12), Const(SCATTER_AT - 12 * (SCATTER_AT % 2)),
                                                     f32(2, 3, 5, seed=3)], {"axis": -1}, 1),
    ("Resize_align_corners", "Resize", [IMG, None, None, i64(2, 4, 13, 4)],
     {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, 1),
    ("Resize_axes_to_1", "Resize", [IMG, None, None, i64(1, 9)],
     {"mode": "linear", "coordinate_transformation_mode": "align_corners", "axes": [2, 3]}, 1),
    ("Resize_half_pixel_scales", "Resize", [IMG, None, Const(np.array([1, 1, 2, 1.5], np.float32))], {"mode": "linear"}, 1),
    ("Resize_nearest", "Resize", [IMG, None, None, i64(2, 4, 14, 12)],
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, 1),
    # DenseBox's Resize: asymmetric linear at the given scales (up on one axis, down on the other), and with sizes
    ("Resize_asymmetric_scales", "Resize", [IMG, None, Const(np.array([1, 1, 2.5, 0.7], np.float32))],
     {"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, 1),
    ("Resize_asymmetric_sizes", "Resize", [IMG, None, None, i64(3, 11)],
     {"mode": "linear", "coordinate_transformation_mode": "asymmetric", "axes": [2, 3]}, 1),
    ("Expand", "Expand", [f32(3, 1), i64(2, 1, 4)], {}, 1),
    ("Tile", "Tile", [f32(2, 3), i64(2, 3)], {}, 1),
    ("Shape", "Shape", [X], {"start": 1}, 1),
    ("Pad_constant", "Pad", [IMG, i64(0, 0, 1, 2, 0, 0, 3, 0), Const(np.array(1.5, np.float32))], {}, 1),
    ("Pad_crop", "Pad", [IMG, i64(0, 0, -1, 1, 0, 0, 1, -2)], {}, 1),
    ("Pad_reflect", "Pad", [IMG, i64(0, 0, 2, 1, 0, 0, 1, 2)], {"mode": "reflect"}, 1),
    ("Pad_edge_axes", "Pad", [IMG, i64(1, 2, 2, 0), None, i64(2, 3)], {"mode": "edge"}, 1),
    ("Einsum", "Einsum", [f32(3, 4), f32(4, 5, seed=1)], {"equation": "ij,jk->ik"}, 1),
    ("ArgMax", "ArgMax", [X], {"axis": 2, "keepdims": 0}, 1),
    ("ArgMin_last", "ArgMin", [np.array([[1, 0, 0, 2]], np.float32)], {"axis": 1, "select_last_index": 1}, 1),
    ("Conv", "Conv", [IMG, Const(f32(6, 4, 3, 3, seed=2)), Const(f32(6, seed=3))], {"pads": [1, 1, 1, 1], "strides": [2, 1]}, 1),
    ("Conv_group_dil_asym", "Conv", [IMG, Const(f32(4, 2, 2, 3, seed=2))],
     {"group": 2, "dilations": [2, 1], "pads": [0, 1, 2, 0]}, 1),
    ("Conv_same_upper", "Conv", [IMG, Const(f32(3, 4, 4, 4, seed=2))], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 1),
    ("ConvTranspose", "ConvTranspose", [IMG, Const(f32(4, 3, 3, 3, seed=2)), Const(f32(3, seed=3))],
     {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 0]}, 1),
    ("ConvTranspose_group_asym", "ConvTranspose", [IMG, Const(f32(4, 2, 3, 2, seed=2))],
     {"group": 2, "strides": [2, 3], "pads": [0, 1, 2, 0]}, 1),
    ("ConvTranspose_output_shape", "ConvTranspose", [IMG, Const(f32(4, 2, 3, 3, seed=2))],
     {"strides": [2, 2], "output_shape": [15, 13]}, 1),
    ("MaxPool_ceil", "MaxPool", [IMG], {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, 1),
    ("MaxPool_pads", "MaxPool", [IMG], {"kernel_shape": [2, 3], "pads": [1, 0, 0, 2]}, 1),
    ("MaxPool_indices", "MaxPool", [IMG], {"kernel_shape": [2, 2], "strides": [2, 2]}, 2),
    # pads torch cannot take itself: the input is padded first, the indices must still count the input's positions
    ("MaxPool_indices_end_pads", "MaxPool", [IMG], {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 0, 2, 1]}, 2),
    ("AveragePool_pad_count", "AveragePool", [IMG],
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}, 1),
    ("AveragePool_asym_exclude", "AveragePool", [IMG], {"kernel_shape": [3, 2], "pads": [0, 1, 2, 1]}, 1),
    ("AveragePool_ceil", "AveragePool", [IMG], {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, 1),
    ("GlobalAveragePool", "GlobalAveragePool", [IMG], {}, 1),
    ("GlobalMaxPool", "GlobalMaxPool", [IMG], {}, 1),
    ("LRN", "LRN", [IMG], {"size": 3, "alpha": 0.01, "beta": 0.75, "bias": 2.0}, 1),
    ("LRN_5", "LRN", [IMG], {"size": 5, "alpha": 0.02}, 1),
    ("BatchNormalization", "BatchNormalization",
     [IMG, Const(f32(4, seed=2)), Const(f32(4, seed=3)), Const(f32(4, seed=4)), Const(f32(4, seed=5, positive=True))],
     {"epsilon": 1e-3}, 1),
    ("InstanceNormalization", "InstanceNormalization", [IMG, Const(f32(4, seed=2)), Const(f32(4, seed=3))], {}, 1),
    ("MeanVarianceNormalization", "MeanVarianceNormalization", [IMG], {"axes": [0, 2, 3]}, 1),
    ("LayerNormalization", "LayerNormalization", [X, Const(f32(5, seed=2)), Const(f32(5, seed=3))], {}, 1),
    ("LpNormalization", "LpNormalization", [X], {"axis": 1}, 1),
    ("Softmax", "Softmax", [X], {"axis": 1}, 1),
    ("LogSoftmax", "LogSoftmax", [X], {}, 1),
    ("Hardmax", "Hardmax", [X], {"axis": 2}, 1),
    ("ReduceSum", "ReduceSum", [X, i64(1, -1)], {}, 1),
    ("ReduceSum_all", "ReduceSum", [X], {"keepdims": 0}, 1),
    ("ReduceMean", "ReduceMean", [X, i64(2)], {"keepdims": 0}, 1),
    ("ReduceMax", "ReduceMax", [X, i64(0, 3)], {}, 1),
    ("ReduceProd", "ReduceProd", [X, i64(1, 2)], {}, 1),
    ("ReduceL2", "ReduceL2", [X, i64(1)], {}, 1),
    ("ReduceLogSumExp", "ReduceLogSumExp", [X, i64(3)], {}, 1),
    ("ReduceSumSquare", "ReduceSumSquare", [X, i64(3)], {}, 1),
    ("ReduceL1", "ReduceL1", [X, i64(3)], {}, 1),
    ("SoftmaxCrossEntropyLoss", "SoftmaxCrossEntropyLoss",
     [f32(6, 4), Const(np.array([0, 3, 1, 2, 2, 1], np.int64))], {}, 1),
    ("SoftmaxCrossEntropyLoss_ignore_sum", "SoftmaxCrossEntropyLoss",
     [f32(3, 4, 2), Const(np.array([[0, 3], [1, 1], [2, 0]], np.int64))], {"ignore_index": 1, "reduction": "sum"}, 2),
    ("NegativeLogLikelihoodLoss", "NegativeLogLikelihoodLoss",
     [f32(6, 4), Const(np.array([0, 3, 1, 2, 2, 1], np.int64)), Const(f32(4, seed=3, positive=True))], {}, 1),
    ("HardSwish", "HardSwish", [f32(3, 4, 5) * 4], {}, 1),
    ("DepthToSpace_DCR", "DepthToSpace", [f32(2, 8, 3, 2)], {"blocksize": 2}, 1),
    ("DepthToSpace_CRD", "DepthToSpace", [f32(2, 18, 2, 3)], {"blocksize": 3, "mode": "CRD"}, 1),
    ("MaxRoiPool", "MaxRoiPool", [IMG, Const(ROIS)], {"pooled_shape": [3, 2], "spatial_scale": 0.5}, 1),
    ("Compress_axis_short", "Compress", [X, np.array([True, False, True])], {"axis": 2}, 1),
    ("Compress_negative_axis_long", "Compress", [X, np.array([False, True, True, False, True, True, True])],
     {"axis": -1}, 1),
    ("Compress_flattened", "Compress", [X, rng(5).uniform(size=100) > 0.6], {}, 1),
    ("CumSum", "CumSum", [X, Const(np.array(2, np.int64))], {}, 1),
    ("CumSum_exclusive_reverse", "CumSum", [X, Const(np.array(-1, np.int32))], {"exclusive": 1, "reverse": 1}, 1),
    ("CumSum_int32_exclusive", "CumSum", [np.arange(-6, 6, dtype=np.int32).reshape(3, 4), Const(np.array(0, np.int64))],
     {"exclusive": 1}, 1),
    ("NonZero", "NonZero", [rng(6).integers(-1, 2, (3, 4, 2)).astype(np.int32)], {}, 1),
    ("NonZero_bool", "NonZero", [X > 0.5], {}, 1),
    ("NonZero_float", "NonZero", [Const(np.where(X > 0, X, 0))], {}, 1),
    ("NonMaxSuppression", "NonMaxSuppression", [Const(NMS_BOXES), Const(NMS_SCORES), i64(5),
                                                Const(np.array([0.5], np.float32)), Const(np.array([0.25], np.float32))],
     {}, 1),
    ("NonMaxSuppression_all_kept", "NonMaxSuppression", [Const(NMS_BOXES), Const(NMS_SCORES), i64(100),
                                                         Const(np.array([1.0], np.float32))], {}, 1),
    ("NonMaxSuppression_no_threshold", "NonMaxSuppression", [Const(NMS_BOXES), Const(NMS_SCORES), i64(20),
                                                             Const(np.array([0.3], np.float32))], {}, 1),
    ("NonMaxSuppression_center", "NonMaxSuppression", [Const(NMS_CENTRES), Const(NMS_SCORES[:, :, :12]), i64(3),
                                                       Const(np.array([0.2], np.float32)), Const(np.array([0.1], np.float32))],
     {"center_point_box": 1}, 1),
    ("NonMaxSuppression_no_max", "NonMaxSuppression", [Const(NMS_BOXES), Const(NMS_SCORES)], {}, 1),
]


@pytest.mark.parametrize(("case", "op", "inputs", "attrs", "n_out"), CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_onnxruntime(case: str, op: str, inputs: list, attrs: dict, n_out: int) -> None:
    model = single_node_model(op, inputs, attrs, n_out)
    feeds = {f"in{i}": x for i, x in enumerate(inputs) if x is not None and not isinstance(x, Const)}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, feeds)
    module = GraphModule(model).eval()
    with torch.no_grad():
        got = module({k: torch.from_numpy(v) for k, v in feeds.items()})
    for i, w in enumerate(want):
        g = got[f"out{i}"].numpy()
        assert g.dtype == w.dtype, f"{case} out{i}: dtype {g.dtype} != onnxruntime's {w.dtype}"
        assert_close(g, w, f"{case} out{i}")


NOT_DIFFERENTIABLE = {"Cast", "CastLike", "Shape", "Size", "ArgMax", "ArgMin", "Floor", "Ceil", "Sign", "Round", "Hardmax",
                      "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Mod", "IsNaN", "IsInf"}
DIFFERENTIABLE = [c for c in CASES if c[1] not in NOT_DIFFERENTIABLE
                  and any(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in c[2])]


@pytest.mark.parametrize(("case", "op", "inputs", "attrs", "n_out"), DIFFERENTIABLE, ids=[c[0] for c in DIFFERENTIABLE])
def test_kernel_gradient_matches_finite_differences(case: str, op: str, inputs: list, attrs: dict, n_out: int) -> None:
    """Autograd through each kernel in float64 vs central differences (torch.autograd.gradcheck)."""
    model = single_node_model(op, inputs, attrs, n_out)
    module = GraphModule(model).double()
    names = [f"in{i}" for i, x in enumerate(inputs) if isinstance(x, np.ndarray) and x.dtype == np.float32]
    fixed = {f"in{i}": torch.from_numpy(x) for i, x in enumerate(inputs)
             if isinstance(x, np.ndarray) and x.dtype != np.float32}

    def fn(*xs: torch.Tensor) -> torch.Tensor:
        feeds = {**fixed, **dict(zip(names, xs))}
        outs = module(feeds)
        return sum(o.sum() * (k + 1) for k, o in enumerate(outs.values()) if o.is_floating_point())

    xs = tuple(torch.from_numpy(np.asarray(inputs[int(n[2:])], dtype=np.float64)).requires_grad_() for n in names)
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_every_registered_op_is_exercised() -> None:
    tested = {c[1] for c in CASES} | {"Constant", "Dropout"}  # both are run by test_graph_module
    assert sorted(set(supported_ops()) - tested) == [], "ops without a parity case here"


def test_unsupported_ops_are_listed_at_once() -> None:
    nodes = [helper.make_node("Det", ["x"], ["a"], name="d1"), helper.make_node("Det", ["a"], ["b"], name="d2"),
             helper.make_node("Unique", ["b"], ["c"], name="u")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
    with pytest.raises(UnsupportedError, match=r"3 node\(s\): Det \(2 nodes\), Unique \(1 node\)"):
        GraphModule(helper.make_model(graph))


def test_every_onnx_op_the_converter_can_emit_has_a_kernel() -> None:
    """Scan the converter's layer handlers for ONNX op names, so a newly emitted op fails here first."""
    # A handler's own Caffe type (@register_layer("Swish", ...)) may also be an ONNX op name: not an op it emits.
    sources = [re.sub(r"@register_layer\(.*", "", f.read_text()) for f in Path(converter_layers.__path__[0]).glob("*.py")]
    named = {m.group(1) for text in sources for m in re.finditer(r'"([A-Z][A-Za-z]+)"', text) if onnx.defs.has(m.group(1))}
    assert len(named) > 30, f"the scan found only {sorted(named)}"
    assert sorted(named - set(supported_ops())) == []
