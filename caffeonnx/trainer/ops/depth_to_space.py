"""DepthToSpace: channels moved into blocks of pixels (Caffe forks' PixelShuffle)."""
from __future__ import annotations

import torch

from caffeonnx.trainer.ops import Kernel, NodeSpec, register_op

Tensor = torch.Tensor


@register_op("DepthToSpace")
def depth_to_space(node: NodeSpec) -> Kernel:
    """DepthToSpace: [N, C·b², H, W] -> [N, C, H·b, W·b].

    Channel c·b² + i·b + j goes to pixel offset (i, j) in CRD mode (PyTorch's pixel_shuffle,
    the forks' PixelShuffle); channel (i·b + j)·C + c in DCR mode, ONNX's default.  Being a
    pure rearrangement, its backward gathers the top diff back, as the forks' Backward_cpu do.
    """
    b = int(node.attr("blocksize"))
    crd = node.attr("mode", "DCR") == "CRD"

    def run(x: Tensor) -> Tensor:
        n, ch, h, w = x.shape
        c = ch // (b * b)
        if crd:
            return x.reshape(n, c, b, b, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, h * b, w * b)
        return x.reshape(n, b, b, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c, h * b, w * b)

    return run
