"""`caffeonnx train` from a Caffe train prototxt whose Data layer reads a convert_mnist_data-style LMDB.

Caffe's own recipe (examples/mnist/mnist_autoencoder.prototxt): a Data layer with
`transform_param { scale }` over an LMDB of MNIST Datums, no `--data`.  The same samples
given as an .npz must train identically: the same losses, bit for bit, and the same weights.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from caffeonnx.cli import main
from caffeonnx.converter.caffe_io import read_caffemodel
from caffeonnx.data.lmdb_writer import write_datum_lmdb
from caffeonnx.runtime.inputs import open_samples
from caffeonnx.trainer.session import TrainOptions, run_training

MNIST = Path(__file__).parents[1] / "caffeonnx" / "examples" / "mnist_subset"
TIED_AE = Path(__file__).parents[1] / "caffeonnx" / "examples" / "tied_ae"
SAMPLES = 50  # records in the LMDB: with the batch sizes below, training wraps around the database

TIED_LAYERS = """
layer { name: "encode1" type: "InnerProduct" bottom: "data" top: "encode1"
  param { name: "encode1_matrix" lr_mult: 1 decay_mult: 1 } param { name: "encode1_bias" lr_mult: 1 decay_mult: 0 }
  inner_product_param { num_output: 64 } }
layer { name: "encode1neuron" type: "Sigmoid" bottom: "encode1" top: "encode1neuron" }
layer { name: "decode1" type: "InnerProduct" bottom: "encode1neuron" top: "decode1"
  param { name: "encode1_matrix" lr_mult: 1 decay_mult: 1 } param { name: "decode1_bias" lr_mult: 1 decay_mult: 0 }
  inner_product_param { num_output: 784 transpose: true } }
layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "decode1" bottom: "data" top: "loss" }
"""
SOLVER = """net: "{net}"
type: "SGD"
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.5
stepsize: 4
max_iter: {iters}
display: 0
snapshot_after_train: false
random_seed: 7
"""


def mnist_images(n: int) -> np.ndarray:
    """The first `n` bundled MNIST training images, uint8 (n, 28, 28)."""
    with open_samples(MNIST / "train-images-idx3-ubyte.gz", scratch_dir=None) as images:
        return np.array(images[:n])


def write_case(d: Path, layer0: str, iters: int) -> Path:
    """A train prototxt (`layer0` feeding "data", then the tied AE) and its solver in `d`; the solver's path."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.prototxt").write_text(f'name: "tied_ae"\n{layer0}\n{TIED_LAYERS}')
    (d / "solver.prototxt").write_text(SOLVER.format(net=d / "train.prototxt", iters=iters))  # absolute: cwd-proof
    return d / "solver.prototxt"


def data_layer(batch: int, scale: float) -> str:
    """Caffe's mnist_autoencoder Data layer: one top, pixels scaled, an LMDB relative to the working directory."""
    return (f'layer {{ name: "data" type: "Data" top: "data" transform_param {{ scale: {scale!r} }} '
            f'data_param {{ source: "mnist_train_lmdb" batch_size: {batch} backend: LMDB }} }}')


def cli_train(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """Run the real `caffeonnx train` entry point in-process; its stderr (fails on a non-zero exit)."""
    monkeypatch.setattr(sys, "argv", ["caffeonnx", "train", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert int(exit_info.value.code or 0) == 0, err
    return err


@pytest.mark.parametrize(("batch", "scale", "iters"), [(20, 0.0039215684, 6), (16, 0.00390625, 7)])
def test_lmdb_trains_exactly_as_the_same_samples_from_npz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], batch: int,
                                                          scale: float, iters: int) -> None:
    images = mnist_images(SAMPLES)
    weights = TIED_AE / "weights.caffemodel"
    lmdb_dir = tmp_path / "lmdb_case"
    solver = write_case(lmdb_dir, data_layer(batch, scale), iters)
    write_datum_lmdb(lmdb_dir / "mnist_train_lmdb", images, np.arange(SAMPLES) % 10)
    monkeypatch.chdir(lmdb_dir)  # Caffe opens the Data layer's source relative to the working directory
    # The CLI picks its thread count from the machine's load; bitwise equality needs the API run's count.
    err = cli_train(monkeypatch, capsys, solver, "--weights", weights, "--log", "log.jsonl", "-o", "trained",
                    "--device", "cpu", "-q", "--threads", str(torch.get_num_threads()))
    assert "reading train batches from Data layer 'data' ('mnist_train_lmdb')" in err
    lmdb_losses = [json.loads(line)["loss"] for line in (lmdb_dir / "log.jsonl").read_text().splitlines()]
    assert len(lmdb_losses) == iters and all(np.isfinite(lmdb_losses))

    # The same Data-layer net fed the raw bytes from an .npz: its transform_param scale is applied as well.
    np.savez(tmp_path / "bytes.npz", data=images[:, None])
    raw = run_training(TrainOptions(solver, weights=weights, data=str(tmp_path / "bytes.npz"), device="cpu",
                                    output=tmp_path / "raw"), say=lambda _: None)
    # An Input-layer net fed the scaled float samples Caffe's DataTransformer produces: x · float32(scale).
    scaled = images.reshape(SAMPLES, 784).astype(np.float32) * np.float32(scale)
    np.savez(tmp_path / "scaled.npz", data=scaled)
    input_solver = write_case(tmp_path / "input_case",
                              f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} '
                              'dim: 784 } } }', iters)
    floats = run_training(TrainOptions(input_solver, weights=weights, data=str(tmp_path / "scaled.npz"),
                                       device="cpu", output=tmp_path / "floats"), say=lambda _: None)

    for name, result in (("uint8 .npz through the Data layer", raw), ("scaled float .npz via Input", floats)):
        losses = [r.loss for r in result.iterations]
        assert losses == lmdb_losses, f"{name}: losses {losses} differ from the LMDB run's {lmdb_losses}"
    assert lmdb_losses[-1] < lmdb_losses[0], f"training does not learn: losses {lmdb_losses}"
    want = read_caffemodel(lmdb_dir / "trained.caffemodel").blobs
    for prefix in ("raw", "floats"):
        got = read_caffemodel(tmp_path / f"{prefix}.caffemodel").blobs
        for layer in ("encode1", "decode1"):
            for i, (g, w) in enumerate(zip(got[layer], want[layer], strict=True)):
                assert np.array_equal(g.data, w.data), (
                    f"{prefix}: trained blob {layer}[{i}] (shape {w.data.shape}) differs from the LMDB run's by "
                    f"up to {np.abs(g.data - w.data).max():.3g}")


def test_lmdb_writer_stores_convert_mnist_data_records(tmp_path: Path) -> None:
    import lmdb

    from caffeonnx.proto import caffe_pb2

    images = mnist_images(12)
    write_datum_lmdb(tmp_path / "db", images, np.arange(12) % 10)
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    with env.begin() as txn:
        records = list(txn.cursor())
    env.close()
    assert [k for k, _ in records] == [f"{i:08d}".encode() for i in range(12)]
    datum = caffe_pb2.Datum.FromString(records[11][1])
    assert (datum.channels, datum.height, datum.width, datum.label) == (1, 28, 28, 1)
    assert datum.data == images[11].tobytes() and not datum.float_data and not datum.encoded
