"""BatchNormalization -> BatchNorm + Scale; LRN -> LRN (atol 1e-5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.converter.foreign.helpers import check_conversion, feeds_for, layer_types, make_model, node


@pytest.mark.parametrize("x_shape", [[2, 4, 5, 3], [3, 4]], ids=["4d", "2d"])
def test_batch_norm(x_shape: list[int], tmp_path: Path) -> None:
    rng = np.random.default_rng(20)
    c = x_shape[1]
    inits = {"gamma": rng.random(c, dtype=np.float32) + 0.5, "beta": rng.standard_normal(c).astype(np.float32),
             "mean": rng.standard_normal(c).astype(np.float32), "var": rng.random(c, dtype=np.float32) + 0.2}
    model = make_model([node("BatchNormalization", ["x", "gamma", "beta", "mean", "var"], epsilon=1e-3)],
                       {"x": x_shape}, ["y"], inits)
    result = check_conversion(model, feeds_for(model, 0), tmp_path)
    assert layer_types(result) == ["Input", "BatchNorm", "Scale"]
    bn, scale = result.net.layer[1:]
    assert bn.batch_norm_param.use_global_stats and np.isclose(bn.batch_norm_param.eps, 1e-3)
    assert [p.lr_mult for p in bn.param] == [0.0, 0.0, 0.0], "Caffe must not train the statistics"
    mean, var, factor = result.blobs[bn.name]
    assert np.array_equal(mean, inits["mean"]) and np.array_equal(var, inits["var"]) and factor.tolist() == [1.0]
    assert np.array_equal(result.blobs[scale.name][0], inits["gamma"]) and scale.scale_param.bias_term


@pytest.mark.parametrize("size", [3, 5])
def test_lrn(size: int, tmp_path: Path) -> None:
    model = make_model([node("LRN", ["x"], size=size, alpha=2e-3, beta=0.6, bias=1.5)], {"x": [2, 7, 3, 3]}, ["y"])
    result = check_conversion(model, feeds_for(model, 1), tmp_path)
    assert result.net.layer[1].lrn_param.local_size == size
