"""The Caffe net under construction and the view of it that an emitter gets.

Conventions every emitter relies on:
- a node's outputs become Caffe blobs of the same names (so graph outputs keep theirs);
  intermediate blobs an emitter needs come from `ctx.temp()`;
- params are appended to a layer in Caffe's blob order with `ctx.param()`, naming the
  initializer they are a copy of; after all nodes are written, an initializer stored
  by several layers in the same role becomes one shared `param { name }` on each;
- constants never become blobs: an emitter reads them with `ctx.const()` and folds
  them into layer params or fields.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, helper

from caffeonnx.converter.foreign.prepare import Const, PreparedGraph, Shape
from caffeonnx.errors import LayerError, UnsupportedError
from caffeonnx.proto import caffe_pb2

# Layer types and fields stock BVLC Caffe 1.0 lacks; written only with extensions enabled.  Clip and
# Swish are BVLC master's; the rest are forks' (`--target` refuses them for a Caffe without them).
EXTENSION_LAYERS = frozenset({"Permute", "Clip", "Swish", "ReLU6", "HardSwish", "HardSigmoid", "PixelShuffle"})


@dataclass(frozen=True)
class ForeignOptions:
    """Options of one foreign ONNX -> Caffe conversion."""

    extensions: bool = False  # allow layer types/fields newer than BVLC Caffe 1.0


@dataclass(frozen=True)
class ParamUse:
    """One param blob a layer stores: where it is, and which initializer it copies in which role."""

    layer: caffe_pb2.LayerParameter
    index: int
    source: str | None  # initializer whose elements (same order) the blob holds
    role: str | None  # 'weight', 'bias', 'scale'...; None: never shared (statistics, fixed constants)


class CaffeBuilder:
    """Layers, blobs and params of the Caffe net being written."""

    def __init__(self, graph: PreparedGraph, options: ForeignOptions) -> None:
        self.graph = graph
        self.options = options
        self.net = caffe_pb2.NetParameter(name=graph.name or "onnx_net")
        self.blobs: dict[str, list[np.ndarray]] = {}
        self.values: dict[str, str] = {}  # ONNX value -> the Caffe blob holding it
        self.absorbed: set[str] = set()  # nodes another node's emitter already wrote
        self._uses: list[ParamUse] = []
        self.onnx_values = {v for n in graph.nodes for v in (*n.input, *n.output) if v}
        self.onnx_values.update(name for name, _ in graph.inputs)
        self._blob_names = self.onnx_values | set(graph.consts)
        self._layer_names: set[str] = set()
        self.users: dict[str, list[NodeProto]] = defaultdict(list)
        for node in graph.nodes:
            for name in dict.fromkeys(node.input):
                self.users[name].append(node)

    def unique_blob(self, base: str) -> str:
        """A blob name not used by the ONNX graph nor by earlier layers."""
        name, k = base, 1
        while name in self._blob_names:
            name = f"{base}_{k}"
            k += 1
        self._blob_names.add(name)
        return name

    def add_layer(self, layer_type: str, name: str, bottoms: Sequence[str],
                  tops: Sequence[str]) -> caffe_pb2.LayerParameter:
        """Append a layer (its name made unique) and return it for its fields to be set."""
        unique, k = name, 1
        while unique in self._layer_names:
            unique = f"{name}_{k}"
            k += 1
        self._layer_names.add(unique)
        return self.net.layer.add(name=unique, type=layer_type, bottom=list(bottoms), top=list(tops))

    def add_param(self, layer: caffe_pb2.LayerParameter, array: np.ndarray, source: str | None,
                  role: str | None) -> None:
        """Append `array` as the layer's next blob, recording the initializer it copies."""
        stored = self.blobs.setdefault(layer.name, [])
        self._uses.append(ParamUse(layer, len(stored), source, role))
        stored.append(np.array(array, dtype=np.float32, order="C"))  # copies; keeps 0-axis blobs 0-axis

    def add_input(self, name: str, shape: Shape) -> None:
        """An Input layer for one graph input."""
        layer = self.add_layer("Input", name, [], [name])
        layer.input_param.shape.add(dim=list(shape))
        self.values[name] = name

    def finish(self) -> None:
        """Name graph outputs that are aliases (Split), share params, and check the extension policy."""
        for name in self.graph.outputs:
            if self.values[name] != name:
                self.add_layer("Split", name, [self.values[name]], [name])
                self.values[name] = name
        self._share_params()
        if not self.options.extensions:
            used = [(lay.name, lay.type) for lay in self.net.layer
                    if lay.type in EXTENSION_LAYERS or lay.pooling_param.HasField("round_mode")]
            if used:
                raise RuntimeError(f"emitters wrote non-Caffe-1.0 layers without extensions: {used}")

    def _share_params(self) -> None:
        """One `param { name }` per initializer stored by several layers in the same role."""
        groups: dict[tuple[str, str], list[ParamUse]] = defaultdict(list)
        for use in self._uses:
            if use.source is not None and use.role is not None:
                groups[(use.source, use.role)].append(use)
        for (source, _), uses in groups.items():
            arrays = [self.blobs[u.layer.name][u.index] for u in uses]
            if len({u.layer.name for u in uses}) < 2 or np.all(arrays[0] == arrays[0].flat[0]):
                continue  # one user, or a constant array an exporter merely deduplicated
            same_shape = all(a.shape == arrays[0].shape for a in arrays)
            for use in uses:
                while len(use.layer.param) <= use.index:
                    use.layer.param.add()
                spec = use.layer.param[use.index]
                spec.name = source
                if not same_shape:
                    spec.share_mode = caffe_pb2.ParamSpec.PERMISSIVE


