"""Foreign ONNX made ready for Caffe: validated, fixed shapes, constants folded, ties recovered.

Caffe blobs have fixed shapes and a net has no constant tensors other than layer
params, so before any op is mapped:
- the model is validated (every node input defined, onnx.checker) and every graph
  input gets a concrete shape (a dynamic batch is fixed with `--batch N`);
- every node whose inputs are all constant, and every Shape/Size of a value whose
  shape is known, is evaluated (onnx.reference, one node at a time), so torch's
  Shape -> Gather -> Unsqueeze -> Concat -> Reshape chains become constant shapes;
- every remaining node gets its output shapes from ONNX shape inference on that node;
- a 2-D initializer that is exactly the transpose of an earlier one is recorded as
  that initializer read transposed: exporters constant-fold `weight.t()` into a copy,
  and this is how the tie survives.
Constants remember the initializer their elements come from (through Identity,
Reshape-like ops and 2-D transposes), so the emitters can share Caffe params.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from caffeonnx.converter.foreign.geometry import Window, onnx_pool_size, resolve_pads
from caffeonnx.converter.foreign.registry import get_emitter, supported_ops
from caffeonnx.errors import CaffeOnnxError, InputFileError, UnsupportedError

Shape = tuple[int, ...]

# Ops whose output keeps the element order of their first input (provenance survives).
_SAME_ORDER = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
# Ops never folded: their value changes from run to run.
_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"})


@dataclass(frozen=True)
class Const:
    """A constant value and, when known, the initializer its elements come from.

    With `source` set, value.ravel() equals the source's ravel (or, `transposed`, that
    of the source's 2-D transpose): the emitters may store it as that shared param.
    """

    value: np.ndarray
    source: str | None = None
    source_shape: Shape = ()
    transposed: bool = False

    def is_source(self) -> bool:
        """The value is exactly the source initializer (same shape, same order)."""
        return self.source is not None and not self.transposed and self.value.shape == self.source_shape

    def is_source_transposed(self) -> bool:
        """The value is exactly the 2-D transpose of the source initializer."""
        return self.source is not None and self.transposed and self.value.shape == self.source_shape[::-1]

    def same_order(self) -> bool:
        """The value holds the source's elements in the source's order (any shape)."""
        return self.source is not None and not self.transposed

    def transpose2d(self) -> Const:
        """The 2-D transpose, keeping the source when the value is the source or its transpose."""
        keep = self.is_source() or self.is_source_transposed()
        return Const(self.value.T, self.source if keep else None, self.source_shape, not self.transposed)

    def reshaped(self, shape: Shape) -> Const:
        """Same elements in another shape (the source is kept)."""
        return Const(self.value.reshape(shape), self.source, self.source_shape, self.transposed)


@dataclass
class PreparedGraph:
    """What the emitters work on: live nodes in order, constants and concrete shapes."""

    name: str
    opset: int
    inputs: list[tuple[str, Shape]]
    outputs: list[str]
    nodes: list[NodeProto]
    consts: dict[str, Const] = field(default_factory=dict)
    shapes: dict[str, Shape] = field(default_factory=dict)


def node_label(node: NodeProto, index: int) -> str:
    """The name a node is reported and converted under (its name, or op type and position)."""
    return node.name or f"{node.op_type}_{index}"


def prepare(model: ModelProto, batch: int | None = None) -> PreparedGraph:
    """Validate `model`, fix its input shapes, fold constants and infer every shape."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not opset:
        raise InputFileError("ONNX model imports no default-domain opset; it is not a standard ONNX model")
    _check_defined(model)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputFileError(f"ONNX model {graph.name!r} is malformed (onnx.checker: {first}); re-export it") from None
    consts = {t.name: _initializer(t) for t in graph.initializer}
    _recover_ties(consts)
    prepared = PreparedGraph(graph.name, opset, [], [o.name for o in graph.output], [], consts)
    for value in graph.input:
        if value.name not in consts:
            shape = _input_shape(value, batch)
            prepared.inputs.append((value.name, shape))
            prepared.shapes[value.name] = shape
    live = _live_nodes(graph)
    unsupported: dict[str, list[str]] = defaultdict(list)
    unknown: set[str] = set()  # values downstream of an unsupported op: no shape
    for index, node in enumerate(graph.node):
        if index not in live:
            continue
        label = node_label(node, index)
        inputs = [i for i in node.input if i]
        if node.op_type not in _RANDOM and node.domain in ("", "ai.onnx") and all(i in consts for i in inputs):
            _fold(node, label, model, consts)
            continue
        if node.op_type in ("Shape", "Size") and node.input[0] in prepared.shapes:
            consts[node.output[0]] = Const(_shape_value(node, prepared.shapes[node.input[0]]))
            continue
        if get_emitter(node.op_type, node.domain) is None:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            unsupported[op].append(label)
            unknown.update(node.output)
            continue
        named = NodeProto()
        named.CopyFrom(node)
        named.name = label
        prepared.nodes.append(named)
        if any(i in unknown for i in inputs):
            unknown.update(node.output)
            continue
        for name, shape in zip(node.output, _infer_shapes(node, label, model, consts, prepared.shapes)):
            if name:
                prepared.shapes[name] = shape
    if unsupported:
        parts = [f"{op} ({len(names)}: {', '.join(map(repr, names))})" for op, names in sorted(unsupported.items())]
        raise UnsupportedError(
            f"ONNX model {graph.name!r} has {sum(map(len, unsupported.values()))} node(s) of op types Caffe layers "
            f"cannot express: {'; '.join(parts)}. Supported ops: {', '.join(e.op_type for e in supported_ops())}"
        )
    for name in prepared.outputs:
        if name in consts:
            raise CaffeOnnxError(
                f"graph output {name!r} is a constant (it does not depend on any input); a Caffe net computes "
                "every blob from its inputs: drop that output before converting"
            )
    return prepared


