"""ContrastiveLoss against a numpy transcription of Caffe's ContrastiveLossLayer (atol 1e-5, rtol 1e-4),
and Caffe's siamese example (examples/siamese/mnist_siamese_train_test.prototxt) converted and trained."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffeonnx.converter.layers.loss import effective_loss_weights
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.data import BatchSource
from caffeonnx.trainer.loop import Trainer
from tests.converter.layers.graph_grad import forward_backward, module_of
from tests.helpers import assert_close, convert_text, rng, run


def net(n: int, c: int, extra: str = "", feat: str = "", sim: str = "") -> str:
    feat = feat or f"dim: {n} dim: {c}"
    sim = sim or f"dim: {n}"
    return (f'layer {{ name: "in" type: "Input" top: "a" top: "b" top: "sim" input_param {{ shape {{ {feat} }} '
            f'shape {{ {feat} }} shape {{ {sim} }} }} }}\n'
            f'layer {{ name: "loss" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "sim" top: "loss" {extra} }}\n')


def caffe_contrastive(a: np.ndarray, b: np.ndarray, sim: np.ndarray, margin: float,
                      legacy: bool) -> tuple[float, np.ndarray]:
    """Forward_cpu's loss and Backward_cpu's diff for bottom 0 (bottom 1 gets its negation)."""
    n = a.shape[0]
    diff = (a - b).reshape(n, -1).astype(np.float64)
    dist_sq = (diff * diff).sum(axis=1)
    similar = sim.reshape(-1).astype(np.int64) != 0
    loss, grad = 0.0, np.zeros_like(diff)
    for i in range(n):
        if similar[i]:
            loss += dist_sq[i]
            grad[i] = diff[i] / n
        elif legacy:
            loss += max(margin - dist_sq[i], 0.0)
            grad[i] = -diff[i] / n if margin - dist_sq[i] > 0 else 0
        else:
            dist = np.sqrt(dist_sq[i])
            loss += max(margin - dist, 0.0) ** 2
            mdist = margin - dist
            grad[i] = -(1 / n) * mdist / (dist + 1e-4) * diff[i] if mdist > 0 else 0
    return loss / n / 2, grad.reshape(a.shape)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(("margin", "feat", "sim"), [(1.0, (8, 3), (8,)), (2.5, (6, 4, 1, 1), (6, 1, 1, 1))])
def test_contrastive_loss(legacy: bool, margin: float, feat: tuple[int, ...], sim: tuple[int, ...]) -> None:
    g = rng(30)
    a = g.normal(size=feat).astype(np.float32)
    b = (a + g.normal(size=feat) * 0.6).astype(np.float32)
    b[1] = a[1]  # a dissimilar pair at distance 0: Caffe's gradient there is 0
    labels = g.integers(0, 2, size=sim).astype(np.float32)
    labels.reshape(-1)[:2] = [0, 0]
    labels.reshape(-1)[2] = 3  # any non-zero int is "similar"
    extra = f"contrastive_loss_param {{ margin: {margin} legacy_version: {str(legacy).lower()} }}"
    text = net(feat[0], 0, extra, " ".join(f"dim: {d}" for d in feat), " ".join(f"dim: {d}" for d in sim))
    want, da = caffe_contrastive(a, b, labels, margin, legacy)
    feeds = {"a": a, "b": b, "sim": labels}
    assert_close(run(convert_text(text), feeds)["loss"], np.float32(want), "loss")
    loss, grads = forward_backward(text, feeds, "loss", 1.0, ["a", "b"])
    assert_close(loss, np.float32(want), "loss (trainer)")
    # Caffe's backward divides by (d + 1e-4) where the exact derivative divides by d: 1e-4/d relative.
    dist = np.sqrt(((a - b).reshape(a.shape[0], -1).astype(np.float64) ** 2).sum(axis=1))
    rtol = 1e-4 if legacy else 1e-4 + 2e-4 / dist[dist > 0].min()
    assert_close(grads["a"], da, "da", rtol=rtol)
    assert_close(grads["b"], -da, "db", rtol=rtol)
    assert np.all(grads["a"][1] == 0), "a == b in a dissimilar pair: zero gradient, not NaN"


def test_contrastive_loss_is_a_loss_layer() -> None:
    assert effective_loss_weights(caffe_pb2.LayerParameter(type="ContrastiveLoss", top=["loss"])) == [1.0]


def test_contrastive_loss_shape_checks() -> None:
    with pytest.raises(LayerError, match=r"'loss' \(ContrastiveLoss\): the two feature bottoms"):
        convert_text(net(4, 0, feat="dim: 4 dim: 3 dim: 2"))
    with pytest.raises(LayerError, match="the similarity bottom 'sim' must hold one value per pair"):
        convert_text(net(4, 3, sim="dim: 4 dim: 2"))


def siamese_branch(suffix: str) -> str:
    """One branch of examples/siamese/mnist_siamese_train_test.prototxt; both share every param by name."""
    s = suffix
    xavier = 'weight_filler { type: "xavier" } bias_filler { type: "constant" }'

    def params(name: str) -> str:
        return f'param {{ name: "{name}_w" lr_mult: 1 }} param {{ name: "{name}_b" lr_mult: 2 }}'

    return f"""
