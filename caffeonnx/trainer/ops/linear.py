"""Matrix products: Gemm (InnerProduct, tied decoders read the weight transposed) and MatMul."""
from __future__ import annotations

import torch

from caffeonnx.trainer.ops import Kernel, NodeSpec, register_op

Tensor = torch.Tensor


@register_op("Gemm")
def gemm(node: NodeSpec) -> Kernel:
    """Gemm: alpha·A'·B' + beta·C, where ' is the optional transpose of each operand."""
    trans_a, trans_b = bool(node.attr("transA", 0)), bool(node.attr("transB", 0))
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))

    def run(a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
        if trans_a:
            a = a.t()
        if trans_b:
            b = b.t()  # a view: a tied weight stays one tensor, autograd sums both users' gradients
        if c is None or beta == 0.0:
            y = torch.mm(a, b)
            return y if alpha == 1.0 else y * alpha
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    return run


@register_op("MatMul")
def matmul(node: NodeSpec) -> Kernel:
    """MatMul: numpy-style matrix product with batch broadcasting."""
    return torch.matmul
