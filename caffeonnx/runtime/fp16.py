"""Half-precision compute for CUDA with float32 inputs and outputs kept.

Every float32 weight and constant becomes float16, `Cast(to=FLOAT)` nodes (the
converter's fp16 weight storage) cast to FLOAT16 instead, and a Cast at each graph
input and output keeps the model's interface in float32, so callers and servers
see no difference except precision.  Only ops known to accept float16 throughout
are rewritten; any other op stops the rewrite with the list of offenders.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

from caffeonnx.errors import UnsupportedError

FP16_OPS = frozenset({
    "Abs", "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "Conv", "ConvTranspose",
    "DepthToSpace", "Div", "Dropout", "Elu", "Exp", "Flatten", "Gemm", "GlobalAveragePool", "HardSigmoid",
    "HardSwish", "Identity", "LeakyRelu", "Log", "LRN",
    "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Pow", "PRelu", "Relu", "Reshape", "Sigmoid", "Slice", "Softmax",
    "Softplus", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Transpose", "Unsqueeze",
})


def _half(t: TensorProto) -> TensorProto:
    """A float32 tensor as float16 (same name); other tensors unchanged."""
    if t.data_type != TensorProto.FLOAT:
        return t
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)


def to_fp16(model: ModelProto) -> ModelProto:
    """`model` computing in float16 with float32 inputs and outputs (see the module docstring)."""
    bad = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in FP16_OPS})
    if bad:
        raise UnsupportedError(
            f"fp16 compute is not available for op(s) {bad!r} of graph {model.graph.name!r}; run in float32 "
            "(drop --fp16)"
        )
    half = ModelProto()
    half.CopyFrom(model)
    g = half.graph
    inits = [_half(t) for t in g.initializer]
    del g.initializer[:]
    g.initializer.extend(inits)
    rename: dict[str, str] = {}
    head = []
    for inp in g.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT and inp.name not in {t.name for t in inits}:
            rename[inp.name] = f"{inp.name}/fp16"
            head.append(helper.make_node("Cast", [inp.name], [rename[inp.name]], name=f"{inp.name}/to_fp16",
                                         to=TensorProto.FLOAT16))
    outputs = [o.name for o in g.output if o.type.tensor_type.elem_type == TensorProto.FLOAT and o.name not in rename]
    rename.update({o: f"{o}/fp16" for o in outputs})  # consumers of an output read its fp16 value too
    body = []
    for node in g.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) if o in outputs else o for o in node.output]
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif node.op_type == "Constant" and attr.name == "value":
                attr.t.CopyFrom(_half(attr.t))
            elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                raise UnsupportedError(f"fp16: Constant {node.name!r} uses {attr.name}; store it as a tensor value")
        body.append(node)
    tail = [helper.make_node("Cast", [rename[o]], [o], name=f"{o}/to_fp32", to=TensorProto.FLOAT) for o in outputs]
    del g.node[:]
    g.node.extend([*head, *body, *tail])
    del g.value_info[:]
    onnx.checker.check_model(half)
    return half
