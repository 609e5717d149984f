"""Element-wise ONNX ops: arithmetic with numpy broadcasting, activations, comparisons, Cast."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from onnx import TensorProto

from caffeonnx.trainer.ops import Kernel, NodeSpec, register_op

Tensor = torch.Tensor

_UNARY = {
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, like ONNX
    "Sign": torch.sign,
    "Erf": torch.erf,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Relu": torch.relu,
    "Softsign": F.softsign,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
}


@register_op(*_UNARY)
def unary(node: NodeSpec) -> Kernel:
    """One-input element-wise math (Abs, Exp, Log, Sigmoid, Tanh, Relu, ...)."""
    return _UNARY[node.op_type]


def _align(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Operands of a binary op on one device (a small integer constant may sit elsewhere)."""
    if a.device != b.device:
        if b.dim() == 0 or b.numel() < a.numel():
            b = b.to(a.device)
        else:
            a = a.to(b.device)
    return a, b


def _div(a: Tensor, b: Tensor) -> Tensor:
    """ONNX Div: true division for floats, truncation towards zero for integers."""
    if a.is_floating_point() or b.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


_BINARY = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Greater": torch.gt,
    "Less": torch.lt,
    "GreaterOrEqual": torch.ge,
    "LessOrEqual": torch.le,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}


@register_op(*_BINARY)
def binary(node: NodeSpec) -> Kernel:
    """Two-input element-wise ops with numpy-style (multidirectional) broadcasting."""
    fn = _BINARY[node.op_type]

    def run(a: Tensor, b: Tensor) -> Tensor:
        return fn(*_align(a, b))

    return run


@register_op("Mod")
def mod(node: NodeSpec) -> Kernel:
    """Mod: the sign of the divisor (fmod=0, Python-like) or of the dividend (fmod=1, C-like)."""
    fn = torch.fmod if node.attr("fmod", 0) else torch.remainder
    return lambda a, b: fn(*_align(a, b))


@register_op("Max", "Min", "Sum", "Mean")
def variadic(node: NodeSpec) -> Kernel:
    """Element-wise Max/Min/Sum/Mean over any number of broadcast inputs."""
    op = node.op_type

    def run(*xs: Tensor) -> Tensor:
        out = xs[0]
        for x in xs[1:]:
            out, x = _align(out, x)
            if op == "Max":
                out = torch.maximum(out, x)
            elif op == "Min":
                out = torch.minimum(out, x)
            else:
                out = out + x
        return out / len(xs) if op == "Mean" else out

    return run


@register_op("Where")
def where(node: NodeSpec) -> Kernel:
    """Where: pick from X where the condition holds, else from Y (broadcast)."""

    def run(cond: Tensor, x: Tensor, y: Tensor) -> Tensor:
        x, y = _align(x, y)
        return torch.where(cond.to(x.device), x, y)

    return run


@register_op("IsInf")
def is_inf(node: NodeSpec) -> Kernel:
    """IsInf: +inf and/or -inf as selected by detect_positive / detect_negative."""
    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)

    def run(x: Tensor) -> Tensor:
        if pos and neg:
            return torch.isinf(x)
        if pos:
            return torch.isposinf(x)
        if neg:
            return torch.isneginf(x)
        return torch.zeros_like(x, dtype=torch.bool)

    return run


