"""MaxPool / AveragePool / global pools -> Pooling with ONNX's exact windows and divisors (atol 1e-5)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.converter.foreign.helpers import check_conversion, feeds_for, layer_types, make_model, node

POOL_CASES = {
    "k2s2": ([2, 3, 8, 8], {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "k3s2_pad1": ([1, 2, 9, 9], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "k3s2_floor_extra_window": ([1, 2, 8, 8], {"kernel_shape": [3, 3], "strides": [2, 2]}),
    "k3s2_pad1_floor_extra": ([1, 2, 8, 8], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "ceil_dropped_window": ([1, 2, 5, 5], {"kernel_shape": [2, 2], "strides": [3, 3], "pads": [1, 1, 1, 1],
                                           "ceil_mode": 1}),
    "ceil_partial": ([1, 2, 7, 6], {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1}),
    "asym_pads": ([1, 2, 7, 7], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 0, 2]}),
    "same_upper": ([1, 2, 7, 8], {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "rect_stride1": ([1, 1, 6, 7], {"kernel_shape": [2, 3], "strides": [1, 2], "pads": [0, 1, 0, 1]}),
}


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool(op: str, case: str, tmp_path: Path) -> None:
    x_shape, attrs = POOL_CASES[case]
    model = make_model([node(op, ["x"], **attrs)], {"x": x_shape}, ["y"])
    check_conversion(model, feeds_for(model, 0), tmp_path)


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("case", ["k3s2_pad1", "ceil_partial", "asym_pads", "same_upper"])
def test_average_pool_divisors(case: str, count_include_pad: int, tmp_path: Path) -> None:
    x_shape, attrs = POOL_CASES[case]
    model = make_model([node("AveragePool", ["x"], count_include_pad=count_include_pad, **attrs)], {"x": x_shape},
                       ["y"])
    check_conversion(model, feeds_for(model, 1), tmp_path)


def test_extra_caffe_window_is_sliced_off_in_caffe_1_0(tmp_path: Path) -> None:
    x_shape, attrs = POOL_CASES["k3s2_floor_extra_window"]
    model = make_model([node("MaxPool", ["x"], **attrs)], {"x": x_shape}, ["y"])
    result = check_conversion(model, feeds_for(model, 2), tmp_path)
    assert layer_types(result) == ["Input", "Pooling", "Slice", "Silence", "Slice", "Silence"]


def test_extensions_use_round_mode_floor_instead(tmp_path: Path) -> None:
    x_shape, attrs = POOL_CASES["k3s2_floor_extra_window"]
    model = make_model([node("AveragePool", ["x"], **attrs)], {"x": x_shape}, ["y"])
    result = check_conversion(model, feeds_for(model, 3), tmp_path, extensions=True)
    assert layer_types(result) == ["Input", "Pooling"]
    assert result.net.layer[1].pooling_param.round_mode == result.net.layer[1].pooling_param.FLOOR


@pytest.mark.parametrize("op", ["GlobalMaxPool", "GlobalAveragePool"])
def test_global_pool(op: str, tmp_path: Path) -> None:
    model = make_model([node(op, ["x"])], {"x": [2, 3, 5, 4]}, ["y"])
    result = check_conversion(model, feeds_for(model, 4), tmp_path)
    assert result.net.layer[1].pooling_param.global_pooling
