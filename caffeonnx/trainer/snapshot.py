"""Snapshots: PREFIX_iter_N.caffemodel / .onnx / .solverstate, and resuming from them.

The .solverstate is Caffe's own SolverState (iter, learned_net, history, current_step),
so `caffe train --snapshot` can resume it too and we can resume Caffe's.  What Caffe
does not store but an exact continuation needs (the smoothed-loss window, the dropout
RNG) goes beside it in PREFIX_iter_N.solverstate.json; without that file a resume is
still exact in weights and updates, only the smoothed loss restarts, as in Caffe.
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from google.protobuf.message import DecodeError

from caffeonnx.converter.caffe_to_onnx import ConvertedModel, load_weights
from caffeonnx.errors import InputFileError, SolverError
from caffeonnx.fileio import atomic_write, write_bytes_atomic
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.loop import SmoothedLoss, Trainer
from caffeonnx.wire import length_delimited

_STATE_HISTORY = 3  # SolverState.history
_BLOB_DATA, _BLOB_SHAPE = 5, 7  # BlobProto.data (packed float), BlobProto.shape


@dataclass
class SnapshotFiles:
    """The files of one snapshot."""

    caffemodel: Path
    onnx: Path
    solverstate: Path

    @property
    def extras(self) -> Path:
        """The trainer's own state beside the Caffe solverstate."""
        return self.solverstate.with_name(self.solverstate.name + ".json")


def snapshot_files(prefix: str | os.PathLike[str], iteration: int) -> SnapshotFiles:
    """Caffe's snapshot names: PREFIX_iter_N.caffemodel and PREFIX_iter_N.solverstate (+ .onnx)."""
    base = f"{prefix}_iter_{iteration}"
    return SnapshotFiles(Path(base + ".caffemodel"), Path(base + ".onnx"), Path(base + ".solverstate"))


def export_onnx(export: ConvertedModel, trainer: Trainer, path: Path) -> None:
    """Write the export graph with the trained values of every initializer it shares with the training net."""
    trained = trainer.module.arrays()
    arrays = {k: trained[k].astype(v.dtype) if k in trained else v for k, v in export.weights.items()}
    ConvertedModel(export.model, arrays).save(path)


def write_solverstate(path: Path, trainer: Trainer, learned_net: str) -> None:
    """Caffe's SolverState, with each history blob streamed from its array."""
    solver = trainer.solver
    head = caffe_pb2.SolverState(iter=solver.iter, learned_net=learned_net, current_step=solver.lr.current_step)
    with atomic_write(path) as fh:
        fh.write(head.SerializeToString())
        for arr in solver.history_arrays():
            shape = caffe_pb2.BlobShape(dim=list(arr.shape)).SerializeToString()
            data = memoryview(np.ascontiguousarray(arr, dtype="<f4")).cast("B")
            body = length_delimited(_BLOB_SHAPE, len(shape)) + shape + length_delimited(_BLOB_DATA, data.nbytes)
            fh.write(length_delimited(_STATE_HISTORY, len(body) + data.nbytes) + body)
            fh.write(data)


def write_snapshot(trainer: Trainer, prefix: str | os.PathLike[str], export: ConvertedModel) -> SnapshotFiles:
    """Snapshot the current iteration: caffemodel, ONNX, Caffe solverstate and the trainer's extras."""
    files = snapshot_files(prefix, trainer.iter)
    trainer.module.save_caffemodel(files.caffemodel)
    export_onnx(export, trainer, files.onnx)
    write_solverstate(files.solverstate, trainer, str(files.caffemodel))
    gen = trainer.module.generator_for(trainer.module.device)
    extras = {
        "format": 1,
        "solver": trainer.solver.name,
        "iter": trainer.iter,
        "smoothed_loss": {"window": trainer.smoothed.window, "losses": trainer.smoothed.losses,
                          "value": trainer.smoothed.value, "start_iter": trainer.smoothed.start_iter},
        "rng": {"device": str(gen.device), "state": base64.b64encode(gen.get_state().numpy().tobytes()).decode()},
    }
    write_bytes_atomic(files.extras, json.dumps(extras).encode())
    return files


def resume(trainer: Trainer, solverstate: str | os.PathLike[str]) -> list[str]:
    """Continue from a snapshot (Caffe's Solver::Restore): weights, iteration, lr step, history; returns notes."""
    path = Path(solverstate)
    if not path.is_file():
        raise InputFileError(f"solver state {str(path)!r} does not exist; check the path")
    if path.suffix == ".h5":
        raise InputFileError(f"{path}: HDF5 solver states are not supported; snapshot with snapshot_format: BINARYPROTO")
    try:
        state = caffe_pb2.SolverState.FromString(path.read_bytes())
    except DecodeError as exc:
        raise InputFileError(f"{path}: not a Caffe .solverstate ({exc})") from None
    notes = []
    if state.learned_net:
        net_path = Path(state.learned_net)
        if not net_path.exists() and (path.parent / net_path.name).exists():
            net_path = path.parent / net_path.name
        missing = trainer.module.load_caffe_weights(load_weights(net_path))
        if missing:
            raise SolverError(f"{net_path}: no weights for {missing}; is this snapshot from another net?")
    history = [np.asarray(b.data, dtype=np.float32) for b in state.history]
    trainer.solver.restore(state.iter, state.current_step, history, str(path))
    extras_path = path.with_name(path.name + ".json")
    if extras_path.exists():
        extras = json.loads(extras_path.read_text())
        if extras.get("solver") != trainer.solver.name:
            raise SolverError(f"{path}: written by a {extras.get('solver')} solver, this solver is {trainer.solver.name}")
        s = extras["smoothed_loss"]
        trainer.smoothed = SmoothedLoss(s["window"], list(s["losses"]), s["value"], s["start_iter"])
        rng = extras["rng"]
        gen = trainer.module.generator_for(trainer.module.device)
        if rng["device"] == str(gen.device):
            gen.set_state(torch.from_numpy(np.frombuffer(base64.b64decode(rng["state"]), dtype=np.uint8).copy()))
        else:
            notes.append(f"the dropout RNG state was saved on {rng['device']}, not {gen.device}: it restarts")
    else:
        trainer.smoothed.start_iter = state.iter
        notes.append(f"{extras_path.name} not found: the smoothed loss restarts at iteration {state.iter}")
    return notes