def _check_defined(model: ModelProto) -> None:
    """Every node input is a graph input, an initializer or an earlier node's output (clear message if not)."""
    graph = model.graph
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in known:
                produced_later = any(name in later.output for later in graph.node[index + 1:])
                why = ("is produced by a later node: the nodes are not in topological order" if produced_later else
                       "is neither a graph input, an initializer nor a node output: a missing initializer "
                       "(was the model saved with external data that was not found?)")
                raise InputFileError(
                    f"ONNX model {graph.name!r}: node {node_label(node, index)!r} ({node.op_type}) reads {name!r}, "
                    f"which {why}; re-export the model"
                )
        known.update(node.output)


def _initializer(tensor: TensorProto) -> Const:
    """An initializer as a Const (floating point widened/narrowed to Caffe's float32)."""
    try:
        value = numpy_helper.to_array(tensor)
    except Exception as exc:  # noqa: BLE001 - external data and bad payloads raise several types
        raise InputFileError(
            f"initializer {tensor.name!r} cannot be read ({type(exc).__name__}: {exc}); if the model uses external "
            "data, keep the data files next to the .onnx"
        ) from None
    if value.dtype.kind == "f" or tensor.data_type == TensorProto.BFLOAT16:
        value = value.astype(np.float32)
    return Const(value, tensor.name, value.shape)


def _recover_ties(consts: dict[str, Const]) -> None:
    """A 2-D float initializer equal to an earlier one's transpose becomes that one read transposed.

    Arrays with a single distinct value (zeros, ones) are left alone: an exporter's copy of
    them says nothing about a tie.
    """
    earlier: dict[tuple[Shape, bytes], str] = {}
    for name, c in list(consts.items()):
        v = c.value
        if v.ndim != 2 or v.dtype != np.float32 or v.size < 2 or np.all(v == v.flat[0]):
            continue
        base = earlier.get((v.T.shape, np.ascontiguousarray(v.T).tobytes()))
        if base is not None and base != name:
            consts[name] = Const(v, base, consts[base].source_shape, transposed=True)
        else:
            earlier.setdefault((v.shape, v.tobytes()), name)


def _input_shape(value: onnx.ValueInfoProto, batch: int | None) -> Shape:
    """The concrete Caffe shape of a graph input; dynamic dims are errors except a batch fixed by --batch."""
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type") or ttype.elem_type != TensorProto.FLOAT:
        kind = TensorProto.DataType.Name(ttype.elem_type) if value.type.HasField("tensor_type") else "non-tensor"
        raise UnsupportedError(
            f"graph input {value.name!r} is {kind}; Caffe blobs hold float32: export the model with a float input"
        )
    if not ttype.HasField("shape"):
        raise CaffeOnnxError(f"graph input {value.name!r} has no shape; Caffe blobs need one: export with a fixed "
                             "input shape")
    dims = []
    for axis, dim in enumerate(ttype.shape.dim):
        fixed = dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None
        if axis == 0 and batch is not None:
            if fixed is not None and fixed != batch:
                raise CaffeOnnxError(
                    f"graph input {value.name!r} has a fixed batch of {fixed}; --batch {batch} cannot change it "
                    "(shapes computed from it are baked into the model): drop --batch or re-export with a dynamic batch"
                )
            fixed = batch
        if fixed is None:
            what = repr(dim.dim_param) if dim.dim_param else "unknown"
            hint = ("pass --batch N (batch=N in the Python API)" if axis == 0 else
                    "Caffe cannot hold it: export the model with a fixed size for that axis")
            raise CaffeOnnxError(f"graph input {value.name!r} has a dynamic dimension {axis} ({what}); {hint}")
        dims.append(fixed)
    return tuple(dims)


