"""Caffe net (+ weights) -> ONNX: the driver that walks layers and calls handlers.

Naming: graph inputs are the Caffe input blobs; every Caffe blob name is the ONNX
value holding what Caffe's blob holds after forward.  When in-place layers write a
blob several times, the earlier writes are named `<blob>@<writer layer>`.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import text_format
from onnx import ModelProto, TensorProto, helper

from caffeonnx import __version__
from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_io import CaffeWeights, read_caffemodel, read_prototxt
from caffeonnx.converter.context import ConvertOptions, GraphBuilder, LayerContext
from caffeonnx.converter.forks import adopt_spelling
from caffeonnx.converter.layers.loss import effective_loss_weights
from caffeonnx.converter.onnx_io import check_and_type_outputs, save_streaming, to_model_proto
from caffeonnx.converter.registry import check_blob_counts, get_handler, has_params
from caffeonnx.converter.upgrade import upgrade_net
from caffeonnx.errors import CaffeOnnxError, LayerError, UnsupportedError, WeightsError
from caffeonnx.proto import caffe_pb2

BATCH_SYMBOL = "N"


def net_state(net: caffe_pb2.NetParameter, opts: ConvertOptions) -> caffe_pb2.NetState:
    """The NetState Caffe filters with: the options' phase and level, the net's own stages plus the options'.

    As Caffe's Net(file, phase, level, stages) constructor: phase and level are set,
    stages are added to those of the prototxt's `state`.
    """
    stages = list(dict.fromkeys([*net.state.stage, *opts.stages]))
    return caffe_pb2.NetState(phase=opts.phase, level=opts.level, stage=stages)


def filter_positions(net: caffe_pb2.NetParameter, state: caffe_pb2.NetState, source: str = "<net>") -> list[int]:
    """Positions of the layers Caffe's Net::FilterNet keeps for `state`."""
    kept = []
    for i, layer in enumerate(net.layer):
        if layer.include and layer.exclude:
            raise LayerError(layer.name, layer.type, f"Specify either include rules or exclude rules; not both "
                             f"({source}); keep one kind")
        if metadata.layer_included(layer, state):
            kept.append(i)
    return kept


def filter_layers(net: caffe_pb2.NetParameter, opts: ConvertOptions) -> list[caffe_pb2.LayerParameter]:
    """The layers Caffe would instantiate for the options' phase/level/stages."""
    return [net.layer[i] for i in filter_positions(net, net_state(net, opts))]


def _state_text(state: caffe_pb2.NetState) -> str:
    stages = "".join(f" --stage {s}" for s in state.stage)
    return f"--phase {caffe_pb2.Phase.Name(state.phase)}{stages} --level {state.level}"


def _rule_text(layer: caffe_pb2.LayerParameter) -> str:
    """A layer's include/exclude rules, one line, as in the prototxt."""
    kind, rules = ("include", layer.include) if layer.include else ("exclude", layer.exclude)
    return " ".join(f"{kind} {{ {text_format.MessageToString(r, as_one_line=True)} }}" for r in rules)


def _unknown_bottom(net: caffe_pb2.NetParameter, kept: set[int], layer: caffe_pb2.LayerParameter, blob: str,
                    state: caffe_pb2.NetState, source: str) -> LayerError:
    """Caffe's 'Unknown bottom blob', naming the layers that would produce it under another NetState."""
    hidden = [f"{other.name!r} ({_rule_text(other)})" for i, other in enumerate(net.layer)
              if i not in kept and blob in other.top]
    hint = ("check the layer order and the blob names" if not hidden else
            f"it is produced by layer(s) {', '.join(hidden)}, which the NetState ({_state_text(state)}) leaves "
            "out: choose their phase/stage/level with --phase, --stage and --level")
    return LayerError(layer.name, layer.type,
                      f"Unknown bottom blob {blob!r} (bottom index {list(layer.bottom).index(blob)}) in {source}: {hint}")


