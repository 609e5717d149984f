"""From a solver prototxt to a ready Trainer: Caffe's net lookup, NetState, weights and data.

Caffe reads `net`/`train_net` relative to the current directory; so does this, and when
the file is only found beside the solver it says so and uses that one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import numpy_helper

from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_io import Blob, CaffeWeights, read_prototxt
from caffeonnx.converter.caffe_to_onnx import convert_net, load_weights
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.onnx_io import load_onnx
from caffeonnx.converter.upgrade import upgrade_net
from caffeonnx.errors import InputFileError, SolverError, WeightsError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule

_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")


@dataclass
class TrainNet:
    """The TRAIN-phase net a solver names, where it came from, and notes for the user."""

    net: caffe_pb2.NetParameter
    source: str
    state: caffe_pb2.NetState
    notes: list[str] = field(default_factory=list)


def load_solver(path: str | os.PathLike[str]) -> caffe_pb2.SolverParameter:
    """Parse a solver prototxt (file:line:column errors)."""
    return read_prototxt(path, caffe_pb2.SolverParameter)


def resolve_path(name: str, solver_path: Path, what: str, notes: list[str]) -> Path:
    """A path from the solver: relative to the current directory as in Caffe, else beside the solver."""
    direct = Path(name)
    if direct.is_absolute() or direct.exists():
        return direct
    beside = solver_path.parent / name
    if beside.exists():
        notes.append(f"{what} {name!r} is not in the current directory (where Caffe looks); using {str(beside)!r} "
                     "beside the solver")
        return beside
    raise InputFileError(
        f"{solver_path}: {what} {name!r} not found in the current directory ({os.getcwd()}) nor beside the solver "
        f"({str(beside)!r}); fix the path in the solver or run from the directory Caffe would"
    )


def train_net(param: caffe_pb2.SolverParameter, solver_path: str | os.PathLike[str]) -> TrainNet:
    """The train net of a solver (Caffe's Solver::InitTrainNet checks and NetState merge)."""
    path = Path(solver_path)
    given = [f for f in _NET_FIELDS if param.HasField(f)]
    if not given:
        raise SolverError(f"{path}: SolverParameter must specify a train net using one of these fields: "
                          f"{', '.join(_NET_FIELDS)}; add e.g. net: \"train_val.prototxt\"")
    if len(given) > 1:
        raise SolverError(f"{path}: SolverParameter must not contain more than one of these fields specifying a "
                          f"train_net: {', '.join(_NET_FIELDS)} (it has {', '.join(given)}); keep one")
    notes: list[str] = []
    kind = given[0]
    if kind in ("net_param", "train_net_param"):
        net = caffe_pb2.NetParameter()
        net.CopyFrom(getattr(param, kind))
        source = f"{path} ({kind})"
    else:
        net_path = resolve_path(getattr(param, kind), path, kind, notes)
        net = read_prototxt(net_path)
        source = str(net_path)
    upgrade_net(net, source)
    state = caffe_pb2.NetState(phase=caffe_pb2.TRAIN)
    state.MergeFrom(net.state)
    state.MergeFrom(param.train_state)
    return TrainNet(net, source, state, notes)


def weights_from_onnx(path: str | os.PathLike[str]) -> CaffeWeights:
    """A caffeonnx-written .onnx as Caffe weights: each initializer given to every layer that uses it."""
    p = Path(path)
    model = load_onnx(p, what="weights")
    records = metadata.param_records(model)
    net = metadata.caffe_net_from(model)
    if not records or net is None:
        raise WeightsError(f"{p}: this ONNX model was not written by caffeonnx (no caffe.params metadata), so its "
                           "initializers cannot be matched to Caffe layers; pass a .caffemodel")
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    per_layer: dict[str, dict[int, Blob]] = {}
    for rec in records:
        arr = np.asarray(arrays[rec["name"]], dtype=np.float32)
        for use in metadata.param_uses(rec):
            per_layer.setdefault(use.layer, {})[use.index] = Blob(arr.reshape(use.shape))
    blobs = {layer: [by[i] for i in sorted(by)] for layer, by in per_layer.items()}
    return CaffeWeights(path=p, net=net, blobs=blobs)


def read_weights(path: str | os.PathLike[str]) -> CaffeWeights:
    """Initial weights from a .caffemodel or a caffeonnx .onnx (by extension)."""
    return weights_from_onnx(path) if str(path).lower().endswith(".onnx") else load_weights(path)


def build_module(tn: TrainNet, weights: CaffeWeights | None, seed: int, phase: int = caffe_pb2.TRAIN) -> GraphModule:
    """The net of `tn` converted for `phase` as a GraphModule; layers missing from `weights` use their fillers.

    Caffe's CopyTrainedLayersFrom copies the layers it finds and leaves the others as
    initialised; a weights file that matches no layer with params is refused as the wrong file.
    """
    opts = ConvertOptions(phase=phase, level=tn.state.level, stages=tuple(tn.state.stage), init_missing=True,
                          seed=seed)
    converted = convert_net(tn.net, weights, opts, tn.source)
    if weights is not None:
        learnable = list(dict.fromkeys(u.layer for rec in metadata.param_records(converted.model)
                                       for u in metadata.param_uses(rec)))
        missing = [name for name in learnable if name not in weights.blobs]
        if learnable and len(missing) == len(learnable):
            raise WeightsError(f"{weights.path}: none of the layers with params ({', '.join(learnable)}) is in these "
                               "weights; are they from another net?")
        if missing:
            tn.notes.append(f"layers {missing} are not in {weights.path}; they start from their fillers")
    return GraphModule(converted.model, converted.weights, seed=seed)
