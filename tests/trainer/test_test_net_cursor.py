"""A test net's Data layer keeps its cursor from one test to the next, as in Caffe.

Caffe builds each test net once (Solver::InitTestNets) and its DataLayer reads on from where
the previous Test() stopped: with test_iter 2 and batch 2, test number t reads batches 2t and
2t+1, i.e. records 4t..4t+3 of the database, wrapping around mid-batch.  Written in the style of
BVLC's examples/mnist/lenet_train_test.prototxt (two Data layers named "data", one per phase).
With base_lr 0 the weights never move, so every expected value is a numpy forward.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caffeonnx.data.lmdb_writer import write_datum_lmdb
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.evaluate import run_test
from caffeonnx.trainer.session import TrainOptions, count_tests_before, run_training

NET = """name: "LeNetStyle"
layer {
  name: "data"
  type: "Data"
  top: "data"
  top: "label"
  include {
    phase: TRAIN
  }
  transform_param {
    scale: 0.00390625
  }
  data_param {
    source: "train_lmdb"
    batch_size: 3
    backend: LMDB
  }
}
layer {
  name: "data"
  type: "Data"
  top: "data"
  top: "label"
  include {
    phase: TEST
  }
  transform_param {
    scale: 0.00390625
  }
  data_param {
    source: "test_lmdb"
    batch_size: 2
    backend: LMDB
  }
}
layer {
  name: "ip1"
  type: "InnerProduct"
  bottom: "data"
  top: "ip1"
  inner_product_param {
    num_output: 1
    weight_filler {
      type: "constant"
      value: 0.01
    }
    bias_filler {
      type: "constant"
      value: 0.5
    }
  }
}
layer {
  name: "loss"
  type: "EuclideanLoss"
  bottom: "ip1"
  bottom: "label"
  top: "loss"
}
"""
SOLVER = """net: "net.prototxt"
test_iter: 2
test_interval: 1
base_lr: 0
lr_policy: "fixed"
momentum: 0.9
display: 0
max_iter: 4
snapshot: 2
snapshot_prefix: "snap"
random_seed: 1
"""
TEST_RECORDS = 5


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    rng = np.random.default_rng(3)
    write_datum_lmdb(tmp_path / "train_lmdb", rng.integers(0, 256, (7, 1, 2, 2), dtype=np.uint8),
                     rng.integers(0, 10, 7))
    images = rng.integers(0, 256, (TEST_RECORDS, 1, 2, 2), dtype=np.uint8)
    labels = rng.integers(0, 10, TEST_RECORDS)
    write_datum_lmdb(tmp_path / "test_lmdb", images, labels)
    np.savez(tmp_path / "test_records.npz", images=images, labels=labels)
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    monkeypatch.chdir(tmp_path)  # Caffe reads sources relative to the current directory
    return tmp_path


def _expected_test(t: int, records: np.lib.npyio.NpzFile) -> float:
    """Test number t: batches 2t, 2t+1 of 2 records each (wrapping), EuclideanLoss averaged over test_iter."""
    x = records["images"].reshape(TEST_RECORDS, -1).astype(np.float32) * np.float32(0.00390625)
    y = records["labels"].astype(np.float64)
    losses = []
    for b in (2 * t, 2 * t + 1):
        rows = np.arange(2 * b, 2 * b + 2) % TEST_RECORDS
        pred = x[rows].astype(np.float64) @ np.full(4, 0.01) + 0.5
        losses.append(np.sum((pred - y[rows]) ** 2) / 2 / 2)
    return float(np.mean(losses))


def test_each_test_reads_on_from_the_last(workdir: Path) -> None:
    result = run_training(TrainOptions(Path("solver.prototxt"), pictures=False), say=lambda _: None)
    records = np.load(workdir / "test_records.npz")
    got = [(t["iter"], t["outputs"]["loss"]) for t in result.tests]
    assert [i for i, _ in got] == [0, 1, 2, 3, 4], "tested at 0 (test_initialization), every interval and the end"
    for t, (_, value) in enumerate(got):
        assert value == pytest.approx(_expected_test(t, records), rel=1e-5), f"test {t} must read batches {2*t},{2*t+1}"
    assert got[0][1] != pytest.approx(got[1][1]), "the second test reads other records than the first"


def test_resumed_run_tests_on_the_records_an_uninterrupted_run_would(workdir: Path) -> None:
    whole = run_training(TrainOptions(Path("solver.prototxt"), pictures=False), say=lambda _: None)
    resumed = run_training(TrainOptions(Path("solver.prototxt"), snapshot=Path("snap_iter_2.solverstate"),
                                        pictures=False), say=lambda _: None)
    tail = [(t["iter"], t["outputs"]) for t in whole.tests if t["iter"] >= 2]
    assert [(t["iter"], t["outputs"]) for t in resumed.tests] == tail


@pytest.mark.parametrize(("interval", "initial", "iteration", "want"), [
    (1, True, 0, 0), (1, True, 3, 3), (1, False, 3, 2), (500, True, 500, 1), (500, True, 501, 2),
    (500, False, 1000, 1), (500, False, 1001, 2),
])
def test_tests_before_counts_caffes_test_points(interval: int, initial: bool, iteration: int, want: int) -> None:
    param = caffe_pb2.SolverParameter(test_iter=[1], test_interval=interval, test_initialization=initial)
    assert count_tests_before(param, iteration) == want


def test_test_net_param_inline_equals_the_generic_net(workdir: Path) -> None:
    """A test net written inside the solver (test_net_param) is Caffe's test net #0, like the generic one."""
    whole = run_training(TrainOptions(Path("solver.prototxt"), pictures=False), say=lambda _: None)
    inline = SOLVER.replace('net: "net.prototxt"', 'train_net: "net.prototxt"\ntest_net_param {\n' + NET + "\n}")
    (workdir / "inline_solver.prototxt").write_text(inline)
    got = run_training(TrainOptions(Path("inline_solver.prototxt"), pictures=False), say=lambda _: None)
    assert [(t["iter"], t["outputs"]) for t in got.tests] == [(t["iter"], t["outputs"]) for t in whole.tests]


