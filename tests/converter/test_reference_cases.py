"""Every forward case computed by real Caffe matches on every blob through onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.verify import compare_blobs, load_npz
from tests.helpers import REFERENCE

FORWARD_CASES = sorted(
    p.name for p in REFERENCE.iterdir() if (p / "case.json").exists() and json.loads((p / "case.json").read_text())["kind"] == "forward"
)


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_every_blob_matches_caffe(case: str) -> None:
    d = REFERENCE / case
    meta = json.loads((d / "case.json").read_text())
    converted = convert_files(d / "net.prototxt", d / "weights.caffemodel", ConvertOptions(all_blobs=True))
    checks = compare_blobs(converted, load_npz(d / "inputs.npz", "inputs"), load_npz(d / "blobs.npz", "blobs"),
                           atol=meta["atol"], rtol=meta["rtol"])
    bad = [c for c in checks if not c.ok]
    assert not bad, "; ".join(f"{c.blob} (layer {c.layer}, shape {c.shape}): max abs {c.max_abs:.3g} {c.note}" for c in bad)
    assert len(checks) == len(np.load(d / "blobs.npz").files)


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_parameter_count_is_unique_count(case: str, tmp_path) -> None:
    d = REFERENCE / case
    meta = json.loads((d / "case.json").read_text())
    out = tmp_path / "m.onnx"
    convert_files(d / "net.prototxt", d / "weights.caffemodel").save(out)
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    assert len(model.graph.initializer) == meta["unique_params"]
    assert sum(int(np.prod(t.dims)) for t in model.graph.initializer) == meta["unique_param_count"]


def test_tied_ae_has_exactly_the_three_named_initializers() -> None:
    model = convert_files(REFERENCE / "tied_ae" / "net.prototxt", REFERENCE / "tied_ae" / "weights.caffemodel").to_proto()
    assert [t.name for t in model.graph.initializer] == ["encode1_matrix", "encode1_bias", "decode1_bias"]
    users = [n for n in model.graph.node if "encode1_matrix" in n.input]
    assert [(n.op_type, dict((a.name, a.i) for a in n.attribute).get("transB")) for n in users] == [("Gemm", 1), ("Gemm", 0)]
