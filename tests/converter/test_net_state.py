"""NetState filtering exactly as Caffe's Net::FilterNet / StateMeetsRule, and layers known by position.

Expected layer lists are written from Caffe's rules (src/caffe/net.cpp):
- a layer with include rules is kept when ANY rule is met; with exclude rules, when NONE is;
- a rule is met when its phase (if set) equals the state's, min_level <= level <= max_level
  (where set), every `stage` is in the state and no `not_stage` is;
- Net(file, phase, level, stages) sets phase and level and ADDS the stages to the prototxt's
  own `state { stage }`;
- a layer with both include and exclude rules is an error.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from google.protobuf import text_format

from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_io import CaffeWeights, read_caffemodel, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_net, filter_layers
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.onnx_to_caffe import onnx_to_caffe
from caffeonnx.errors import CaffeOnnxError, LayerError, WeightsError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "caffeonnx", *args], capture_output=True, text=True, timeout=120)

# In the style of BVLC's train_val nets: data layers per phase, a deploy-only stage, levels.
STAGED = """
name: "staged"
state { stage: "from-net" }
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } include { phase: TRAIN } }
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 3 dim: 4 } } include { phase: TEST } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
layer { name: "deploy_only" type: "ReLU" bottom: "ip" top: "ip" include { stage: "deploy" } }
layer { name: "not_deploy" type: "Sigmoid" bottom: "ip" top: "ip" include { not_stage: "deploy" } }
layer { name: "deep" type: "TanH" bottom: "ip" top: "ip" include { min_level: 2 } }
layer { name: "shallow" type: "AbsVal" bottom: "ip" top: "ip" include { max_level: 0 } }
layer { name: "both_stages" type: "ReLU" bottom: "ip" top: "ip" include { stage: "a" stage: "b" } }
layer { name: "either_stage" type: "ReLU" bottom: "ip" top: "ip" include { stage: "a" } include { stage: "b" } }
layer { name: "net_stage" type: "ReLU" bottom: "ip" top: "ip" include { stage: "from-net" } }
layer { name: "not_in_test" type: "ReLU" bottom: "ip" top: "ip" exclude { phase: TEST } }
layer { name: "test_level1" type: "ReLU" bottom: "ip" top: "ip" exclude { phase: TEST min_level: 1 } }
"""

COMMON = ["data", "ip"]
CASES = [
    # phase, stages, level -> layers kept after "ip"
    (caffe_pb2.TEST, (), 0, ["not_deploy", "shallow", "net_stage", "test_level1"]),
    (caffe_pb2.TRAIN, (), 0, ["not_deploy", "shallow", "net_stage", "not_in_test", "test_level1"]),
    (caffe_pb2.TEST, ("deploy",), 0, ["deploy_only", "shallow", "net_stage", "test_level1"]),
    (caffe_pb2.TEST, (), 1, ["not_deploy", "net_stage"]),
    (caffe_pb2.TEST, (), 2, ["not_deploy", "deep", "net_stage"]),
    (caffe_pb2.TEST, ("a",), 0, ["not_deploy", "shallow", "either_stage", "net_stage", "test_level1"]),
    (caffe_pb2.TEST, ("a", "b"), 0,
     ["not_deploy", "shallow", "both_stages", "either_stage", "net_stage", "test_level1"]),
]


def _net(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


@pytest.mark.parametrize(("phase", "stages", "level", "kept"), CASES,
                         ids=[f"{caffe_pb2.Phase.Name(c[0])}-{'+'.join(c[1]) or 'nostage'}-L{c[2]}" for c in CASES])
def test_filter_follows_caffes_state_meets_rule(phase: int, stages: tuple[str, ...], level: int,
                                                 kept: list[str]) -> None:
    net = _net(STAGED)
    opts = ConvertOptions(phase=phase, stages=stages, level=level)
    assert [layer.name for layer in filter_layers(net, opts)] == COMMON + kept
    model = convert_net(net, None, opts).model
    state = metadata.net_state(model)
    assert state is not None and list(state.stage) == ["from-net", *stages] and state.level == level
    records = metadata.layer_records(model)
    assert [r.name for r in records] == COMMON + kept
    assert all(net.layer[r.index].name == r.name for r in records), "records point at their layer by position"
    data = records[0]
    assert data.index == (0 if phase == caffe_pb2.TRAIN else 1), "the data layer of the phase, not the first 'data'"


def test_include_and_exclude_together_is_caffes_error() -> None:
    net = _net(STAGED + 'layer { name: "odd" type: "ReLU" bottom: "ip" top: "ip" include { phase: TEST } '
                        'exclude { stage: "x" } }')
    with pytest.raises(LayerError, match="Specify either include rules or exclude rules; not both"):
        convert_net(net, None, ConvertOptions())


def test_cli_stage_and_level_select_layers_and_to_caffe_keeps_them(tmp_path) -> None:
    proto = tmp_path / "staged.prototxt"
    proto.write_text(STAGED)
    onnx_path, back = tmp_path / "m.onnx", tmp_path / "back.prototxt"
    result = run("convert", str(proto), "-o", str(onnx_path), "--stage", "deploy", "--stage", "a", "--level", "2")
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(onnx_path))
    names = [r.name for r in metadata.layer_records(model)]
    assert names == COMMON + ["deploy_only", "deep", "either_stage", "net_stage"]
    assert run("to-caffe", str(onnx_path), "-o", str(back)).returncode == 0
    written = _net(back.read_text())
    assert list(written.state.stage) == ["from-net", "deploy", "a"] and written.state.level == 2
    # Caffe adds the file's stages to the ones it is given: the written prototxt selects the same layers.
    again = filter_layers(written, ConvertOptions(level=written.state.level))
    assert [layer.name for layer in again] == names
    shown = run("inspect", str(proto), "--stage", "deploy", "--json")
    assert shown.returncode == 0 and '"deploy_only"' in shown.stdout and '"not_deploy"' not in shown.stdout


def test_a_blob_from_a_layer_of_another_stage_names_the_rule_to_choose() -> None:
    net = _net("""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } }
  include { phase: TEST stage: "test-on-train" } }
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 } }
  include { phase: TEST stage: "test-on-test" } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
