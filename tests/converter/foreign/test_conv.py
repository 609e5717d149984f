"""Conv / ConvTranspose -> Convolution / Deconvolution with ONNX's exact output windows (atol 1e-5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.converter.foreign.helpers import check_conversion, feeds_for, layer_types, make_model, node


def _weights(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 0.3).astype(np.float32)


CONV_CASES = {
    "pad1": ([1, 3, 7, 7], (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    "stride2_rect": ([2, 3, 8, 9], (4, 3, 3, 2), {"strides": [2, 1], "pads": [1, 0, 1, 0]}),
    "dilation_group": ([1, 4, 9, 9], (6, 2, 3, 3), {"dilations": [2, 2], "group": 2, "pads": [2, 2, 2, 2]}),
    "asym_begin_bigger": ([1, 2, 9, 9], (3, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 0, 0]}),
    "same_upper_odd_kernel": ([1, 2, 8, 7], (3, 2, 3, 3), {"auto_pad": "SAME_UPPER"}),
    "same_lower": ([1, 2, 8, 7], (3, 2, 4, 4), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "valid_1d": ([2, 3, 10], (5, 3, 3), {"auto_pad": "VALID"}),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv(case: str, bias: bool, tmp_path: Path) -> None:
    x_shape, w_shape, attrs = CONV_CASES[case]
    inits = {"W": _weights(0, w_shape)} | ({"B": _weights(1, (w_shape[0],))} if bias else {})
    model = make_model([node("Conv", ["x", "W"] + (["B"] if bias else []), **attrs)], {"x": x_shape}, ["y"], inits)
    result = check_conversion(model, feeds_for(model, 0), tmp_path)
    conv = result.net.layer[1].convolution_param
    assert result.net.layer[1].type == "Convolution" and conv.bias_term == bias


def test_asymmetric_conv_slices_off_the_extra_windows(tmp_path: Path) -> None:
    """pads (1, 0): Caffe pads 1 at the end too and computes one more row/column, which Slice + Silence drop."""
    x_shape, w_shape, attrs = CONV_CASES["asym_begin_bigger"]
    model = make_model([node("Conv", ["x", "W"], **attrs)], {"x": x_shape}, ["y"], {"W": _weights(2, w_shape)})
    result = check_conversion(model, feeds_for(model, 1), tmp_path)
    assert layer_types(result) == ["Input", "Convolution", "Slice", "Silence", "Slice", "Silence"]


DECONV_CASES = {
    "stride2_pad1_outpad1": ([1, 4, 5, 5], (4, 2, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                               "output_padding": [1, 1]}),
    "asym_pads": ([2, 3, 4, 4], (3, 2, 4, 4), {"strides": [2, 2], "pads": [2, 1, 0, 1]}),
    "group_dilation": ([1, 4, 5, 6], (4, 3, 3, 3), {"group": 2, "dilations": [2, 1], "pads": [1, 1, 1, 1]}),
    "output_shape": ([1, 2, 4, 4], (2, 3, 3, 3), {"strides": [2, 2], "output_shape": [8, 9]}),
    "same_upper": ([1, 2, 4, 5], (2, 2, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
}


@pytest.mark.parametrize("case", DECONV_CASES)
def test_conv_transpose(case: str, tmp_path: Path) -> None:
    x_shape, w_shape, attrs = DECONV_CASES[case]
    c_out = w_shape[1] * attrs.get("group", 1)
    inits = {"W": _weights(3, w_shape), "B": _weights(4, (c_out,))}
    model = make_model([node("ConvTranspose", ["x", "W", "B"], **attrs)], {"x": x_shape}, ["y"], inits)
    result = check_conversion(model, feeds_for(model, 2), tmp_path)
    assert result.net.layer[1].type == "Deconvolution"
    assert result.net.layer[1].convolution_param.num_output == c_out
