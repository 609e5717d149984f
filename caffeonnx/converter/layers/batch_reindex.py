"""BatchReindex: Caffe's BatchReindexLayer, y = x[int(idx)] along the first axis."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from caffeonnx.converter.context import LayerContext
from caffeonnx.converter.registry import register_layer
from caffeonnx.proto import caffe_pb2

# An index Caffe refuses (negative) is sent out of range, so ONNX Runtime (and the trainer) refuse it
# too instead of Gather counting it from the end.
_OUT_OF_RANGE = 2**31 - 1


@register_layer("BatchReindex", bottoms=2, tops=1)
def convert_batch_reindex(layer: caffe_pb2.LayerParameter, ctx: LayerContext) -> None:
    """BatchReindex: y[m] = x[int(idx[m])] along axis 0 (select, reorder or repeat examples; idx is (M))."""
    (x, idx), (x_shape, idx_shape) = ctx.inputs[:2], ctx.input_shapes[:2]
    if len(idx_shape) != 1:
        raise ctx.error(f"the index bottom {layer.bottom[1]!r} must have 1 axis (M) but has shape {list(idx_shape)} "
                        "(Caffe: CHECK_EQ(1, bottom[1]->num_axes())); flatten it first")
    if not x_shape:
        raise ctx.error(f"bottom {layer.bottom[0]!r} is a scalar; BatchReindex indexes its first axis")
    if ctx.builder.dtypes.get(idx, TensorProto.FLOAT) == TensorProto.INT64:
        index = idx
        negative = ctx.node("Less", [idx, ctx.const(np.array(0, dtype=np.int64), "zero")])
    else:
        index = ctx.node("Cast", [idx], to=TensorProto.INT64)  # static_cast<int>: toward zero
        negative = ctx.node("Less", [idx, ctx.const(np.float32(0), "zero")])
    index = ctx.node("Where", [negative, ctx.const(np.array(_OUT_OF_RANGE, dtype=np.int64), "out_of_range"), index])
    ctx.node("Gather", [x, index], [ctx.outputs[0]], axis=0)
    ctx.set_output_shape(0, (idx_shape[0], *x_shape[1:]))