""")
    with pytest.raises(LayerError) as info:
        convert_net(net, None, ConvertOptions())
    text = str(info.value)
    assert "Unknown bottom blob 'data'" in text and "stage: \"test-on-train\"" in text and "--stage" in text
    ok = convert_net(net, None, ConvertOptions(stages=("test-on-test",))).model
    assert [r.index for r in metadata.layer_records(ok)] == [1, 2]


# Two layers named "ip" in one phase: Caffe builds both; its CopyTrainedLayersFrom gives the
# caffemodel's "ip" blobs to the FIRST of them only.
REPEATED = """
name: "repeated"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "a" inner_product_param { num_output: 3
  weight_filler { type: "constant" value: 0.5 } } }
layer { name: "ip" type: "InnerProduct" bottom: "a" top: "b" inner_product_param { num_output: 2
  weight_filler { type: "constant" value: 0.25 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "b" bottom: "b" top: "l1" }
layer { name: "loss" type: "Sigmoid" bottom: "b" top: "s" loss_weight: 2 }
"""


def _weights(tmp_path, first: list[np.ndarray]) -> CaffeWeights:
    net = caffe_pb2.NetParameter()
    net.layer.add(name="ip", type="InnerProduct")
    write_caffemodel(tmp_path / "w.caffemodel", net, {"ip": first})
    return read_caffemodel(tmp_path / "w.caffemodel")


def test_repeated_layer_names_copy_weights_to_the_first_only(tmp_path) -> None:
    w, b = np.arange(9, dtype=np.float32).reshape(3, 3), np.ones(3, np.float32)
    weights = _weights(tmp_path, [w, b])
    with pytest.raises(WeightsError, match=r"'ip' \(layer 2\) repeat the name"):
        convert_net(_net(REPEATED), weights, ConvertOptions(phase=caffe_pb2.TRAIN))
    converted = convert_net(_net(REPEATED), weights, ConvertOptions(phase=caffe_pb2.TRAIN, init_missing=True))
    params = {r["name"]: r for r in metadata.param_records(converted.model)}
    assert [[u[2] for u in r["users"]] for r in params.values()] == [[1], [1], [2], [2]], "users by position"
    first, second = [r.params for r in metadata.layer_records(converted.model)[1:3]]
    assert np.array_equal(converted.weights[first[0]], w), "the first 'ip' gets the caffemodel's blobs"
    assert np.array_equal(converted.weights[second[0]], np.full((2, 3), 0.25, np.float32)), "the second its filler"


def test_trainer_keeps_each_repeated_layer_apart(tmp_path) -> None:
    converted = convert_net(_net(REPEATED), None, ConvertOptions(phase=caffe_pb2.TRAIN))
    module = GraphModule(converted.model, converted.weights)
    assert [(t.layer, t.blob, t.weight, t.position) for t in module.loss_terms] == [
        ("loss", "l1", 1.0, 3), ("loss", "s", 2.0, 4)], "each 'loss' layer brings its own loss_weight"
    with pytest.raises(CaffeOnnxError, match=r"layer name 'ip' is ambiguous: 2 layers have it \(#1 .*#2 "):
        module.add_train_transform("ip", lambda x: x)
    path = tmp_path / "trained.caffemodel"
    module.save_caffemodel(path)
    raw = caffe_pb2.NetParameter.FromString(path.read_bytes())
    shapes = [[list(b.shape.dim) for b in layer.blobs] for layer in raw.layer if layer.name == "ip"]
    assert shapes == [[[3, 3], [3]], [[2, 3], [2]]], "both layers named 'ip' are written, each with its own blobs"
    back = onnx_to_caffe(module.to_converted().to_proto())
    assert [len(back.blobs.get(i, [])) for i in range(len(back.net.layer))] == [0, 2, 2, 0, 0]


def test_to_caffe_writes_the_phase_stage_and_level_it_is_given(tmp_path) -> None:
    proto = tmp_path / "staged.prototxt"
    proto.write_text(STAGED)
    model, back = tmp_path / "m.onnx", tmp_path / "back.prototxt"
    assert run("convert", str(proto), "-o", str(model)).returncode == 0
    done = run("to-caffe", str(model), "-o", str(back), "--phase", "TRAIN", "--stage", "deploy", "--level", "3")
    assert done.returncode == 0, done.stderr
    state = _net(back.read_text()).state
    assert (state.phase, list(state.stage), state.level) == (caffe_pb2.TRAIN, ["from-net", "deploy"], 3)
    bad = run("to-caffe", str(model), "-o", str(tmp_path / "x.prototxt"), "--phase", "VAL")
    assert bad.returncode == 2 and "--phase must be TEST or TRAIN" in bad.stderr
