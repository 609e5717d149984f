"""The Open Inference Protocol v2 (KServe / Triton REST) and its binary tensor extension.

Pure functions, no server: parse an infer request into arrays, build the response,
and describe a model the way Triton does (metadata and model configuration), so
`serve` and `export-triton` say the same thing about a model.

Binary tensor extension (what tritonclient.http sends by default): the body is the
JSON header (its byte length in the `Inference-Header-Content-Length` header)
followed by the raw row-major bytes of each input whose `parameters` carry a
`binary_data_size`, in input order.  Outputs are returned the same way when the
request's `binary_data_output` parameter, or an output's `binary_data` parameter,
asks for it.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.session import TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(t) for name, t in [
        ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
        ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
        ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64),
    ]
}


_MODEL_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_model_name(name: str) -> str:
    """`name` if it is a valid model name (a Triton repository directory, a URL path segment)."""
    if not _MODEL_NAME.match(name) or name in (".", ".."):
        raise CaffeOnnxError(f"model name {name!r} is not valid; use letters, digits, '_', '-' and '.'")
    return name


class ProtocolError(Exception):
    """A request the protocol refuses: an HTTP status and the message for the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_NAMES = {dt: name for name, dt in DATATYPES.items()}


def datatype(dtype: np.dtype) -> str:
    """The v2 datatype name of a numpy dtype (FP32 for float32 ...)."""
    name = _NAMES.get(np.dtype(dtype).newbyteorder("="))
    if name is None:
        raise ValueError(f"no v2 datatype for {dtype}")
    return name


def v2_shape(spec: TensorSpec) -> list[int]:
    """A tensor's full shape as the protocol shows it: -1 for the dynamic batch and symbolic dims."""
    dims = [spec.batch if spec.batch is not None else -1, *spec.sample_shape]
    return [d if isinstance(d, int) else -1 for d in dims]


def model_metadata(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> dict:
    """GET /v2/models/{name}: name, versions, platform and tensors."""
    def tensors(specs: Sequence[TensorSpec]) -> list[dict]:
        return [{"name": s.name, "datatype": datatype(s.dtype), "shape": v2_shape(s)} for s in specs]

    return {"name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": tensors(inputs), "outputs": tensors(outputs)}


def triton_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch: int,
                  max_delay_us: int) -> dict:
    """Triton's model configuration: dims without the batch when the model batches (max_batch_size > 0)."""
    batching = max_batch > 0 and all(s.batch is None for s in (*inputs, *outputs))

    def tensors(specs: Sequence[TensorSpec]) -> list[dict]:
        return [{"name": s.name, "data_type": f"TYPE_{datatype(s.dtype)}",
                 "dims": v2_shape(s)[1:] if batching else v2_shape(s)} for s in specs]

    config: dict = {"name": name, "platform": "onnxruntime_onnx", "max_batch_size": max_batch if batching else 0,
                    "input": tensors(inputs), "output": tensors(outputs)}
    if batching:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": max_delay_us}
    return config


@dataclass
class InferRequest:
    """A parsed infer request: its id, input arrays and which outputs to send, binary or JSON."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool]  # output name -> send as binary


def _check_shape(entry: dict, name: str) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    return tuple(shape)


def _input_array(entry: dict, spec: TensorSpec, binary: memoryview, offset: int) -> tuple[np.ndarray, int]:
    """One input's array from its JSON `data` or its slice of the binary section; returns the new offset."""
    name = spec.name
    shape = _check_shape(entry, name)
    dt = entry.get("datatype")
    want = datatype(spec.dtype)
    if dt not in DATATYPES:
        raise ProtocolError(f"input {name!r}: unknown datatype {dt!r}; the model takes {want}")
    if dt != want:
        raise ProtocolError(f"input {name!r} has datatype {dt}, the model takes {want}")
    expect = v2_shape(spec)
    if len(shape) != len(expect) or any(e >= 0 and g != e for g, e in zip(shape, expect)):
        raise ProtocolError(f"input {name!r} has shape {list(shape)}, the model takes {expect} (-1: any size)")
    count = math.prod(shape)
    params = entry.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        nbytes = count * spec.dtype.itemsize
        if not isinstance(size, int) or size != nbytes:
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} does not match shape {list(shape)} of "
                                f"{dt} ({nbytes} bytes)")
        if offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                                f"({len(binary) - offset} bytes left)")
        array = np.frombuffer(binary[offset:offset + size], dtype=spec.dtype).reshape(shape)
        return array, offset + size
    if "data" not in entry:
        raise ProtocolError(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    try:
        array = np.asarray(entry["data"], dtype=spec.dtype)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"input {name!r}: 'data' is not a list of {dt} numbers ({exc})") from None
    if array.size != count:
        raise ProtocolError(f"input {name!r}: 'data' holds {array.size} values but shape {list(shape)} needs {count}")
    return array.reshape(shape), offset


def parse_infer_request(body: bytes, header_length: str | None, inputs: Sequence[TensorSpec],
                        outputs: Sequence[TensorSpec]) -> InferRequest:
    """Parse a POST /v2/models/{name}/infer body (JSON, or JSON + binary tensors); ProtocolError on any fault."""
    view = memoryview(body)
    if header_length is not None:
        try:
            json_len = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= json_len <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {json_len} is outside the body's {len(body)} bytes")
        head, binary = view[:json_len], view[json_len:]
    else:
        head, binary = view, view[len(body):]
    try:
        request = json.loads(bytes(head))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    specs = {s.name: s for s in inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for entry in request["inputs"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in specs:
            raise ProtocolError(f"unknown input {name!r}; the model takes {sorted(specs)}")
        if name in arrays:
            raise ProtocolError(f"input {name!r} is given twice")
        arrays[name], offset = _input_array(entry, specs[name], binary, offset)
    missing = sorted(set(specs) - set(arrays))
    if missing:
        raise ProtocolError(f"missing input(s) {missing}")
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} binary bytes that no input claims")
    params = request.get("parameters") or {}
    binary_default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    names = [o.name for o in outputs]
    wanted: dict[str, bool] = {}
    for entry in request.get("outputs") or [{"name": n} for n in names]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in names:
            raise ProtocolError(f"unknown output {name!r}; the model has {names}")
        p = entry.get("parameters") or {}
        if isinstance(p, dict) and p.get("classification"):
            raise ProtocolError("the classification extension is not supported; request the raw output")
        wanted[name] = bool(p.get("binary_data", binary_default)) if isinstance(p, dict) else binary_default
    request_id = request.get("id")
    return InferRequest(str(request_id) if request_id is not None else None, arrays, wanted)


def infer_response(model: str, request: InferRequest, results: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an infer response; binary outputs follow the JSON header."""
    entries, chunks = [], []
    for name, binary in request.outputs.items():
        array = np.ascontiguousarray(results[name])
        entry: dict = {"name": name, "datatype": datatype(array.dtype), "shape": list(array.shape)}
        if binary:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    response: dict = {"model_name": model, "model_version": "1", "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    return b"".join([head, *chunks]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
