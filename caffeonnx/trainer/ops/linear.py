"""Matrix products: Gemm (InnerProduct, tied decoders read the weight transposed) and MatMul.

On CPU, float32 InnerProducts big enough to matter run their forward and input-gradient
products through oneDNN's inner product rather than torch.addmm's BLAS: on the 2-core AMD
EPYC this project benchmarks on, oneDNN is 10-17% faster for batch 100 at 250-1000 units
(benchmarks/trainer_mnist_autoencoder.py); the weight gradient stays on torch.mm, which is
as fast there.  Only the summation order inside each dot product differs (float32 rounding),
well inside the real-Caffe fixtures' rtol 1e-4.
"""
from __future__ import annotations

from typing import Any

import torch

from caffeonnx.trainer.ops import Kernel, NodeSpec, register_op

Tensor = torch.Tensor

# oneDNN's fully connected primitive on dense tensors (what torch's inductor calls for CPU linears).
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
# Below this many multiply-adds (M·K·N) BLAS wins: oneDNN's per-call setup outweighs its faster kernel.
ONEDNN_MIN_MACS = 2_000_000


def onednn_linear_usable(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether y = x·weightᵀ + bias may run on oneDNN: float32 CPU 2-D operands of a big enough product."""
    return (
        _ONEDNN_LINEAR is not None
        and torch.backends.mkldnn.is_available()
        and x.dim() == 2 and weight.dim() == 2
        and x.device.type == "cpu" and weight.device.type == "cpu"
        and x.dtype == torch.float32 and weight.dtype == torch.float32
        and (bias is None or (bias.dim() == 1 and bias.shape[0] == weight.shape[0]
                              and bias.device.type == "cpu" and bias.dtype == torch.float32))
        and x.shape[0] * x.shape[1] * weight.shape[0] >= ONEDNN_MIN_MACS
    )


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x·weightᵀ (+ bias) on oneDNN; `weight` may be a transposed view."""
    assert _ONEDNN_LINEAR is not None
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


class OneDnnLinear(torch.autograd.Function):
    """y = x·weightᵀ + bias with oneDNN products for y and ∂x, torch.mm for ∂weight, a column sum for ∂bias."""

    # forward takes ctx itself: a separate setup_context makes every apply() bind its arguments by signature.
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        # ∂x = grad·weight is the forward's product transposed (same dtype, device and size): oneDNN's too.
        gx = _onednn(grad, weight.t(), None) if need_x else None
        gw = torch.mm(grad.t(), x) if need_w else None
        gb = grad.sum(0) if need_b else None
        return gx, gw, gb


@register_op("Gemm")
def gemm(node: NodeSpec) -> Kernel:
    """Gemm: alpha·A'·B' + beta·C, where ' is the optional transpose of each operand."""
    trans_a, trans_b = bool(node.attr("transA", 0)), bool(node.attr("transB", 0))
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))

    def run(a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
        if trans_a:
            a = a.t()
        # An InnerProduct: b' = bᵀ is the [out, in] weight (a view when not transB: tied weights stay one tensor).
        weight = b if trans_b else b.t()
        bias = None if c is None or beta == 0.0 else c
        if alpha == 1.0 and beta == 1.0 and not trans_a and onednn_linear_usable(a, weight, bias):
            return OneDnnLinear.apply(a, weight, bias)
        b = weight.t()
        if bias is None:
            y = torch.mm(a, b)
            return y if alpha == 1.0 else y * alpha
        return torch.addmm(bias, a, b, beta=beta, alpha=alpha)

    return run


@register_op("MatMul")
def matmul(node: NodeSpec) -> Kernel:
    """MatMul: numpy-style matrix product with batch broadcasting."""
    return torch.matmul
