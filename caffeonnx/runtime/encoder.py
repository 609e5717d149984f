"""Cut an autoencoder's ONNX graph at its code blob: what production serves.

The code blob is, by default, the narrowest blob (fewest values per sample) that
every path from the input to a reconstruction goes through; ties go to the first in
graph order, taken after the element-wise activation applied to it (a sigmoid
autoencoder serves its sigmoid codes).  A reconstruction is any value computed from the input with the
input's per-sample shape, so the cut is found for a deploy net, an all-blobs
conversion and a TRAIN net whose only output is a loss alike (a loss reads the
input directly, so nothing dominates it, but the reconstruction it compares is
dominated by the code).  In a caffeonnx model only Caffe blob names are candidates
(never the `<blob>@<layer>` values of in-place chains); in foreign ONNX every node
output is.

The encoder keeps the nodes the code depends on, the initializers and inputs they
read, and the code blob's name as its only output.  Metadata stays consistent:
- `caffe.layers` keeps the layers that still have a node in the graph;
- `caffe.params` keeps the initializers still present, their `users` (and
  `user_shapes`) restricted to kept layers;
- `caffe.net` keeps only the layers named in `caffe.layers` (layers of other phases
  that the conversion skipped are dropped too, so the net is the encoder alone);
- `caffeonnx.encoder` (added): JSON {"code", "input", "reconstruction",
  "dropped_layers"} saying where the graph was cut.
"""
from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import onnx
from google.protobuf import text_format
from onnx import GraphProto, ModelProto, NodeProto, ValueInfoProto, numpy_helper

from caffeonnx.converter import metadata
from caffeonnx.converter.onnx_io import load_onnx, save_streaming
from caffeonnx.errors import CaffeOnnxError

KEY_ENCODER = "caffeonnx.encoder"


@dataclass(frozen=True)
class CodeChoice:
    """Where an autoencoder is cut: its input, its reconstruction and its code blob."""

    input: str
    reconstruction: str | None  # None when the code was named explicitly
    code: str
    width: int | None  # values per sample of the code blob (None: not statically known)



def _value_infos(model: ModelProto) -> dict[str, ValueInfoProto]:
    """Inferred type and shape of every value (initializers excluded)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    return {vi.name: vi for vi in [*g.value_info, *g.input, *g.output]}


def _dims(vi: ValueInfoProto | None) -> list[int | str] | None:
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _per_sample(dims: list[int | str] | None) -> int | None:
    """Values per sample (dimension 0 is the batch, as in Caffe); None when not static."""
    if not dims or any(not isinstance(d, int) for d in dims[1:]):
        return None
    return math.prod(int(d) for d in dims[1:])


def _subgraph_inputs(node: NodeProto) -> Iterable[str]:
    """Outer-scope names read by the node's subgraphs (If/Loop/Scan bodies)."""
    for attr in node.attribute:
        graphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
        for g in graphs:
            for inner in g.node:
                yield from (i for i in inner.input if i)
                yield from _subgraph_inputs(inner)


def _node_inputs(node: NodeProto) -> list[str]:
    return [i for i in node.input if i] + list(_subgraph_inputs(node))


