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
  {"name", "type", "bottoms": [ONNX values], "tops": [ONNX values], "params": [initializers]}.
- `caffe.params`: JSON list, one entry per initializer: {"name", "caffe_name",
  "shape", "lr_mult", "decay_mult", "share_mode", "users": [[layer, blob index]],
  "user_shapes": [[layer, blob index, shape]] for users viewing it with another shape}.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import text_format
from onnx import ModelProto

from caffeonnx.converter.params import ParamTable
from caffeonnx.proto import caffe_pb2

FORMAT = "1"
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
            "users": [[layer, index] for layer, index, _ in p.users],
            # Users that view the blob with another shape of the same count (PERMISSIVE sharing).
            "user_shapes": [[layer, index, list(shape)] for layer, index, shape in p.users if shape != p.shape],
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
    """The per-layer records of a caffeonnx model ([] for foreign ONNX)."""
    raw = read_metadata(model).get(KEY_LAYERS)
    return [LayerRecord(**r) for r in json.loads(raw)] if raw else []


def param_records(model: ModelProto) -> list[dict]:
    """The per-initializer param records of a caffeonnx model ([] for foreign ONNX)."""
    raw = read_metadata(model).get(KEY_PARAMS)
    return json.loads(raw) if raw else []


def net_state(model: ModelProto) -> caffe_pb2.NetState | None:
    """The NetState a caffeonnx model was converted with (None for foreign ONNX or older models)."""
    text = read_metadata(model).get(KEY_STATE)
    return None if text is None else text_format.Parse(text, caffe_pb2.NetState())


def input_shapes(model: ModelProto) -> dict[str, list[int]]:
    """The Caffe shape each graph input was converted with ({} for foreign ONNX or older models)."""
    raw = read_metadata(model).get(KEY_INPUT_SHAPES)
    return json.loads(raw) if raw else {}
