"""Acceptance: every training case computed by real Caffe, reproduced iteration by iteration.

From init.caffemodel and data.npz, the per-iteration losses (losses.npy) and the final
weights (final.caffemodel) must match Caffe's within the case's tolerances (rtol 1e-4,
atol 1e-5; the issue asks for rtol 1e-3).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from caffeonnx.converter.caffe_to_onnx import load_weights
from caffeonnx.trainer.build import build_module, load_solver, read_weights, train_net
from caffeonnx.trainer.data import input_shapes, load_source
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.loop import Trainer
from tests.helpers import REFERENCE, assert_close

TRAIN_CASES = sorted(
    p.name for p in REFERENCE.iterdir()
    if (p / "case.json").exists() and json.loads((p / "case.json").read_text())["kind"] == "train"
)


def make_trainer(case_dir: Path) -> Trainer:
    """The case's solver, net, init weights and data, set up as `caffeonnx train` does."""
    param = load_solver(case_dir / "solver.prototxt")
    tn = train_net(param, case_dir / "solver.prototxt")
    module = build_module(tn, read_weights(case_dir / "init.caffemodel"), seed=param.random_seed)
    data = load_source(case_dir / "data.npz", input_shapes(module.input_dims, [layer for layer in module.caffe_layers if layer]))
    return Trainer(module, param, data, str(case_dir / "solver.prototxt"))


def assert_weights_match(module: GraphModule, final: Path, atol: float, rtol: float) -> None:
    want = load_weights(final).blobs
    net = module.caffe_net()  # caffe_blobs() is keyed by position in it (names may repeat)
    got = {net.layer[k].name: blobs for k, blobs in module.caffe_blobs().items()}
    assert sorted(got) == sorted(k for k, v in want.items() if v), "layers with params"
    for layer, blobs in got.items():
        assert len(blobs) == len(want[layer]), f"{layer}: blob count"
        for i, arr in enumerate(blobs):
            assert_close(arr, want[layer][i].data, f"{layer} blob {i}", atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_losses_and_final_weights_match_caffe(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    d = REFERENCE / case
    meta = json.loads((d / "case.json").read_text())
    monkeypatch.chdir(d.parent)  # Caffe resolves `net:` from the CWD; here it is found beside the solver
    trainer = make_trainer(d)
    want = np.load(d / "losses.npy")
    assert len(want) == meta["iters"]
    records = trainer.step(len(want))
    got = np.array([r.outputs[meta["loss_blob"]] for r in records], dtype=np.float32)
    assert_close(got, want, f"{case} losses", atol=meta["atol"], rtol=meta["rtol"])
    assert_weights_match(trainer.module, d / "final.caffemodel", meta["atol"], meta["rtol"])


def test_net_found_beside_the_solver_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REFERENCE)
    d = REFERENCE / "train_tied_sgd"
    tn = train_net(load_solver(d / "solver.prototxt"), d / "solver.prototxt")
    assert tn.source == str(d / "train.prototxt")
    note = f"net 'train.prototxt' is not in the current directory (where Caffe looks); using '{d / 'train.prototxt'}'"
    assert tn.notes == [note + " beside the solver"]


def test_plain_torch_sgd_misses_the_step_policy_case() -> None:
    """torch.optim.SGD keeps an unscaled velocity: identical to Caffe until the rate halves, then it diverges."""
    d = REFERENCE / "train_tied_sgd"
    meta = json.loads((d / "case.json").read_text())
    trainer = make_trainer(d)
    module, param = trainer.module, trainer.param
    groups = [{"params": [p], "weight_decay": param.weight_decay * info.decay_mult, "lr": param.base_lr * info.lr_mult}
              for info, p in module.named_blobs()]
    opt = torch.optim.SGD(groups, lr=param.base_lr, momentum=param.momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=param.stepsize, gamma=param.gamma)
    want = np.load(d / "losses.npy")
    losses = []
    for it in range(len(want)):
        opt.zero_grad()
        values = module(trainer.data.batch(it), module.loss_outputs())
        loss = module.loss(values)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
        sched.step()
    losses_arr = np.array(losses, dtype=np.float32)
    before = param.stepsize + 1  # the first update at the new rate shows in the loss of the next iteration
    assert_close(losses_arr[:before], want[:before], "losses while the rate is base_lr", atol=meta["atol"], rtol=meta["rtol"])
    with pytest.raises(AssertionError, match="values differ"):
        assert_weights_match(module, d / "final.caffemodel", atol=1e-5, rtol=1e-3)
    rel = np.abs(losses_arr[before:] - want[before:]) / np.abs(want[before:])
    assert rel.max() > 1e-3, f"torch.optim.SGD's losses after the rate change stay within {rel.max():.2g} of Caffe's"
