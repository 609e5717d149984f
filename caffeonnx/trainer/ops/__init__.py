"""Registry of ONNX op kernels in torch: one small factory per ONNX op type.

Contributor rules: a factory lives in `trainer/ops/<family>.py`, is named after the
op it runs, is registered with `@register_op("OpType")`, and receives the node's
`NodeSpec` once, at build time; it returns the kernel (a closure over the parsed
attributes) that the graph module calls with the node's input tensors (None for an
omitted optional input).  Inputs that are constant at build time are available as
numpy arrays in `node.consts`, so shape-like inputs (Reshape's shape, Slice's
starts...) are read once instead of on every call.  Kernels must be differentiable
by autograd wherever ONNX's op is, and follow the ONNX spec at `node.opset`.
Modules in this package are discovered automatically.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from caffeonnx.registry import Registry

Kernel = Callable[..., "torch.Tensor | tuple[torch.Tensor, ...]"]
Factory = Callable[["NodeSpec"], Kernel]


@dataclass
class NodeSpec:
    """What a kernel factory knows about one ONNX node."""

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    consts: dict[int, np.ndarray] = field(default_factory=dict)  # input index -> value known at build time

    def attr(self, key: str, default: Any = None) -> Any:
        """Attribute `key`, or `default` when the node does not set it."""
        return self.attrs.get(key, default)

    def const(self, index: int) -> np.ndarray | None:
        """The build-time value of input `index` (None when absent or computed at run time)."""
        return self.consts.get(index)

    def has_input(self, index: int) -> bool:
        """Whether optional input `index` is given (ONNX omits it with an empty name)."""
        return index < len(self.inputs) and self.inputs[index] != ""


_OPS: Registry[Factory] = Registry("ONNX op kernel", __name__)
register_op = _OPS.register


def get_op(op_type: str) -> Factory | None:
    """The kernel factory for `op_type`, or None when the trainer cannot run it."""
    return _OPS.get(op_type)


def supported_ops() -> list[str]:
    """Every ONNX op type the trainer can run, sorted."""
    return [name for name, _ in _OPS.items()]


def ints(value: np.ndarray | list[int] | tuple[int, ...] | None) -> list[int] | None:
    """A build-time integer tensor/attribute as a Python list (None stays None)."""
    if value is None:
        return None
    return [int(v) for v in np.asarray(value).reshape(-1)]


def host_ints(tensor: torch.Tensor | None, static: list[int] | None) -> list[int] | None:
    """An integer input: its build-time value when known, else read from `tensor` at run time."""
    if static is not None:
        return static
    if tensor is None:
        return None
    return [int(v) for v in tensor.reshape(-1).tolist()]