layer {{ name: "conv1{s}" type: "Convolution" bottom: "data{s}" top: "conv1{s}" {params("conv1")}
  convolution_param {{ num_output: 20 kernel_size: 5 stride: 1 {xavier} }} }}
layer {{ name: "pool1{s}" type: "Pooling" bottom: "conv1{s}" top: "pool1{s}"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2{s}" type: "Convolution" bottom: "pool1{s}" top: "conv2{s}" {params("conv2")}
  convolution_param {{ num_output: 50 kernel_size: 5 stride: 1 {xavier} }} }}
layer {{ name: "pool2{s}" type: "Pooling" bottom: "conv2{s}" top: "pool2{s}"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1{s}" type: "InnerProduct" bottom: "pool2{s}" top: "ip1{s}" {params("ip1")}
  inner_product_param {{ num_output: 500 {xavier} }} }}
layer {{ name: "relu1{s}" type: "ReLU" bottom: "ip1{s}" top: "ip1{s}" }}
layer {{ name: "ip2{s}" type: "InnerProduct" bottom: "ip1{s}" top: "ip2{s}" {params("ip2")}
  inner_product_param {{ num_output: 10 {xavier} }} }}
layer {{ name: "feat{s}" type: "InnerProduct" bottom: "ip2{s}" top: "feat{s}" {params("feat")}
  inner_product_param {{ num_output: 2 {xavier} }} }}
"""


# The example's TRAIN phase with Input layers in place of its Data layers (batch 64; the data is fed
# already scaled by transform_param.scale 0.00390625).
SIAMESE = f"""name: "mnist_siamese_train_test"
layer {{ name: "pair_data" type: "Input" top: "pair_data" top: "sim"
  input_param {{ shape {{ dim: 64 dim: 2 dim: 28 dim: 28 }} shape {{ dim: 64 }} }} }}
layer {{ name: "slice_pair" type: "Slice" bottom: "pair_data" top: "data" top: "data_p"
  slice_param {{ slice_dim: 1 slice_point: 1 }} }}
{siamese_branch("")}{siamese_branch("_p")}
layer {{ name: "loss" type: "ContrastiveLoss" bottom: "feat" bottom: "feat_p" bottom: "sim" top: "loss"
  contrastive_loss_param {{ margin: 1 }} }}
"""

# examples/siamese/mnist_siamese_solver.prototxt's optimisation settings.
SOLVER = """base_lr: 0.01 momentum: 0.9 weight_decay: 0.0000 lr_policy: "inv" gamma: 0.0001 power: 0.75
max_iter: 50000 display: 0 solver_mode: CPU"""


def test_siamese_example_trains_two_iterations() -> None:
    converted = convert_text(SIAMESE, phase=caffe_pb2.TRAIN)
    assert len(converted.weights) == 10, "each of the 5 shared layers' 2 blobs is one initializer"
    module = module_of(SIAMESE)
    g = rng(31)
    pairs = g.uniform(0, 1, size=(128, 2, 28, 28)).astype(np.float32)
    sim = g.integers(0, 2, size=(128,)).astype(np.float32)
    data = BatchSource({"pair_data": pairs, "sim": sim}, {"pair_data": (64, 2, 28, 28), "sim": (64,)})
    with torch.no_grad():
        first = module({"pair_data": pairs[:64], "sim": sim[:64]}, ["feat", "feat_p"])
    want, _ = caffe_contrastive(first["feat"].numpy(), first["feat_p"].numpy(), sim[:64], 1.0, False)
    before = {info.name: p.detach().clone() for info, p in module.named_blobs()}
    trainer = Trainer(module, text_format.Parse(SOLVER, caffe_pb2.SolverParameter()), data)
    records = trainer.step(2)
    assert len(records) == 2
    assert_close(np.float32(records[0].outputs["loss"]), np.float32(want), "iteration 0 loss")
    assert all(np.isfinite(r.loss) for r in records)
    moved = {info.name: float((p.detach() - before[info.name]).abs().max()) for info, p in module.named_blobs()}
    # The loss sees only feat - feat_p, and ip2/feat are linear: their shared biases' gradients from the two
    # branches cancel exactly (as in Caffe), so only those two blobs stay (numerically) where they were.
    assert {k for k, v in moved.items() if v < 1e-6} == {"ip2_b", "feat_b"}, moved