class _Graph:
    """Value-level view of a graph: who produces and who consumes each value."""

    def __init__(self, graph: GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name for t in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.order: list[str] = list(self.inputs)  # values in topological (graph) order
        self.producer: dict[str, int] = {}
        self.successors: dict[str, list[str]] = {}
        for k, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = k
                    self.order.append(out)
            for i in _node_inputs(node):
                self.successors.setdefault(i, []).extend(o for o in node.output if o)

    def descendants(self, source: str) -> set[str]:
        """Values computed from `source`."""
        seen = {source}
        todo = deque([source])
        while todo:
            for nxt in self.successors.get(todo.popleft(), []):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def dominators(self, source: str) -> dict[str, set[str]]:
        """For each value computed from `source`: the values every path from `source` to it goes through."""
        reach = self.descendants(source)
        dom: dict[str, set[str]] = {source: {source}}
        for value in self.order:  # graph order is topological
            if value == source or value not in reach or value not in self.producer:
                continue
            preds = [i for i in _node_inputs(self.graph.node[self.producer[value]]) if i in dom]
            dom[value] = set.intersection(*(dom[p] for p in preds)) | {value}
        return dom

    def needed_nodes(self, outputs: Iterable[str]) -> list[int]:
        """Indices (graph order) of the nodes that `outputs` depend on."""
        keep: set[int] = set()
        todo = deque(outputs)
        seen = set(todo)
        while todo:
            k = self.producer.get(todo.popleft())
            if k is None or k in keep:
                continue
            keep.add(k)
            for i in _node_inputs(self.graph.node[k]):
                if i not in seen:
                    seen.add(i)
                    todo.append(i)
        return sorted(keep)


def _blob_names(model: ModelProto) -> set[str] | None:
    """Caffe blob names of a caffeonnx model (None for foreign ONNX)."""
    net = metadata.caffe_net_from(model)
    if net is None:
        return None
    return {t for layer in net.layer for t in layer.top}


def choose_code(model: ModelProto, code: str | None = None) -> CodeChoice:
    """Find the code blob: `code` if given (checked), else the narrowest blob on the input->reconstruction path."""
    g = _Graph(model.graph)
    infos = _value_infos(model)
    if not g.inputs:
        raise CaffeOnnxError("the model has no graph inputs, so it has no encoder to cut")
    if code is not None:
        return _named_code(model, g, infos, code)
    blobs = _blob_names(model)
    for source in g.inputs:
        want = _dims(infos.get(source))
        dom = g.dominators(source)
        recons = [v for v in dom if v != source and want and (_dims(infos.get(v)) or [])[1:] == want[1:]]
        cuts: dict[str, str] = {}  # code candidate -> the deepest reconstruction it dominates
        for recon in recons:
            for value in dom[recon] - {source, recon}:
                cuts[value] = recon
        ranked = []
        for value in g.order:
            width = _per_sample(_dims(infos.get(value))) if value in cuts else None
            if width is not None and (blobs is None or value in blobs):
                ranked.append((width, value))
        if ranked:
            width, best = min(ranked, key=lambda c: c[0])  # min keeps the first of equal widths
            best = _after_activation(g, best, {v for w, v in ranked if w == width})
            return CodeChoice(source, cuts[best], best, width)
    shapes = {i: _dims(infos.get(i)) for i in g.inputs}
    raise CaffeOnnxError(
        f"found no code blob: no blob lies on every path from an input {shapes!r} to a value with that input's "
        "per-sample shape (a reconstruction); is this an autoencoder? Name the code blob with --code BLOB"
    )


# Element-wise neurons: a code is served after its activation (sigmoid codes, not logits).
_ACTIVATIONS = {"Sigmoid", "Relu", "LeakyRelu", "Tanh", "Elu", "Softplus", "Abs", "PRelu", "Selu", "HardSigmoid"}


def _after_activation(g: _Graph, value: str, same_width: set[str]) -> str:
    """Follow `value` through the element-wise activations applied to it (same width)."""
    moved = True
    while moved:
        moved = False
        for node in g.graph.node:
            if node.op_type in _ACTIVATIONS and node.input and node.input[0] == value:
                nxt = next((o for o in node.output if o in same_width), None)
                if nxt is not None:
                    value, moved = nxt, True
                    break
    return value


def _named_code(model: ModelProto, g: _Graph, infos: dict[str, ValueInfoProto], code: str) -> CodeChoice:
    """Check a user-named code blob: it must be computed by the graph from an input."""
    if code not in g.producer:
        blobs = _blob_names(model)
        names = [v for v in g.order if v in g.producer and (blobs is None or v in blobs)]
        shown = ", ".join(repr(n) for n in names[:40]) + (" ..." if len(names) > 40 else "")
        what = "a graph input" if code in g.inputs else "an initializer" if code in g.initializers else "no value"
        raise CaffeOnnxError(f"--code {code!r} is {what} of the model, not a computed blob; choose one of: {shown}")
    sources = [s for s in g.inputs if code in g.descendants(s)]
    if not sources:
        raise CaffeOnnxError(f"--code {code!r} does not depend on any graph input {g.inputs!r}; choose a blob the input feeds")
    return CodeChoice(sources[0], None, code, _per_sample(_dims(infos.get(code))))


def _filtered_metadata(model: ModelProto, kept_values: set[str], kept_inits: set[str], choice: CodeChoice) -> dict[str, str]:
    """metadata_props restricted to what is left in the encoder (see the module docstring)."""
    props = metadata.read_metadata(model)
    records = metadata.layer_records(model)
    if not records:
        return {**props, KEY_ENCODER: json.dumps({"code": choice.code, "input": choice.input,
                                                   "reconstruction": choice.reconstruction, "dropped_layers": []})}
    kept = [r for r in records if any(t in kept_values for t in r.tops)]
    kept_names = {r.name for r in kept}
    dropped = [r.name for r in records if r.name not in kept_names]
    params = []
    for p in metadata.param_records(model):
        if p["name"] not in kept_inits:
            continue
        p = dict(p)
        p["users"] = [u for u in p.get("users", []) if u[0] in kept_names]
        if "user_shapes" in p:
            p["user_shapes"] = [u for u in p["user_shapes"] if u[0] in kept_names]
        params.append(p)
    out = dict(props)
    out[metadata.KEY_LAYERS] = json.dumps([r.__dict__ for r in kept])
    out[metadata.KEY_PARAMS] = json.dumps(params)
    net = metadata.caffe_net_from(model)
    if net is not None:
        layers = [layer for layer in net.layer if layer.name in kept_names]
        del net.layer[:]
        net.layer.extend(layers)
        if net.name:
            net.name = f"{net.name}_encoder"
        out[metadata.KEY_NET] = text_format.MessageToString(net)
    out[KEY_ENCODER] = json.dumps({"code": choice.code, "input": choice.input,
                                   "reconstruction": choice.reconstruction, "dropped_layers": dropped})
    return out


def extract_encoder(model: ModelProto, code: str | None = None) -> tuple[ModelProto, CodeChoice]:
    """The encoder half of `model`: the nodes, initializers and inputs the code blob needs."""
    choice = choose_code(model, code)
    g = _Graph(model.graph)
    infos = _value_infos(model)
    node_ids = g.needed_nodes([choice.code])
    nodes = [model.graph.node[k] for k in node_ids]
    used = {i for n in nodes for i in _node_inputs(n)} | {choice.code}
    kept_values = used | {o for n in nodes for o in n.output if o}

    enc = ModelProto(
        ir_version=model.ir_version, producer_name=model.producer_name, producer_version=model.producer_version,
        domain=model.domain, model_version=model.model_version, doc_string=model.doc_string,
    )
    enc.opset_import.extend(model.opset_import)
    enc.functions.extend(model.functions)
    graph = enc.graph
    graph.name = f"{model.graph.name}_encoder" if model.graph.name else "encoder"
    graph.doc_string = model.graph.doc_string
    graph.node.extend(nodes)
    graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    graph.sparse_initializer.extend(t for t in model.graph.sparse_initializer if t.values.name in used)
    graph.input.extend(i for i in model.graph.input if i.name in used)
    out_info = infos.get(choice.code)
    graph.output.append(out_info if out_info is not None else onnx.ValueInfoProto(name=choice.code))
    graph.value_info.extend(vi for vi in model.graph.value_info if vi.name in kept_values and vi.name != choice.code)
    kept_inits = {t.name for t in graph.initializer}
    for key, value in _filtered_metadata(model, kept_values, kept_inits, choice).items():
        enc.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return enc, choice


def save_model(model: ModelProto, path: str | os.PathLike[str]) -> None:
    """Write `model` atomically, streaming its initializers (no 2 GiB serialisation copy)."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    bare = ModelProto()
    bare.CopyFrom(model)
    bare.graph.ClearField("initializer")
    save_streaming(path, bare, weights)


def extract_encoder_file(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], code: str | None = None
) -> CodeChoice:
    """Read `src`, cut it at its code blob, check the result and write it to `dst` atomically."""
    model = load_onnx(src)
    enc, choice = extract_encoder(model, code)
    onnx.checker.check_model(enc, full_check=True)
    save_model(enc, dst)
    return choice

