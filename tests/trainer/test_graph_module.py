"""GraphModule: Caffe's forward on every reference case, one Parameter per tie, Caffe TRAIN layers, write-back."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from caffeonnx.converter.caffe_io import read_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule
from tests.helpers import REFERENCE, assert_close, convert_text, rng

FORWARD_CASES = sorted(
    p.name for p in REFERENCE.iterdir()
    if (p / "case.json").exists() and json.loads((p / "case.json").read_text())["kind"] == "forward"
)


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_every_blob_matches_caffe(case: str) -> None:
    """Each blob Caffe computed, recomputed by the torch interpreter, within the case's tolerances."""
    d = REFERENCE / case
    meta = json.loads((d / "case.json").read_text())
    converted = convert_files(d / "net.prototxt", d / "weights.caffemodel", ConvertOptions(all_blobs=True))
    module = GraphModule(converted.model, converted.weights).eval()
    inputs, blobs = dict(np.load(d / "inputs.npz")), dict(np.load(d / "blobs.npz"))
    wanted = [b for b in blobs if b not in inputs]
    with torch.no_grad():
        got = module(inputs, wanted)
    for name in wanted:
        assert_close(got[name].numpy(), blobs[name], f"{case}/{name}", atol=meta["atol"], rtol=meta["rtol"])


TIED = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 5 dim: 12 } } }
layer { name: "encode1" type: "InnerProduct" bottom: "data" top: "encode1"
  param { name: "W" } inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "encode1neuron" type: "Sigmoid" bottom: "encode1" top: "h" }
