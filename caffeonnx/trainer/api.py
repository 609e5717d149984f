"""`caffeonnx.train(...)`: `caffeonnx train` as a function taking protobuf objects as well as paths.

The trainer reads files, as Caffe does; objects (a SolverParameter, a NetParameter, an ONNX
ModelProto as initial weights, numpy arrays as samples) are written to a temporary directory
for the run.  Relative paths inside a solver given as an object resolve against the current
directory (Caffe's rule), and its snapshots go to its `snapshot_prefix`, else `./solver`.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from onnx import ModelProto

from caffeonnx.fileio import write_bytes_atomic
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.build import load_solver
from caffeonnx.trainer.session import Progress, Say, TrainOptions, TrainResult, run_training

PathLike = str | os.PathLike[str]
_TRAIN_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param")


def _solver_file(solver: PathLike | caffe_pb2.SolverParameter, net: PathLike | caffe_pb2.NetParameter | None,
                 scratch: Path) -> Path:
    """The solver as a file: the given path when nothing changes, else a written copy with `net` as its train net."""
    if net is None and not isinstance(solver, caffe_pb2.SolverParameter):
        return Path(solver)
    param = caffe_pb2.SolverParameter()
    if isinstance(solver, caffe_pb2.SolverParameter):
        param.CopyFrom(solver)
        prefix = Path.cwd() / "solver"
    else:
        param.CopyFrom(load_solver(solver))
        prefix = Path(solver).with_suffix("")  # where `caffeonnx train SOLVER` would snapshot
    if net is not None:
        for name in _TRAIN_NET_FIELDS:
            param.ClearField(name)
        if isinstance(net, caffe_pb2.NetParameter):
            param.net_param.CopyFrom(net)
        else:
            param.net = str(Path(net).resolve())
    if not param.snapshot_prefix:
        param.snapshot_prefix = str(prefix)
    path = scratch / "solver.prototxt"
    path.write_text(text_format.MessageToString(param))
    return path


def _samples(value: PathLike | Mapping[str, np.ndarray] | None, scratch: Path, name: str) -> str | None:
    """A --data spec: a path or `blob=path,...` as given, arrays (one per input blob) as a written .npz."""
    if value is None or isinstance(value, str | os.PathLike):
        return None if value is None else str(value)
    path = scratch / f"{name}.npz"
    np.savez(path, **{blob: np.asarray(arr) for blob, arr in value.items()})
    return str(path)


def train(
    solver: PathLike | caffe_pb2.SolverParameter,
    *,
    net: PathLike | caffe_pb2.NetParameter | None = None,
    weights: PathLike | ModelProto | None = None,
    data: PathLike | Mapping[str, np.ndarray] | None = None,
    test_data: PathLike | Mapping[str, np.ndarray] | None = None,
    say: Say = print,
    progress: Progress | None = None,
    **options: object,
) -> TrainResult:
    """Train as `caffeonnx train` does; returns the TrainResult (iterations, tests, snapshots, files written).

    `net` replaces the solver's train net; `weights` is a .caffemodel/.onnx path or a ModelProto written by
    caffeonnx; `data`/`test_data` are --data specs or {blob: array}; other keywords are TrainOptions fields
    (max_iter, output, log, device, threads, wta, stacked, pictures, ...).
    """
    with tempfile.TemporaryDirectory(prefix="caffeonnx-train-") as tmp:
        scratch = Path(tmp)
        if isinstance(weights, ModelProto):
            initial = scratch / "weights.onnx"
            write_bytes_atomic(initial, weights.SerializeToString())
        else:
            initial = Path(weights) if weights is not None else None
        opts = TrainOptions(_solver_file(solver, net, scratch), weights=initial, data=_samples(data, scratch, "data"),
                            test_data=_samples(test_data, scratch, "test_data"), **options)  # type: ignore[arg-type]
        return run_training(opts, say, progress)