def test_test_state_must_be_given_once_per_test_net(workdir: Path) -> None:
    (workdir / "bad.prototxt").write_text(SOLVER + 'test_state { stage: "a" }\ntest_state { stage: "b" }\n')
    with pytest.raises(CaffeOnnxError, match="test_state must be unspecified or specified once per test net"):
        run_training(TrainOptions(Path("bad.prototxt"), pictures=False), say=lambda _: None)


def test_caffeonnx_test_scores_the_test_phase_like_caffe_test(workdir: Path) -> None:
    """`caffe test -model net.prototxt -iterations 3`: batches 0, 1, 2 of the TEST Data layer, then their mean."""
    lines: list[str] = []
    report = run_test("net.prototxt", iterations=3, say=lines.append)
    records = np.load(workdir / "test_records.npz")
    x = records["images"].reshape(TEST_RECORDS, -1).astype(np.float32) * np.float32(0.00390625)
    want = []
    for b in range(3):
        rows = np.arange(2 * b, 2 * b + 2) % TEST_RECORDS
        pred = x[rows].astype(np.float64) @ np.full(4, 0.01) + 0.5
        want.append(np.sum((pred - records["labels"][rows]) ** 2) / 2 / 2)
    assert [b["loss"] for b in report.batches] == pytest.approx(want, rel=1e-5)
    assert report.means["loss"] == pytest.approx(np.mean(want), rel=1e-5)
    assert report.loss == pytest.approx(np.mean(want), rel=1e-5), "loss_weight 1 on the EuclideanLoss"
    start = lines.index("Running for 3 iterations.")
    assert lines[start + 1].startswith("Batch 0, loss = ") and "test_lmdb" in lines[0]
    assert lines[-2].startswith("Loss: ") and lines[-1].startswith("loss = ") and "(* 1 = " in lines[-1]


def test_caffeonnx_test_command_line(workdir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "caffeonnx", "test", "net.prototxt", "--iterations", "2"],
                          capture_output=True, text=True, timeout=120, cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1:3] == ["Running for 2 iterations.", lines[2]] and lines[2].startswith("Batch 0, loss = ")
    assert lines[-2].startswith("Loss: ") and lines[-1].startswith("loss = ")
    bad = subprocess.run([sys.executable, "-m", "caffeonnx", "test", "net.prototxt", "--iterations", "0"],
                         capture_output=True, text=True, timeout=120, cwd=workdir)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --iterations must be at least 1")