layer { name: "decode1" type: "InnerProduct" bottom: "h" top: "decode1"
  param { name: "W" } inner_product_param { num_output: 12 transpose: true bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "decode1" bottom: "data" top: "loss" }
"""


def test_tied_weight_is_one_parameter_whose_gradient_sums_both_users() -> None:
    converted = convert_text(TIED, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights).train()
    assert [info.name for info, _ in module.named_blobs()] == ["W", "encode1.bias", "decode1.bias"]
    x = torch.from_numpy(rng(3).normal(size=(5, 12)).astype(np.float32))
    loss = module.loss(module({"data": x}, module.loss_outputs()))
    loss.backward()
    # The same net with the weight used as two independent copies: its two gradients must add up.
    w_enc = torch.from_numpy(converted.weights["W"].copy()).requires_grad_()
    w_dec = torch.from_numpy(converted.weights["W"].copy()).requires_grad_()
    b1, b2 = (torch.from_numpy(converted.weights[n]) for n in ("encode1.bias", "decode1.bias"))
    recon = torch.sigmoid(x @ w_enc.t() + b1) @ w_dec + b2
    ref = ((recon - x) ** 2).sum() / 5 / 2
    ref.backward()
    assert_close(loss.detach().numpy(), ref.detach().numpy(), "loss")
    assert_close(module.parameter("W").grad.numpy(), (w_enc.grad + w_dec.grad).numpy(), "dW (sum of users)")
    assert module.loss_terms[0].blob == "loss" and module.loss_terms[0].weight == 1.0


def test_written_back_onnx_keeps_ties_and_runs_with_the_new_values(tmp_path) -> None:
    converted = convert_text(TIED, phase=caffe_pb2.TEST)
    module = GraphModule(converted.model, converted.weights)
    with torch.no_grad():
        for p in module.params:
            p.add_(0.25)
    path = tmp_path / "trained.onnx"
    module.save_onnx(path)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [t.name for t in model.graph.initializer] == ["W", "encode1.bias", "decode1.bias"]
    assert model.metadata_props == converted.model.metadata_props
    x = rng(4).normal(size=(5, 12)).astype(np.float32)
    again = GraphModule(model).eval()
    with torch.no_grad():
        want = module.eval()({"data": x}, ["decode1"])["decode1"].numpy()
        got = again({"data": x}, ["decode1"])["decode1"].numpy()
    assert_close(got, want, "decode1 after reload")
    for t in model.graph.initializer:
        assert_close(onnx.numpy_helper.to_array(t), converted.weights[t.name] + np.float32(0.25), t.name)


def test_caffemodel_holds_the_shared_blob_once_per_user_layer(tmp_path) -> None:
    d = REFERENCE / "tied_ae"
    converted = convert_files(d / "net.prototxt", d / "weights.caffemodel")
    module = GraphModule(converted.model, converted.weights)
    with torch.no_grad():
        module.parameter("encode1_matrix").mul_(2.0)
    path = tmp_path / "out.caffemodel"
    module.save_caffemodel(path)
    written = read_caffemodel(path)
    original = read_caffemodel(d / "weights.caffemodel")
    assert [layer.name for layer in written.net.layer] == [r.name for r in module.records]
    for layer in ("encode1", "decode1"):
        assert len(written.blobs[layer]) == len(original.blobs[layer])
        assert_close(written.blobs[layer][0].data, original.blobs[layer][0].data * 2, f"{layer} weight")
        assert_close(written.blobs[layer][1].data, original.blobs[layer][1].data, f"{layer} bias")
    reconverted = convert_files(d / "net.prototxt", path)
    for name, arr in module.arrays().items():
        assert_close(reconverted.weights[name], arr, f"reconverted {name}")


PERMISSIVE = """
layer { name: "data" type: "Input" top: "data" top: "small" input_param { shape { dim: 2 dim: 6 } shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 4 bias_term: false }
  param { name: "W" } }
layer { name: "b" type: "InnerProduct" bottom: "small" top: "b" inner_product_param { num_output: 8 bias_term: false }
  param { name: "W" share_mode: PERMISSIVE } }
layer { name: "c" type: "Concat" bottom: "a" bottom: "b" top: "c" }
"""


def test_caffemodel_gives_permissive_users_their_own_blob_shape(tmp_path) -> None:
    """A PERMISSIVE share (same count, other shape) is written in each user's shape, as Caffe stores it."""
    w = rng(3).standard_normal((4, 6)).astype(np.float32)
    converted = convert_text(PERMISSIVE, {"a": [w], "b": [w.reshape(8, 3)]})
    module = GraphModule(converted.model, converted.weights)
    path = tmp_path / "out.caffemodel"
    module.save_caffemodel(path)
    written = read_caffemodel(path)
    assert written.blobs["a"][0].data.shape == (4, 6) and written.blobs["b"][0].data.shape == (8, 3)
    assert np.array_equal(written.blobs["b"][0].data, w.reshape(8, 3))


DROPOUT = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 64 dim: 200 } } }
layer { name: "drop" type: "Dropout" bottom: "data" top: "data" dropout_param { dropout_ratio: %s } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }
"""


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_dropout_is_caffes_inverted_dropout_in_train_and_identity_in_eval(ratio: float) -> None:
    converted = convert_text(DROPOUT % ratio, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights, seed=7)
    top = next(r.tops[0] for r in module.records if r.name == "drop")  # in place: "data@drop"
    x = torch.from_numpy(rng(5).uniform(1, 2, size=(64, 200)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(module.eval()({"data": x}, [top])[top], x)
        out = module.train()({"data": x}, [top])[top]
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / (1 - ratio), rtol=1e-6), "kept units are scaled by 1/(1-p)"
    frac = kept.float().mean().item()
    assert abs(frac - (1 - ratio)) < 0.02, f"kept fraction {frac:.3f}, expected {1 - ratio} (12800 draws)"


def test_batch_norm_trains_on_batch_statistics_and_accumulates_caffes_moving_averages() -> None:
    text = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 6 dim: 3 dim: 2 dim: 2 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { moving_average_fraction: 0.9 } }
"""
    converted = convert_text(text, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights).train()
    assert all(info.lr_mult == 0 for info, _ in module.named_blobs()), "Caffe freezes BatchNorm statistics"
    xs = [rng(s).normal(2.0, 3.0, size=(6, 3, 2, 2)).astype(np.float32) for s in (1, 2)]
    mean_acc, var_acc, s = np.zeros(3), np.zeros(3), 0.0
    for x in xs:
        with torch.no_grad():
            y = module({"data": x}, ["bn"])["bn"].numpy()
        mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
        assert_close(y, (x - mu.reshape(1, 3, 1, 1)) / np.sqrt(var.reshape(1, 3, 1, 1) + 1e-5), "bn (batch stats)")
        s, mean_acc, var_acc = 0.9 * s + 1, 0.9 * mean_acc + mu, 0.9 * var_acc + 24 / 23 * var
    arrays = module.arrays()
    names = [info.name for info, _ in module.named_blobs()]
    assert_close(arrays[names[0]], mean_acc.astype(np.float32), "mean blob")
    assert_close(arrays[names[1]], var_acc.astype(np.float32), "variance blob")
    assert_close(arrays[names[2]], np.array([s], np.float32), "moving average factor")


