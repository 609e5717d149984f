"""ONNX -> Caffe: a prototxt and a caffemodel, without Caffe installed.

A model written by caffeonnx goes back exactly: the Caffe net kept in its metadata
(every layer, param spec, filler, phase rule and loss layer) is restored, and each
layer's blobs are the current values of its initializers (so weights trained in
torch come back too).  As Caffe does, a shared blob is stored once per layer that
uses it.  Foreign ONNX (torch.onnx.export, model zoo) is mapped op by op instead.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import text_format
from onnx import ModelProto, numpy_helper

from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_io import write_caffemodel_to
from caffeonnx.converter.registry import has_params
from caffeonnx.converter.forks import retarget
from caffeonnx.converter.onnx_io import load_onnx
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.fileio import atomic_write
from caffeonnx.proto import caffe_pb2


@dataclass
class CaffeNet:
    """A Caffe net and its weights: layer -> blobs in Caffe's order."""

    net: caffe_pb2.NetParameter
    # by layer position in `net` (a restored caffeonnx model), or by name (foreign ONNX: names are unique)
    blobs: dict[int | str, list[np.ndarray]] = field(default_factory=dict)

    def save(self, prototxt: str | os.PathLike[str], caffemodel: str | os.PathLike[str] | None = None) -> None:
        """Write the prototxt (and the caffemodel); both or neither appear."""
        with contextlib.ExitStack() as stack:
            proto_fh = stack.enter_context(atomic_write(prototxt))
            proto_fh.write(text_format.MessageToString(self.net).encode())
            if caffemodel is not None:
                weights_fh = stack.enter_context(atomic_write(caffemodel))
                write_caffemodel_to(weights_fh, self.net, self.blobs)


def initializer_arrays(model: ModelProto) -> dict[str, np.ndarray]:
    """Every initializer as a float32 numpy array (fp16-stored weights are widened)."""
    arrays = {}
    for t in model.graph.initializer:
        arr = numpy_helper.to_array(t)
        arrays[t.name] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
    return arrays


def _restore(model: ModelProto, batch: int | None, state: caffe_pb2.NetState | None = None,
             target: str = "any") -> CaffeNet:
    """Rebuild the Caffe net recorded by caffeonnx, with blobs from the initializers.

    Blobs are keyed by layer position (names may repeat).  The prototxt's `state` gets the
    stages and level the model was converted with (or `state`), so Caffe selects the same layers.
    """
    net = metadata.caffe_net_from(model)
    assert net is not None
    arrays = initializer_arrays(model)
    blobs: dict[int, dict[int, np.ndarray]] = {}
    for rec in metadata.param_records(model):
        if rec["name"] not in arrays:
            raise CaffeOnnxError(
                f"the model's caffeonnx metadata names initializer {rec['name']!r}, which the graph lacks; the graph "
                "was edited after conversion: convert the edited model as foreign ONNX by removing its metadata"
            )
        data = arrays[rec["name"]]
        for use in metadata.param_uses(rec):
            blobs.setdefault(use.position, {})[use.index] = data.reshape(use.shape)
    converted = {r.index for r in metadata.layer_records(model)}
    out = CaffeNet(net)
    for position, got in blobs.items():
        out.blobs[position] = [got[i] for i in sorted(got)]
    missing = [layer.name for i, layer in enumerate(net.layer)
               if i in converted and i not in out.blobs and has_params(layer)]
    if missing:
        raise CaffeOnnxError(f"no weights recorded for layer(s) {missing}; the model's metadata is inconsistent")
    chosen = state if state is not None else metadata.net_state(model)
    if chosen is not None:
        added = [s for s in chosen.stage if s not in net.state.stage]
        if added:
            net.state.stage.extend(added)
        if chosen.level:
            net.state.level = chosen.level
        if state is not None and state.HasField("phase"):
            net.state.phase = state.phase
    if batch is not None:
        _set_batch(net, batch)
    retarget(net, target)
    return out


def _set_batch(net: caffe_pb2.NetParameter, batch: int) -> None:
    for layer in net.layer:
        if layer.type == "Input":
            for shape in layer.input_param.shape:
                if shape.dim:
                    shape.dim[0] = batch


def onnx_to_caffe(model: ModelProto, batch: int | None = None, extensions: bool = False,
                  state: caffe_pb2.NetState | None = None, target: str = "any") -> CaffeNet:
    """Convert an ONNX model to a Caffe net + weights (exact for caffeonnx's own models).

    `extensions` lets foreign models use layers/fields newer than BVLC Caffe 1.0 (Permute, Clip, Swish, round_mode,
    and the forks' ReLU6, HardSwish, HardSigmoid, PixelShuffle).
    `state` (stages, level) replaces the NetState recorded at conversion in the written prototxt.
    `target` ("any", "bvlc" or a fork key) refuses layers that Caffe lacks (see forks.retarget).
    """
    if metadata.caffe_net_from(model) is not None:
        return _restore(model, batch, state, target)
    from caffeonnx.converter.foreign import convert_foreign

    result = convert_foreign(model, batch, extensions)
    retarget(result.net, target)  # extensions may write a fork's layer (Permute is SSD's)
    return result


def convert_to_caffe_files(
    onnx_path: str | os.PathLike[str],
    prototxt: str | os.PathLike[str],
    caffemodel: str | os.PathLike[str] | None = None,
    batch: int | None = None,
    extensions: bool = False,
    state: caffe_pb2.NetState | None = None,
    target: str = "any",
) -> CaffeNet:
    """`caffeonnx to-caffe`: read ONNX, write prototxt (+ caffemodel) atomically."""
    result = onnx_to_caffe(load_onnx(onnx_path), batch, extensions, state, target)
    result.save(prototxt, caffemodel)
    return result
