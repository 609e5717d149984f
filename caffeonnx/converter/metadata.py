"""What ONNX has no place for, kept in `ModelProto.metadata_props` so a converted
model can return to Caffe and be trained with Caffe's semantics.

Keys (all values are strings):
- `caffeonnx.format`: version of this layout ("1").
- `caffe.net`: the upgraded NetParameter as prototxt text, every phase's layers,
  blobs stripped: layer names and types, param names, lr_mult, decay_mult,
  share_mode, fillers, include/exclude rules, loss_weight, every *_param.
- `caffe.phase`: the phase the graph was converted for (TRAIN or TEST).
- `caffe.state`: the whole NetState the layers were filtered with (phase, level,
  stages) as prototxt text: with the phase alone a staged net cannot be re-filtered.
- `caffe.input_shapes`: JSON {blob: shape}, the Caffe shape each graph input was
  converted with (batch included, after --batch/--input-shape): the ONNX input may
  show a symbolic batch, and shapes given on the command line are nowhere else.
- `caffe.layers`: JSON list, one entry per converted layer in order:
  {"name", "type", "index": position in `caffe.net`'s layer list, "bottoms": [ONNX values],
  "tops": [ONNX values], "params": [initializers]}.
- `caffe.params`: JSON list, one entry per initializer: {"name", "caffe_name",
  "shape", "lr_mult", "decay_mult", "share_mode", "users": [[layer, blob index, position]],
  "user_shapes": [[layer, blob index, shape, position]] for users viewing it with another shape}.

A layer is identified by its POSITION in `caffe.net` (Caffe allows repeated layer
names: its own examples have three layers named `data` and two named `loss`); the
name is kept for messages.  Format "1" files (no positions) are read by resolving each
name to the first converted layer of that name, which is what they meant.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf import text_format
from onnx import ModelProto

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2

if TYPE_CHECKING:  # params.py builds on ParamUse, defined here
    from caffeonnx.converter.params import ParamTable

FORMAT = "2"
KEY_FORMAT = "caffeonnx.format"
KEY_NET = "caffe.net"
KEY_PHASE = "caffe.phase"
KEY_STATE = "caffe.state"
KEY_INPUT_SHAPES = "caffe.input_shapes"
KEY_LAYERS = "caffe.layers"
KEY_PARAMS = "caffe.params"


@dataclass
class LayerRecord:
    """Where one Caffe layer landed in the ONNX graph."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    params: list[str]
    index: int = -1  # position in the stored net's layer list: the layer's identity


@dataclass(frozen=True)
class ParamUse:
    """One layer's use of a learnable blob: which layer (by position), which of its blobs, and its own shape."""

    layer: str  # the layer's name, for messages
    index: int  # blob index within the layer
    shape: tuple[int, ...]
    position: int  # the layer's position in the stored net (its identity)


