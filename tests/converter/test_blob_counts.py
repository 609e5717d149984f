"""Every layer type's bottom/top counts are declared with its handler and checked before it runs, in Caffe's words.

Caffe's Layer::CheckBlobCounts aborts with "<Type> Layer takes N bottom blob(s) as input." (and "at
least"/"at most", "produces ... top blob(s) as output"); a layer with too few or too many blobs must get
that message as one LayerError, never an IndexError from inside a handler.
"""
from __future__ import annotations

import pytest
from google.protobuf import text_format

from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_to_onnx import convert_net
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.registry import BlobCounts, supported_layers
from caffeonnx.errors import LayerError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.graph_module import GraphModule

INPUT = 'layer { name: "in" type: "Input" top: "a" top: "b" top: "c" top: "d" input_param { shape { dim: 2 dim: 3 } } }\n'


def _bad_counts(counts: BlobCounts) -> list[tuple[str, int, int]]:
    """(what breaks, bottoms, tops) just outside the declared counts."""
    def bounds(count: int | tuple[int, int | None]) -> tuple[int, int | None]:
        return (count, count) if isinstance(count, int) else count

    (blo, bhi), (tlo, thi) = bounds(counts.bottoms), bounds(counts.tops)
    ok_b, ok_t = blo, max(tlo, 1 if thi is None or thi >= 1 else 0)
    cases = []
    if blo > 0:
        cases.append(("bottom", blo - 1, ok_t))
    if bhi is not None and bhi < 4:
        cases.append(("bottom", bhi + 1, ok_t))
    if tlo > 0 and not counts.auto_top:
        cases.append(("top", ok_b, tlo - 1))
    if thi is not None:
        cases.append(("top", ok_b, thi + 1))
    return [c for c in cases if not (counts.equal and c[0] == "top" and c[2] == ok_b)]


CASES = [(h.layer_type, *case) for h in supported_layers() for case in _bad_counts(h.counts)]


@pytest.mark.parametrize(("layer_type", "side", "bottoms", "tops"), CASES,
                         ids=[f"{c[0]}-{c[2]}b-{c[3]}t" for c in CASES])
def test_wrong_blob_counts_get_caffes_message(layer_type: str, side: str, bottoms: int, tops: int) -> None:
    layer = (f'layer {{ name: "x" type: "{layer_type}" '
             + "".join(f'bottom: "{n}" ' for n in "abcde"[:bottoms])
             + "".join(f'top: "t{k}" ' for k in range(tops)) + "}\n")
    net = text_format.Parse(INPUT + layer, caffe_pb2.NetParameter())
    with pytest.raises(LayerError) as info:
        convert_net(net, None, ConvertOptions())
    text = str(info.value)
    assert f"layer 'x' ({layer_type}): {layer_type} Layer " in text, text
    verb = "takes" if side == "bottom" else "produces"
    assert f"{verb} " in text and f"{side} blob" in text and "(in <net>)" in text, text


def test_every_type_declares_its_counts() -> None:
    assert all(isinstance(h.counts, BlobCounts) for h in supported_layers())


def test_a_loss_without_top_gets_caffes_automatic_top_and_trains() -> None:
    """Caffe's LossLayer has AutoTopBlobs: `top` may be left out; the loss still counts, under "(automatic)"."""
    net = text_format.Parse(
        INPUT + 'layer { name: "ip" type: "InnerProduct" bottom: "a" top: "y" inner_product_param { num_output: 3 } }\n'
        'layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "b" }\n', caffe_pb2.NetParameter())
    converted = convert_net(net, None, ConvertOptions(phase=caffe_pb2.TRAIN))
    assert [o.name for o in converted.model.graph.output] == ["c", "d", "(automatic)"]  # c, d: unused inputs
    stored = metadata.caffe_net_from(converted.model)
    assert stored is not None and list(stored.layer[2].top) == ["(automatic)"]
    module = GraphModule(converted.model, converted.weights)
    assert [(t.blob, t.weight) for t in module.loss_terms] == [("(automatic)", 1.0)]
    assert list(net.layer[2].top) == [], "the caller's net is left as it was"