@register_op("LeakyRelu")
def leaky_relu(node: NodeSpec) -> Kernel:
    """LeakyRelu: x for x > 0, alpha·x otherwise (Caffe ReLU with negative_slope)."""
    alpha = float(node.attr("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@register_op("Elu")
def elu(node: NodeSpec) -> Kernel:
    """Elu: x for x > 0, alpha·(exp(x) − 1) otherwise."""
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@register_op("Selu")
def selu(node: NodeSpec) -> Kernel:
    """Selu: gamma·(x for x > 0, alpha·(exp(x) − 1) otherwise)."""
    alpha, gamma = float(node.attr("alpha", 1.67326319217681884765625)), float(node.attr("gamma", 1.05070102214813232421875))
    return lambda x: gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@register_op("Softplus")
def softplus(node: NodeSpec) -> Kernel:
    """Softplus: log(1 + exp(x)), computed without overflow (Caffe's BNLL)."""
    return lambda x: torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


@register_op("HardSigmoid")
def hard_sigmoid(node: NodeSpec) -> Kernel:
    """HardSigmoid: max(0, min(1, alpha·x + beta))."""
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)


@register_op("PRelu")
def prelu(node: NodeSpec) -> Kernel:
    """PRelu: x for x >= 0, slope·x otherwise; slope broadcasts to x (Caffe PReLU)."""
    return lambda x, slope: torch.where(x >= 0, x, x * slope)


@register_op("Clip")
def clip(node: NodeSpec) -> Kernel:
    """Clip: clamp to [min, max]; an omitted bound is open."""
    lo_attr, hi_attr = node.attr("min"), node.attr("max")  # opset < 11 attributes
    # Bounds known at build time clamp with torch.clamp, whose gradient passes on the bounds
    # themselves (Caffe's ClipLayer: min <= x <= max); maximum/minimum would halve it there.
    lo_const, hi_const = node.const(1), node.const(2)
    if lo_const is not None and lo_const.size == 1:
        lo_attr = float(lo_const.reshape(()))
    if hi_const is not None and hi_const.size == 1:
        hi_attr = float(hi_const.reshape(()))
    static = (not node.has_input(1) or lo_const is not None) and (not node.has_input(2) or hi_const is not None)

    def run(x: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
        lo_v = lo_attr if static or lo is None else lo
        hi_v = hi_attr if static or hi is None else hi
        if isinstance(lo_v, Tensor) or isinstance(hi_v, Tensor):
            if lo_v is not None:
                x = torch.maximum(x, torch.as_tensor(lo_v, dtype=x.dtype, device=x.device))
            if hi_v is not None:
                x = torch.minimum(x, torch.as_tensor(hi_v, dtype=x.dtype, device=x.device))
            return x
        return torch.clamp(x, lo_v, hi_v)

    return run


_DTYPES = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT64: torch.int64,
    TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}


def torch_dtype(onnx_type: int, where: str) -> torch.dtype:
    """The torch dtype of an ONNX TensorProto data type."""
    if onnx_type not in _DTYPES:
        raise NotImplementedError(f"{where}: ONNX data type {TensorProto.DataType.Name(onnx_type)} has no torch kernel")
    return _DTYPES[onnx_type]


@register_op("Cast")
def cast(node: NodeSpec) -> Kernel:
    """Cast: convert to the `to` data type (float casts keep gradients)."""
    dtype = torch_dtype(int(node.attr("to")), f"Cast node {node.name!r}")
    return lambda x: x.to(dtype)


@register_op("CastLike")
def cast_like(node: NodeSpec) -> Kernel:
    """CastLike: convert to the data type of the second input."""
    return lambda x, like: x.to(like.dtype)


@register_op("Identity")
def identity(node: NodeSpec) -> Kernel:
    """Identity: the input, unchanged."""
    return lambda x: x


@register_op("Dropout")
def dropout(node: NodeSpec) -> Kernel:
    """Dropout as inference computes it: the input (and an all-true mask).

    Caffe's TRAIN-phase dropout is applied per Caffe layer by the graph module.
    """

    def run(x: Tensor, ratio: Tensor | None = None, training: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if len(node.outputs) > 1:
            return x, torch.ones_like(x, dtype=torch.bool)
        return x

    return run


@register_op("Gelu")
def gelu(node: NodeSpec) -> Kernel:
    """Gelu: x·Φ(x), exactly or with the tanh approximation."""
    approximate = node.attr("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


@register_op("ThresholdedRelu")
def thresholded_relu(node: NodeSpec) -> Kernel:
    """ThresholdedRelu: x where x > alpha, else 0."""
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, torch.zeros((), dtype=x.dtype, device=x.device))

