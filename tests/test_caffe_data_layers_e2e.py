"""Training and testing straight from Caffe's HDF5Data and ImageData layers, in BVLC's example style.

Expected values are numpy written from Caffe's rules:
- HDF5Data (examples/hdf5_classification): the `source` lists .h5 files; rows run through the files in
  order and wrap, with no transform; SoftmaxWithLoss is Σ −log p[label] / N (VALID), Accuracy the share
  of argmax == label; a test net averages its outputs over test_iter batches.
- ImageData (examples/images style list file): `root_folder` + path, images read as BGR, the TEST
  transform takes the centre crop_size window, subtracts the mean_file pixel at the uncropped
  position, then multiplies by `scale`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from caffeonnx.converter.caffe_io import write_caffemodel
from caffeonnx.proto import caffe_pb2

HDF5_NET = """name: "LogisticRegressionNet"
layer {
  name: "data"
  type: "HDF5Data"
  top: "data"
  top: "label"
  include {
    phase: TRAIN
  }
  hdf5_data_param {
    source: "examples/hdf5_classification/data/train.txt"
    batch_size: 10
  }
}
layer {
  name: "data"
  type: "HDF5Data"
  top: "data"
  top: "label"
  include {
    phase: TEST
  }
  hdf5_data_param {
    source: "examples/hdf5_classification/data/test.txt"
    batch_size: 10
  }
}
layer {
  name: "fc1"
  type: "InnerProduct"
  bottom: "data"
  top: "fc1"
  param {
    lr_mult: 1
    decay_mult: 1
  }
  param {
    lr_mult: 1
    decay_mult: 0
  }
  inner_product_param {
    num_output: 2
    weight_filler {
      type: "gaussian"
      std: 0.01
    }
    bias_filler {
      type: "constant"
      value: 0
    }
  }
}
layer {
  name: "loss"
  type: "SoftmaxWithLoss"
  bottom: "fc1"
  bottom: "label"
  top: "loss"
}
layer {
  name: "accuracy"
  type: "Accuracy"
  bottom: "fc1"
  bottom: "label"
  top: "accuracy"
  include {
    phase: TEST
  }
}
"""
HDF5_SOLVER = """net: "examples/hdf5_classification/logreg_auto_train.prototxt"
test_iter: 3
test_interval: 1000
base_lr: 0.01
lr_policy: "step"
gamma: 0.1
stepsize: 5000
display: 1000
max_iter: 10000
momentum: 0.9
weight_decay: 0.0005
snapshot: 10000
snapshot_prefix: "examples/hdf5_classification/data/train"
solver_mode: CPU
"""


def _softmax_loss_and_accuracy(x: np.ndarray, labels: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    logits = x.astype(np.float64) @ w.T.astype(np.float64) + b
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    idx = labels.astype(int)
    return float(-logp[np.arange(len(x)), idx].mean()), float((logits.argmax(axis=1) == idx).mean())


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "caffeonnx", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_hdf5_classification_trains_and_tests_from_its_h5_lists(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    d = tmp_path / "examples" / "hdf5_classification" / "data"
    d.mkdir(parents=True)
    parts = {"train": [rng.normal(size=(14, 4)), rng.normal(size=(9, 4))], "test": [rng.normal(size=(7, 4))]}
    labels = {split: [rng.integers(0, 2, len(x)).astype(np.float32) for x in xs] for split, xs in parts.items()}
    for split, xs in parts.items():
        names = []
        for i, (x, y) in enumerate(zip(xs, labels[split])):
            with h5py.File(d / f"{split}{i}.h5", "w") as f:
                f["data"], f["label"] = x.astype(np.float32), y
            names.append(f"examples/hdf5_classification/data/{split}{i}.h5")
        (d / f"{split}.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "examples/hdf5_classification/logreg_auto_train.prototxt").write_text(HDF5_NET)
    (tmp_path / "examples/hdf5_classification/logreg_auto_solver.prototxt").write_text(HDF5_SOLVER)
    w, b = rng.normal(0, 0.5, (2, 4)).astype(np.float32), rng.normal(0, 0.1, 2).astype(np.float32)
    net = caffe_pb2.NetParameter()
    net.layer.add(name="fc1", type="InnerProduct")
    write_caffemodel(tmp_path / "init.caffemodel", net, {"fc1": [w, b]})

    run = _cli("train", "examples/hdf5_classification/logreg_auto_solver.prototxt", "--weights", "init.caffemodel",
               "--max-iter", "2", "--log", "log.jsonl", "--no-png", "-q", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train_x = np.concatenate(parts["train"]).astype(np.float32)
    train_y = np.concatenate(labels["train"])
    first = next(r for r in records if r.get("phase") != "test")
    want_loss, _ = _softmax_loss_and_accuracy(train_x[:10], train_y[:10], w, b)
    assert first["loss"] == pytest.approx(want_loss, rel=1e-5), "rows 0..9 of the files in list order"
    test = next(r for r in records if r.get("phase") == "test")
    test_x, test_y = parts["test"][0].astype(np.float32), labels["test"][0]
    losses, accs = zip(*(_softmax_loss_and_accuracy(test_x[rows], test_y[rows], w, b)
                         for rows in (np.arange(k * 10, k * 10 + 10) % 7 for k in range(3))))
    assert test["outputs"]["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert test["outputs"]["accuracy"] == pytest.approx(np.mean(accs), rel=1e-6)


IMAGE_NET = """name: "ImageDataNet"
layer {
  name: "data"
  type: "ImageData"
  top: "data"
  top: "label"
  include {
    phase: TEST
  }
  transform_param {
    scale: 0.00390625
    crop_size: 4
    mean_file: "mean.binaryproto"
  }
  image_data_param {
    source: "images.txt"
    root_folder: "imgs/"
    batch_size: 2
  }
}
layer {
  name: "ip"
  type: "InnerProduct"
  bottom: "data"
  top: "ip"
  inner_product_param {
    num_output: 1
    weight_filler {
      type: "constant"
      value: 0.01
    }
  }
}
layer {
  name: "loss"
  type: "EuclideanLoss"
  bottom: "ip"
  bottom: "label"
  top: "loss"
}
"""


def test_image_data_with_a_mean_file_scores_as_caffe_reads_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    (tmp_path / "imgs").mkdir()
    rgb = rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)  # three 6x6 colour images, H x W x RGB
    lines = []
    for i, pic in enumerate(rgb):
        Image.fromarray(pic).save(tmp_path / "imgs" / f"pic {i}.png")  # a space in the name: split at the last
        lines.append(f"pic {i}.png {i + 1}")
    (tmp_path / "images.txt").write_text("\n".join(lines) + "\n")
    mean = rng.uniform(0, 255, (3, 6, 6)).astype(np.float32)
    blob = caffe_pb2.BlobProto(data=mean.ravel().tolist())
    blob.shape.dim.extend([1, 3, 6, 6])
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    (tmp_path / "net.prototxt").write_text(IMAGE_NET)

    run = _cli("test", "net.prototxt", "--iterations", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    bgr = rgb[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)  # Caffe's cv::imread order, C x H x W
    x = ((bgr - mean)[:, :, 1:5, 1:5] * np.float32(0.00390625)).reshape(3, -1)  # centre 4x4 of 6x6
    want = []
    for batch in range(2):
        rows = np.arange(batch * 2, batch * 2 + 2) % 3
        pred = x[rows].astype(np.float64).sum(axis=1) * 0.01
        want.append(np.sum((pred - (rows + 1)) ** 2) / 2 / 2)
    got = [float(line.split("= ")[1]) for line in run.stdout.splitlines() if line.startswith("Batch ")]
    assert got == pytest.approx(want, rel=1e-4)
