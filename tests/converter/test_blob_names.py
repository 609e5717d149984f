"""ONNX value names follow Caffe's blobs: last writes keep the name, inputs stay inputs."""
from __future__ import annotations

import numpy as np

from tests.helpers import assert_close, convert_text, rng, run

IN_PLACE = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 5 } } }
layer { name: "scale" type: "Power" bottom: "data" top: "data" power_param { scale: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
"""


def test_in_place_writes_are_named_blob_at_layer_and_the_last_write_keeps_the_name() -> None:
    w = rng(0).standard_normal((3, 5)).astype(np.float32)
    b = rng(1).standard_normal(3).astype(np.float32)
    converted = convert_text(IN_PLACE, {"ip1": [w, b]}, all_blobs=True)
    graph = converted.model.graph
    assert [i.name for i in graph.input] == ["data"], "the input blob stays the graph input"
    produced = [o for n in graph.node for o in n.output if "@" in o]
    assert set(produced) == {"data@scale", "ip1@ip1"}
    x = rng(2).standard_normal((4, 5)).astype(np.float32)  # another batch size than the prototxt's
    out = run(converted, {"data": x})
    assert_close(out["ip1"], np.maximum(2 * x @ w.T + b, 0), "ip1 (after the in-place ReLU)")
    assert [o.name for o in graph.output][0] == "ip1"
