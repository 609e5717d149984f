"""The same encoder in torch eager mode, built from the ONNX initializers: the benchmark's baseline.

Covers the ops a fully connected encoder uses (Gemm, MatMul, Add, Sigmoid, Relu,
Tanh, Identity, Flatten); each Gemm becomes one `F.linear` (a fused addmm), as a
hand-written torch model would be.  The general ONNX -> torch trainer lives in
caffeonnx/trainer; this module only has to be a fair inference baseline.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from onnx import ModelProto, helper, numpy_helper

from caffeonnx.errors import UnsupportedError

Step = Callable[[dict[str, torch.Tensor]], None]


def _attrs(node) -> dict:  # type: ignore[no-untyped-def]
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class TorchEncoder(torch.nn.Module):
    """An ONNX encoder graph replayed with torch ops on torch Parameters (inference only)."""

    def __init__(self, model: ModelProto) -> None:
        super().__init__()
        g = model.graph
        self.weights = torch.nn.ParameterDict()
        self._names: dict[str, str] = {}
        for t in g.initializer:
            key = f"p{len(self._names)}"
            self._names[t.name] = key
            self.weights[key] = torch.nn.Parameter(torch.from_numpy(np.array(numpy_helper.to_array(t),
                                                                             dtype=np.float32)), requires_grad=False)
        inits = {t.name for t in g.initializer}
        self.input_name = next(i.name for i in g.input if i.name not in inits)
        self.output_name = g.output[0].name
        self._steps = [self._step(node) for node in g.node]

    def _getter(self, name: str) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """Reads `name`: a weight is looked up once, here, not on every call (Module.to keeps the Parameter)."""
        key = self._names.get(name)
        if key is None:
            return lambda env: env[name]
        weight = self.weights[key]
        return lambda env: weight

    def _step(self, node) -> Step:  # type: ignore[no-untyped-def]
        """A closure computing `node`'s output into the value environment."""
        a, out = _attrs(node), node.output[0]
        ins = [self._getter(n) if n else None for n in node.input]
        op = node.op_type
        if op == "Gemm":
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise UnsupportedError(f"TorchEncoder: Gemm {node.name!r} with transA/alpha/beta is not covered")
            x, w, b = ins[0], ins[1], ins[2] if len(ins) > 2 else None
            if a.get("transB", 0):
                return lambda env: env.__setitem__(out, F.linear(x(env), w(env), b(env) if b else None))
            return lambda env: env.__setitem__(out, F.linear(x(env), w(env).t(), b(env) if b else None))
        unary = {"Sigmoid": torch.sigmoid, "Relu": torch.relu, "Tanh": torch.tanh, "Identity": lambda x: x}
        if op in unary:
            fn, x = unary[op], ins[0]
            return lambda env: env.__setitem__(out, fn(x(env)))
        if op in ("MatMul", "Add"):
            fn, x, y = (torch.matmul if op == "MatMul" else torch.add), ins[0], ins[1]
            return lambda env: env.__setitem__(out, fn(x(env), y(env)))
        if op == "Flatten":
            axis, x = a.get("axis", 1), ins[0]
            return lambda env: env.__setitem__(out, torch.flatten(x(env), axis))
        raise UnsupportedError(f"TorchEncoder covers Gemm/MatMul/Add/Sigmoid/Relu/Tanh/Identity/Flatten, not {op!r} "
                               f"(node {node.name!r})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's output for `x`."""
        env = {self.input_name: x}
        for step in self._steps:
            step(env)
        return env[self.output_name]
