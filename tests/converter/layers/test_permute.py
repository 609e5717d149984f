"""Permute (SSD Caffe fork) against a numpy transcription of its index arithmetic, exact."""
from __future__ import annotations

import math

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, rng, run


def _net(shape: tuple[int, ...], order: list[int]) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    orders = " ".join(f"order: {o}" for o in order)
    return (
        f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
        f'layer {{ name: "permute" type: "Permute" bottom: "x" top: "y" permute_param {{ {orders} }} }}\n'
    )


def ssd_permute(x: np.ndarray, order: list[int]) -> np.ndarray:
    """PermuteLayer::Forward_cpu: split each top index with the top strides, rebuild it with the bottom strides."""
    perm = order + [a for a in range(x.ndim) if a not in order]
    top_shape = [x.shape[a] for a in perm]
    old_steps = [math.prod(x.shape[a + 1:]) for a in range(x.ndim)]
    new_steps = [math.prod(top_shape[a + 1:]) for a in range(x.ndim)]
    idx = np.arange(x.size)
    old = np.zeros_like(idx)
    for j in range(x.ndim):
        old += (idx // new_steps[j]) * old_steps[perm[j]]
        idx = idx % new_steps[j]
    return x.reshape(-1)[old].reshape(top_shape)


CASES = [
    ((2, 3, 4, 5), [0, 2, 3, 1]),  # SSD's mbox_loc_perm / mbox_conf_perm: NCHW -> NHWC
    ((2, 3, 4, 5), [0, 3, 1, 2]),
    ((2, 3, 4, 5), [1]),  # unlisted axes follow in order: [1, 0, 2, 3]
    ((2, 3, 4, 5), [0, 1]),  # identity: Caffe shares the data
    ((2, 3, 4), [2, 0]),
    ((2, 3, 4, 5), []),
]


@pytest.mark.parametrize(("shape", "order"), CASES)
@pytest.mark.parametrize("batch", [2, 3])
def test_permute_matches_ssd_caffe(shape: tuple[int, ...], order: list[int], batch: int) -> None:
    """Converted with prototxt batch 2; batch 3 checks the graph keeps the batch dynamic."""
    x = rng(len(order) + batch).standard_normal((batch, *shape[1:])).astype(np.float32)
    got = run(convert_text(_net(shape, order)), {"x": x})["y"]
    assert_close(got, ssd_permute(x, order), f"Permute order {order} of {x.shape}", atol=0, rtol=0)


@pytest.mark.parametrize(
    ("order", "message"),
    [([0, 4, 1], "names axis 4 but the bottom [2, 3, 4, 5] has 4 axes"), ([0, 2, 2], "has duplicate axes")],
)
def test_permute_refuses_bad_orders(order: list[int], message: str) -> None:
    with pytest.raises(LayerError, match="layer 'permute' \\(Permute\\)") as err:
        convert_text(_net((2, 3, 4, 5), order))
    assert message in str(err.value)
