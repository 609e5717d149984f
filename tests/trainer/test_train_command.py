"""`caffeonnx train`: outputs, JSONL log, snapshots and exact resume, tests, and bad input (exit 2, one line)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from caffeonnx.cli import main
from caffeonnx.converter.caffe_io import read_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.trainer.build import build_module, load_solver, read_weights, train_net
from caffeonnx.trainer.loop import Iteration
from caffeonnx.trainer.session import TrainOptions, run_training
from tests.helpers import REFERENCE, assert_close


def case_copy(tmp_path: Path, case: str, **solver_fields: str) -> Path:
    """A writable copy of a reference training case with solver fields replaced/added; returns the solver path."""
    d = tmp_path / case
    shutil.copytree(REFERENCE / case, d)
    lines = [ln for ln in (d / "solver.prototxt").read_text().splitlines() if ln.split(":")[0] not in solver_fields]
    lines += [f"{k}: {v}" for k, v in solver_fields.items()]
    (d / "solver.prototxt").write_text("\n".join(lines) + "\n")
    return d / "solver.prototxt"


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """Run the real `caffeonnx` entry point in-process; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["caffeonnx", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_cli_trains_the_reference_case_and_writes_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    solver = case_copy(tmp_path, "train_tied_sgd", snapshot="10", snapshot_prefix='"snap/tied"')
    monkeypatch.chdir(solver.parent)
    code, err = cli(monkeypatch, capsys, "train", "solver.prototxt", "--weights", "init.caffemodel", "--data",
                    "data.npz", "--max-iter", "25", "-o", "trained", "--log", "log.jsonl", "--device", "cpu")
    assert code == 0, err
    d = solver.parent
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == list(range(25))
    assert set(log[0]) == {"iter", "loss", "smoothed_loss", "lr"}
    assert [r["lr"] for r in log[9:12]] == [0.05, 0.025, 0.025], "step policy: the rate halves at iteration 10"
    assert_close(np.array([r["loss"] for r in log], np.float32), np.load(d / "losses.npy"), "logged losses",
                 atol=1e-5, rtol=1e-4)
    for n in (10, 20):
        for ext in ("caffemodel", "onnx", "solverstate", "solverstate.json"):
            assert (d / f"snap/tied_iter_{n}.{ext}").is_file(), f"snapshot {n} .{ext}"
    want = read_caffemodel(d / "final.caffemodel").blobs
    got = read_caffemodel(d / "trained.caffemodel").blobs
    for layer in ("encode1", "decode1"):
        for i in range(2):
            assert_close(got[layer][i].data, want[layer][i].data, f"{layer} blob {i}", atol=1e-5, rtol=1e-4)
    model = onnx.load(str(d / "trained.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert sorted(inits) == ["decode1.bias", "encode1.bias", "encode1_matrix"], "the tie stays one initializer"
    assert_close(inits["encode1_matrix"], got["encode1"][0].data, "onnx encode1_matrix")


@pytest.mark.parametrize(("case", "at"), [("train_tied_sgd", 10), ("train_deep_adam", 6)])
def test_resume_continues_exactly_as_if_uninterrupted(tmp_path: Path, case: str, at: int) -> None:
    solver = case_copy(tmp_path, case, snapshot=str(at), snapshot_prefix=f'"{tmp_path}/snap"')
    d = solver.parent
    total = len(np.load(d / "losses.npy"))
    full = run_training(TrainOptions(solver, weights=d / "init.caffemodel", data=str(d / "data.npz"), max_iter=total,
                                     output=tmp_path / "full"), say=lambda _: None)
    state = tmp_path / f"snap_iter_{at}.solverstate"
    resumed = run_training(TrainOptions(solver, snapshot=state, data=str(d / "data.npz"), max_iter=total - at,
                                        output=tmp_path / "resumed"), say=lambda _: None)
    assert [(r.iter, r.loss, r.smoothed_loss, r.lr) for r in resumed.iterations] == \
        [(r.iter, r.loss, r.smoothed_loss, r.lr) for r in full.iterations[at:]]
    a, b = read_caffemodel(tmp_path / "full.caffemodel").blobs, read_caffemodel(tmp_path / "resumed.caffemodel").blobs
    for layer, blobs in a.items():
        for i, blob in enumerate(blobs):
            assert np.array_equal(blob.data, b[layer][i].data), f"{layer} blob {i} differs after resume"


def test_interrupt_writes_a_snapshot_of_the_finished_iterations(tmp_path: Path) -> None:
    solver = case_copy(tmp_path, "train_siamese_sgd", snapshot_prefix=f'"{tmp_path}/run"')
    d = solver.parent

    def interrupt(record: Iteration, _rate: float) -> None:
        if record.iter == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(TrainOptions(solver, weights=d / "init.caffemodel", data=str(d / "data.npz")), say=lambda _: None,
                     progress=interrupt)
    state = json.loads((tmp_path / "run_iter_5.solverstate.json").read_text())
    assert state["iter"] == 5
    assert (tmp_path / "run_iter_5.caffemodel").is_file() and (tmp_path / "run_iter_5.onnx").is_file()


def test_test_nets_run_every_test_interval(tmp_path: Path) -> None:
    solver = case_copy(tmp_path, "train_siamese_sgd", test_iter="2", test_interval="4", test_compute_loss="true")
    d = solver.parent
    result = run_training(TrainOptions(solver, weights=d / "init.caffemodel", data=str(d / "data.npz"),
                                       test_data=str(d / "data.npz"), max_iter=8), say=lambda _: None)
    assert [t["iter"] for t in result.tests] == [0, 4, 8]
    first = result.tests[0]
    # At iteration 0 the weights are init.caffemodel's: the test loss is their mean loss on the first two batches.
    param = load_solver(solver)
    module = build_module(train_net(param, solver), read_weights(d / "init.caffemodel"), seed=0).eval()
    batches = np.load(d / "data.npz")
    with torch.no_grad():
        want = np.mean([float(module({k: batches[k][i] for k in batches.files}, ["loss"])["loss"]) for i in range(2)])
    assert first["outputs"]["loss"] == pytest.approx(float(want), rel=1e-5)
    assert first["loss"] == pytest.approx(float(want), rel=1e-5)
    assert result.tests[1]["loss"] != first["loss"], "the test net sees the trained weights"


def test_nan_loss_stops_and_keeps_the_last_good_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    solver = case_copy(tmp_path, "train_siamese_sgd", base_lr="1e6", snapshot="1", snapshot_prefix='"s"')
    monkeypatch.chdir(solver.parent)
    code, err = cli(monkeypatch, capsys, "train", solver, "--weights", "init.caffemodel", "--data", "data.npz",
                    "-q", "-o", "out")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "loss is" in line and ("nan" in line or "inf" in line) and "Traceback" not in err
    snaps = sorted(solver.parent.glob("s_iter_*.caffemodel"))
    assert snaps, "the iterations before the divergence were snapshotted"
    last = read_caffemodel(snaps[-1])
    assert all(np.isfinite(b.data).all() for blobs in last.blobs.values() for b in blobs)
    assert not (solver.parent / "out.caffemodel").exists()


W = ["--weights", "init.caffemodel"]
D = ["--data", "data.npz"]
BAD_INPUT = [
    ("solver without net", {"net": None}, W + D, ("SolverParameter must specify a train net",)),
    ("unknown solver type", {"type": '"Adamax"'}, W + D, ("Unknown solver type: 'Adamax'", "known types")),
    ("momentum with AdaGrad", {"type": '"AdaGrad"'}, W + D, ("Momentum cannot be used with AdaGrad",)),
    ("data shape mismatch", {}, [*W, "--data", "bad.npz"], ("array 'data' has shape [7, 13]", "[32, 784]")),
    ("missing data file", {}, [*W, "--data", "nowhere.npz"], ("data file 'nowhere.npz' does not exist",)),
    ("no data at all", {}, W, ("give the samples with --data",)),
    ("weights and snapshot", {}, [*W, *D, "--snapshot", "x.solverstate"], ("not both",)),
    ("missing net file", {"net": '"missing.prototxt"'}, W + D, ("net 'missing.prototxt' not found",)),
    ("missing weights file", {}, ["--weights", "none.caffemodel", *D], ("none.caffemodel",)),
    ("cuda without a GPU", {}, [*W, *D, "--device", "cuda"], ("CUDA is not available",)),
]


@pytest.mark.parametrize(("what", "fields", "args", "says"), BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], what: str, fields: dict[str, str | None],
                                          args: list[str], says: tuple[str, ...]) -> None:
    if what == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    solver = case_copy(tmp_path, "train_tied_sgd", **{k: v for k, v in fields.items() if v is not None})
    if fields.get("net", "") is None:
        solver.write_text("\n".join(ln for ln in solver.read_text().splitlines() if not ln.startswith("net:")))
    np.savez(solver.parent / "bad.npz", data=np.zeros((7, 13), np.float32))
    monkeypatch.chdir(solver.parent)
    code, err = cli(monkeypatch, capsys, "train", "solver.prototxt", "-q", *args)
    assert code == 2, f"{what}: exit {code}, stderr {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, f"{what}: not one line: {err!r}"
    for s in says:
        assert s in lines[0], f"{what}: {s!r} not in {lines[0]!r}"


def test_onnx_weights_start_exactly_where_the_caffemodel_does(tmp_path: Path) -> None:
    """--weights model.onnx (a caffeonnx TEST graph) gives the same run as --weights init.caffemodel."""
    solver = case_copy(tmp_path, "train_tied_sgd")
    d = solver.parent
    convert_files(d / "train.prototxt", d / "init.caffemodel").save(tmp_path / "init.onnx")
    runs = [run_training(TrainOptions(solver, weights=w, data=str(d / "data.npz"), max_iter=3), say=lambda _: None)
            for w in (d / "init.caffemodel", tmp_path / "init.onnx")]
    assert [r.loss for r in runs[0].iterations] == [r.loss for r in runs[1].iterations]


def test_max_iter_option_keeps_the_solvers_poly_schedule(tmp_path: Path) -> None:
    solver = case_copy(tmp_path, "train_siamese_sgd", lr_policy='"poly"', power="2", max_iter="100")
    d = solver.parent
    result = run_training(TrainOptions(solver, weights=d / "init.caffemodel", data=str(d / "data.npz"), max_iter=5),
                          say=lambda _: None)
    assert [r.lr for r in result.iterations] == pytest.approx([0.01 * (1 - i / 100) ** 2 for i in range(5)], rel=1e-6)


def test_deterministic_runs_repeat_bitwise_and_leave_torch_as_found(tmp_path: Path) -> None:
    solver = case_copy(tmp_path, "train_deep_nesterov")
    d = solver.parent
    runs = [run_training(TrainOptions(solver, weights=d / "init.caffemodel", data=str(d / "data.npz"), max_iter=4,
                                      deterministic=True, output=tmp_path / f"r{k}"), say=lambda _: None)
            for k in range(2)]
    assert [r.loss for r in runs[0].iterations] == [r.loss for r in runs[1].iterations]
    assert (tmp_path / "r0.caffemodel").read_bytes() == (tmp_path / "r1.caffemodel").read_bytes()
    assert not torch.are_deterministic_algorithms_enabled()
