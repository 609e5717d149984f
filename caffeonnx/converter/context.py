"""The graph under construction and the view of it that a layer handler gets.

Conventions every handler relies on:
- initializers are exactly Caffe's param blobs (same shape, same bytes); any other
  constant is a `Constant` node, so the initializer count is the param count;
- shapes are tracked concretely (Caffe always knows them) while the emitted ops stay
  batch-agnostic, so the batch dimension can be dynamic in the ONNX graph.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from caffeonnx.converter.caffe_io import Blob
from caffeonnx.converter.fillers import fill
from caffeonnx.converter.params import Param, ParamTable, shape_string
from caffeonnx.errors import LayerError, WeightsError
from caffeonnx.fileio import physical_memory
from caffeonnx.proto import caffe_pb2

Shape = tuple[int, ...]

_INT_MAX = 2**31 - 1  # Caffe's limit on a blob's count


_FILL_BUDGET = physical_memory() // 2

# Opset from which each reduction takes `axes` as an input instead of an attribute.
_REDUCE_AXES_INPUT_SINCE = {"ReduceSum": 13, "ReduceMean": 18, "ReduceL1": 18, "ReduceSumSquare": 18}


@dataclass
class ConvertOptions:
    """Options of one Caffe -> ONNX conversion (passed around, never global)."""

    opset: int = 21
    batch: int | None = None  # fix the batch dimension; None keeps it dynamic
    all_blobs: bool = False  # every Caffe blob becomes a graph output
    fp16: bool = False  # store weights as float16 (computation stays float32)
    phase: int = caffe_pb2.TEST
    stages: tuple[str, ...] = ()
    level: int = 0
    input_shapes: dict[str, Shape] = field(default_factory=dict)
    seed: int = 0  # for filler initialisation when there is no caffemodel
    init_missing: bool = False  # layers absent from the caffemodel use their fillers
    # PriorBox tops as constants (they depend only on the sizes), or computed from the bottoms' run-time
    # shapes, for a graph whose input size is made symbolic after conversion
    fold_priors: bool = True


def _claim(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`... whichever is free; marks it taken."""
    name, k = base, 1
    while name in taken:
        name = f"{base}_{k}"
        k += 1
    taken.add(name)
    return name


class GraphBuilder:
    """Nodes, initializers and value shapes of the ONNX graph being built."""

    def __init__(self, options: ConvertOptions, source: str) -> None:
        self.options = options
        self.source = source
        self.nodes: list[NodeProto] = []
        self.params = ParamTable(source)
        self.shapes: dict[str, Shape] = {}
        self.dtypes: dict[str, int] = {}
        self.inputs: list[tuple[str, Shape, int]] = []
        # graph input -> its batch axis where that is not 0 (time-major bottoms of LSTM/RNN: (T, N, ...))
        self.batch_axes: dict[str, int] = {}
        self._names: set[str] = set()
        self._node_names: set[str] = set()
        self._casts: dict[str, str] = {}
        self.rng = np.random.default_rng(options.seed)
        self.filled_bytes = 0  # weights made by fillers so far

    def take_fill_budget(self, nbytes: int) -> bool:
        """Count `nbytes` of filler-made weights; False once they pass half of this machine's memory."""
        self.filled_bytes += nbytes
        return self.filled_bytes <= _FILL_BUDGET

    def reserve(self, name: str) -> None:
        """Mark a value name as taken (Caffe blob names are reserved up front)."""
        self._names.add(name)

    def unique(self, base: str) -> str:
        """A value name not used yet, derived from `base`."""
        return _claim(base, self._names)

    def unique_node(self, base: str) -> str:
        """A node name not used yet, derived from `base`."""
        return _claim(base, self._node_names)

    def add_node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs: object) -> NodeProto:
        node = helper.make_node(op, list(inputs), list(outputs), name=self.unique_node(name), **attrs)
        self.nodes.append(node)
        return node

    def param_value(self, param: Param) -> str:
        """The float32 value of a param: the initializer, or its Cast when stored as fp16."""
        if not self.options.fp16:
            return param.name
        if param.name not in self._casts:
            out = self.unique(f"{param.name}/fp32")
            self.add_node("Cast", [param.name], [out], f"{param.name}/cast", to=TensorProto.FLOAT)
            self._casts[param.name] = out
        return self._casts[param.name]


