"""Training nets convert in TRAIN phase and reproduce real Caffe's first-iteration loss.

`losses.npy[0]` is the `loss` blob Caffe computed on `data.npz[...][0]` with
`init.caffemodel`, before any update: the forward pass of a training net, loss included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.proto import caffe_pb2
from tests.helpers import REFERENCE, assert_close, run

TRAIN_CASES = ["train_tied_sgd", "train_deep_adam", "train_deep_nesterov", "train_siamese_sgd"]


def test_every_train_fixture_is_covered() -> None:
    found = sorted(
        p.name
        for p in REFERENCE.iterdir()
        if (p / "case.json").exists() and json.loads((p / "case.json").read_text())["kind"] == "train"
    )
    assert found == sorted(TRAIN_CASES), f"train fixtures {found} vs cases tested {sorted(TRAIN_CASES)}"


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_first_iteration_loss_matches_caffe(case: str) -> None:
    d = REFERENCE / case
    meta = json.loads((d / "case.json").read_text())
    converted = convert_files(d / "train.prototxt", d / "init.caffemodel", ConvertOptions(phase=caffe_pb2.TRAIN))
    with np.load(d / "data.npz") as data:
        feeds = {name: data[name][0] for name in data.files}
    want = np.load(d / "losses.npy")[0].astype(np.float32)
    out = run(converted, feeds)
    loss_blob = meta["loss_blob"]
    assert loss_blob in out, f"{case}: no graph output named {loss_blob!r}; outputs are {sorted(out)}"
    assert out[loss_blob].shape == (), f"{case}: {loss_blob} has shape {out[loss_blob].shape}, Caffe's loss is a scalar"
    assert_close(out[loss_blob], want, f"{case}: {loss_blob}", atol=meta["atol"], rtol=meta["rtol"])


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_net_inputs_are_the_fed_blobs(case: str) -> None:
    d = REFERENCE / case
    model = convert_files(d / "train.prototxt", d / "init.caffemodel", ConvertOptions(phase=caffe_pb2.TRAIN)).to_proto()
    with np.load(d / "data.npz") as data:
        fed = sorted(data.files)
    assert sorted(i.name for i in model.graph.input) == fed, f"{case}: graph inputs vs data.npz arrays {fed}"
    for i in model.graph.input:
        dim0 = i.type.tensor_type.shape.dim[0]
        assert dim0.dim_param, f"{case}: input {i.name!r} bakes in batch {dim0.dim_value}; it must stay dynamic"


def test_train_loss_follows_the_batch_fed() -> None:
    # The normaliser (num) comes from the fed batch: half the batch gives that half's mean loss.
    d = REFERENCE / "train_tied_sgd"
    converted = convert_files(d / "train.prototxt", d / "init.caffemodel", ConvertOptions(phase=caffe_pb2.TRAIN))
    with np.load(d / "data.npz") as data:
        batch = data["data"][0]
    halves = [run(converted, {"data": part})["loss"] for part in (batch[:16], batch[16:])]
    whole = run(converted, {"data": batch})["loss"]
    assert_close(whole, np.float32((halves[0] + halves[1]) / 2), "loss of the whole batch vs mean of its halves")
