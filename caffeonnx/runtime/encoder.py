"""Cut an autoencoder's ONNX graph at its code blob: what production serves.

The code blob is, by default, the narrowest blob (fewest values per sample) that
every path from the input to a reconstruction goes through, taken after the
element-wise activations and reshapes applied to it (a sigmoid autoencoder serves its
sigmoid codes; such a chain is one candidate).  Two different candidates of the same
narrowest width are refused with their list: guessing would silently serve the wrong
blob, so the user names one with --code.  A reconstruction is any value computed from
the input with the input's per-sample shape, or a flat (N, values) value with as many
values as an input sample: Caffe's MNIST autoencoder feeds N×1×28×28 images and
reconstructs N×784 rows (its loss compares them with `Flatten(data)`).  So the cut is
found for a deploy net, an all-blobs conversion and a TRAIN net whose only output is a
loss alike (a loss reads the input directly, so nothing dominates it, but the
reconstruction it compares is dominated by the code).  In a caffeonnx model only Caffe
blob names are candidates (never the `<blob>@<layer>` values of in-place chains); in
foreign ONNX every node output is.

`--code NAME` may name a blob (an ONNX value) or a Caffe layer (its single top).
Caffe allows repeated layer names (BVLC's mnist_autoencoder has two layers "loss"), so
a name meaning more than one value is refused with the candidates and their positions
in the prototxt.

The encoder keeps the nodes the code depends on, the initializers and inputs they
read, and the code blob's name as its only output.  Metadata stays consistent:
- `caffe.net` keeps only the converted layers that still have a top in the graph,
  found by their record's position (Caffe allows repeated names: BVLC's nets have a
  Data layer "data" per phase/stage); layers of other phases or stages are dropped,
  so the net is the encoder alone and its data layer (with its transform_param, which
  `caffeonnx encode` applies) is the one the model was converted with;
- `caffe.layers` keeps those layers' records, their positions renumbered to the new net;
- `caffe.params` keeps the initializers still present, their `users` (and
  `user_shapes`) restricted to kept layers and renumbered alike;
- `caffe.input_shapes` keeps the inputs the encoder still reads;
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
from caffeonnx.proto import caffe_pb2

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


def _layer_of(model: ModelProto) -> dict[str, str]:
    """ONNX value -> the Caffe layer (caffeonnx) or node (foreign ONNX) that computes it, for messages."""
    records = metadata.layer_records(model)
    if records:
        return {t: f"layer {r.name!r}" for r in records for t in r.tops}
    return {o: f"{n.op_type} node {n.name!r}" for n in model.graph.node for o in n.output}


def _reconstructs(dims: list[int | str] | None, want: list[int | str] | None) -> bool:
    """Whether a value of shape `dims` can be a reconstruction of an input of shape `want`.

    Same per-sample shape, or flat rows with as many values as a sample (an InnerProduct
    decoder of a 4-D input: Caffe's MNIST autoencoder reconstructs N×784 from N×1×28×28).
    """
    if not want or not dims:
        return False
    if dims[1:] == want[1:]:
        return True
    size = _per_sample(want)
    return len(dims) == 2 and size is not None and len(want) > 2 and _per_sample(dims) == size


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
        recons = [v for v in dom if v != source and _reconstructs(_dims(infos.get(v)), want)]
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
            width = min(w for w, _ in ranked)
            groups = _same_code_groups(g, [v for w, v in ranked if w == width])
            if len(groups) > 1:
                where = _layer_of(model)
                served = [_served_value(g, group) for group in groups]
                listed = ", ".join(f"{v!r} (from {where.get(v, 'the graph')})" for v in served)
                raise CaffeOnnxError(
                    f"{len(groups)} blobs tie as the narrowest code ({width} values per sample): {listed}; "
                    "pass --code BLOB to choose one"
                )
            best = _served_value(g, groups[0])
            return CodeChoice(source, cuts[best], best, width)
    shapes = {i: _dims(infos.get(i)) for i in g.inputs}
    raise CaffeOnnxError(
        f"found no code blob: no blob lies on every path from an input {shapes!r} to a value with that input's "
        "per-sample shape (a reconstruction); is this an autoencoder? Name the code blob with --code BLOB"
    )


# Element-wise neurons: a code is served after its activation (sigmoid codes, not logits).
_ACTIVATIONS = {"Sigmoid", "Relu", "LeakyRelu", "Tanh", "Elu", "Softplus", "Abs", "PRelu", "Selu", "HardSigmoid"}
# Ops that pass the same values on in another shape: the code seen through them is the same code.
_VIEWS = {"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Dropout"}


def _same_code_groups(g: _Graph, tied: list[str]) -> list[list[str]]:
    """`tied` (graph order) split into chains linked by activations and views; each chain is one code."""
    group_of: dict[str, list[str]] = {}
    groups: list[list[str]] = []
    for value in tied:
        node = g.graph.node[g.producer[value]] if value in g.producer else None
        link = node.input[0] if node is not None and node.op_type in _ACTIVATIONS | _VIEWS and node.input else None
        if link in group_of:
            group_of[link].append(value)
            group_of[value] = group_of[link]
        else:
            group_of[value] = [value]
            groups.append(group_of[value])
    return groups


def _served_value(g: _Graph, chain: list[str]) -> str:
    """The value of a code chain to serve: after its last activation (sigmoid codes, not logits)."""
    activated = [v for v in chain if g.graph.node[g.producer[v]].op_type in _ACTIVATIONS]
    return activated[-1] if activated else chain[0]


def _named_code(model: ModelProto, g: _Graph, infos: dict[str, ValueInfoProto], code: str) -> CodeChoice:
    """Check a user-named code blob or layer: it must be one computed value that depends on an input."""
    code = _resolve_code_name(model, g, code)
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


def _resolve_code_name(model: ModelProto, g: _Graph, name: str) -> str:
    """The value `--code name` means: the blob of that name, or the one top of the layer(s) of that name.

    A name meaning several values (a repeated layer name, a layer with several tops, a layer
    named like another layer's blob) is refused with every candidate and its prototxt position.
    """
    records = metadata.layer_records(model)
    meanings: list[tuple[str, str]] = []  # (value, how the name reaches it)
    if name in g.producer or name in g.inputs or name in g.initializers:
        meanings.append((name, f"blob {name!r}"))
    for r in records:
        if r.name != name or r.name in r.tops:  # a layer naming its own top means that blob
            continue
        where = f"layer {r.name!r} #{r.index + 1} of the prototxt"
        meanings.extend((top, f"{where} ({r.type}, top {top!r})") for top in r.tops)
    values = list(dict.fromkeys(v for v, _ in meanings))
    if len(values) > 1:
        listed = "; ".join(how for _, how in meanings)
        raise CaffeOnnxError(f"--code {name!r} is ambiguous (Caffe allows repeated layer names): it names {listed}; "
                             "pass the blob name of the one you mean with --code")
    return values[0] if values else name


def _filtered_metadata(model: ModelProto, kept_values: set[str], kept_inits: set[str], choice: CodeChoice) -> dict[str, str]:
    """metadata_props restricted to what is left in the encoder (see the module docstring)."""
    props = metadata.read_metadata(model)
    records = metadata.layer_records(model)
    info = {"code": choice.code, "input": choice.input, "reconstruction": choice.reconstruction}
    if not records:
        return {**props, KEY_ENCODER: json.dumps({**info, "dropped_layers": []})}
    kept = [r for r in records if any(t in kept_values for t in r.tops)]
    dropped = [r.name for r in records if not any(t in kept_values for t in r.tops)]
    net = metadata.caffe_net_from(model)
    # Layers are identified by their position in the stored net, which the cut renumbers.
    moved = {r.index: k for k, r in enumerate(kept)} if net is not None else {r.index: r.index for r in kept}
    params = []
    for p in metadata.param_records(model):
        if p["name"] not in kept_inits:
            continue
        p = dict(p)
        p["users"] = [[u[0], u[1], moved[u[2]]] for u in p.get("users", []) if u[2] in moved]
        p["user_shapes"] = [[u[0], u[1], u[2], moved[u[3]]] for u in p.get("user_shapes", []) if u[3] in moved]
        params.append(p)
    out = dict(props)
    if net is not None:
        layers = [caffe_pb2.LayerParameter.FromString(net.layer[r.index].SerializeToString()) for r in kept]
        del net.layer[:]
        net.layer.extend(layers)
        if net.name:
            net.name = f"{net.name}_encoder"
        out[metadata.KEY_NET] = text_format.MessageToString(net)
    kept = [metadata.LayerRecord(**{**r.__dict__, "index": moved[r.index]}) for r in kept]
    out[metadata.KEY_LAYERS] = json.dumps([r.__dict__ for r in kept])
    out[metadata.KEY_PARAMS] = json.dumps(params)
    if metadata.KEY_INPUT_SHAPES in props:
        shapes = metadata.input_shapes(model)
        out[metadata.KEY_INPUT_SHAPES] = json.dumps({k: v for k, v in shapes.items() if k in kept_values})
    out[KEY_ENCODER] = json.dumps({**info, "dropped_layers": dropped})
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

