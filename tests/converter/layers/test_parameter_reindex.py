"""Parameter and BatchReindex against Caffe's ParameterLayer / BatchReindexLayer (exact: they copy values)."""
from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from tests.converter.layers.graph_grad import forward_backward, module_of
from tests.helpers import assert_close, convert_text, rng, run

PARAM = """
layer { name: "in" type: "Input" top: "t" input_param { shape { dim: 3 dim: 4 } } }
layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 3 dim: 4 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "t" top: "loss" }
"""


def test_parameter_is_its_blob() -> None:
    blob = rng(11).normal(size=(3, 4)).astype(np.float32)
    converted = convert_text(PARAM, weights={"p": [blob]}, all_blobs=True)
    assert list(converted.weights) == ["p.blob"]  # one initializer: the blob itself
    out = run(converted, {"t": np.zeros((3, 4), np.float32)})
    assert_close(out["p"], blob, "p")


def test_untrained_parameter_is_zero() -> None:
    """ParameterLayer only reshapes its blob (no filler): Caffe's fresh memory is zeroed."""
    out = run(convert_text(PARAM, all_blobs=True), {"t": np.ones((3, 4), np.float32)})
    assert_close(out["p"], np.zeros((3, 4), np.float32), "p")


def test_parameter_trains() -> None:
    """Caffe shares the top's diff with the blob's: the blob's gradient is the loss's gradient of the top."""
    module = module_of(PARAM)
    t = rng(12).normal(size=(3, 4)).astype(np.float32)
    module.loss(module({"t": t}, module.loss_outputs())).backward()
    assert_close(module.parameter("p.blob").grad.numpy(), (0 - t) / 3, "d blob")


def reindex_net(x_shape: tuple[int, ...], m: int) -> str:
    dims = " ".join(f"dim: {d}" for d in x_shape)
    return (f'layer {{ name: "in" type: "Input" top: "x" top: "idx" input_param {{ shape {{ {dims} }} '
            f'shape {{ dim: {m} }} }} }}\n'
            'layer { name: "r" type: "BatchReindex" bottom: "x" bottom: "idx" top: "y" }\n')


@pytest.mark.parametrize(("x_shape", "idx"), [((4, 3, 2), [3, 0, 0, 2, 3.7]), ((5,), [1, 1, 4]), ((2, 3), [0.9])])
def test_batch_reindex_forward_and_gradient(x_shape: tuple[int, ...], idx: list[float]) -> None:
    x = rng(13).normal(size=x_shape).astype(np.float32)
    ids = np.array(idx, dtype=np.float32)
    want = x[ids.astype(np.int64)]  # static_cast<int>: toward zero
    assert_close(run(convert_text(reindex_net(x_shape, len(idx))), {"x": x, "idx": ids})["y"], want, "y")
    dy = rng(14).normal(size=want.shape).astype(np.float32)
    y, grads = forward_backward(reindex_net(x_shape, len(idx)), {"x": x, "idx": ids}, "y", dy, ["x"])
    assert_close(y, want, "y (trainer)")
    dx = np.zeros_like(x)
    np.add.at(dx, ids.astype(np.int64), dy)  # Backward_cpu sums where an example is repeated
    assert_close(grads["x"], dx, "dx")


@pytest.mark.parametrize("bad", [-1.0, 4.0])
def test_batch_reindex_refuses_indices_caffe_refuses(bad: float) -> None:
    """Caffe CHECKs 0 <= idx < N; ONNX Gather would count -1 from the end, so it is sent out of range."""
    converted = convert_text(reindex_net((4, 2), 2))
    with pytest.raises(Exception, match="out of"):
        run(converted, {"x": np.zeros((4, 2), np.float32), "idx": np.array([0, bad], np.float32)})
    with pytest.raises(Exception, match="index|range"):
        module_of(reindex_net((4, 2), 2), caffe_pb2.TEST)({"x": np.zeros((4, 2), np.float32),
                                                            "idx": np.array([0, bad], np.float32)}, ["y"])


def test_batch_reindex_needs_a_flat_index() -> None:
    with pytest.raises(LayerError, match=r"'r' \(BatchReindex\): the index bottom 'idx' must have 1 axis"):
        convert_text('layer { name: "in" type: "Input" top: "x" top: "idx" input_param { shape { dim: 4 dim: 2 } } }\n'
                     'layer { name: "r" type: "BatchReindex" bottom: "x" bottom: "idx" top: "y" }\n')