class NodeContext:
    """What an emitter sees of one ONNX node: attributes, constant and blob inputs, output shapes."""

    def __init__(self, builder: CaffeBuilder, node: NodeProto) -> None:
        self.builder = builder
        self.node = node
        self.name = node.name
        self.op = node.op_type
        self.opset = builder.graph.opset
        self.options = builder.options
        self.attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self._layers = 0

    # --- errors -------------------------------------------------------------------
    def error(self, message: str) -> LayerError:
        """A LayerError naming this node (raise it): the node's attributes or inputs are invalid."""
        return LayerError(self.name, self.op, message)

    def unsupported(self, message: str) -> UnsupportedError:
        """An UnsupportedError naming this node (raise it): valid ONNX that Caffe layers cannot express."""
        return UnsupportedError(f"node {self.name!r} ({self.op}): {message}")

    # --- inputs -------------------------------------------------------------------
    def attr(self, name: str, default: object = None) -> object:
        """An attribute value (strings decoded), or `default` when absent."""
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def has_input(self, index: int) -> bool:
        """Whether optional input `index` is given."""
        return index < len(self.node.input) and bool(self.node.input[index])

    def const(self, index: int) -> Const | None:
        """Input `index` when it is a constant (None when it is computed or absent)."""
        if not self.has_input(index):
            return None
        return self.builder.graph.consts.get(self.node.input[index])

    def blob(self, index: int) -> str:
        """The Caffe blob of computed input `index` (a constant here is an error)."""
        name = self.node.input[index] if self.has_input(index) else ""
        if not name:
            raise self.error(f"input {index} is missing")
        if name in self.builder.graph.consts:
            raise self.unsupported(
                f"input {index} ({name!r}) is a constant where Caffe needs a computed blob; Caffe has no constant "
                "blobs (only layer params)"
            )
        return self.builder.values[name]

    def shape(self, index: int) -> Shape:
        """Shape of input `index` (computed or constant)."""
        c = self.const(index)
        return tuple(c.value.shape) if c is not None else self.builder.graph.shapes[self.node.input[index]]

    def out_shape(self, index: int = 0) -> Shape:
        """Shape of output `index` (ONNX shape inference, with ONNX Runtime's pool rule)."""
        return self.builder.graph.shapes[self.node.output[index]]

    def output(self, index: int = 0) -> str:
        """The ONNX name of output `index`, which is also its Caffe blob name."""
        return self.node.output[index]

    # --- writing layers -----------------------------------------------------------
    def temp(self, hint: str) -> str:
        """A fresh blob name for an intermediate result of this node."""
        return self.builder.unique_blob(f"{self.name}/{hint}")

    def layer(self, layer_type: str, bottoms: Sequence[str], tops: Sequence[str]) -> caffe_pb2.LayerParameter:
        """Write a Caffe layer: the node's first is named after it, later ones `<node>/<Type>`."""
        name = self.name if self._layers == 0 else f"{self.name}/{layer_type}"
        self._layers += 1
        layer = self.builder.add_layer(layer_type, name, bottoms, tops)
        for top in tops:
            if top in self.builder.onnx_values:
                self.builder.values[top] = top
        return layer

    def param(self, layer: caffe_pb2.LayerParameter, array: np.ndarray, role: str | None,
              source: str | None = None) -> None:
        """Append a param blob to `layer`; `source` names the initializer it copies (for sharing)."""
        self.builder.add_param(layer, array, source, role)

    def fixed_param(self, layer: caffe_pb2.LayerParameter, array: np.ndarray) -> None:
        """Append a constant blob that training must not change (lr_mult 0, decay_mult 0, never shared)."""
        while len(layer.param) < len(self.builder.blobs.get(layer.name, [])):
            layer.param.add()
        layer.param.add(lr_mult=0.0, decay_mult=0.0)
        self.builder.add_param(layer, array, None, None)

    def alias(self, index: int, blob: str) -> None:
        """Output `index` is the same data as `blob` (Identity, Dropout at inference): no layer."""
        self.builder.values[self.node.output[index]] = blob

    # --- looking ahead ------------------------------------------------------------
    def sole_user(self, index: int = 0) -> NodeProto | None:
        """The only node reading output `index`, when there is exactly one and it is no graph output."""
        name = self.node.output[index]
        users = self.builder.users.get(name, [])
        if len(users) != 1 or name in self.builder.graph.outputs:
            return None
        return users[0]

    def absorb(self, node: NodeProto) -> None:
        """Mark `node` as written by this emitter (it is skipped later)."""
        self.builder.absorbed.add(node.name)