def net_without_blobs(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """A copy of `net` with every layer's blobs removed."""
    bare = caffe_pb2.NetParameter()
    bare.CopyFrom(net)
    for layer in bare.layer:
        del layer.blobs[:]
    return bare


def build_metadata(
    net: caffe_pb2.NetParameter,
    phase: int,
    layers: list[LayerRecord],
    params: ParamTable,
    *,
    level: int = 0,
    stages: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, str]:
    """The metadata_props entries for a converted net."""
    param_entries = [
        {
            "name": p.name,
            "caffe_name": p.caffe_name,
            "shape": list(p.shape),
            "lr_mult": 1.0 if p.lr_mult is None else p.lr_mult,
            "decay_mult": 1.0 if p.decay_mult is None else p.decay_mult,
            "share_mode": caffe_pb2.ParamSpec.DimCheckMode.Name(p.share_mode),
            "users": [[u.layer, u.index, u.position] for u in p.users],
            # Users that view the blob with another shape of the same count (PERMISSIVE sharing).
            "user_shapes": [[u.layer, u.index, list(u.shape), u.position] for u in p.users if u.shape != p.shape],
        }
        for p in params.params.values()
    ]
    return {
        KEY_FORMAT: FORMAT,
        KEY_NET: text_format.MessageToString(net_without_blobs(net)),
        KEY_PHASE: caffe_pb2.Phase.Name(phase),
        KEY_STATE: text_format.MessageToString(caffe_pb2.NetState(phase=phase, level=level, stage=list(stages))),
        KEY_INPUT_SHAPES: json.dumps({k: list(v) for k, v in (input_shapes or {}).items()}),
        KEY_LAYERS: json.dumps([r.__dict__ for r in layers]),
        KEY_PARAMS: json.dumps(param_entries),
    }


def read_metadata(model: ModelProto) -> dict[str, str]:
    """metadata_props as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def caffe_net_from(model: ModelProto) -> caffe_pb2.NetParameter | None:
    """The Caffe net stored in a model converted by caffeonnx (None for foreign ONNX)."""
    text = read_metadata(model).get(KEY_NET)
    if text is None:
        return None
    return text_format.Parse(text, caffe_pb2.NetParameter())


def layer_records(model: ModelProto) -> list[LayerRecord]:
    """The per-layer records of a caffeonnx model, each with its position in the stored net ([] for foreign ONNX)."""
    raw = read_metadata(model).get(KEY_LAYERS)
    records = [LayerRecord(**r) for r in json.loads(raw)] if raw else []
    if any(r.index < 0 for r in records):
        # Format 1: the records are the layers the stored NetState kept, in order.
        net, state = caffe_net_from(model), net_state(model)
        if net is not None:
            if state is None:
                state = caffe_pb2.NetState(phase=caffe_pb2.Phase.Value(read_metadata(model).get(KEY_PHASE, "TEST")))
            kept = [i for i, layer in enumerate(net.layer) if layer_included(layer, state)]
            for rec, position in zip(records, kept):
                rec.index = position
    return records


def param_records(model: ModelProto) -> list[dict]:
    """The per-initializer param records of a caffeonnx model ([] for foreign ONNX).

    Every entry of "users" is [layer, blob index, position] and of "user_shapes"
    [layer, blob index, shape, position], whatever the file's format.
    """
    raw = read_metadata(model).get(KEY_PARAMS)
    records = json.loads(raw) if raw else []
    if any(len(u) < 3 for r in records for u in r.get("users", [])):
        first: dict[str, int] = {}
        for rec in layer_records(model):
            first.setdefault(rec.name, rec.index)
        for r in records:
            r["users"] = [[u[0], u[1], first.get(u[0], -1)] for u in r.get("users", [])]
            r["user_shapes"] = [[u[0], u[1], u[2], first.get(u[0], -1)] for u in r.get("user_shapes", [])]
    return records


def param_uses(record: dict) -> list[ParamUse]:
    """The users of one param record (from `param_records`), each with its own shape."""
    shape = tuple(int(d) for d in record["shape"])
    views = {(int(u[3]), int(u[1])): tuple(int(d) for d in u[2]) for u in record.get("user_shapes", [])}
    return [ParamUse(str(u[0]), int(u[1]), views.get((int(u[2]), int(u[1])), shape), int(u[2]))
            for u in record.get("users", [])]


def meets_rule(rule: caffe_pb2.NetStateRule, state: caffe_pb2.NetState) -> bool:
    """Caffe's Net::StateMeetsRule."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stage for s in rule.stage):
        return False
    return not any(s in state.stage for s in rule.not_stage)


def layer_included(layer: caffe_pb2.LayerParameter, state: caffe_pb2.NetState) -> bool:
    """Caffe's Net::FilterNet for one layer: any include rule met, else no exclude rule met."""
    if layer.include:
        return any(meets_rule(r, state) for r in layer.include)
    return not any(meets_rule(r, state) for r in layer.exclude)


def net_state(model: ModelProto) -> caffe_pb2.NetState | None:
    """The NetState a caffeonnx model was converted with (None for foreign ONNX or older models)."""
    text = read_metadata(model).get(KEY_STATE)
    return None if text is None else text_format.Parse(text, caffe_pb2.NetState())


def input_shapes(model: ModelProto) -> dict[str, list[int]]:
    """The Caffe shape each graph input was converted with ({} for foreign ONNX or older models)."""
    raw = read_metadata(model).get(KEY_INPUT_SHAPES)
    return json.loads(raw) if raw else {}


_LAYER_KEYS = {"name": str, "type": str, "bottoms": list, "tops": list, "params": list}
_PARAM_KEYS = {"name": str, "shape": list, "users": list}


def _damaged(key: str, what: str) -> CaffeOnnxError:
    return CaffeOnnxError(
        f"metadata_props {key!r} is damaged ({what}); this file was edited or truncated after caffeonnx wrote it: "
        "convert the Caffe net again, or delete the caffe.* and caffeonnx.* metadata to treat it as foreign ONNX"
    )


def validate(model: ModelProto) -> None:
    """Check caffeonnx's metadata once, when a model is opened, so no reader meets a damaged value later.

    Foreign ONNX (no caffeonnx keys) passes untouched.  Every key is parsed and its schema
    checked: the stored net and NetState as Caffe text, the JSON records and their fields,
    positions within the stored net, initializer names that exist.
    """
    meta = read_metadata(model)
    if KEY_NET not in meta and KEY_LAYERS not in meta and KEY_PARAMS not in meta:
        return
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):  # protobuf hands undecodable text back as bytes
            raise _damaged(str(key), "not UTF-8 text")
    try:
        net = text_format.Parse(meta.get(KEY_NET, ""), caffe_pb2.NetParameter())
    except text_format.ParseError as exc:
        raise _damaged(KEY_NET, f"not a Caffe NetParameter: {exc}") from None
    if KEY_PHASE in meta and meta[KEY_PHASE] not in caffe_pb2.Phase.keys():
        raise _damaged(KEY_PHASE, f"{meta[KEY_PHASE]!r} is not TRAIN or TEST")
    if KEY_STATE in meta:
        try:
            text_format.Parse(meta[KEY_STATE], caffe_pb2.NetState())
        except text_format.ParseError as exc:
            raise _damaged(KEY_STATE, f"not a Caffe NetState: {exc}") from None
    layers = _json_list(meta, KEY_LAYERS, _LAYER_KEYS)
    for entry in layers:
        extra = set(entry) - {*_LAYER_KEYS, "index"}
        if extra:
            raise _damaged(KEY_LAYERS, f"layer {entry['name']!r} has unknown field(s) {sorted(extra)}")
        index = entry.get("index", -1)
        if not isinstance(index, int) or index >= len(net.layer) or index < -1:
            raise _damaged(KEY_LAYERS, f"layer {entry['name']!r} points at position {index!r}; the stored net has "
                                       f"{len(net.layer)} layers")
    inits = {t.name for t in model.graph.initializer}
    for entry in _json_list(meta, KEY_PARAMS, _PARAM_KEYS):
        if entry["name"] not in inits:
            raise _damaged(KEY_PARAMS, f"initializer {entry['name']!r} is not in the graph")
        if not all(isinstance(d, int) and d >= 0 for d in entry["shape"]):
            raise _damaged(KEY_PARAMS, f"param {entry['name']!r} has shape {entry['shape']!r}")
        for use in entry["users"]:
            if not (isinstance(use, list) and len(use) in (2, 3) and isinstance(use[0], str)
                    and all(isinstance(v, int) for v in use[1:])):
                raise _damaged(KEY_PARAMS, f"param {entry['name']!r} has user {use!r}, not [layer, blob, position]")
        for view in entry.get("user_shapes", []):
            if not (isinstance(view, list) and len(view) in (3, 4) and isinstance(view[2], list)):
                raise _damaged(KEY_PARAMS, f"param {entry['name']!r} has user shape {view!r}")
    if KEY_INPUT_SHAPES in meta:
        try:
            shapes = json.loads(meta[KEY_INPUT_SHAPES])
        except json.JSONDecodeError as exc:
            raise _damaged(KEY_INPUT_SHAPES, f"not JSON: {exc}") from None
        if not isinstance(shapes, dict) or not all(
                isinstance(v, list) and all(isinstance(d, int) for d in v) for v in shapes.values()):
            raise _damaged(KEY_INPUT_SHAPES, "not a JSON object of blob -> list of dims")


def _json_list(meta: Mapping[str, str], key: str, fields: Mapping[str, type]) -> list[dict]:
    """The JSON list stored under `key`, each entry an object with `fields` of the given types."""
    if key not in meta:
        return []
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise _damaged(key, f"not JSON: {exc}") from None
    if not isinstance(value, list):
        raise _damaged(key, f"a JSON {type(value).__name__}, not a list")
    for entry in value:
        if not isinstance(entry, dict):
            raise _damaged(key, f"an entry is {entry!r}, not an object")
        for field, kind in fields.items():
            if not isinstance(entry.get(field), kind):
                raise _damaged(key, f"an entry's {field!r} is {entry.get(field)!r}, not a {kind.__name__}")
    return value
