"""The Caffe training cases reproduced on a CUDA device (skipped without one; CI has no GPU).

Same fixtures and tolerances as test_reference_training (rtol 1e-4, atol 1e-5 per case.json):
the trainer keeps float32 math on the GPU (no TF32).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caffeonnx.trainer.build import build_module, load_solver, read_weights, train_net
from caffeonnx.trainer.data import input_shapes, load_source
from caffeonnx.trainer.loop import Trainer
from tests.helpers import REFERENCE, assert_close
from tests.trainer.test_reference_training import TRAIN_CASES, assert_weights_match

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch here")


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_losses_and_final_weights_match_caffe_on_cuda(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    d = REFERENCE / case
    meta = json.loads((d / "case.json").read_text())
    monkeypatch.chdir(d.parent)
    param = load_solver(d / "solver.prototxt")
    tn = train_net(param, d / "solver.prototxt")
    module = build_module(tn, read_weights(d / "init.caffemodel"), seed=param.random_seed).to("cuda")
    data = load_source(d / "data.npz", input_shapes(module.input_dims, [layer for layer in module.caffe_layers if layer]))
    trainer = Trainer(module, param, data, str(d / "solver.prototxt"))
    want = np.load(d / "losses.npy")
    records = trainer.step(len(want))
    assert all(p.device.type == "cuda" for _, p in trainer.solver.blobs)
    got = np.array([r.outputs[meta["loss_blob"]] for r in records], dtype=np.float32)
    assert_close(got, want, f"{case} losses (CUDA)", atol=meta["atol"], rtol=meta["rtol"])
    assert_weights_match(trainer.module, d / "final.caffemodel", meta["atol"], meta["rtol"])