def _live_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes the graph outputs depend on."""
    needed = {o.name for o in graph.output}
    live = set()
    for index in range(len(graph.node) - 1, -1, -1):
        node = graph.node[index]
        if any(o in needed for o in node.output):
            live.add(index)
            needed.update(i for i in node.input if i)
    return live


def _one_node_model(node: NodeProto, model: ModelProto, consts: dict[str, Const],
                    shapes: dict[str, Shape]) -> ModelProto:
    """`node` alone, its constant inputs as initializers and the others as typed graph inputs."""
    inits, inputs = [], []
    for name in dict.fromkeys(i for i in node.input if i):
        if name in consts:
            inits.append(numpy_helper.from_array(consts[name].value, name))
        else:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shapes[name])))
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
    graph = helper.make_graph([node], "node", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _fold(node: NodeProto, label: str, model: ModelProto, consts: dict[str, Const]) -> None:
    """Evaluate a node whose inputs are all constant; its outputs become constants."""
    try:
        results = ReferenceEvaluator(_one_node_model(node, model, consts, {})).run(None, {})
    except Exception as exc:  # noqa: BLE001 - the reference evaluator raises many types
        raise UnsupportedError(
            f"node {label!r} ({node.op_type}) has only constant inputs but could not be evaluated "
            f"({type(exc).__name__}: {exc}); simplify the model (e.g. onnxsim) before converting"
        ) from None
    outputs = [o for o in node.output if o]
    first = consts[node.input[0]] if node.input and node.input[0] else None
    for name, value in zip(outputs, results):
        value = np.asarray(value)
        if first is not None and node.op_type in _SAME_ORDER and len(outputs) == 1:
            consts[name] = first.reshaped(value.shape)
        elif first is not None and node.op_type == "Transpose" and value.ndim == 2 and first.value.ndim == 2 \
                and _attr(node, "perm", [1, 0]) == [1, 0]:
            consts[name] = first.transpose2d()
        else:
            consts[name] = Const(value)


def _attr(node: NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _shape_value(node: NodeProto, shape: Shape) -> np.ndarray:
    """Shape (with ONNX's start/end) or Size of a value whose shape is known."""
    if node.op_type == "Size":
        return np.array(int(np.prod(shape)), dtype=np.int64)
    start, end = int(_attr(node, "start", 0)), _attr(node, "end", None)
    return np.array(shape[start:None if end is None else int(end)], dtype=np.int64)


def _infer_shapes(node: NodeProto, label: str, model: ModelProto, consts: dict[str, Const],
                  shapes: dict[str, Shape]) -> list[Shape]:
    """Output shapes of one node from ONNX shape inference (pool sizes use ONNX Runtime's ceil rule)."""
    one = _one_node_model(node, model, consts, shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(one, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - inference errors come as several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"node {label!r} ({node.op_type}): ONNX shape inference fails ({first}); the node's "
                             "inputs do not fit it: re-export the model") from None
    out: list[Shape] = []
    for value in inferred.graph.output:
        ttype = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
        if not ttype.HasField("shape") or any(d < 0 for d in dims):
            raise CaffeOnnxError(f"node {label!r} ({node.op_type}): the shape of output {value.name!r} cannot be "
                                 "determined; Caffe needs fixed shapes (export with fixed input sizes)")
        out.append(tuple(dims))
    if node.op_type in ("MaxPool", "AveragePool") and out:
        out[0] = _pool_shape(node, shapes[node.input[0]])
    return out


def _pool_shape(node: NodeProto, in_shape: Shape) -> Shape:
    """ONNX Runtime's pooled shape (ONNX shape inference misses the ceil-mode rule dropping a last window)."""
    n = len(in_shape) - 2
    kernel = list(_attr(node, "kernel_shape", []))
    strides = list(_attr(node, "strides", [1] * n))
    dilations = list(_attr(node, "dilations", [1] * n))
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    pads = resolve_pads(auto_pad, list(_attr(node, "pads", [])), in_shape[2:], kernel, strides, dilations)
    ceil = bool(_attr(node, "ceil_mode", 0))
    sizes = [onnx_pool_size(Window(s, k, st, d, pb, pe), ceil)
             for s, k, st, d, (pb, pe) in zip(in_shape[2:], kernel, strides, dilations, pads)]
    return (*in_shape[:2], *sizes)
