"""Tile against a numpy transcription of Caffe's TileLayer::Forward_cpu, exact."""
from __future__ import annotations

import math

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, rng, run


def _net(shape: tuple[int, ...], param: str) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (
        f'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ {dims} }} }} }}\n'
        f'layer {{ name: "tile" type: "Tile" bottom: "x" top: "y" tile_param {{ {param} }} }}\n'
    )


def caffe_tile(x: np.ndarray, axis: int, tiles: int) -> np.ndarray:
    """For each of the count(0, axis) outer rows, the count(axis) inner block is written `tiles` times."""
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis:])
    flat = x.reshape(-1)
    top = np.empty(x.size * tiles, np.float32)
    pos = 0
    for i in range(outer):
        for _ in range(tiles):
            top[pos:pos + inner] = flat[i * inner:(i + 1) * inner]
            pos += inner
    shape = list(x.shape)
    shape[axis] *= tiles
    return top.reshape(shape)


CASES = [
    ("tiles: 3", 1, 3),
    ("axis: 2 tiles: 2", 2, 2),
    ("axis: -1 tiles: 4", 3, 4),
    ("axis: 0 tiles: 2", 0, 2),
    ("tiles: 1", 1, 1),
]


@pytest.mark.parametrize(("param", "axis", "tiles"), CASES)
@pytest.mark.parametrize("batch", [2, 3])
def test_tile_matches_caffe(param: str, axis: int, tiles: int, batch: int) -> None:
    """Converted with prototxt batch 2; batch 3 checks the graph keeps the batch dynamic."""
    x = rng(axis * 10 + tiles + batch).standard_normal((batch, 3, 2, 4)).astype(np.float32)
    got = run(convert_text(_net((2, 3, 2, 4), param)), {"x": x})["y"]
    assert_close(got, caffe_tile(x, axis, tiles), f"Tile {param} of {x.shape}", atol=0, rtol=0)


@pytest.mark.parametrize(
    ("param", "message"),
    [
        ("axis: 1", "Number of tiles must be specified"),
        ("tiles: 0", "tile_param.tiles 0 must be positive"),
        ("tiles: -2", "tile_param.tiles -2 must be positive"),
        ("axis: 4 tiles: 2", "tile_param.axis 4 is out of range"),
    ],
)
def test_tile_refuses_bad_params(param: str, message: str) -> None:
    with pytest.raises(LayerError, match="layer 'tile' \\(Tile\\)") as err:
        convert_text(_net((2, 3, 2, 4), param))
    assert message in str(err.value)
