"""Solver values Caffe refuses, that would hang or crash, or that Caffe would run silently wrong.

Refusals are one `error:` line and exit 2 before any iteration; warnings are one `warning:` line and training runs.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from caffeonnx.cli import main
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.solvers import check_solver
from tests.helpers import REFERENCE


def solver_copy(tmp_path: Path, case: str, **fields: str) -> Path:
    """A copy of a reference training case with solver fields replaced/added; returns the solver path."""
    d = tmp_path / case
    shutil.copytree(REFERENCE / case, d)
    lines = [ln for ln in (d / "solver.prototxt").read_text().splitlines() if ln.split(":")[0] not in fields]
    (d / "solver.prototxt").write_text("\n".join([*lines, *(f"{k}: {v}" for k, v in fields.items())]) + "\n")
    return d / "solver.prototxt"


def train(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], solver: Path,
          *args: str) -> tuple[int, list[str]]:
    """`caffeonnx train` through the real entry point from the case's directory; returns (exit code, stderr lines)."""
    monkeypatch.chdir(solver.parent)
    monkeypatch.setattr(sys, "argv", ["caffeonnx", "train", "solver.prototxt", "--weights", "init.caffemodel",
                                      "--data", "data.npz", "--device", "cpu", "--no-png", "-q", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0), capsys.readouterr().err.strip().splitlines()


REFUSED = [
    ("iter_size 2^31-1", "train_tied_sgd", {"iter_size": "2147483647"}, [],
     "iter_size 2147483647 × batch 32 = 68719476704 samples per iteration is more than Caffe's int holds"),
    ("poly past max_iter", "train_tied_sgd", {"lr_policy": '"poly"', "power": "0.5", "max_iter": "10"},
     ["--max-iter", "20"], "lr_policy 'poly' reaches 0 at max_iter 10; training to iteration 20"),
    ("negative base_lr", "train_tied_sgd", {"base_lr": "-0.01"}, [], "base_lr must be >= 0"),
    ("NaN base_lr", "train_tied_sgd", {"base_lr": "nan"}, [], "base_lr is nan; give a finite number"),
    ("momentum 1", "train_tied_sgd", {"momentum": "1"}, [], "momentum must lie in [0, 1)"),
    ("negative momentum", "train_tied_sgd", {"momentum": "-0.5"}, [], "got -0.5"),
    ("Adam beta1 1.5", "train_deep_adam", {"momentum": "1.5"}, [], "momentum (Adam's beta1) must lie in [0, 1)"),
    ("Adam beta2 1", "train_deep_adam", {"momentum2": "1"}, [], "momentum2 (Adam's beta2) must lie in [0, 1)"),
    ("Adam delta 0", "train_deep_adam", {"delta": "0"}, [], "delta must be > 0 for Adam"),
    ("average_loss 0", "train_tied_sgd", {"average_loss": "0"}, [], "average_loss should be non-negative."),
    ("negative snapshot", "train_tied_sgd", {"snapshot": "-5"}, [], "snapshot must be >= 0, got -5"),
]


@pytest.mark.parametrize(("what", "case", "fields", "args", "says"), REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_solver_values_are_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str], what: str, case: str,
                                                   fields: dict[str, str], args: list[str], says: str) -> None:
    solver = solver_copy(tmp_path, case, snapshot_prefix=f'"{tmp_path}/snap"', **fields)
    code, lines = train(monkeypatch, capsys, solver, "--max-iter", "3", *args)
    assert code == 2, f"{what}: exit {code}: {lines}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"{what}: {lines}"
    assert says in lines[0], f"{what}: {says!r} not in {lines[0]!r}"
    assert not list(tmp_path.glob("snap*")), "refused before training: nothing written"


WARNED = [
    ("HDF5 snapshots", {"snapshot_format": "HDF5"}, "snapshot_format HDF5 is not written by caffeonnx"),
    ("clip_gradients 0", {"clip_gradients": "0"}, "clip_gradients 0 scales every gradient to zero"),
    ("negative weight_decay", {"weight_decay": "-0.001"}, "weight_decay -0.001 is negative"),
    ("snapshot without prefix", {"snapshot": "100"}, "snapshot is specified but snapshot_prefix is not"),
    ("stepvalue not increasing", {"lr_policy": '"multistep"', "stepvalue": "5\nstepvalue: 3"},
     "stepvalue [5, 3] is not increasing"),
]


@pytest.mark.parametrize(("what", "fields", "says"), WARNED, ids=[w[0] for w in WARNED])
def test_values_caffe_runs_silently_wrong_are_warned_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str], what: str,
                                                           fields: dict[str, str], says: str) -> None:
    solver = solver_copy(tmp_path, "train_tied_sgd", **fields)
    code, lines = train(monkeypatch, capsys, solver, "--max-iter", "2")
    assert code == 0, f"{what}: {lines}"
    text = " ".join(" ".join(lines).split())  # the console wraps long notes
    assert text.count("warning:") == 1 and says in text, f"{what}: {lines}"


def test_a_good_solver_has_no_warnings() -> None:
    param = caffe_pb2.SolverParameter(base_lr=0.01, momentum=0.9, lr_policy="step", stepsize=10, max_iter=100)
    assert check_solver(param) == []
