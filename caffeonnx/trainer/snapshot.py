"""Snapshots: PREFIX_iter_N.caffemodel / .onnx / .solverstate, and resuming from them.

The .solverstate is Caffe's own SolverState (iter, learned_net, history, current_step),
so `caffe train --snapshot` can resume it too and we can resume Caffe's.  What Caffe
does not store but an exact continuation needs (the smoothed-loss window, the dropout
RNG) goes beside it in PREFIX_iter_N.solverstate.json; without that file a resume is
still exact in weights and updates, only the smoothed loss restarts, as in Caffe.  A run under
torchrun stores every rank's generators there ("rng_ranks"), so each rank resumes its own Dropout.

A snapshot is written as a set: every file goes to a hidden temporary beside its target
(fileio's naming, `.NAME.XXXXXXXX.tmp`), and only when all of them are on disk are they
renamed into place, the .solverstate last; a full disk or an unwritable directory leaves
no part of the new set and keeps the earlier ones.  Temporaries left by a killed run are
removed when the next run with the same prefix starts.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from google.protobuf.message import DecodeError

from caffeonnx.converter.caffe_to_onnx import ConvertedModel, load_weights
from caffeonnx.errors import CaffeOnnxError, InputFileError, SolverError
from caffeonnx.fileio import atomic_write, current_umask
from caffeonnx.proto import caffe_pb2
from caffeonnx.runtime.inputs import lock_scratch, process_start_time, remove_stale
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


def rng_extras(trainer: Trainer) -> dict:
    """The random generators' states an exact continuation needs (Dropout's and torch's global CPU one)."""
    gen = trainer.module.generator_for(trainer.module.device)
    return {"device": str(gen.device), "state": base64.b64encode(gen.get_state().numpy().tobytes()).decode(),
            "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def write_snapshot(trainer: Trainer, prefix: str | os.PathLike[str], export: ConvertedModel,
                   rng_ranks: list[object] | None = None) -> SnapshotFiles:
    """Snapshot the current iteration as one set: caffemodel, ONNX, Caffe solverstate and the trainer's extras
    (with `rng_ranks`, every rank's `rng_extras` under torchrun).

    Raises CaffeOnnxError (one line) when the set cannot be written; then none of its files exist.
    """
    files = snapshot_files(prefix, trainer.iter)
    extras = {
        "format": 1,
        "solver": trainer.solver.name,
        "iter": trainer.iter,
        "smoothed_loss": {"window": trainer.smoothed.window, "losses": trainer.smoothed.losses,
                          "value": trainer.smoothed.value, "start_iter": trainer.smoothed.start_iter},
        "rng": rng_extras(trainer),
    }
    if rng_ranks is not None:
        extras["rng_ranks"] = rng_ranks
    writers: list[tuple[Path, Callable[[Path], None]]] = [
        (files.caffemodel, trainer.module.save_caffemodel),
        (files.onnx, lambda tmp: export_onnx(export, trainer, tmp)),
        (files.extras, lambda tmp: tmp.write_bytes(json.dumps(extras).encode())),
        (files.solverstate, lambda tmp: write_solverstate(tmp, trainer, str(files.caffemodel))),
    ]
    try:
        write_set(writers)
    except OSError as exc:
        raise CaffeOnnxError(
            f"cannot write snapshot {files.solverstate.with_suffix('')}.*: {exc.strerror or exc} "
            f"({exc.filename2 or exc.filename or files.solverstate.parent}); none of its files were written and "
            "earlier snapshots are kept: free space or fix the directory, then resume from the last snapshot with "
            "--snapshot") from None
    return files


