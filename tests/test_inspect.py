"""`caffeonnx inspect`: layers, shapes, shared params and counts, checked against real Caffe's facts.

Ground truth: tests/data/caffe_reference/*/case.json (unique_params, unique_param_count and
layer_param_shapes were read from real Caffe's Net) and the blobs Caffe itself stored in
each weights.caffemodel (one copy per layer that uses a shared param).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from caffeonnx.converter.caffe_io import parse_prototxt, read_caffemodel, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.inspect import Inspection, detect_format, inspect_file, inspect_onnx
from caffeonnx.errors import WeightsError
from caffeonnx.proto import caffe_pb2
from tests.helpers import REFERENCE, rng

FORWARD_CASES = sorted(
    p.name for p in REFERENCE.iterdir()
    if (p / "case.json").exists() and json.loads((p / "case.json").read_text())["kind"] == "forward"
)

PERMISSIVE_NET = """
name: "permissive"
layer { name: "a" type: "Input" top: "a" input_param { shape { dim: 3 dim: 20 } } }
layer { name: "b" type: "Input" top: "b" input_param { shape { dim: 3 dim: 40 } } }
layer { name: "enc" type: "InnerProduct" bottom: "a" top: "enc"
  param { name: "W" lr_mult: 2 decay_mult: 0 } inner_product_param { num_output: 10 bias_term: false } }
layer { name: "other" type: "InnerProduct" bottom: "b" top: "other"
  param { name: "W" share_mode: PERMISSIVE } inner_product_param { num_output: 5 bias_term: false } }
"""


def _case(case: str) -> dict:
    return json.loads((REFERENCE / case / "case.json").read_text())


def _users(insp: Inspection, name: str) -> list[tuple[str, int, list[int]]]:
    param = next(p for p in insp.params if p.name == name)
    return [(u.layer, u.index, u.shape) for u in param.users]


def _check_against_case(insp: Inspection, case: str) -> None:
    """Blob count, unique value count and every layer's param shapes as real Caffe reported them."""
    meta = _case(case)
    assert len(insp.params) == meta["unique_params"], f"{case}: {[p.name for p in insp.params]}"
    assert insp.unique_param_count == meta["unique_param_count"], f"{case}: {insp.unique_param_count}"
    if meta.get("layer_param_shapes"):
        got = {layer.name: layer.param_shapes for layer in insp.layers if layer.params}
        assert got == meta["layer_param_shapes"], f"{case}: per-layer param shapes {got}"


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_caffemodel_counts_match_caffe(case: str) -> None:
    path = REFERENCE / case / "weights.caffemodel"
    insp = inspect_file(path)
    _check_against_case(insp, case)
    stored = read_caffemodel(path)
    on_disk = sum(b.data.size for blobs in stored.blobs.values() for b in blobs)
    assert insp.per_layer_param_count == on_disk, f"{case}: on-disk count {insp.per_layer_param_count} != {on_disk}"
    assert insp.per_layer_param_bytes == 4 * on_disk
    assert insp.unique_param_bytes == 4 * insp.unique_param_count
    assert [layer.name for layer in insp.layers] == [layer.name for layer in stored.net.layer or stored.net.layers]


@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("fmt", ["prototxt", "onnx", "caffemodel"])
def test_same_facts_from_every_format(case: str, fmt: str, tmp_path: Path) -> None:
    d = REFERENCE / case
    if fmt == "onnx":
        path = tmp_path / f"{case}.onnx"
        convert_files(d / "net.prototxt", d / "weights.caffemodel").save(path)
    else:
        path = d / ("net.prototxt" if fmt == "prototxt" else "weights.caffemodel")
    insp = inspect_file(path)
    assert insp.format == fmt
    _check_against_case(insp, case)
    stored = read_caffemodel(d / "weights.caffemodel")
    on_disk = sum(b.data.size for blobs in stored.blobs.values() for b in blobs)
    assert insp.per_layer_param_count == on_disk, f"{case}/{fmt}: {insp.per_layer_param_count} != {on_disk}"
    shared_caffe_names = sorted(p.caffe_name for p in insp.shared_params)
    net = parse_prototxt((d / "net.prototxt").read_text(), case)
    names = [spec.name for layer in net.layer for spec in layer.param if spec.name]
    assert shared_caffe_names == sorted({n for n in names if names.count(n) > 1}), f"{case}/{fmt}"


