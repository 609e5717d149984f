"""Stacked (greedy layer-wise) training: each phase trains its pair only, bypasses the inner layers, caches codes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.data import BatchSource
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.loop import Trainer
from caffeonnx.trainer.session import TrainOptions, run_training
from caffeonnx.trainer.stacked import StackedPlan, parse_pairs, train_stacked
from tests.helpers import assert_close, convert_text, rng


def ip(name: str, bottom: str, n: int) -> str:
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
            f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" std: 0.3 }} '
            'bias_filler { type: "gaussian" std: 0.1 } } }\n')


def sig(name: str) -> str:
    return f'layer {{ name: "{name}s" type: "Sigmoid" bottom: "{name}" top: "{name}s" }}\n'


NET = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 8 dim: 12 } } }\n'
       + ip("encode1", "data", 9) + sig("encode1") + ip("encode2", "encode1s", 6) + sig("encode2")
       + ip("encode3", "encode2s", 3) + ip("decode3", "encode3", 6) + sig("decode3")
       + ip("decode2", "decode3s", 9) + sig("decode2") + ip("decode1", "decode2s", 12)
       + 'layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "decode1" bottom: "data" top: "loss" }\n')
PAIRS = parse_pairs(["encode1:decode1,encode2:decode2", "encode3:decode3"])
SOLVER = caffe_pb2.SolverParameter(base_lr=0.5, momentum=0.9, lr_policy="fixed", max_iter=100)


def setup() -> tuple[GraphModule, BatchSource, StackedPlan]:
    converted = convert_text(NET, phase=caffe_pb2.TRAIN)
    module = GraphModule(converted.model, converted.weights)
    x = rng(2).uniform(size=(40, 12)).astype(np.float32)
    return module, BatchSource({"data": x}, {"data": (8, 12)}), StackedPlan(module, PAIRS)


def run_phase(module: GraphModule, plan: StackedPlan, i: int, data: BatchSource, iters: int) -> None:
    phase = plan.phases[i]
    blobs = [(info, p) for info, p in module.named_blobs() if info.name in phase.params]
    Trainer(module, SOLVER, data, objective=plan.objective(phase), blobs=blobs).step(iters)


@pytest.mark.parametrize("phase", [0, 1, 2])
def test_a_phase_changes_its_own_pair_only(phase: int) -> None:
    module, data, plan = setup()
    before = module.arrays()
    source = data if phase == 0 else plan.cache_inputs(plan.phases[phase], data)
    run_phase(module, plan, phase, source, 3)
    after = module.arrays()
    own = set(plan.phases[phase].params)
    assert {k for k in before if not np.array_equal(before[k], after[k])} == own


def test_phases_bypass_the_inner_layers_and_inner_phases_use_euclidean_on_cached_codes() -> None:
    module, data, plan = setup()
    w = {k: torch.from_numpy(v) for k, v in module.arrays().items()}

    def layer(name: str, x: torch.Tensor) -> torch.Tensor:
        return x @ w[f"{name}.weight"].t() + w[f"{name}.bias"]

    x = torch.from_numpy(data.batch(0)["data"])
    # Phase 1: decode1 reads encode1's code instead of decode2's output; the net's own loss scores it.
    logits = layer("decode1", torch.sigmoid(layer("encode1", x)))
    want1 = (torch.relu(logits) - logits * x + torch.log1p(torch.exp(-logits.abs()))).sum() / 8
    got1, _ = plan.objective(plan.phases[0])(data.batch(0))
    assert_close(got1.detach().numpy(), want1.numpy(), "phase 1 loss")
    cached = plan.cache_inputs(plan.phases[1], data)
    x1 = torch.sigmoid(layer("encode1", x))
    assert_close(cached.batch(0)["encode1s"], x1.numpy(), "cached encode1 codes")
    recon = torch.sigmoid(layer("decode2", torch.sigmoid(layer("encode2", x1))))
    want2 = ((recon - x1) ** 2).sum() / 8 / 2
    got2, _ = plan.objective(plan.phases[1])(cached.batch(0))
    assert_close(got2.detach().numpy(), want2.numpy(), "phase 2 loss", atol=1e-6)


def test_train_stacked_then_fine_tune_through_run_training(tmp_path: Path) -> None:
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.5\nmomentum: 0.9\nlr_policy: "fixed"\nmax_iter: 20\n'
        "snapshot_after_train: false\n")
    np.savez(tmp_path / "data.npz", data=rng(2).uniform(size=(40, 12)).astype(np.float32))
    lines: list[str] = []
    result = run_training(TrainOptions(tmp_path / "solver.prototxt", data=str(tmp_path / "data.npz"),
                                       stacked=["encode1:decode1,encode2:decode2,encode3:decode3"], stacked_iters=15,
                                       output=tmp_path / "out"), say=lines.append)
    assert [ln.split(" (")[0] for ln in lines if ln.startswith("stacked phase") and "iterations" in ln] == \
        ["stacked phase 1", "stacked phase 2", "stacked phase 3"]
    assert len(result.iterations) == 20, "then max_iter iterations of end-to-end fine-tuning"
    assert (tmp_path / "out.caffemodel").is_file()


def test_stacked_errors() -> None:
    with pytest.raises(CaffeOnnxError, match="expects ENCODER:DECODER"):
        parse_pairs(["encode1"])
    module, data, _ = setup()
    with pytest.raises(CaffeOnnxError, match="no layer named 'encode9'"):
        train_stacked(module, SOLVER, data, parse_pairs(["encode9:decode1"]), 1, "s", lambda _: None)