def write_set(writers: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Write every (target, writer) to a temporary beside its target, then rename them all in order: all or none."""
    temps: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    locks: list[int] = []  # each temporary stays flocked until the set is in place: `clean_stale_temps` skips it
    try:
        for target, write in writers:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            tmp = Path(name)
            temps.append((tmp, target))
            locks.append(fd)
            lock_scratch(fd)
            os.fchmod(fd, 0o666 & ~current_umask())
            write(tmp)
            if os.stat(tmp).st_ino != os.fstat(fd).st_ino:  # the writer made its own atomic write over `tmp`
                fd = os.open(tmp, os.O_RDWR)
                locks.append(fd)
                lock_scratch(fd)
            os.fsync(fd)
        for tmp, target in temps:
            os.replace(tmp, target)
            placed.append(target)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        for target in placed:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        raise
    finally:
        for fd in locks:
            os.close(fd)


def clean_stale_temps(prefix: str | os.PathLike[str]) -> list[Path]:
    """Remove the hidden temporaries of snapshot sets under `prefix` that a killed run left; returns them.

    Only names of our own pattern (fileio's `.PREFIX_iter_N.EXT.XXXXXXXX.tmp`, and the inner temporary the
    caffemodel and ONNX writers make beside such a name), older than this process and not locked by a live
    run's `write_set`, are touched.
    """
    base = Path(prefix)
    rand = r"[a-z0-9_]{8}\.tmp"
    pattern = re.compile(rf"\.\.?{re.escape(base.name)}_iter_\d+\.(caffemodel|onnx|solverstate|solverstate\.json)"
                         rf"\.{rand}(\.{rand})?")
    return remove_stale(base.parent, pattern, process_start_time()) if base.parent.is_dir() else []


def unwritable(folder: Path) -> str | None:
    """Why files cannot be made in `folder` (or in its nearest existing parent, where it would be created), or None.

    Probed by creating and removing a file, as Caffe does: permissions, read-only mounts and ACLs all count.
    """
    existing = folder
    while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".caffeonnx-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{exc.strerror or exc}: {exc.filename or folder}"
    return None


def check_snapshot_prefix(prefix: str | os.PathLike[str]) -> None:
    """Caffe's CheckSnapshotWritePermissions, before training starts: the snapshot directory must take new files."""
    why = unwritable(Path(prefix).parent)
    if why is not None:
        raise CaffeOnnxError(f"Cannot write to snapshot prefix {str(prefix)!r} ({why}). Make sure that the directory "
                             "exists and is writeable, or set snapshot_prefix in the solver.")


def check_log(path: Path) -> None:
    """--log must be a file we can append to (or create), checked before training starts; nothing is created."""
    why = None
    if path.exists() or path.is_symlink():
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            why = f"{exc.strerror or exc}"
    else:
        why = unwritable(path.parent) if path.parent.is_dir() else f"{path.parent} is not a directory"
    if why is not None:
        raise CaffeOnnxError(f"--log {str(path)!r}: cannot append to it ({why}); give a writable file")


def resume(trainer: Trainer, solverstate: str | os.PathLike[str], rank: int = 0, world: int = 1) -> list[str]:
    """Continue from a snapshot (Caffe's Solver::Restore): weights, iteration, lr step, history; returns notes.

    Every rank of a torchrun run reads the same files; rank r takes its own generators when the snapshot has
    them for `world` ranks, else rank 0 takes the saved ones and the others keep random_seed + rank.
    """
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
        extras = read_extras(extras_path, trainer, state.iter)
        s = extras["smoothed_loss"]
        trainer.smoothed = SmoothedLoss(s["window"], [float(v) for v in s["losses"]], float(s["value"]),
                                        s["start_iter"])
        per_rank = extras.get("rng_ranks")
        if world > 1 and isinstance(per_rank, list) and len(per_rank) == world:
            rng = _check_rng(extras_path, dict(enumerate(per_rank)), rank, trainer, f"rng_ranks[{rank}]")
        elif rank == 0:
            rng = extras["rng"]
        else:
            rng = None
            notes.append(f"{extras_path.name} holds no random generators for {world} ranks: rank {rank}'s Dropout "
                         "continues from random_seed + rank")
        gen = trainer.module.generator_for(trainer.module.device)
        if rng is not None and rng["device"] == str(gen.device):
            gen.set_state(rng["state"])
        elif rng is not None:
            notes.append(f"the dropout RNG state was saved on {rng['device']}, not {gen.device}: it restarts")
        if rng is not None and "torch_cpu" in rng:
            torch.set_rng_state(rng["torch_cpu"])
    else:
        trainer.smoothed.start_iter = state.iter
        notes.append(f"{extras_path.name} not found: the smoothed loss restarts at iteration {state.iter}")
    return notes


def _field(path: Path, where: dict, key: str | int, kinds: type | tuple[type, ...], name: str) -> object:
    """`where[key]`, which must be of `kinds` (bool is not a number here); else a one-line error naming it."""
    value = where.get(key) if isinstance(where, dict) else None
    if not isinstance(value, kinds) or isinstance(value, bool):
        got = f"{type(value).__name__} {value!r}"[:80] if key in where else "nothing"
        raise InputFileError(f"{path}: field {name!r} should be {_kind_name(kinds)}, found {got}; the file is damaged: "
                             "restore it or delete it (the smoothed loss and dropout RNG then restart)")
    return value


def _kind_name(kinds: type | tuple[type, ...]) -> str:
    """'an int', 'a number', ... for messages."""
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list"}
    return " or ".join(names[k] for k in (kinds if isinstance(kinds, tuple) else (kinds,)))


def _rng_state(path: Path, rng: dict, key: str, like: torch.Tensor, name: str = "rng") -> torch.Tensor:
    """A generator state from base64, of exactly the size `like` (this torch's state for that generator) has."""
    text = _field(path, rng, key, str, f"{name}.{key}")
    try:
        raw = base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise InputFileError(f"{path}: field '{name}.{key}' is not base64; the file is damaged: restore or delete it") \
            from None
    if len(raw) != like.numel():
        raise InputFileError(f"{path}: field '{name}.{key}' holds {len(raw)} bytes of generator state, this torch's "
                             f"is {like.numel()} bytes; the file is damaged or from another torch build: restore or "
                             "delete it")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())


