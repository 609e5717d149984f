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
