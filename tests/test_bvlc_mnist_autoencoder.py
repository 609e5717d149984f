"""BVLC Caffe's own examples/mnist/mnist_autoencoder{,_solver}.prototxt, unchanged, trained as a Caffe user would.

The net repeats layer names (three `data`, two `loss`) and picks its data by phase and
stage; the solver has two test nets chosen by `test_state { stage }`.  The expected values
are written from Caffe's rules in numpy (float64):
- the objective is Σ loss_weight·loss: the SigmoidCrossEntropyLoss alone (the EuclideanLoss
  named `loss` too has loss_weight 0), normalised by the batch (Caffe's BATCH_SIZE default);
- test net #0 (stage test-on-train) reads mnist_train_lmdb, test net #1 (test-on-test)
  mnist_test_lmdb, each for its own test_iter batches of 100 that wrap around the database;
- each test output is the mean over test_iter batches, and `loss` is the weighted sum.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_io import write_caffemodel
from caffeonnx.data.lmdb_writer import write_datum_lmdb
from caffeonnx.proto import caffe_pb2
from caffeonnx.runtime.inputs import open_samples

BVLC = Path(__file__).parents[1] / "caffeonnx" / "examples" / "bvlc"
MNIST = Path(__file__).parents[1] / "caffeonnx" / "examples" / "mnist_subset"
SCALE = np.float32(0.0039215684)
SIZES = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
NAMES = ["encode1", "encode2", "encode3", "encode4", "decode4", "decode3", "decode2", "decode1"]
TRAIN_RECORDS, TEST_RECORDS = 300, 200  # batches of 100 wrap every 3 and every 2 batches


def _images(name: str, count: int) -> np.ndarray:
    with open_samples(MNIST / name) as arr:
        return np.array(arr[:count], dtype=np.uint8)


@pytest.fixture(scope="module")
def caffe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory laid out like Caffe's root: the example files as BVLC ships them, and the two LMDBs."""
    root = tmp_path_factory.mktemp("caffe")
    shutil.copytree(BVLC / "examples", root / "examples")
    files = sorted(p.name for p in MNIST.iterdir())
    train = next(f for f in files if f.startswith("train-images"))
    test = next(f for f in files if f.startswith("t10k-images"))
    write_datum_lmdb(root / "examples/mnist/mnist_train_lmdb", _images(train, TRAIN_RECORDS))
    write_datum_lmdb(root / "examples/mnist/mnist_test_lmdb", _images(test, TEST_RECORDS))
    rng = np.random.default_rng(7)
    weights = {}
    net = caffe_pb2.NetParameter(name="MNISTAutoencoder")
    for name, n_in, n_out in zip(NAMES, SIZES, SIZES[1:]):
        net.layer.add(name=name, type="InnerProduct")
        weights[name] = [rng.normal(0, 0.1, (n_out, n_in)).astype(np.float32),
                         rng.normal(0, 0.1, n_out).astype(np.float32)]
    write_caffemodel(root / "init.caffemodel", net, weights)
    np.savez(root / "init.npz", **{f"{k}_{i}": v for k, b in weights.items() for i, v in enumerate(b)})
    return root


def _forward(x: np.ndarray, w: dict[str, list[np.ndarray]]) -> tuple[float, float]:
    """Caffe's forward in float64: (SigmoidCrossEntropyLoss, EuclideanLoss) of one batch."""
    h = x.astype(np.float64).reshape(len(x), -1)
    target = h
    for k, name in enumerate(NAMES):
        h = h @ w[name][0].T.astype(np.float64) + w[name][1]
        if name not in ("encode4", "decode1"):
            h = 1 / (1 + np.exp(-h))
    logits = h
    cross = np.sum(np.maximum(logits, 0) - logits * target + np.log1p(np.exp(-np.abs(logits)))) / len(x)
    recon = 1 / (1 + np.exp(-logits))
    l2 = np.sum((recon - target) ** 2) / 2 / len(x)
    return float(cross), float(l2)


def _batches(images: np.ndarray, count: int) -> list[np.ndarray]:
    """Batch b of 100 read in order, wrapping around the records (Caffe's DataLayer cursor)."""
    n = len(images)
    return [images[np.arange(b * 100, (b + 1) * 100) % n] for b in range(count)]


def test_bvlc_mnist_autoencoder_trains_unchanged(caffe_root: Path) -> None:
    log = caffe_root / "log.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "caffeonnx", "train", "examples/mnist/mnist_autoencoder_solver.prototxt",
         "--weights", "init.caffemodel", "--max-iter", "1", "--log", str(log), "--no-png", "-q"],
        cwd=caffe_root, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    loaded = np.load(caffe_root / "init.npz")
    w = {name: [loaded[f"{name}_0"], loaded[f"{name}_1"]] for name in NAMES}
    train_imgs = _images(next(p.name for p in MNIST.iterdir() if p.name.startswith("train-images")), TRAIN_RECORDS)
    test_imgs = _images(next(p.name for p in MNIST.iterdir() if p.name.startswith("t10k-images")), TEST_RECORDS)
    scaled = lambda b: b.astype(np.float32) * SCALE  # noqa: E731 - Caffe's transform: uint8 · scale in float32

    first = next(r for r in records if "loss" in r and r.get("phase") != "test")
    cross, l2 = _forward(scaled(_batches(train_imgs, 1)[0]), w)
    assert first["iter"] == 0
    assert first["loss"] == pytest.approx(cross, rel=1e-4), (
        f"iteration 0 loss {first['loss']} must be the SigmoidCrossEntropyLoss alone ({cross}); "
        f"with the EuclideanLoss (loss_weight 0) it would be {cross + l2}")

    tests = [r for r in records if r.get("phase") == "test" and r["iter"] == 0]
    assert [t["net"] for t in tests] == [0, 1], "two test nets, tested at iteration 0 (test_initialization)"
    for entry, images, iters in ((tests[0], train_imgs, 500), (tests[1], test_imgs, 100)):
        # The records repeat every len(images)/100 batches: weigh each distinct batch by how often it comes up.
        period = len(images) // 100
        per = [_forward(scaled(b), w) for b in _batches(images, period)]
        counts = np.bincount(np.arange(iters) % period, minlength=period)
        want_cross = float(np.dot(counts, [c for c, _ in per]) / iters)
        want_l2 = float(np.dot(counts, [e for _, e in per]) / iters)
        got = entry["outputs"]
        assert got["cross_entropy_loss"] == pytest.approx(want_cross, rel=1e-4), f"test net #{entry['net']}"
        assert got["l2_error"] == pytest.approx(want_l2, rel=1e-4), f"test net #{entry['net']}"
        assert entry["loss"] == pytest.approx(want_cross, rel=1e-4), "test loss: loss_weight 1 and 0"
    assert "mnist_test_lmdb" in run.stderr + run.stdout, "test net #1 reads the test LMDB"
    assert "does not convert" not in run.stderr + run.stdout
    snap = onnx.load(str(caffe_root / "examples/mnist/mnist_autoencoder_iter_1.onnx"))
    state = metadata.net_state(snap)
    assert state is not None and list(state.stage) == ["test-on-train"], "the .onnx is the TEST net of test_state[0]"
    assert [r.index for r in metadata.layer_records(snap)][:2] == [1, 3], "data #1 (test-on-train), then flatdata"
