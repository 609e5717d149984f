"""Foreign ONNX (torch.onnx.export, model zoo) -> Caffe prototxt + caffemodel, without Caffe.

The model is prepared (validated, shapes fixed, constant subgraphs folded, weight ties
recovered: see prepare.py), then every remaining node is written as Caffe layers by the
emitter registered for its op (emitters/*.py).  By default only layer types and fields
of stock BVLC Caffe 1.0 are written; `extensions=True` also allows Permute, Clip, Swish,
pooling round_mode and the forks' ReLU6, HardSwish, HardSigmoid and PixelShuffle.  An initializer that several layers
store in the same role (a tied weight) becomes one shared `param { name }`, and, as
Caffe does, each of those layers keeps its own copy of the blob in the caffemodel.
"""
from __future__ import annotations

from onnx import ModelProto

from caffeonnx.converter.foreign.context import CaffeBuilder, ForeignOptions, NodeContext
from caffeonnx.converter.foreign.prepare import prepare
from caffeonnx.converter.foreign.registry import get_emitter, supported_ops
from caffeonnx.converter.onnx_to_caffe import CaffeNet

__all__ = ["convert_foreign", "supported_ops"]


def convert_foreign(model: ModelProto, batch: int | None = None, extensions: bool = False) -> CaffeNet:
    """Convert an ONNX model that caffeonnx did not write to a Caffe net and its weights."""
    graph = prepare(model, batch)
    builder = CaffeBuilder(graph, ForeignOptions(extensions=extensions))
    for name, shape in graph.inputs:
        builder.add_input(name, shape)
    for node in graph.nodes:
        if node.name in builder.absorbed:
            continue
        emitter = get_emitter(node.op_type, node.domain)
        assert emitter is not None, "prepare() reports unsupported ops"
        emitter.emit(NodeContext(builder, node))
        for name in node.output:
            readers = [u for u in builder.users.get(name, []) if u.name not in builder.absorbed]
            if name and (readers or name in graph.outputs) and name not in builder.values:
                raise RuntimeError(f"emitter {emitter.module}.{emitter.emit.__name__} left output {name!r} of node "
                                   f"{node.name!r} unwritten")
    builder.finish()
    return CaffeNet(builder.net, builder.blobs)
