"""Crop against a numpy reference of Caffe's CropLayer (current BVLC master), exact."""
from __future__ import annotations

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, rng, run


def _net(data: tuple[int, ...], ref: tuple[int, ...], param: str, bottoms: str = 'bottom: "x" bottom: "r"') -> str:
    return (
        'layer { name: "in" type: "Input" top: "x" top: "r" input_param { '
        f'shape {{ {" ".join(f"dim: {d}" for d in data)} }} shape {{ {" ".join(f"dim: {d}" for d in ref)} }} }} }}\n'
        f'layer {{ name: "crop" type: "Crop" {bottoms} top: "y" crop_param {{ {param} }} }}\n'
    )


def caffe_crop(x: np.ndarray, ref_shape: tuple[int, ...], axis: int, offsets: list[int]) -> np.ndarray:
    """Caffe's crop_copy: top[i0..] = bottom[i0 + off0, ..]; axes before `axis` keep size and offset 0."""
    ndim = x.ndim
    off = [0] * axis + (offsets * (ndim - axis) if len(offsets) == 1 else offsets or [0] * (ndim - axis))
    top_shape = (*x.shape[:axis], *ref_shape[axis:])
    idx = np.indices(top_shape)
    return x[tuple(idx[d] + off[d] for d in range(ndim))]


CASES = [
    # (data shape, reference shape, crop_param text, canonical axis, offsets as given)
    ((2, 3, 10, 12), (2, 1, 6, 7), "", 2, []),
    ((2, 3, 10, 12), (2, 1, 6, 7), "offset: 2", 2, [2]),
    ((2, 3, 10, 12), (2, 1, 6, 7), "axis: 2 offset: 4 offset: 5", 2, [4, 5]),
    ((2, 5, 10, 12), (2, 2, 6, 7), "axis: 1 offset: 3 offset: 1 offset: 0", 1, [3, 1, 0]),
    ((2, 5, 10, 12), (2, 2, 6, 7), "axis: 1 offset: 1", 1, [1]),
    ((2, 3, 10, 12), (7, 7, 7, 5), "axis: -1 offset: 7", 3, [7]),
    ((2, 3, 10, 12), (2, 3, 10, 12), "", 2, []),
]


@pytest.mark.parametrize(("data", "ref", "param", "axis", "offsets"), CASES)
@pytest.mark.parametrize("batch", [2, 3])
def test_crop_matches_caffe(data: tuple[int, ...], ref: tuple[int, ...], param: str, axis: int, offsets: list[int],
                            batch: int) -> None:
    """Converted with prototxt batch 2; batch 3 checks the graph keeps the batch dynamic."""
    x = rng(axis + batch).standard_normal((batch, *data[1:])).astype(np.float32)
    r = np.zeros((batch, *ref[1:]), np.float32)
    got = run(convert_text(_net(data, ref, param)), {"x": x, "r": r})["y"]
    want = caffe_crop(x, r.shape, axis, offsets)
    assert_close(got, want, f"Crop {param or 'default'} of {x.shape} to {r.shape}", atol=0, rtol=0)


@pytest.mark.parametrize(("fixed", "data_batch", "ref_batch"), [(False, 5, 3), (False, 4, 2), (True, 4, 2)])
def test_crop_of_the_batch_axis_follows_the_reference(fixed: bool, data_batch: int, ref_batch: int) -> None:
    """axis 0 crops the batch too: its length comes from the second bottom (at run time when the batch is dynamic)."""
    text = _net((4, 3, 6), (2, 2, 4), "axis: 0 offset: 1 offset: 0 offset: 2")
    m = convert_text(text, batch=4, input_shapes={"r": (2, 2, 4)}) if fixed else convert_text(text)
    x = rng(data_batch).standard_normal((data_batch, 3, 6)).astype(np.float32)
    r = np.zeros((ref_batch, 2, 4), np.float32)
    got = run(m, {"x": x, "r": r})["y"]
    assert_close(got, caffe_crop(x, r.shape, 0, [1, 0, 2]), f"Crop axis 0 of {x.shape} to {r.shape}", atol=0, rtol=0)


@pytest.mark.parametrize(
    ("ref", "param", "bottoms", "message"),
    [
        ((2, 3, 6, 7), "offset: 5", 'bottom: "x" bottom: "r"', "does not fit in axis 2: offset 5 + size 6"),
        ((2, 3, 6, 7), "offset: 0 offset: 6", 'bottom: "x" bottom: "r"', "does not fit in axis 3: offset 6 + size 7"),
        ((2, 3, 11, 7), "", 'bottom: "x" bottom: "r"', "does not fit in axis 2: offset 0 + size 11"),
        ((2, 3, 6, 7), "offset: 1 offset: 1 offset: 1", 'bottom: "x" bottom: "r"', "has 3 values but axes 2..3"),
        ((2, 3, 6, 7), "axis: 4", 'bottom: "x" bottom: "r"', "crop_param.axis 4 is out of range"),
        ((2, 6, 7), "", 'bottom: "x" bottom: "r"', "has 3 axes but 'x'"),
        ((2, 3, 6, 7), "", 'bottom: "x"', "Crop Layer takes 2 bottom blob(s) as input"),
    ],
)
def test_crop_refuses_a_crop_that_does_not_fit(ref: tuple[int, ...], param: str, bottoms: str, message: str) -> None:
    with pytest.raises(LayerError, match="layer 'crop' \\(Crop\\)") as err:
        convert_text(_net((2, 3, 10, 12), ref, param, bottoms))
    assert message in str(err.value)
