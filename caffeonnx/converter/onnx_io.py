"""Assemble, validate and write ONNX models without copying weights needlessly.

The graph is validated (onnx.checker + strict shape inference) on a skeleton whose
initializers are declared as graph inputs, so the check costs nothing for a 500 MB
model.  `save_streaming` then writes the real file by splicing each weight's bytes
straight from its numpy array (often a view of the mapped caffemodel).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

from caffeonnx.errors import CaffeOnnxError, InputFileError
from caffeonnx.fileio import atomic_write
from caffeonnx.wire import length_delimited

_GRAPH_FIELD = 7  # ModelProto.graph
_INIT_FIELD = 5  # GraphProto.initializer
_RAW_FIELD = 9  # TensorProto.raw_data


def load_onnx(path: str | os.PathLike[str], what: str = "ONNX model") -> ModelProto:
    """Load an .onnx file with a one-line error when it is missing, unreadable or not ONNX."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{what} {str(p)!r} does not exist; check the path")
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for garbage
        raise InputFileError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise InputFileError(f"{p}: not an ONNX model (its graph has no nodes)")
    return model


def tensor_header(name: str, array: np.ndarray) -> TensorProto:
    """A TensorProto with name, dims and type but no data."""
    return TensorProto(
        name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype)
    )


def skeleton(model: ModelProto, weights: Mapping[str, np.ndarray]) -> ModelProto:
    """`model` (which has no initializers) with every weight declared as a graph input."""
    sk = ModelProto()
    sk.CopyFrom(model)
    for name, arr in weights.items():
        sk.graph.input.append(
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
        )
    return sk


def check_and_type_outputs(model: ModelProto, weights: Mapping[str, np.ndarray]) -> None:
    """Infer output types, then run onnx.checker (full) and strict shape inference.

    Fills `model.graph.output` types from inference; raises on an invalid graph,
    which is a caffeonnx bug rather than a user error.
    """
    sk = skeleton(model, weights)
    inferred = onnx.shape_inference.infer_shapes(sk, strict_mode=True, data_prop=True)
    known = {vi.name: vi for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    for out in model.graph.output:
        vi = known.get(out.name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            raise RuntimeError(f"shape inference gave no shape for output {out.name!r}")
        out.type.CopyFrom(vi.type)
    sk = skeleton(model, weights)
    onnx.checker.check_model(sk, full_check=True)


def to_model_proto(model: ModelProto, weights: Mapping[str, np.ndarray]) -> ModelProto:
    """A self-contained ModelProto (copies the weights into it)."""
    full = ModelProto()
    full.CopyFrom(model)
    full.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in weights.items())
    return full


def _initializer_chunks(weights: Mapping[str, np.ndarray]) -> Iterable[tuple[bytes, memoryview]]:
    for name, arr in weights.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        payload = memoryview(arr).cast("B")
        head = tensor_header(name, arr).SerializeToString() + length_delimited(_RAW_FIELD, payload.nbytes)
        yield length_delimited(_INIT_FIELD, len(head) + payload.nbytes) + head, payload


def save_streaming(path: str | os.PathLike[str], model: ModelProto, weights: Mapping[str, np.ndarray]) -> None:
    """Write `model` plus `weights` as initializers to `path` atomically, without a full copy."""
    graph_head = model.graph.SerializeToString()
    chunks = list(_initializer_chunks(weights))
    graph_len = len(graph_head) + sum(len(h) + p.nbytes for h, p in chunks)
    if graph_len >= 2**31:
        raise CaffeOnnxError(
            f"the model's weights are {graph_len / 2**30:.1f} GiB, over ONNX's 2 GiB protobuf limit; "
            "use --fp16 to halve them"
        )
    rest = ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    with atomic_write(path) as fh:
        fh.write(rest.SerializeToString())
        fh.write(length_delimited(_GRAPH_FIELD, graph_len))
        fh.write(graph_head)
        for head, payload in chunks:
            fh.write(head)
            fh.write(payload)