def check_supported(layers: list[caffe_pb2.LayerParameter], source: str) -> None:
    """Raise one error listing every unsupported layer type with its layer names."""
    missing: dict[str, list[str]] = defaultdict(list)
    for layer in layers:
        if get_handler(layer.type) is None:
            missing[layer.type].append(layer.name)
    if missing:
        parts = [f"{t} ({len(n)}: {', '.join(repr(x) for x in n)})" for t, n in sorted(missing.items())]
        raise UnsupportedError(
            f"{source}: {sum(len(n) for n in missing.values())} layer(s) of unsupported type: "
            + "; ".join(parts)
            + ". See 'caffeonnx layers' for the supported types."
        )


@dataclass
class ConvertedModel:
    """A converted graph plus its weights, kept apart so large models stream to disk."""

    model: ModelProto  # graph without initializers
    weights: dict[str, np.ndarray]  # initializer name -> array (Caffe param blobs)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # value name -> Caffe's concrete shape

    def to_proto(self) -> ModelProto:
        """A self-contained onnx.ModelProto."""
        return to_model_proto(self.model, self.weights)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the .onnx file atomically, streaming the weights."""
        save_streaming(path, self.model, self.weights)


def _top_names(layers: list[caffe_pb2.LayerParameter], builder: GraphBuilder) -> list[list[str]]:
    """ONNX value names of every layer's tops.

    A blob keeps its name on its last write (what Caffe's blob holds after forward),
    except an input blob, whose graph input keeps it; other writes are `blob@layer`.
    """
    writes = Counter(t for layer in layers for t in layer.top)
    inputs = {t for layer in layers if _is_data(layer) for t in layer.top}
    for blob in writes:
        builder.reserve(blob)
    seen: Counter[str] = Counter()
    names = []
    for layer in layers:
        tops = []
        for t in layer.top:
            seen[t] += 1
            plain = seen[t] == 1 if t in inputs else seen[t] == writes[t]
            tops.append(t if plain else builder.unique(f"{t}@{layer.name}"))
        names.append(tops)
    return names


_DATA_TYPES = {"Input", "Data", "MemoryData", "HDF5Data", "DummyData", "ImageData", "WindowData"}


def _is_data(layer: caffe_pb2.LayerParameter) -> bool:
    return layer.type in _DATA_TYPES


def convert_net(
    net: caffe_pb2.NetParameter,
    weights: CaffeWeights | None = None,
    options: ConvertOptions | None = None,
    source: str = "<net>",
) -> ConvertedModel:
    """Convert an (upgraded) NetParameter and optional weights to ONNX."""
    opts = options or ConvertOptions()
    state = net_state(net, opts)
    positions = filter_positions(net, state, source)
    check_supported([net.layer[i] for i in positions], source)
    net = _check_blob_counts(net, positions, source)
    layers = [net.layer[i] for i in positions]
    # Caffe's CopyTrainedLayersFrom gives a source layer's blobs to the FIRST layer of that name only.
    gets_weights = {}
    for position, layer in zip(positions, layers):
        gets_weights.setdefault(layer.name, position)
    if weights is not None:
        _check_weights_cover(layers, positions, gets_weights, weights, opts)
    builder = GraphBuilder(opts, source)
    tops_per_layer = _top_names(layers, builder)
    current: dict[str, str] = {}
    records: list[metadata.LayerRecord] = []
    producers: dict[str, tuple[int, int]] = {}
    consumers: Counter[tuple[int, int]] = Counter()
    available: dict[str, None] = {}
    silenced: dict[str, None] = {}  # ONNX values whose only reader is a Silence layer, in net order
    for i, (position, layer, tops) in enumerate(zip(positions, layers, tops_per_layer)):
        bottoms = []
        for b in layer.bottom:
            if b not in current:
                raise _unknown_bottom(net, set(positions), layer, b, state, source)
            bottoms.append(current[b])
            consumers[producers[b]] += 1
            if layer.type == "Silence" and b in available:
                silenced[current[b]] = None
            available.pop(b, None)
        blobs = None
        if weights is not None and gets_weights[layer.name] == position:
            blobs = weights.blobs.get(layer.name)
        ctx = LayerContext(builder, layer, bottoms, tops, blobs, str(weights.path) if weights else None, position)
        handler = get_handler(layer.type)
        assert handler is not None
        handler.convert(layer, ctx)
        ctx.finish()
        for j, (t, name) in enumerate(zip(layer.top, tops)):
            if name not in builder.shapes:
                raise RuntimeError(f"{layer.type} handler did not set the shape of top {t!r}")
            current[t] = name
            producers[t] = (i, j)
            available[t] = None
        for j, w in enumerate(layer.loss_weight):
            if w and j < len(layer.top):
                consumers[(i, j)] += 1
        params_used = [n for n, p in builder.params.params.items() if any(u.position == position for u in p.users)]
        records.append(metadata.LayerRecord(layer.name, layer.type, bottoms, tops, params_used, position))

    fed = [name for name, _, _ in builder.inputs]
    unknown = [name for name in opts.input_shapes if name not in fed]
    if unknown:
        raise CaffeOnnxError(
            f"{source}: an input shape was given for {', '.join(map(repr, unknown))}, which no data layer "
            f"produces; the net's inputs are: {', '.join(map(repr, fed)) or 'none'}"
        )
    outputs = [current[b] for b in available]
    if opts.all_blobs:
        outputs = list(dict.fromkeys([*outputs, *(current[b] for b in current)]))
        outputs += _split_blobs(layers, tops_per_layer, consumers, builder)
    inputs = {name for name, _, _ in builder.inputs}
    outputs = [o for o in outputs if o not in inputs or o in available]
    if not outputs:
        # A deploy net whose last blob only feeds a Silence layer (colorization's class8_ab): Caffe still
        # computes it, and a model without outputs could not be run, so the silenced blobs are the outputs.
        outputs = [o for o in silenced if o not in inputs]
    if not outputs:
        what = "no layers" if not layers else "no output: every blob is consumed (by a Silence layer or a loss)"
        raise CaffeOnnxError(f"{source}: the net has {what} for the NetState ({_state_text(state)}), so the ONNX "
                             "model could not be run; check the phase/stage/level, or drop the Silence layer")

    graph_inputs = []
    for name, shape, dtype in builder.inputs:
        dims: list[int | str] = list(shape)
        if opts.batch is None and dims:
            dims[builder.batch_axes.get(name, 0)] = BATCH_SYMBOL
        graph_inputs.append(helper.make_tensor_value_info(name, dtype, dims))
    graph = helper.make_graph(
        builder.nodes,
        net.name or "caffe_net",
        graph_inputs,
        [helper.make_tensor_value_info(o, builder.dtypes.get(o, TensorProto.FLOAT), None) for o in outputs],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opts.opset)],
        producer_name="caffeonnx",
        producer_version=__version__,
    )
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    props = metadata.build_metadata(
        net, opts.phase, records, builder.params, level=state.level, stages=list(state.stage),
        input_shapes={name: shape for name, shape, _ in builder.inputs},
    )
    for key, value in props.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    arrays = {}
    for p in builder.params.params.values():
        arrays[p.name] = p.data.astype(np.float16) if opts.fp16 else p.data
    check_and_type_outputs(model, arrays)
    return ConvertedModel(model, arrays, dict(builder.shapes))


def _check_blob_counts(net: caffe_pb2.NetParameter, positions: list[int], source: str) -> caffe_pb2.NetParameter:
    """Every kept layer's bottom/top counts against its type's contract (Caffe's Layer::CheckBlobCounts).

    Loss layers may leave out their top (Caffe's AutoTopBlobs): it is added as Caffe names it,
    `(automatic)`, to a copy of the net, so the stored net says where the loss went.
    """
    auto: dict[int, int] = {}
    for i in positions:
        layer = net.layer[i]
        handler = get_handler(layer.type)
        assert handler is not None
        problem = check_blob_counts(layer, handler.counts)
        if problem is not None:
            raise LayerError(layer.name, layer.type, f"{problem} (in {source}); fix its bottom/top lines")
        missing = handler.counts.needed_tops() - len(layer.top)
        if handler.counts.auto_top and missing > 0:
            auto[i] = missing
    if not auto:
        for i in positions:
            effective_loss_weights(net.layer[i])  # one loss_weight per top (Caffe's SetLossWeights)
        return net
    copy = caffe_pb2.NetParameter()
    copy.CopyFrom(net)
    taken = {t for layer in net.layer for t in (*layer.top, *layer.bottom)}
    for i, missing in auto.items():
        for _ in range(missing):
            name, k = "(automatic)", 1
            while name in taken:
                name, k = f"(automatic)_{k}", k + 1
            taken.add(name)
            copy.layer[i].top.append(name)
    for i in positions:
        effective_loss_weights(copy.layer[i])
    return copy


def _check_weights_cover(layers: list[caffe_pb2.LayerParameter], positions: list[int], gets_weights: dict[str, int],
                         weights: CaffeWeights, opts: ConvertOptions) -> None:
    """Every layer with params must find its blobs in the caffemodel (unless --init-missing)."""
    if opts.init_missing:
        return
    learnable = [(p, layer) for p, layer in zip(positions, layers) if has_params(layer)]
    repeated = [f"{layer.name!r} (layer {p})" for p, layer in learnable if gets_weights[layer.name] != p]
    if repeated:
        raise WeightsError(
            f"{weights.path}: layer(s) {', '.join(repeated)} repeat the name of an earlier layer with params; Caffe "
            "copies a caffemodel's blobs to the first layer of each name only, so these would keep their fillers: "
            "rename them, or pass --init-missing to accept the fillers"
        )
    missing = [layer.name for _, layer in learnable if layer.name not in weights.blobs]
    if missing:
        raise WeightsError(
            f"{weights.path}: no weights for layer(s) {', '.join(repr(m) for m in missing)}; is this caffemodel "
            "from another net? (use --init-missing to initialise them from their fillers)"
        )


def _split_blobs(
    layers: list[caffe_pb2.LayerParameter],
    tops_per_layer: list[list[str]],
    consumers: Counter[tuple[int, int]],
    builder: GraphBuilder,
) -> list[str]:
    """Identity outputs named like the Split blobs Caffe inserts for fanned-out tops."""
    outs = []
    for (i, j), count in sorted(consumers.items()):
        if count < 2:
            continue
        layer = layers[i]
        for k in range(count):
            name = f"{layer.top[j]}_{layer.name}_{j}_split_{k}"
            if name in builder.shapes:
                continue
            builder.reserve(name)
            src = tops_per_layer[i][j]
            builder.add_node("Identity", [src], [name], f"{name}/split")
            builder.shapes[name] = builder.shapes[src]
            outs.append(name)
    return outs


def load_net(prototxt: str | os.PathLike[str]) -> caffe_pb2.NetParameter:
    """Read and upgrade a net prototxt."""
    return upgrade_net(read_prototxt(prototxt), str(prototxt))


def load_weights(caffemodel: str | os.PathLike[str], net: caffe_pb2.NetParameter | None = None) -> CaffeWeights:
    """Read a caffemodel; its V0/V1 layers are upgraded so names match the net.

    With the prototxt's `net`, pooling field 13 is read with the meaning the prototxt spells
    (the forks' ceil_mode or BVLC's round_mode; see converter/forks.py).
    """
    weights = read_caffemodel(caffemodel)
    if weights.net.layers:
        blobs = weights.blobs
        upgrade_net(weights.net, str(caffemodel))
        weights.blobs = blobs
    if net is not None:
        adopt_spelling(weights.net, net)
    return weights


def convert_files(
    prototxt: str | os.PathLike[str],
    caffemodel: str | os.PathLike[str] | None = None,
    options: ConvertOptions | None = None,
) -> ConvertedModel:
    """Convert a prototxt (+ caffemodel) to a ConvertedModel (weights not yet copied)."""
    net = load_net(prototxt)
    weights = load_weights(caffemodel, net) if caffemodel is not None else None
    return convert_net(net, weights, options, source=str(Path(prototxt)))


def convert(
    prototxt: str | os.PathLike[str],
    caffemodel: str | os.PathLike[str] | None = None,
    **options: object,
) -> ModelProto:
    """Convert a Caffe prototxt (+ caffemodel) to an onnx.ModelProto.

    Keyword options are those of ConvertOptions (opset, batch, all_blobs, fp16, ...).
    """
    return convert_files(prototxt, caffemodel, ConvertOptions(**options)).to_proto()  # type: ignore[arg-type]
