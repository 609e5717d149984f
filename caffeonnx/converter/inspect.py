"""`caffeonnx inspect`: what a prototxt, caffemodel or ONNX file holds, sharing included.

The question it answers is "which blobs are learnable, who uses each, and how many
values are there really": a shared Caffe param is one blob (counted once), although
a caffemodel stores it once per layer that uses it.

Where the facts come from:
- prototxt: converted with fillers (the converter's own shape inference and sharing
  checks), read back through the metadata it writes;
- caffemodel: the layers and blobs stored in it, grouped by param name with the
  converter's ParamTable (so Caffe's sharing rules and wording apply);
- ONNX written by caffeonnx: its metadata (see converter/metadata.py);
- foreign ONNX: nodes are the layers and an initializer read by several nodes is shared.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, helper
from rich.table import Table

from caffeonnx.converter import forks, metadata
from caffeonnx.converter.caffe_io import _is_text
from caffeonnx.converter.caffe_to_onnx import convert_net, load_net, load_weights
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.onnx_io import load_onnx
from caffeonnx.converter.params import ParamTable
from caffeonnx.proto import caffe_pb2

Dim = int | str  # a symbolic ONNX dimension (the dynamic batch "N") is a string
CAFFE_ITEMSIZE = 4  # Caffe stores every blob as float32


@dataclass
class ParamUser:
    """One layer's use of a param blob: its blob index there and the shape it sees."""

    layer: str
    index: int
    shape: list[int]
    position: int  # the layer's position in the net (names may repeat)


@dataclass
class ParamInfo:
    """One learnable blob (one ONNX initializer) and every layer that uses it."""

    name: str  # initializer name (the Caffe param name when it has one)
    caffe_name: str  # ParamSpec.name, "" when unnamed (never shared)
    shape: list[int]
    count: int  # values in the blob
    bytes: int  # bytes of one copy in this file's dtype
    users: list[ParamUser]
    lr_mult: float | None  # None for foreign ONNX (no Caffe training semantics)
    decay_mult: float | None
    share_mode: str | None

    @property
    def shared(self) -> bool:
        """Used by more than one layer (Caffe: one blob, several owners' views)."""
        return len({u.position for u in self.users}) > 1


