"""Ground truth from real Caffe: every forward reference case, converted to ONNX by caffeonnx and then
stripped of its caffeonnx metadata (so it is foreign ONNX), comes back as a Caffe net that reproduces
Caffe's own output blobs (tests/data/caffe_reference, the case's tolerances) in tests/caffe_numpy.py,
with the original weight sharing (the same layers share the same blobs) recovered from the graph alone.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter.caffe_to_onnx import convert_files, load_net
from caffeonnx.converter.onnx_to_caffe import onnx_to_caffe
from caffeonnx.proto import caffe_pb2
from tests import caffe_numpy
from tests.converter.foreign.helpers import assert_caffe_1_0
from tests.helpers import REFERENCE, assert_close

CASES = sorted(p.name for p in REFERENCE.iterdir()
               if (p / "case.json").exists() and json.loads((p / "case.json").read_text())["kind"] == "forward")


def _shared(net: caffe_pb2.NetParameter) -> set[frozenset[tuple[str, int]]]:
    """The groups of (layer, blob index) sharing one param (names may differ: ONNX renames clashes)."""
    users = defaultdict(set)
    for lay in net.layer:
        for index, spec in enumerate(lay.param):
            if spec.name:
                users[spec.name].add((lay.name, index))
    return {frozenset(group) for group in users.values() if len(group) > 1}


@pytest.mark.parametrize("case", CASES)
def test_caffe_reference_case_through_foreign_onnx(case: str, tmp_path: Path) -> None:
    d = REFERENCE / case
    meta = json.loads((d / "case.json").read_text())
    model = convert_files(d / "net.prototxt", d / "weights.caffemodel").to_proto()
    del model.metadata_props[:]  # now indistinguishable from any other exporter's ONNX
    inputs = {k: v for k, v in np.load(d / "inputs.npz").items()}
    result = onnx_to_caffe(model, batch=next(iter(inputs.values())).shape[0])
    assert_caffe_1_0(result.net)
    blobs = caffe_numpy.forward(result.net, result.blobs, inputs)
    reference = np.load(d / "blobs.npz")
    outputs = [o.name for o in model.graph.output]
    assert outputs
    for name in outputs:
        assert_close(blobs[name], reference[name], f"{case}/{name}", meta["atol"], meta["rtol"])
    assert _shared(result.net) == _shared(load_net(d / "net.prototxt"))