def test_loss_weight_on_any_top_joins_the_objective_and_zero_weight_leaves_it() -> None:
    text = """
layer { name: "data" type: "Input" top: "data" top: "t" input_param { shape { dim: 4 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" loss_weight: 0.5
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "l2" type: "EuclideanLoss" bottom: "ip" bottom: "t" top: "l2" loss_weight: 0 }
"""
    converted = convert_text(text, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights)
    assert [(t.blob, t.weight) for t in module.loss_terms] == [("ip", 0.5)]
    x, t = rng(1).normal(size=(4, 3)).astype(np.float32), rng(2).normal(size=(4, 3)).astype(np.float32)
    values = module({"data": x, "t": t}, module.loss_outputs())
    w, b = converted.weights["ip.weight"], converted.weights["ip.bias"]
    assert_close(module.loss(values).detach().numpy(), np.float32(0.5 * (x @ w.T + b).sum()), "objective")


SIGMOID_CE = """
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 6 } } }
layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 4 dim: 2 dim: 3 } } }
layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss" loss_param { %s } }
"""


@pytest.mark.parametrize("ignore", [None, -1])
@pytest.mark.parametrize("norm", ["normalization: FULL", "normalization: VALID", "normalization: BATCH_SIZE",
                                  "normalization: NONE", "normalize: true", ""])
def test_sigmoid_cross_entropy_trains_with_caffes_closed_form_gradient(norm: str, ignore: int | None) -> None:
    """TRAIN: value as the inference graph's, ∂x = (sigmoid(x) − t)·[t ≠ ignore]/normalizer (atol 1e-6, rtol 1e-5)."""
    param = norm + (f" ignore_label: {ignore}" if ignore is not None else "")
    converted = convert_text(SIGMOID_CE % param, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights)
    assert [ov.layer for ov in module.overrides.values()] == ["loss"], "SigmoidCrossEntropyLoss has a TRAIN-phase forward"
    x = rng(8).normal(0.0, 3.0, size=(4, 6)).astype(np.float32)
    t = rng(9).choice(np.array([0.0, 0.25, 1.0, -1.0], np.float32), size=(4, 2, 3))
    kept = np.ones_like(x) if ignore is None else (t.reshape(4, 6).astype(np.int64) != ignore).astype(np.float32)
    normalizer = {"normalization: FULL": 24.0, "normalization: VALID": kept.sum(), "normalization: BATCH_SIZE": 4.0,
                  "normalization: NONE": 1.0, "normalize: true": kept.sum(), "": 4.0}[norm]
    results = {}
    for mode in ("train", "eval"):
        xt = torch.from_numpy(x.copy()).requires_grad_()
        loss = getattr(module, mode)()({"x": xt, "t": t}, ["loss"])["loss"]
        loss.backward()
        results[mode] = (loss.detach().numpy(), xt.grad.numpy())
    want_grad = (1 / (1 + np.exp(-x.astype(np.float64))) - t.reshape(4, 6)) * kept / max(normalizer, 1.0)
    assert_close(results["train"][0], results["eval"][0], f"loss ({param!r})", atol=1e-6, rtol=1e-5)
    assert_close(results["train"][1], want_grad, f"d loss/dx ({param!r})", atol=1e-6, rtol=1e-5)
    assert_close(results["eval"][1], want_grad, f"d loss/dx via the graph ({param!r})", atol=1e-6, rtol=1e-5)
