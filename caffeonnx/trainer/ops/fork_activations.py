"""Activations the Caffe forks added that BVLC lacks, as ONNX ops: HardSwish (MobileNet v3)."""
from __future__ import annotations

import torch

from caffeonnx.trainer.ops import Kernel, NodeSpec, register_op

Tensor = torch.Tensor


@register_op("HardSwish")
def hard_swish(node: NodeSpec) -> Kernel:
    """HardSwish: x · max(0, min(1, x/6 + 1/2)), differentiated as micronet-caffe's HardSwishLayer.

    Its Backward_cpu is 0 below -3, 1 above 3 and (2x + 3)/6 on [-3, 3], both edges included
    (-1/2 at -3, 3/2 at 3); torch's hardswish puts the edges on the outer pieces, so the pieces
    are spelled out.  The middle piece reads x clamped to [-3, 3], so an infinite x selected by
    an outer piece cannot leak a NaN gradient through it.
    """

    def run(x: Tensor) -> Tensor:
        mid = torch.clamp(x, -3.0, 3.0)
        return torch.where(x < -3, x * 0, torch.where(x > 3, x, mid * (mid + 3) / 6))

    return run