def read_extras(path: Path, trainer: Trainer, iteration: int) -> dict:
    """Read and check PREFIX_iter_N.solverstate.json; every damage is one line naming the file and the field."""
    try:
        extras = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputFileError(f"{path}: not the JSON caffeonnx writes ({exc}); the file is damaged: restore it or "
                             "delete it (the smoothed loss and dropout RNG then restart)") from None
    if not isinstance(extras, dict):
        raise InputFileError(f"{path}: should hold a JSON object, found a {type(extras).__name__}; the file is "
                             "damaged: restore or delete it")
    if _field(path, extras, "format", int, "format") != 1:
        raise InputFileError(f"{path}: field 'format' is {extras['format']!r}; this caffeonnx reads format 1")
    solver = _field(path, extras, "solver", str, "solver")
    if solver != trainer.solver.name:
        raise SolverError(f"{path}: written by a {solver} solver, this solver is {trainer.solver.name}")
    if _field(path, extras, "iter", int, "iter") != iteration:
        raise InputFileError(f"{path}: field 'iter' is {extras['iter']!r} but its .solverstate is at iteration "
                             f"{iteration}; the two files are from different snapshots")
    s = _field(path, extras, "smoothed_loss", dict, "smoothed_loss")
    assert isinstance(s, dict)
    window = _field(path, s, "window", int, "smoothed_loss.window")
    losses = _field(path, s, "losses", list, "smoothed_loss.losses")
    assert isinstance(window, int) and isinstance(losses, list)
    if window < 1 or len(losses) > window or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in losses):
        raise InputFileError(f"{path}: field 'smoothed_loss.losses' should be at most window={window} numbers "
                             f"(window >= 1); the file is damaged: restore or delete it")
    _field(path, s, "value", (int, float), "smoothed_loss.value")
    _field(path, s, "start_iter", int, "smoothed_loss.start_iter")
    extras["rng"] = _check_rng(path, extras, "rng", trainer, "rng")
    return extras


def _check_rng(path: Path, where: dict, key: str | int, trainer: Trainer, name: str) -> dict:
    """One saved set of generators (`rng`, or an entry of `rng_ranks`), its states decoded and checked."""
    value = _field(path, where, key, dict, name)
    assert isinstance(value, dict)
    _field(path, value, "device", str, f"{name}.device")
    gen = trainer.module.generator_for(trainer.module.device)
    if value["device"] == str(gen.device):
        value["state"] = _rng_state(path, value, "state", gen.get_state(), name)
    if "torch_cpu" in value:
        value["torch_cpu"] = _rng_state(path, value, "torch_cpu", torch.get_rng_state(), name)
    return value
