"""`caffeonnx.train(...)`: objects (SolverParameter, NetParameter, ModelProto, arrays) train exactly as files do."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import caffeonnx
from caffeonnx.converter.caffe_io import read_prototxt
from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.trainer.build import load_solver
from tests.helpers import REFERENCE

CASE = REFERENCE / "train_tied_sgd"


def test_objects_train_exactly_as_the_files_they_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(CASE, tmp_path / "case")
    monkeypatch.chdir(tmp_path)
    solver_file = tmp_path / "case" / "solver.prototxt"
    solver_file.write_text(solver_file.read_text().replace("snapshot_after_train: false", "snapshot_after_train: true"))
    from_files = caffeonnx.train(solver_file, weights=CASE / "init.caffemodel", data=CASE / "data.npz", max_iter=6,
                                 say=lambda _: None, pictures=False)
    assert [s.caffemodel.name for s in from_files.snapshots] == ["solver_iter_6.caffemodel"]
    assert from_files.snapshots[0].caffemodel.parent == solver_file.parent, "beside the solver file, as the CLI"

    solver = load_solver(solver_file)
    solver.ClearField("net")
    weights = convert_files(CASE / "train.prototxt", CASE / "init.caffemodel").to_proto()
    with np.load(CASE / "data.npz") as data:
        arrays = {"data": data["data"]}
    from_objects = caffeonnx.train(solver, net=read_prototxt(CASE / "train.prototxt"), weights=weights,
                                   data=arrays, max_iter=6, say=lambda _: None, pictures=False)
    assert [r.loss for r in from_objects.iterations] == [r.loss for r in from_files.iterations]
    assert [s.caffemodel for s in from_objects.snapshots] == [tmp_path / "solver_iter_6.caffemodel"], \
        "a solver object without snapshot_prefix snapshots to ./solver"
    assert isinstance(onnx.load(str(from_objects.snapshots[0].onnx)), onnx.ModelProto)