@pytest.mark.parametrize("fmt", ["prototxt", "onnx", "caffemodel"])
def test_tied_ae_shared_table(fmt: str, tmp_path: Path) -> None:
    d = REFERENCE / "tied_ae"
    path = {"prototxt": d / "net.prototxt", "caffemodel": d / "weights.caffemodel", "onnx": tmp_path / "t.onnx"}[fmt]
    if fmt == "onnx":
        convert_files(d / "net.prototxt", d / "weights.caffemodel").save(path)
    insp = inspect_file(path)
    (shared,) = insp.shared_params
    assert (shared.name, shared.shape, shared.lr_mult, shared.decay_mult) == ("encode1_matrix", [64, 784], 1.0, 1.0)
    assert _users(insp, "encode1_matrix") == [("encode1", 0, [64, 784]), ("decode1", 0, [64, 784])]
    biases = [(p.name, p.decay_mult) for p in insp.params if "bias" in p.name]
    assert biases == [("encode1_bias", 0.0), ("decode1_bias", 0.0)]
    layers = {layer.name: layer for layer in insp.layers}
    assert (layers["decode1"].bottoms, layers["decode1"].tops) == (["encode1neuron"], ["decode1"])
    assert layers["decode1"].params == ["encode1_matrix", "decode1_bias"]
    if fmt != "caffemodel":  # Caffe stores no activation shapes in a caffemodel
        batch = 16 if fmt == "prototxt" else "N"  # the ONNX graph's batch is dynamic
        assert layers["encode1"].top_shapes == [[batch, 64]]
        assert layers["decode1neuron"].top_shapes == [[batch, 784]]


def test_fp16_onnx_bytes_are_halved(tmp_path: Path) -> None:
    d = REFERENCE / "tied_ae"
    path = tmp_path / "half.onnx"
    convert_files(d / "net.prototxt", d / "weights.caffemodel", ConvertOptions(fp16=True)).save(path)
    insp = inspect_file(path)
    assert insp.unique_param_count == _case("tied_ae")["unique_param_count"]
    assert insp.unique_param_bytes == 2 * insp.unique_param_count
    assert insp.per_layer_param_bytes == 4 * insp.per_layer_param_count  # a caffemodel stores float32


def test_permissive_user_keeps_its_own_shape(tmp_path: Path) -> None:
    proto = tmp_path / "p.prototxt"
    proto.write_text(PERMISSIVE_NET)
    w = rng(3).standard_normal((10, 20)).astype(np.float32)
    model = tmp_path / "p.caffemodel"
    write_caffemodel(model, parse_prototxt(PERMISSIVE_NET), {"enc": [w], "other": [w.reshape(5, 40)]})
    onnx_path = tmp_path / "p.onnx"
    convert_files(proto, model).save(onnx_path)
    for path in (proto, model, onnx_path):
        insp = inspect_file(path)
        (shared,) = insp.shared_params
        assert (shared.name, shared.shape, shared.share_mode) == ("W", [10, 20], "STRICT"), path.suffix
        assert (shared.lr_mult, shared.decay_mult) == (2.0, 0.0), path.suffix
        assert _users(insp, "W") == [("enc", 0, [10, 20]), ("other", 0, [5, 40])], path.suffix
        assert (insp.unique_param_count, insp.per_layer_param_count) == (200, 400), path.suffix


