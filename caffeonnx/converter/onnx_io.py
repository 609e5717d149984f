"""Assemble, validate and write ONNX models without copying weights needlessly.

The graph is validated (onnx.checker + strict shape inference) on a skeleton whose
initializers are declared as graph inputs, so the check costs nothing for a 500 MB
model.  `save_streaming` then writes the real file by splicing each weight's bytes
straight from its numpy array (often a view of the mapped caffemodel).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper

from caffeonnx.converter import metadata
from caffeonnx.converter.caffe_io import check_input_file
from caffeonnx.errors import CaffeOnnxError, InputFileError
from caffeonnx.fileio import atomic_write
from caffeonnx.wire import length_delimited

_GRAPH_FIELD = 7  # ModelProto.graph
_INIT_FIELD = 5  # GraphProto.initializer
_RAW_FIELD = 9  # TensorProto.raw_data
# Packed types whose element count is not their byte count (int4/uint4/float4 pack two values per byte).
_SUB_BYTE = frozenset(getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n))


def load_onnx(path: str | os.PathLike[str], what: str = "ONNX model") -> ModelProto:
    """Load an .onnx file, checked once for every command that opens one.

    One line, never a traceback, when the file is missing or not a regular file, is not
    ONNX, has damaged initializers, fails the ONNX checker (its message is the error), or
    carries damaged caffeonnx metadata.
    """
    p = check_input_file(path, what)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for garbage
        raise InputFileError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise InputFileError(f"{p}: not an ONNX model (its graph has no nodes)")
    check_initializers(model, str(p))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{p}: the ONNX checker refuses this model: {first}") from None
    try:
        metadata.validate(model)
    except CaffeOnnxError as exc:
        raise InputFileError(f"{p}: {exc}") from None
    return model


def check_initializers(model: ModelProto, source: str) -> None:
    """Every initializer's dims, data type and stored size agree (a damaged tensor is named, not crashed on)."""
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            raise InputFileError(f"{source}: initializer {t.name!r} keeps its data in an external file; save the "
                                 "model with its weights inside (onnx.save(..., save_as_external_data=False))")
        if any(d < 0 for d in t.dims):
            raise InputFileError(f"{source}: initializer {t.name!r} has negative dims {list(t.dims)}")
        try:
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        except (KeyError, ValueError, TypeError):
            raise InputFileError(f"{source}: initializer {t.name!r} has unknown data_type {t.data_type}") from None
        count = math.prod(t.dims)
        if t.HasField("raw_data"):
            itemsize = np.dtype(dtype).itemsize if t.data_type not in _SUB_BYTE else None
            want = count * itemsize if itemsize is not None else None
            if want is not None and len(t.raw_data) != want:
                raise InputFileError(
                    f"{source}: initializer {t.name!r} holds {len(t.raw_data)} bytes of raw_data but dims "
                    f"{list(t.dims)} of {np.dtype(dtype).name} need {want}; the file is damaged")
            continue
        stored = max(len(t.float_data), len(t.int32_data), len(t.int64_data), len(t.double_data),
                     len(t.uint64_data), len(t.string_data))
        per = 2 if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
        if t.data_type not in _SUB_BYTE and stored != count * per:
            raise InputFileError(f"{source}: initializer {t.name!r} stores {stored} value(s) but dims "
                                 f"{list(t.dims)} need {count * per}; the file is damaged")


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
