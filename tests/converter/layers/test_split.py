"""Split: every top equals the bottom (Caffe shares the data), exactly."""
from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, rng, run

INPUT = 'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 4 } } }\n'


@pytest.mark.parametrize("tops", [1, 2, 4])
def test_every_split_top_is_the_bottom(tops: int) -> None:
    names = " ".join(f'top: "y{i}"' for i in range(tops))
    m = convert_text(INPUT + f'layer {{ name: "split" type: "Split" bottom: "x" {names} }}\n')
    x = rng(tops).standard_normal((5, 3, 4)).astype(np.float32)  # batch 5, prototxt says 2
    got = run(m, {"x": x})
    assert sorted(got) == [f"y{i}" for i in range(tops)]
    for i in range(tops):
        assert_close(got[f"y{i}"], x, f"Split top y{i}", atol=0, rtol=0)


def test_split_feeding_two_consumers_keeps_both_copies() -> None:
    text = INPUT + (
        'layer { name: "split" type: "Split" bottom: "x" top: "a" top: "b" }\n'
        'layer { name: "act" type: "TanH" bottom: "a" top: "t" }\n'
        'layer { name: "sig" type: "Sigmoid" bottom: "b" top: "s" }\n'
    )
    x = rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    got = run(convert_text(text), {"x": x})
    assert_close(got["t"], np.tanh(x), "t = tanh(split copy a)")
    assert_close(got["s"], 1 / (1 + np.exp(-x)), "s = sigmoid(split copy b)")


def test_split_refuses_in_place() -> None:
    with pytest.raises(LayerError, match="layer 'split' \\(Split\\).*does not allow in-place"):
        convert_text(INPUT + 'layer { name: "split" type: "Split" bottom: "x" top: "x" top: "y" }\n')
