"""Element-wise neuron layers against numpy versions of Caffe's forward (float64 references).

Nets declare batch 2 and are fed batch 3, so every graph is checked to be batch-agnostic.
Default tolerances atol 1e-5, rtol 1e-4; Exp/Power/Log cases that amplify float32 rounding
state their own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, reference_subnet, rng, run

SHAPE = (2, 3, 4, 5)
FED = (3, 3, 4, 5)


def _net(layer_type: str, params: str = "", shape: tuple[int, ...] = SHAPE) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (
        f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
        f'layer {{ name: "act" type: "{layer_type}" bottom: "x" top: "y" {params} }}\n'
    )


def _normal(seed: int) -> np.ndarray:
    return rng(seed).standard_normal(FED).astype(np.float32)


def _positive(seed: int) -> np.ndarray:
    return rng(seed).uniform(0.1, 3.0, FED).astype(np.float32)


def _wide(seed: int) -> np.ndarray:
    """Normal values plus extremes where a naive log(1 + exp(x)) overflows or loses everything."""
    x = 4 * _normal(seed)
    x.flat[:8] = [-200.0, -100.0, -30.0, -1e-4, 0.0, 30.0, 100.0, 200.0]
    return x


def _on_threshold(seed: int) -> np.ndarray:
    """Normal values, some exactly equal to the threshold 0.5 (Caffe's test is strict: x > t)."""
    x = _normal(seed)
    x.flat[::7] = 0.5
    return x


Case = tuple[str, str, Callable[[int], np.ndarray], Callable[[np.ndarray], np.ndarray], float, float]

CASES: dict[str, Case] = {
    "sigmoid": ("Sigmoid", "", _normal, lambda x: 1 / (1 + np.exp(-x)), 1e-5, 1e-4),
    "tanh": ("TanH", "", _normal, np.tanh, 1e-5, 1e-4),
    "relu": ("ReLU", "", _normal, lambda x: np.maximum(x, 0), 0, 0),
    "leaky_relu": (
        "ReLU",
        "relu_param { negative_slope: 0.1 }",
        _normal,
        lambda x: np.where(x > 0, x, 0.1 * x),
        1e-6,
        1e-6,
    ),
    "absval": ("AbsVal", "", _normal, np.abs, 0, 0),
    "bnll": ("BNLL", "", _wide, lambda x: np.logaddexp(0, x), 1e-5, 1e-4),
    "elu": ("ELU", "", _normal, lambda x: np.where(x > 0, x, np.expm1(x)), 1e-5, 1e-4),
    "elu_alpha": (
        "ELU",
        "elu_param { alpha: 0.25 }",
        _normal,
        lambda x: np.where(x > 0, x, 0.25 * np.expm1(x)),
        1e-5,
        1e-4,
    ),
    "threshold_0": ("Threshold", "", _normal, lambda x: (x > 0).astype(np.float64), 0, 0),
    "threshold_half": (
        "Threshold",
        "threshold_param { threshold: 0.5 }",
        _on_threshold,
        lambda x: (x > 0.5).astype(np.float64),
        0,
        0,
    ),
    "exp": ("Exp", "", _normal, np.exp, 1e-5, 1e-4),
    "exp_e_scale_shift": (
        "Exp",
        "exp_param { scale: 0.7 shift: 1.5 }",
        _normal,
        lambda x: np.exp(1.5 + 0.7 * x),
        1e-5,
        2e-4,
    ),
    "exp_base2": ("Exp", "exp_param { base: 2 }", _normal, lambda x: 2.0**x, 1e-5, 1e-4),
    "exp_base10_all": (
        "Exp",
        "exp_param { base: 10 scale: -0.5 shift: 0.25 }",
        _normal,
        lambda x: 10.0 ** (0.25 - 0.5 * x),
        1e-5,
        3e-4,
    ),
    "exp_base1": ("Exp", "exp_param { base: 1 scale: 3 }", _normal, lambda x: np.ones_like(x), 0, 0),
    "log": ("Log", "", _positive, np.log, 1e-5, 1e-4),
    "log_scale_shift": (
        "Log",
        "log_param { scale: 2 shift: 0.5 }",
        _positive,
        lambda x: np.log(0.5 + 2 * x),
        1e-5,
        1e-4,
    ),
    "log_base2": ("Log", "log_param { base: 2 }", _positive, np.log2, 1e-5, 1e-4),
    "log_base10_all": (
        "Log",
        "log_param { base: 10 scale: 0.5 shift: 1 }",
        _positive,
        lambda x: np.log10(1 + 0.5 * x),
        1e-5,
        1e-4,
    ),
    "power_square": (
        "Power",
        "power_param { power: 2 scale: 0.5 shift: 1 }",
        _normal,
        lambda x: (1 + 0.5 * x) ** 2,
        1e-5,
        1e-4,
    ),
    "power_cube": ("Power", "power_param { power: 3 scale: -1.5 }", _normal, lambda x: (-1.5 * x) ** 3, 1e-5, 3e-4),
    "power_sqrt": ("Power", "power_param { power: 0.5 }", _positive, np.sqrt, 1e-5, 1e-4),
    "power_inverse": ("Power", "power_param { power: -1 shift: 2 }", _positive, lambda x: 1 / (2 + x), 1e-5, 1e-4),
    "power_fraction_negative_base": (
        "Power",
        "power_param { power: 2.5 }",
        _normal,
        lambda x: np.power(x.astype(np.float64), 2.5),
        1e-5,
        3e-4,
    ),
    "power_affine": ("Power", "power_param { scale: 2 shift: -1 }", _normal, lambda x: 2 * x - 1, 1e-6, 1e-6),
    "power_identity": ("Power", "", _normal, lambda x: x, 0, 0),
    "power_zero": ("Power", "power_param { power: 0 scale: 3 shift: 2 }", _normal, np.ones_like, 0, 0),
    "power_scale_zero": (
        "Power",
        "power_param { power: 2 scale: 0 shift: 3 }",
        _normal,
        lambda x: np.full_like(x, 9.0),
        0,
        0,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_caffe_forward(case: str, seed: int) -> None:
    layer_type, params, make_input, reference, atol, rtol = CASES[case]
    x = make_input(seed)
    converted = convert_text(_net(layer_type, params))
    got = run(converted, {"x": x})["y"]
    with np.errstate(invalid="ignore"):
        want = reference(x.astype(np.float64))
    assert got.dtype == np.float32, f"{case}: y has dtype {got.dtype}, Caffe blobs are float32"
    assert_close(got, want, f"{case} y", atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_initializers_and_one_graph_output(case: str) -> None:
    """Parameter-free layers add no initializer (constants are Constant nodes) and write exactly the top."""
    layer_type, params, *_ = CASES[case]
    model = convert_text(_net(layer_type, params)).to_proto()
    assert len(model.graph.initializer) == 0, f"{case}: initializers {[t.name for t in model.graph.initializer]}"
    assert [o.name for o in model.graph.output] == ["y"]


@pytest.mark.parametrize("shape", [(5,), (4, 7), (2, 3, 4, 5, 6)])
def test_any_rank(shape: tuple[int, ...]) -> None:
    x = rng(3).standard_normal(shape).astype(np.float32)
    converted = convert_text(_net("Power", "power_param { power: 2 scale: 0.5 shift: 1 }", shape))
    assert_close(run(converted, {"x": x})["y"], (1 + 0.5 * x.astype(np.float64)) ** 2, f"power {shape}")


@pytest.mark.parametrize(
    ("layer_type", "params", "message"),
    [
        ("Exp", "exp_param { base: 0 }", "exp_param.base must be strictly positive or -1 (meaning e), got 0.0"),
        ("Exp", "exp_param { base: -2 }", "exp_param.base must be strictly positive or -1 (meaning e), got -2.0"),
        ("Log", "log_param { base: -0.5 }", "log_param.base must be strictly positive or -1 (meaning e), got -0.5"),
        ("Log", "log_param { base: 1 }", "log_param.base 1.0 has log(base) = 0"),
    ],
)
def test_bad_base_is_a_layer_error(layer_type: str, params: str, message: str) -> None:
    with pytest.raises(
        LayerError, match=r"layer 'act' \(" + layer_type + r"\): " + message.replace("(", r"\(").replace(")", r"\)")
    ):
        convert_text(_net(layer_type, params))


def test_layer_zoo_blobs_match_caffe() -> None:
    """TanH, AbsVal, Power, ELU and Sigmoid of the layer_zoo net, fed the blobs Caffe gave them."""
    text, feeds, expected = reference_subnet("layer_zoo", ["tanh", "absval", "power", "elu", "sig"])
    got = run(convert_text(text, all_blobs=True), feeds)
    for name, want in expected.items():
        assert_close(got[name], want, f"layer_zoo {name}")