class LayerContext:
    """What a handler sees of one Caffe layer: its inputs, outputs, params and graph."""

    def __init__(
        self,
        builder: GraphBuilder,
        layer: caffe_pb2.LayerParameter,
        inputs: list[str],
        outputs: list[str],
        blobs: list[Blob] | None,
        weights_source: str | None,
        position: int = 0,
    ) -> None:
        self.builder = builder
        self.layer = layer
        self.position = position  # where the layer stands in the net: its identity (names may repeat)
        self.name = layer.name
        self.type = layer.type
        self.inputs = inputs
        self.input_shapes: list[Shape] = [builder.shapes[i] for i in inputs]
        self.outputs = outputs
        self.options = builder.options
        self._blobs = blobs
        self._weights_source = weights_source
        self.params_declared = 0
        self._first_node = True

    # --- errors -----------------------------------------------------------------
    def error(self, message: str) -> LayerError:
        """A LayerError naming this layer (raise it)."""
        return LayerError(self.name, self.type, message)

    def check_count(self, shape: Sequence[int], what: str) -> None:
        """Refuse a blob of more than INT_MAX values before anything of that size is made (Caffe's Blob::Reshape).

        Hostile or mistyped sizes (a num_output or input dim of 10^12) would otherwise have a
        filler or a constant try to allocate terabytes.
        """
        count = math.prod(int(d) for d in shape)
        if count > _INT_MAX:
            raise self.error(f"{what} of shape {list(shape)} would hold {count:,} values: blob size exceeds INT_MAX "
                             f"({_INT_MAX:,}), as Caffe refuses too; check num_output and the input shape")

    def axis(self, axis: int, ndim: int, what: str = "axis") -> int:
        """Caffe's CanonicalAxisIndex: negative axes count from the end."""
        if not -ndim <= axis < ndim:
            raise self.error(f"{what} {axis} is out of range for a {ndim}-D input")
        return axis % ndim

    # --- params -----------------------------------------------------------------
    def param(
        self,
        index: int,
        shape: Sequence[int],
        role: str,
        filler: caffe_pb2.FillerParameter,
        default_spec: caffe_pb2.ParamSpec | None = None,
        forced: caffe_pb2.ParamSpec | None = None,
    ) -> str:
        """Declare learnable blob `index` of this layer; returns the value to use in nodes.

        `default_spec` stands in for a ParamSpec the prototxt does not give (a layer's
        built-in default, e.g. BatchNorm's lr_mult 0), without editing the net.  The fields
        set in `forced` replace the prototxt's, for a layer whose setup rewrites its own
        ParamSpecs whatever the prototxt says (PSPNet's BN: lr_mult 0 on its statistics).
        """
        shape = tuple(int(d) for d in shape)
        if index != self.params_declared:
            raise RuntimeError(f"{self.type} handler declared param {index} out of order")
        self.params_declared += 1
        spec = self.layer.param[index] if index < len(self.layer.param) else default_spec
        if forced is not None:
            merged = caffe_pb2.ParamSpec()
            if spec is not None:
                merged.CopyFrom(spec)
            merged.MergeFrom(forced)
            spec = merged
        self.check_count(shape, f"param blob {index}")
        if self._blobs is None and not self.builder.take_fill_budget(math.prod(shape) * 4):
            raise self.error(f"filling param blob {index} {list(shape)} brings the net's filler-made weights to "
                             f"{self.builder.filled_bytes / 2**30:.1f} GiB, over half of this machine's memory "
                             f"({_FILL_BUDGET * 2 / 2**30:.1f} GiB); pass the caffemodel, or check num_output and "
                             "the input shape")
        data = self._blob_data(index, shape, filler)
        param = self.builder.params.add(
            self.name, self.position, index, spec, shape, data, f"{self.name}.{role}", self.builder._names,
            self._weights_source if self._blobs is not None else None,
        )
        self.builder.reserve(param.name)
        value = self.builder.param_value(param)
        if param.shape != shape:  # PERMISSIVE sharing: same count, this layer's own shape
            value = self.node("Reshape", [value, self.const(np.array(shape, dtype=np.int64), "shape")])
        return value

    def _blob_data(self, index: int, shape: Shape, filler: caffe_pb2.FillerParameter) -> np.ndarray:
        if self._blobs is None:
            return fill(filler, shape, self.builder.rng)
        if index >= len(self._blobs):
            raise WeightsError(
                f"{self._weights_source}: layer {self.name!r} has {len(self._blobs)} blob(s) but the "
                f"prototxt's {self.type} needs at least {index + 1} (Incompatible number of blobs for "
                f"layer {self.name}); is this caffemodel from another net?"
            )
        blob = self._blobs[index]
        data = blob.data
        if tuple(data.shape) != shape:
            legacy_ok = blob.legacy_shape and len(shape) <= 4 and (1,) * (4 - len(shape)) + shape == tuple(data.shape)
            if not legacy_ok:
                raise WeightsError(
                    f"{self._weights_source}: Cannot copy param {index} weights from layer '{self.name}'; "
                    f"shape mismatch.  Source param shape is {shape_string(tuple(data.shape))}; target "
                    f"param shape is {shape_string(shape)}. Is this caffemodel from another net? To learn "
                    "this layer's parameters from scratch, rename the layer."
                )
            data = data.reshape(shape)
        return data

    def finish(self) -> None:
        """Check blob and param-spec counts once the handler has run (as Caffe does)."""
        if len(self.layer.param) > self.params_declared:
            raise self.error(
                f"Too many params specified for layer: {len(self.layer.param)} param specs but the layer "
                f"has {self.params_declared} learnable blob(s)"
            )
        if self._blobs is not None and len(self._blobs) != self.params_declared:
            raise WeightsError(
                f"{self._weights_source}: Incompatible number of blobs for layer {self.name}: the caffemodel "
                f"has {len(self._blobs)}, the prototxt's {self.type} needs {self.params_declared}; is this "
                "caffemodel from another net?"
            )

    # --- nodes ------------------------------------------------------------------
    def node(
        self,
        op: str,
        inputs: Sequence[str],
        outputs: Sequence[str] | int | None = None,
        **attrs: object,
    ) -> str:
        """Emit an ONNX node; returns its (first) output name.

        `outputs` may be explicit names (a layer's tops) or a count of fresh names.
        """
        if outputs is None or isinstance(outputs, int):
            n = 1 if outputs is None else outputs
            outs = [self.builder.unique(f"{self.name}/{op}") for _ in range(n)]
        else:
            outs = list(outputs)
        name = self.name if self._first_node else f"{self.name}/{op}"
        self._first_node = False
        self.builder.add_node(op, inputs, outs, name, **attrs)
        return outs[0]

    def node_outputs(self, op: str, inputs: Sequence[str], count: int, **attrs: object) -> list[str]:
        """Emit a node with `count` fresh outputs and return all of them."""
        outs = [self.builder.unique(f"{self.name}/{op}") for _ in range(count)]
        self.node(op, inputs, outs, **attrs)
        return outs

    def const(self, value: np.ndarray | float | int | Sequence[int], hint: str = "const") -> str:
        """A Constant node (not an initializer: those are reserved for Caffe params)."""
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        out = self.builder.unique(f"{self.name}/{hint}")
        self.builder.add_node("Constant", [], [out], f"{self.name}/{hint}", value=numpy_helper.from_array(arr, out))
        return out

    def reduce(
        self, op: str, x: str, axes: Sequence[int] | None = None, output: str | None = None, keepdims: int = 0
    ) -> str:
        """ReduceSum/Mean/L1/SumSquare over `axes` (all when None), as an input or an attribute per the opset."""
        if axes is None:
            return self.node(op, [x], [output] if output else None, keepdims=keepdims)
        if self.options.opset >= _REDUCE_AXES_INPUT_SINCE[op]:
            axes_value = self.const(np.array(list(axes), dtype=np.int64), "axes")
            return self.node(op, [x, axes_value], [output] if output else None, keepdims=keepdims)
        return self.node(op, [x], [output] if output else None, axes=list(axes), keepdims=keepdims)

    def reshape(self, x: str, in_shape: Shape, out_shape: Shape, output: str | None = None) -> str:
        """Reshape keeping the batch dimension symbolic where it is carried through."""
        dims = list(out_shape)
        prefix = 0
        while prefix < min(len(in_shape), len(out_shape)) and in_shape[prefix] == out_shape[prefix]:
            prefix += 1
        for i in range(prefix):
            dims[i] = 0  # copy the input's dimension (allowzero=0 semantics)
        if prefix == 0 and self.options.batch is None and dims and in_shape and math.prod(out_shape[1:]) > 0:
            dims[0] = -1  # batch folded elsewhere: let ONNX infer it
        shape = self.const(np.array(dims, dtype=np.int64), "shape")
        return self.node("Reshape", [x, shape], [output] if output else None)

    # --- shapes and graph inputs ------------------------------------------------
    def set_output_shape(self, index: int, shape: Sequence[int], dtype: int = TensorProto.FLOAT) -> None:
        """Record the Caffe shape of top `index` (handlers must set every top)."""
        self.check_count(shape, f"top {self.layer.top[index]!r}")
        self.builder.shapes[self.outputs[index]] = tuple(int(d) for d in shape)
        self.builder.dtypes[self.outputs[index]] = dtype

    def graph_input(self, index: int, shape: Sequence[int], dtype: int = TensorProto.FLOAT) -> None:
        """Make top `index` a graph input (data layers); --batch overrides dim 0."""
        shape = tuple(int(d) for d in shape)
        override = self.options.input_shapes.get(self.layer.top[index])
        if override is not None:
            shape = tuple(override)
        elif self.options.batch is not None and shape:
            shape = (self.options.batch, *shape[1:])
        if any(d <= 0 for d in shape):
            raise self.error(
                f"input {self.layer.top[index]!r} has no fixed shape ({list(shape)}); give one with "
                f"--input-shape {self.layer.top[index]}=N,C,H,W"
            )
        self.builder.inputs.append((self.outputs[index], shape, dtype))
        self.set_output_shape(index, shape, dtype)
