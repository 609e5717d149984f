"""Eltwise SUM (with coeff), PROD and MAX against numpy, and the layer_zoo blobs computed by Caffe.

Nets declare batch 2 and are fed batch 3 (batch-agnostic). Tolerances atol 1e-5, rtol 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, reference_subnet, rng, run

SHAPE = (2, 3, 4, 5)
FED = (3, 3, 4, 5)


def _net(n_bottoms: int, params: str, shapes: list[tuple[int, ...]] | None = None) -> str:
    shapes = shapes or [SHAPE] * n_bottoms
    lines = [
        f'layer {{ name: "in{i}" type: "Input" top: "x{i}" input_param {{ shape {{ '
        + " ".join(f"dim: {d}" for d in s)
        + " } } }"
        for i, s in enumerate(shapes)
    ]
    bottoms = " ".join(f'bottom: "x{i}"' for i in range(len(shapes)))
    lines.append(f'layer {{ name: "elt" type: "Eltwise" {bottoms} top: "y" eltwise_param {{ {params} }} }}')
    return "\n".join(lines)


def _inputs(n: int, seed: int, ties: bool) -> list[np.ndarray]:
    g = rng(seed)
    if ties:  # few distinct values: many equal pairs for MAX
        return [g.integers(-2, 3, FED).astype(np.float32) for _ in range(n)]
    return [g.standard_normal(FED).astype(np.float32) for _ in range(n)]


CASES = {
    "sum": (2, "operation: SUM", lambda xs: xs[0] + xs[1]),
    "sum_default_op": (3, "", lambda xs: xs[0] + xs[1] + xs[2]),
    "sum_coeff": (2, "operation: SUM coeff: 0.5 coeff: 1.5", lambda xs: 0.5 * xs[0] + 1.5 * xs[1]),
    "sum_difference": (2, "coeff: 1 coeff: -1", lambda xs: xs[0] - xs[1]),
    "sum_coeff_3": (3, "coeff: -2 coeff: 0.25 coeff: 1", lambda xs: -2 * xs[0] + 0.25 * xs[1] + xs[2]),
    "prod": (2, "operation: PROD", lambda xs: xs[0] * xs[1]),
    "prod_3": (3, "operation: PROD", lambda xs: xs[0] * xs[1] * xs[2]),
    "max": (2, "operation: MAX", lambda xs: np.maximum(xs[0], xs[1])),
    "max_4": (4, "operation: MAX", lambda xs: np.maximum.reduce(xs)),
    "max_coeff_ignored": (2, "operation: MAX coeff: 3 coeff: 4", lambda xs: np.maximum(xs[0], xs[1])),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("ties", [False, True], ids=["normal", "ties"])
def test_matches_caffe_forward(case: str, ties: bool) -> None:
    n, params, reference = CASES[case]
    xs = _inputs(n, seed=n, ties=ties)
    got = run(convert_text(_net(n, params)), {f"x{i}": x for i, x in enumerate(xs)})["y"]
    assert_close(got, reference([x.astype(np.float64) for x in xs]), f"{case} y")


def test_unit_coeffs_add_no_multiplication() -> None:
    model = convert_text(_net(2, "coeff: 1 coeff: 1")).to_proto()
    assert [n.op_type for n in model.graph.node] == ["Sum"]


@pytest.mark.parametrize(
    ("n", "params", "shapes", "message"),
    [
        (1, "", None, r"Eltwise Layer takes at least 2 bottom blob\(s\) as input; it has 1"),
        (2, "coeff: 1", None, "eltwise_param has 1 coeff\\(s\\) \\[1.0\\] for 2 bottoms"),
        (
            2,
            "operation: PROD coeff: 1 coeff: 2",
            None,
            "eltwise_param.coeff \\[1.0, 2.0\\] is only allowed with operation SUM",
        ),
        (2, "", [SHAPE, (2, 3, 5, 4)], "bottom 'x1' has shape \\[2, 3, 5, 4\\] but bottom 'x0' has \\[2, 3, 4, 5\\]"),
    ],
)
def test_invalid_eltwise_is_a_layer_error(n: int, params: str, shapes: list | None, message: str) -> None:
    with pytest.raises(LayerError, match=r"layer 'elt' \(Eltwise\): " + message):
        convert_text(_net(n, params, shapes))


def test_layer_zoo_blobs_match_caffe() -> None:
    """elt_sum (coeff 0.5, 1.5), elt_prod and elt_max of the layer_zoo net, fed lrn and data from Caffe."""
    text, feeds, expected = reference_subnet("layer_zoo", ["elt_sum", "elt_prod", "elt_max"])
    got = run(convert_text(text, all_blobs=True), feeds)
    assert sorted(expected) == ["elt_max", "elt_prod", "elt_sum"]
    for name, want in expected.items():
        assert_close(got[name], want, f"layer_zoo {name}")
