"""Nothing is lost: the metadata of a converted model holds what returning to Caffe needs.

`caffe.net` is the upgraded input net minus blobs (every phase's layers), `caffe.params`
lists each shared blob once with all its users, `caffe.layers` maps every converted
layer to its ONNX values, and the NetState and input shapes used are recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from onnx import ModelProto

from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_io import parse_prototxt
from caffeonnx.converter.caffe_to_onnx import (
    convert_files,
    convert_net,
    filter_layers,
    filter_positions,
    load_net,
    load_weights,
)
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.upgrade import upgrade_net
from caffeonnx.proto import caffe_pb2
from tests.helpers import REFERENCE

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST


def _cases() -> list[tuple[str, int]]:
    """(case, phase) for every convertible reference case: forward ones in TEST, training ones in both."""
    out = []
    for d in sorted(REFERENCE.iterdir()):
        meta = d / "case.json"
        kind = json.loads(meta.read_text())["kind"] if meta.exists() else None
        if kind == "forward":
            out.append((d.name, TEST))
        elif kind == "train":
            out += [(d.name, TRAIN), (d.name, TEST)]
    return out


CASES = _cases()


def _files(case: str) -> tuple[Path, Path]:
    d = REFERENCE / case
    if (d / "net.prototxt").exists():
        return d / "net.prototxt", d / "weights.caffemodel"
    return d / "train.prototxt", d / "init.caffemodel"


def _convert(case: str, phase: int) -> ModelProto:
    prototxt, caffemodel = _files(case)
    return convert_files(prototxt, caffemodel, ConvertOptions(phase=phase)).to_proto()


def test_reference_cases_cover_forward_and_train() -> None:
    names = {c for c, _ in CASES}
    assert {"tied_ae", "siamese_shared", "legacy_v1", "train_tied_sgd", "train_siamese_sgd"} <= names, sorted(names)


@pytest.mark.parametrize(("case", "phase"), CASES)
def test_stored_net_is_the_upgraded_input_net_without_blobs(case: str, phase: int) -> None:
    prototxt, _ = _files(case)
    model = _convert(case, phase)
    stored = metadata.caffe_net_from(model)
    want = metadata.net_without_blobs(load_net(prototxt))
    assert stored is not None, f"{case}: no {metadata.KEY_NET!r} in metadata_props"
    if stored != want:
        raise AssertionError(
            f"{case} ({caffe_pb2.Phase.Name(phase)}): stored caffe.net differs from the upgraded input net\n"
            f"--- stored\n{text_format.MessageToString(stored)}\n--- input\n{text_format.MessageToString(want)}"
        )
    assert not any(layer.blobs for layer in stored.layer), f"{case}: caffe.net still carries blobs"


def _expected_param_groups(case: str, phase: int) -> dict[object, set[tuple[str, int, int]]]:
    """Caffe's sharing: blobs with the same ParamSpec name are one; others are one per (layer, index).

    Each user is (layer name, blob index, layer position in the net).
    """
    prototxt, caffemodel = _files(case)
    net, weights = load_net(prototxt), load_weights(caffemodel)
    groups: dict[object, set[tuple[str, int, int]]] = {}
    for position in filter_positions(net, caffe_pb2.NetState(phase=phase)):
        layer = net.layer[position]
        for i in range(len(weights.blobs.get(layer.name, []))):
            name = layer.param[i].name if i < len(layer.param) else ""
            groups.setdefault(name or (layer.name, i), set()).add((layer.name, i, position))
    return groups


@pytest.mark.parametrize(("case", "phase"), CASES)
def test_params_list_each_shared_blob_once_with_all_its_users(case: str, phase: int) -> None:
    model = _convert(case, phase)
    records = metadata.param_records(model)
    groups = _expected_param_groups(case, phase)
    got = sorted(sorted(map(tuple, r["users"])) for r in records)
    want = sorted(sorted(users) for users in groups.values())
    assert got == want, f"{case}: param users {got} != Caffe's sharing {want}"
    assert [r["name"] for r in records] == [t.name for t in model.graph.initializer], f"{case}: records vs initializers"
    for r in records:
        named = [k for k, users in groups.items() if isinstance(k, str) and set(map(tuple, r["users"])) == users]
        assert r["caffe_name"] == (named[0] if named else ""), f"{case}: {r['name']} caffe_name {r['caffe_name']!r}"


@pytest.mark.parametrize(("case", "phase"), CASES)
def test_params_carry_each_specs_multipliers(case: str, phase: int) -> None:
    prototxt, _ = _files(case)
    layers = {layer.name: layer for layer in load_net(prototxt).layer}
    for r in metadata.param_records(_convert(case, phase)):
        for layer_name, index, _ in r["users"]:
            params = layers[layer_name].param
            spec = params[index] if index < len(params) else caffe_pb2.ParamSpec()
            for attr in ("lr_mult", "decay_mult"):
                if spec.HasField(attr):
                    assert r[attr] == pytest.approx(getattr(spec, attr)), (
                        f"{case}: {r['name']} {attr} vs {layer_name}[{index}]"
                    )
        if not any(i < len(layers[u].param) and layers[u].param[i].HasField("lr_mult") for u, i, _ in r["users"]):
            # Caffe's default is 1, except that BatchNorm's LayerSetUp freezes its statistics with lr_mult 0.
            default = 0.0 if layers[r["users"][0][0]].type == "BatchNorm" else 1.0
            assert r["lr_mult"] == default, (
                f"{case}: {r['name']} lr_mult {r['lr_mult']} without a spec (Caffe: {default})"
            )


@pytest.mark.parametrize(("case", "phase"), CASES)
def test_layers_map_every_converted_layer_to_its_onnx_values(case: str, phase: int) -> None:
    prototxt, _ = _files(case)
    model = _convert(case, phase)
    converted = filter_layers(load_net(prototxt), ConvertOptions(phase=phase))
    records = metadata.layer_records(model)
    assert [(r.name, r.type) for r in records] == [(layer.name, layer.type) for layer in converted], case
    values = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    params = metadata.param_records(model)
    last_writer = {top: layer.name for layer in converted for top in layer.top}
    for layer, r in zip(converted, records):
        assert len(r.tops) == len(layer.top), f"{case}: {layer.name} tops {r.tops} vs Caffe's {list(layer.top)}"
        assert set(r.tops) <= values, f"{case}: {layer.name} tops {sorted(set(r.tops) - values)} are not graph values"
        assert set(r.bottoms) <= values, (
            f"{case}: {layer.name} bottoms {sorted(set(r.bottoms) - values)} are not graph values"
        )
        for top, onnx_name in zip(layer.top, r.tops):
            if last_writer[top] == layer.name:
                assert onnx_name == top, f"{case}: the last write of blob {top!r} is ONNX value {onnx_name!r}"
        used = [p["name"] for p in params if any(u[0] == layer.name for u in p["users"])]
        assert r.params == used, f"{case}: {layer.name} lists params {r.params}, its blobs are {used}"
    outputs = {o.name for o in model.graph.output}
    assert outputs <= {t for r in records for t in r.tops}, f"{case}: outputs not mapped to a layer: {outputs}"


@pytest.mark.parametrize("case", [c for c, p in CASES if p == TRAIN])
def test_train_loss_is_a_mapped_output(case: str) -> None:
    model = _convert(case, TRAIN)
    loss = [r for r in metadata.layer_records(model) if r.type.endswith("Loss")]
    assert [r.tops for r in loss] == [["loss"]], f"{case}: loss layer records {loss}"
    assert "loss" in {o.name for o in model.graph.output}, f"{case}: 'loss' is not a graph output"
    assert metadata.read_metadata(model)[metadata.KEY_PHASE] == "TRAIN"


# --- one net exercising every field the trainer and the way back rely on ------------

RICH_NET = """
name: "rich"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 8 dim: 12 } shape { dim: 8 } } }
layer { name: "enc" type: "InnerProduct" bottom: "data" top: "enc"
        param { name: "W" lr_mult: 1 decay_mult: 1 } param { name: "b_enc" lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.05 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "dec" type: "InnerProduct" bottom: "enc" top: "dec"
        param { name: "W" share_mode: PERMISSIVE } param { lr_mult: 3 }
        inner_product_param { num_output: 12 transpose: true bias_filler { type: "constant" value: -0.5 } } }
layer { name: "cls" type: "InnerProduct" bottom: "enc" top: "cls"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "rec_loss" type: "EuclideanLoss" bottom: "dec" bottom: "data" top: "rec_loss"
        loss_weight: 0.5 include { phase: TRAIN } }
layer { name: "cls_loss" type: "SoftmaxWithLoss" bottom: "cls" bottom: "label" top: "cls_loss"
        exclude { phase: TEST } loss_param { ignore_label: 2 normalization: BATCH_SIZE } }
layer { name: "acc" type: "Accuracy" bottom: "cls" bottom: "label" top: "acc" include { phase: TEST } }
layer { name: "code" type: "Sigmoid" bottom: "enc" top: "code" include { phase: TEST stage: "deploy" } }
"""

STATES = [
    (TRAIN, (), ["data", "enc", "dec", "cls", "rec_loss", "cls_loss"]),
    (TEST, (), ["data", "enc", "dec", "cls", "acc"]),
    (TEST, ("deploy",), ["data", "enc", "dec", "cls", "acc", "code"]),
]


def _rich(phase: int, stages: tuple[str, ...], **options: object) -> tuple[caffe_pb2.NetParameter, ModelProto]:
    net = upgrade_net(parse_prototxt(RICH_NET, "<rich>"), "<rich>")
    opts = ConvertOptions(phase=phase, stages=stages, **options)  # type: ignore[arg-type]
    return net, convert_net(net, None, opts, source="<rich>").to_proto()


@pytest.mark.parametrize(("phase", "stages", "layers"), STATES)
def test_rich_net_keeps_every_phase_and_field(phase: int, stages: tuple[str, ...], layers: list[str]) -> None:
    net, model = _rich(phase, stages)
    stored = metadata.caffe_net_from(model)
    assert stored == metadata.net_without_blobs(net), "stored caffe.net differs from the input net"
    by_name = {layer.name: layer for layer in stored.layer}
    assert list(by_name) == ["data", "enc", "dec", "cls", "rec_loss", "cls_loss", "acc", "code"], list(by_name)
    enc, dec = by_name["enc"], by_name["dec"]
    assert [(p.name, p.lr_mult, p.decay_mult) for p in enc.param] == [("W", 1, 1), ("b_enc", 2, 0)], enc.param
    assert dec.param[0].share_mode == caffe_pb2.ParamSpec.PERMISSIVE and dec.param[1].lr_mult == 3, dec.param
    assert enc.inner_product_param.weight_filler == caffe_pb2.FillerParameter(type="gaussian", std=0.05)
    assert enc.inner_product_param.bias_filler == caffe_pb2.FillerParameter(type="constant", value=0.1)
    assert dec.inner_product_param.transpose and dec.inner_product_param.bias_filler.value == -0.5
    assert list(by_name["rec_loss"].loss_weight) == [0.5] and by_name["rec_loss"].include[0].phase == TRAIN
    assert by_name["cls_loss"].exclude[0].phase == TEST
    assert by_name["cls_loss"].loss_param.ignore_label == 2
    assert by_name["cls_loss"].loss_param.normalization == caffe_pb2.LossParameter.BATCH_SIZE
    assert list(by_name["code"].include[0].stage) == ["deploy"]
    assert [r.name for r in metadata.layer_records(model)] == layers


@pytest.mark.parametrize(("phase", "stages", "layers"), STATES)
def test_rich_net_params_and_state(phase: int, stages: tuple[str, ...], layers: list[str]) -> None:
    _, model = _rich(phase, stages)
    records = {r["name"]: r for r in metadata.param_records(model)}
    assert list(records) == ["W", "b_enc", "dec.bias", "cls.weight", "cls.bias"], list(records)
    assert records["W"]["users"] == [["enc", 0, 1], ["dec", 0, 2]]  # [layer, blob index, position]
    assert (records["W"]["lr_mult"], records["W"]["decay_mult"]) == (1.0, 1.0)
    assert (records["b_enc"]["lr_mult"], records["b_enc"]["decay_mult"]) == (2.0, 0.0)
    assert (records["dec.bias"]["lr_mult"], records["dec.bias"]["decay_mult"], records["dec.bias"]["caffe_name"]) == (
        3.0,
        1.0,
        "",
    )
    assert [u[:2] for u in records["cls.weight"]["users"]] == [["cls", 0]] and records["cls.weight"]["lr_mult"] == 1.0
    assert metadata.read_metadata(model)[metadata.KEY_PHASE] == caffe_pb2.Phase.Name(phase)
    assert metadata.net_state(model) == caffe_pb2.NetState(phase=phase, level=0, stage=list(stages))
    assert metadata.input_shapes(model) == {"data": [8, 12], "label": [8]}


def test_state_records_level_and_the_filtering_reproduces() -> None:
    net, model = _rich(TEST, ("deploy",), level=3)
    state = metadata.net_state(model)
    assert state == caffe_pb2.NetState(phase=TEST, level=3, stage=["deploy"]), state
    again = filter_layers(net, ConvertOptions(phase=state.phase, level=state.level, stages=tuple(state.stage)))
    assert [layer.name for layer in again] == [r.name for r in metadata.layer_records(model)]


@pytest.mark.parametrize("batch", [None, 3])
def test_input_shapes_keep_the_caffe_batch_the_graph_may_not_show(batch: int | None) -> None:
    _, model = _rich(TRAIN, (), batch=batch)
    dim0 = {i.name: i.type.tensor_type.shape.dim[0] for i in model.graph.input}
    want_batch = 8 if batch is None else batch
    assert metadata.input_shapes(model) == {"data": [want_batch, 12], "label": [want_batch]}
    if batch is None:
        assert all(d.dim_param for d in dim0.values()), "graph inputs should have a symbolic batch"


def test_training_losses_get_their_weights_from_the_stored_net() -> None:
    from caffeonnx.converter.layers.loss import effective_loss_weights

    _, model = _rich(TRAIN, ())
    net = metadata.caffe_net_from(model)
    layers = {layer.name: layer for layer in net.layer}
    weights = {
        t: w for r in metadata.layer_records(model) for t, w in zip(r.tops, effective_loss_weights(layers[r.name])) if w
    }
    assert weights == {"rec_loss": 0.5, "cls_loss": 1.0}, weights
    assert set(weights) <= {o.name for o in model.graph.output}
    assert np.isfinite(list(weights.values())).all()
