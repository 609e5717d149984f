"""HardSigmoid: the Caffe forks' piecewise-linear sigmoid (MobileNet v3 squeeze-excite gates)."""
from __future__ import annotations

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2


@register_layer("HardSigmoid", bottoms=1, tops=1, fork="mobilenet")
def convert_hard_sigmoid(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """HardSigmoid: y = max(0, min(1, alpha·x + beta)) (hardsigmoid_param or hard_sigmoid_param; 0.2 and 0.5)."""
    if layer.HasField("hardsigmoid_param") and layer.HasField("hard_sigmoid_param"):
        raise ctx.error("both hardsigmoid_param (inisis/caffe's spelling) and hard_sigmoid_param (synopsys-caffe's) "
                        "are given; keep the one your Caffe reads")
    p = layer.hard_sigmoid_param if layer.HasField("hard_sigmoid_param") else layer.hardsigmoid_param
    ctx.node("HardSigmoid", [ctx.inputs[0]], [ctx.outputs[0]], alpha=float(p.alpha), beta=float(p.beta))
    ctx.set_output_shape(0, ctx.input_shapes[0])