def test_differing_caffemodel_copies_name_both_layers(tmp_path: Path) -> None:
    w = rng(4).standard_normal((10, 20)).astype(np.float32)
    model = tmp_path / "p.caffemodel"
    write_caffemodel(model, parse_prototxt(PERMISSIVE_NET), {"enc": [w], "other": [(w + 0.5).reshape(5, 40)]})
    want = r"shared param 'W' differs between layer 'enc' and layer 'other' \(max abs difference 0\.5\)"
    with pytest.raises(WeightsError, match=want):
        inspect_file(model)


def _foreign_model(seed: int) -> onnx.ModelProto:
    """A hand-built graph: W read by two MatMuls (shared), b by one Add, a Reshape shape constant."""
    r = rng(seed)
    w = numpy_helper.from_array(r.standard_normal((6, 6)).astype(np.float32), "W")
    b = numpy_helper.from_array(r.standard_normal(6).astype(np.float16), "b")
    shape = numpy_helper.from_array(np.array([0, 3, 2], dtype=np.int64), "shape")  # 0: keep the batch
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "W"], ["h2"]),
        helper.make_node("Cast", ["b"], ["b32"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["h2", "b32"], ["h3"], name="bias"),
        helper.make_node("Reshape", ["h3", "shape"], ["y"], name="fold"),
    ]
    graph = helper.make_graph(
        nodes, "foreign", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b, shape],
    )
    return helper.make_model(graph, producer_name="handmade", opset_imports=[helper.make_opsetid("", 17)])


def test_foreign_onnx_initializer_read_by_two_nodes_is_shared() -> None:
    insp = inspect_onnx(_foreign_model(5), "foreign.onnx")
    assert insp.producer == "handmade" and insp.phase is None
    assert [p.name for p in insp.shared_params] == ["W"]
    assert _users(insp, "W") == [("first", 1, [6, 6]), ("MatMul_1", 1, [6, 6])]
    assert (insp.unique_param_count, insp.unique_param_bytes) == (36 + 6 + 3, 36 * 4 + 6 * 2 + 3 * 8)
    assert insp.per_layer_param_count is None and insp.shared_params[0].lr_mult is None
    layers = {layer.name: layer for layer in insp.layers}
    assert layers["first"].top_shapes == [["B", 6]] and layers["fold"].top_shapes == [["B", 3, 2]]
    assert (layers["fold"].bottoms, layers["fold"].params) == (["h3"], ["shape"])


def test_phase_selects_layers(tmp_path: Path) -> None:
    proto = tmp_path / "phase.prototxt"
    proto.write_text(PERMISSIVE_NET + """
layer { name: "train_only" type: "InnerProduct" bottom: "enc" top: "t" include { phase: TRAIN }
  inner_product_param { num_output: 4 } }
""")
    test = inspect_file(proto)
    train = inspect_file(proto, ConvertOptions(phase=caffe_pb2.TRAIN))
    assert "train_only" not in [layer.name for layer in test.layers] and test.phase == "TEST"
    assert [layer.name for layer in train.layers][-1] == "train_only" and train.phase == "TRAIN"
    assert train.unique_param_count - test.unique_param_count == 4 * 10 + 4


