"""Dropout is the identity at inference (Caffe scales at train time), kept as an ONNX Dropout with its ratio.

Exact comparison (atol 0): the identity must not change a bit.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, reference_subnet, rng, run


def _net(ratio: float | None) -> str:
    params = "" if ratio is None else f"dropout_param {{ dropout_ratio: {ratio} }}"
    return (
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 } } }\n'
        f'layer {{ name: "drop" type: "Dropout" bottom: "x" top: "y" {params} }}\n'
    )


@pytest.mark.parametrize("ratio", [None, 0.3, 0.9])
@pytest.mark.parametrize("opset", [11, 21])
def test_identity_at_inference_keeps_ratio(ratio: float | None, opset: int) -> None:
    x = rng(7).standard_normal((5, 3, 4)).astype(np.float32)
    converted = convert_text(_net(ratio), opset=opset)
    assert_close(run(converted, {"x": x})["y"], x, "dropout y", atol=0, rtol=0)
    model = converted.to_proto()
    drop = [n for n in model.graph.node if n.op_type == "Dropout"]
    assert len(drop) == 1 and list(drop[0].output) == ["y"]
    if opset >= 12:
        ratio_const = next(n for n in model.graph.node if n.output[0] == drop[0].input[1])
        stored = float(numpy_helper.to_array(ratio_const.attribute[0].t))
    else:
        stored = next(a.f for a in drop[0].attribute if a.name == "ratio")
    assert stored == pytest.approx(0.5 if ratio is None else ratio), f"Dropout ratio {stored} for dropout_ratio {ratio}"


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_ratio_outside_open_unit_interval_is_a_layer_error(ratio: float) -> None:
    with pytest.raises(LayerError, match=r"layer 'drop' \(Dropout\): dropout_param.dropout_ratio must be in \(0, 1\)"):
        convert_text(_net(ratio))


def test_layer_zoo_blob_matches_caffe() -> None:
    """Dropout (ratio 0.3, TEST phase) of the layer_zoo net, fed the pool_ave blob Caffe gave it."""
    text, feeds, expected = reference_subnet("layer_zoo", ["drop"])
    assert_close(run(convert_text(text), feeds)["drop"], expected["drop"], "layer_zoo drop", atol=0, rtol=0)
