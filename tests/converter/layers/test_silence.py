"""Silence consumes blobs: they stop being graph outputs, and the rest of the net is unaffected."""
from __future__ import annotations

import json

import numpy as np
import pytest

from caffeonnx.converter import metadata
from caffeonnx.errors import LayerError
from tests.helpers import assert_close, convert_text, rng, run

NET = """
layer { name: "in" type: "Input" top: "x" top: "label" input_param { shape { dim: 2 dim: 5 } shape { dim: 2 } } }
layer { name: "tanh" type: "TanH" bottom: "x" top: "a" }
layer { name: "abs" type: "AbsVal" bottom: "x" top: "b" }
layer { name: "mute" type: "Silence" bottom: "b" bottom: "label" }
"""


def _feeds() -> dict[str, np.ndarray]:
    g = rng(5)
    return {"x": g.standard_normal((3, 5)).astype(np.float32), "label": g.integers(0, 5, 3).astype(np.float32)}


def test_silenced_blobs_are_not_outputs() -> None:
    converted = convert_text(NET)
    model = converted.to_proto()
    assert [o.name for o in model.graph.output] == ["a"]
    feeds = _feeds()
    assert_close(run(converted, feeds)["a"], np.tanh(feeds["x"].astype(np.float64)), "a")


def test_silence_is_recorded_with_its_bottoms_and_no_tops() -> None:
    model = convert_text(NET).to_proto()
    record = next(r for r in json.loads(metadata.read_metadata(model)[metadata.KEY_LAYERS]) if r["name"] == "mute")
    assert (record["type"], record["bottoms"], record["tops"], record["params"]) == ("Silence", ["b", "label"], [], [])


def test_all_blobs_still_exposes_silenced_blobs() -> None:
    """Caffe keeps silenced blobs in net.blobs; with all_blobs they stay inspectable."""
    converted = convert_text(NET, all_blobs=True)
    feeds = _feeds()
    got = run(converted, feeds)
    assert_close(got["b"], np.abs(feeds["x"]), "b", atol=0, rtol=0)


def test_silence_with_a_top_is_a_layer_error() -> None:
    text = NET.replace('bottom: "label" }', 'bottom: "label" top: "z" }')
    with pytest.raises(LayerError, match=r"layer 'mute' \(Silence\): Silence Layer produces 0 top blob\(s\) as output; it has 1"):
        convert_text(text)