@pytest.mark.parametrize("fmt", ["prototxt", "caffemodel", "onnx"])
def test_format_detected_from_content_without_suffix(fmt: str, tmp_path: Path) -> None:
    d = REFERENCE / "tied_ae"
    odd = tmp_path / "model.bin"
    if fmt == "onnx":
        convert_files(d / "net.prototxt", d / "weights.caffemodel").save(odd)
    else:
        odd.write_bytes((d / ("net.prototxt" if fmt == "prototxt" else "weights.caffemodel")).read_bytes())
    assert detect_format(odd) == fmt
    assert inspect_file(odd).unique_param_count == _case("tied_ae")["unique_param_count"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "caffeonnx.cli", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


def test_cli_json_is_the_api_document() -> None:
    path = REFERENCE / "siamese_shared" / "weights.caffemodel"
    proc = _cli("inspect", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc == json.loads(inspect_file(path).to_json())
    assert doc["shared_params"] == ["ip1_w", "ip1_b"]
    assert (doc["unique_param_count"], doc["per_layer_param_count"]) == (840, 840 + 210)
    assert [(u["layer"], u["index"]) for u in doc["params"][1]["users"]] == [("ip1_a", 1), ("ip1_b", 1)]
    assert all(p["shared"] == (p["name"] in doc["shared_params"]) for p in doc["params"])


def test_cli_text_report(tmp_path: Path) -> None:
    proc = _cli("inspect", str(REFERENCE / "tied_ae" / "net.prototxt"))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    unique = _case("tied_ae")["unique_param_count"]
    per_layer = unique + 64 * 784
    assert f"{unique:,} values unique ({4 * unique:,} bytes)" in text, text
    assert f"{per_layer:,} values ({4 * per_layer:,} bytes) in a caffemodel" in text, text
    assert "encode1[0], decode1[0]" in text and "1 shared params" in text, text


def test_cli_inspect_bad_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.caffemodel"
    bad.write_bytes((REFERENCE / "tied_ae" / "weights.caffemodel").read_bytes()[:5000])
    proc = _cli("inspect", str(bad))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "truncated or corrupt caffemodel" in proc.stderr, proc.stderr


def test_layer_shapes_are_consistent_with_math() -> None:
    """Sanity on a prototxt: every InnerProduct top is (batch, num_output) and its weight count is N*K."""
    insp = inspect_file(REFERENCE / "deep_tied_ae" / "net.prototxt")
    shapes = {t: s for layer in insp.layers for t, s in zip(layer.tops, layer.top_shapes)}
    for layer in insp.layers:
        if layer.type == "InnerProduct":
            (n_in,) = shapes[layer.bottoms[0]][1:]
            (n_out,) = shapes[layer.tops[0]][1:]
            assert math.prod(layer.param_shapes[0]) == n_in * n_out, layer.name
            assert layer.param_shapes[1] == [n_out], layer.name


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_prototxt_blob_shapes_are_caffes(case: str) -> None:
    """Every blob's shape (its last writer's top) equals the shape real Caffe gave it (blobs.npz).

    blobs.npz also holds the Split copies Caffe inserts itself; those are not layers of the prototxt.
    """
    insp = inspect_file(REFERENCE / case / "net.prototxt")
    shapes = {t: s for layer in insp.layers for t, s in zip(layer.tops, layer.top_shapes)}
    with np.load(REFERENCE / case / "blobs.npz") as blobs:
        assert set(shapes) <= set(blobs.files), f"{case}: blobs Caffe does not have: {set(shapes) - set(blobs.files)}"
        want = {name: list(blobs[name].shape) for name in shapes}
    assert shapes == want, case


@pytest.mark.parametrize("phase", ["TEST", "TRAIN"])
def test_onnx_layers_of_the_converted_phase(phase: str, tmp_path: Path) -> None:
    """Two phase-only layers may share a name: the ONNX report shows the converted phase's one."""
    proto = tmp_path / "phases.prototxt"
    proto.write_text(PERMISSIVE_NET + """
layer { name: "head" type: "InnerProduct" bottom: "enc" top: "out" include { phase: TEST }
  inner_product_param { num_output: 4 } }
layer { name: "head" type: "InnerProduct" bottom: "other" top: "out" include { phase: TRAIN }
  inner_product_param { num_output: 4 } }
""")
    path = tmp_path / "phases.onnx"
    convert_files(proto, None, ConvertOptions(phase=caffe_pb2.Phase.Value(phase))).save(path)
    insp = inspect_file(path)
    head = next(layer for layer in insp.layers if layer.name == "head")
    assert insp.phase == phase
    assert head.bottoms == (["enc"] if phase == "TEST" else ["other"]), head
    assert head.param_shapes == ([[4, 10], [4]] if phase == "TEST" else [[4, 5], [4]]), head