@dataclass
class LayerInfo:
    """One layer (Caffe) or node (foreign ONNX): connections, top shapes, param blobs."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    top_shapes: list[list[Dim] | None]  # None where unknown; [] for a caffemodel (no shapes stored)
    params: list[str]  # ParamInfo names in the layer's blob order
    param_shapes: list[list[int]]  # the shape this layer sees for each of them
    fork: str = ""  # the Caffe fork (FORKS key) a non-BVLC layer needs; "" for BVLC's own and foreign ONNX


@dataclass
class Inspection:
    """Everything `caffeonnx inspect` reports about one file."""

    path: str
    format: str  # "prototxt" | "caffemodel" | "onnx"
    producer: str  # "caffe", "caffeonnx" or the foreign ONNX producer
    net: str
    phase: str | None  # the converted phase (prototxt, caffeonnx ONNX)
    layers: list[LayerInfo]
    params: list[ParamInfo]
    unique_param_count: int = field(init=False)
    unique_param_bytes: int = field(init=False)
    per_layer_param_count: int | None = field(init=False)  # a copy per using layer, as a caffemodel stores
    per_layer_param_bytes: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.unique_param_count = sum(p.count for p in self.params)
        self.unique_param_bytes = sum(p.bytes for p in self.params)
        if self.producer == "caffe" or self.producer == "caffeonnx":
            copies = sum(p.count * len({u.position for u in p.users}) for p in self.params)
            self.per_layer_param_count, self.per_layer_param_bytes = copies, copies * CAFFE_ITEMSIZE
        else:
            self.per_layer_param_count = self.per_layer_param_bytes = None

    @property
    def shared_params(self) -> list[ParamInfo]:
        """The params used by more than one layer."""
        return [p for p in self.params if p.shared]

    def to_dict(self) -> dict:
        """A JSON-ready document (the `--json` output)."""
        doc = asdict(self)
        for p, d in zip(self.params, doc["params"]):
            d["shared"] = p.shared
        doc["shared_params"] = [p.name for p in self.shared_params]
        return doc

    def to_json(self) -> str:
        """`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2)


def detect_format(path: Path) -> str:
    """prototxt, caffemodel or onnx: by suffix, else by content (text, ONNX's leading ir_version key)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".caffemodel":
        return "caffemodel"
    if suffix in (".prototxt", ".pbtxt"):
        return "prototxt"
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if _is_text(head):
        return "prototxt"
    return "onnx" if head[:1] == b"\x08" else "caffemodel"  # ModelProto field 1 is a varint; NetParameter's a string


def inspect_file(path: str | os.PathLike[str], options: ConvertOptions | None = None) -> Inspection:
    """Inspect a prototxt (converted with fillers under `options`), a caffemodel or an ONNX model."""
    p = Path(path)
    fmt = detect_format(p) if p.is_file() else ("onnx" if p.suffix.lower() == ".onnx" else "prototxt")
    if fmt == "onnx":
        return inspect_onnx(load_onnx(p), str(p))
    if fmt == "caffemodel":
        return _inspect_caffemodel(p)
    return _inspect_prototxt(p, options or ConvertOptions())


def _inspect_prototxt(path: Path, options: ConvertOptions) -> Inspection:
    """Convert with fillers: Caffe's concrete blob shapes and sharing, read back from the metadata."""
    net = load_net(path)
    converted = convert_net(net, None, options, source=str(path))
    shapes: dict[str, list[Dim]] = {k: list(v) for k, v in converted.shapes.items()}
    return _from_caffeonnx_metadata(converted.model, shapes, str(path), "prototxt", "caffe", CAFFE_ITEMSIZE)


def inspect_onnx(model: ModelProto, path: str = "<model>") -> Inspection:
    """Inspect an ONNX model: caffeonnx metadata when present, else initializers shared between nodes."""
    shapes = _onnx_value_shapes(model)
    if metadata.KEY_PARAMS in metadata.read_metadata(model):
        return _from_caffeonnx_metadata(model, shapes, path, "onnx", "caffeonnx", None)
    return _inspect_foreign(model, shapes, path)


def _from_caffeonnx_metadata(
    model: ModelProto, shapes: dict[str, list[Dim]], path: str, fmt: str, producer: str, itemsize: int | None
) -> Inspection:
    """Layers and params from the metadata caffeonnx writes; `itemsize` None: the initializers' own dtype."""
    meta = metadata.read_metadata(model)
    net = metadata.caffe_net_from(model) or caffe_pb2.NetParameter()
    phase = meta.get(metadata.KEY_PHASE)
    sizes = {t.name: _tensor_itemsize(t.data_type) for t in model.graph.initializer}
    records = metadata.param_records(model)
    params = _params_from_records(records, lambda name: itemsize or sizes.get(name, CAFFE_ITEMSIZE))
    layers = []
    for rec in metadata.layer_records(model):
        # Records point at their layer by position: the stored net holds every phase's layers, names may repeat.
        caffe = net.layer[rec.index] if 0 <= rec.index < len(net.layer) else None
        bottoms = list(caffe.bottom) if caffe is not None else rec.bottoms
        tops = list(caffe.top) if caffe is not None else rec.tops
        layers.append(_layer_info(rec.index, rec.name, rec.type, bottoms, tops, [shapes.get(t) for t in rec.tops],
                                  params, caffe))
    return Inspection(path, fmt, producer, net.name, phase, layers, params)


def _params_from_records(records: list[dict], itemsize: Callable[[str], int]) -> list[ParamInfo]:
    """ParamInfo from caffeonnx's `caffe.params` records (users' own shapes from `user_shapes`)."""
    params = []
    for rec in records:
        shape = [int(d) for d in rec["shape"]]
        users = [ParamUser(u.layer, u.index, list(u.shape), u.position) for u in metadata.param_uses(rec)]
        count = math.prod(shape)
        params.append(ParamInfo(
            rec["name"], rec["caffe_name"], shape, count, count * itemsize(rec["name"]), users,
            rec["lr_mult"], rec["decay_mult"], rec["share_mode"],
        ))
    return params


def _layer_info(
    position: int,
    name: str,
    type_: str,
    bottoms: list[str],
    tops: list[str],
    top_shapes: list[list[Dim] | None],
    params: list[ParamInfo],
    layer: caffe_pb2.LayerParameter | None,
) -> LayerInfo:
    """A LayerInfo whose params are those `params` list this layer as a user of, in blob order."""
    mine = sorted((u.index, p.name, u.shape) for p in params for u in p.users if u.position == position)
    fork = forks.fork_of(layer if layer is not None else caffe_pb2.LayerParameter(type=type_))
    return LayerInfo(name, type_, bottoms, tops, top_shapes, [n for _, n, _ in mine], [s for _, _, s in mine],
                     "" if fork == "bvlc" else fork)


def _inspect_caffemodel(path: Path) -> Inspection:
    """Layers as stored; blobs grouped by param name (a shared blob's per-layer copies must agree)."""
    weights = load_weights(path)  # alone: pooling field 13 reads as BVLC's round_mode
    table = ParamTable(str(path))
    for position, layer in enumerate(weights.net.layer):
        for index, blob in enumerate(weights.blobs.get(layer.name, [])):
            spec = layer.param[index] if index < len(layer.param) else None
            shape = tuple(int(d) for d in blob.data.shape)
            table.add(layer.name, position, index, spec, shape, blob.data, f"{layer.name}.blob{index}", set(),
                      str(path))
    records = json.loads(metadata.build_metadata(weights.net, caffe_pb2.TEST, [], table)[metadata.KEY_PARAMS])
    params = _params_from_records(records, lambda _name: CAFFE_ITEMSIZE)
    layers = [
        _layer_info(position, layer.name, layer.type, list(layer.bottom), list(layer.top), [], params, layer)
        for position, layer in enumerate(weights.net.layer)
    ]
    return Inspection(str(path), "caffemodel", "caffe", weights.net.name, None, layers, params)


def _inspect_foreign(model: ModelProto, shapes: dict[str, list[Dim]], path: str) -> Inspection:
    """Foreign ONNX: each top-level node is a layer; an initializer read by several nodes is shared."""
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list[ParamUser]] = {name: [] for name in inits}
    layers = []
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        for index, value in enumerate(node.input):
            if value in inits:
                users[value].append(ParamUser(name, index, [int(d) for d in inits[value].dims], i))
        bottoms = [v for v in node.input if v and v not in inits]
        tops = [v for v in node.output if v]
        layers.append(LayerInfo(
            name, op, bottoms, tops, [shapes.get(t) for t in tops],
            [v for v in node.input if v in inits], [[int(d) for d in inits[v].dims] for v in node.input if v in inits],
        ))
    params = []
    for name, t in inits.items():
        shape = [int(d) for d in t.dims]
        count = math.prod(shape)
        nbytes = count * _tensor_itemsize(t.data_type)
        params.append(ParamInfo(name, "", shape, count, nbytes, users[name], None, None, None))
    return Inspection(path, "onnx", model.producer_name or "unknown", model.graph.name, None, layers, params)


def _tensor_itemsize(data_type: int) -> int:
    """Bytes per element of an ONNX tensor type."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


def _onnx_value_shapes(model: ModelProto) -> dict[str, list[Dim]]:
    """Shapes of every value ONNX shape inference can type (symbolic dims as their names).

    Runs on a light copy: initializers larger than a small constant become typed graph
    inputs, so a large model's weights are not copied through inference.
    """
    light = ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    declared = {vi.name for vi in g.input}
    for t in model.graph.initializer:
        if math.prod(t.dims) <= 64:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        inferred = light  # a model inference cannot type: keep what it declares
    shapes: dict[str, list[Dim]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return shapes


def _shape_text(shape: list[Dim] | None) -> str:
    return "?" if shape is None else ("x".join(str(d) for d in shape) or "scalar")


def renderables(insp: Inspection) -> list[Table | str]:
    """The human-readable report: a header, the layer table, the shared-param table, the totals."""
    header = f"{insp.path}: {insp.format} ({insp.producer}), net {insp.net!r}"
    layers = Table(title=f"{len(insp.layers)} layers" + (f" ({insp.phase})" if insp.phase else ""))
    for col in ("#", "layer", "type", "bottoms", "tops", "top shapes" if insp.format != "caffemodel" else "", "params"):
        if col:
            layers.add_column(col, overflow="fold")
    for i, layer in enumerate(insp.layers):
        kind = f"{layer.type} ({forks.FORKS[layer.fork].name})" if layer.fork else layer.type
        row = [str(i), layer.name, kind, ", ".join(layer.bottoms), ", ".join(layer.tops)]
        if insp.format != "caffemodel":
            row.append(", ".join(_shape_text(s) for s in layer.top_shapes))
        row.append(", ".join(f"{n} {_shape_text(list(s))}" for n, s in zip(layer.params, layer.param_shapes)))
        layers.add_row(*row)
    out: list[Table | str] = [header, layers]
    shared = insp.shared_params
    if shared:
        caffe = shared[0].share_mode is not None  # foreign ONNX has no Caffe training semantics
        table = Table(title=f"{len(shared)} shared params")
        for col in ("param", "shape", "users", *(("lr_mult", "decay_mult", "share_mode") if caffe else ())):
            table.add_column(col, overflow="fold")
        for p in shared:
            users = ", ".join(
                f"{u.layer}[{u.index}]" + (f" as {_shape_text(list(u.shape))}" if u.shape != p.shape else "")
                for u in p.users
            )
            label = p.name if p.caffe_name in ("", p.name) else f"{p.caffe_name} (initializer {p.name})"
            row = [label, _shape_text(list(p.shape)), users]
            table.add_row(*row, *((f"{p.lr_mult:g}", f"{p.decay_mult:g}", str(p.share_mode)) if caffe else ()))
        out.append(table)
    else:
        out.append("no shared params")
    totals = (
        f"parameters: {len(insp.params)} blobs, {insp.unique_param_count:,} values unique "
        f"({insp.unique_param_bytes:,} bytes)"
    )
    if insp.per_layer_param_count is not None:
        where = "on disk (Caffe stores a shared blob once per layer)" if insp.format == "caffemodel" else (
            "in a caffemodel (a shared blob is stored once per layer)"
        )
        totals += f"; {insp.per_layer_param_count:,} values ({insp.per_layer_param_bytes:,} bytes) {where}"
    out.append(totals)
    return out
