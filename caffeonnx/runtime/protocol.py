"""The Open Inference Protocol v2 (KServe / Triton REST) and its binary tensor extension.

Pure functions, no server: parse an infer request into arrays, build the response,
and describe a model the way Triton does (metadata and model configuration), so
`serve` and `export-triton` say the same thing about a model.

Binary tensor extension (what tritonclient.http sends by default): the body is the
JSON header (its byte length in the `Inference-Header-Content-Length` header)
followed by the raw row-major bytes of each input whose `parameters` carry a
`binary_data_size`, in input order.  Outputs are returned the same way when the
request's `binary_data_output` parameter, or an output's `binary_data` parameter,
asks for it (JSON booleans only: the string "false" is refused, not taken as true).

JSON is RFC 8259 JSON both ways: a request with NaN/Infinity tokens is not valid
JSON (400), and a JSON output holding NaN or ±Infinity is refused with 422 naming
the output (Triton writes bare NaN tokens, which strict JSON parsers reject);
binary tensors carry any IEEE value.  The request is checked against pydantic
models of the v2 schema, so a wrong type is a 400 naming the field.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError, from_json

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


# The v2 request schema ($inference_request, $request_input, $request_output), with the parameters this server
# reads typed strictly: a string "false" is not a boolean, a 400-digit number is not an int64.
INT64_MAX = (1 << 63) - 1
ParameterValue = StrictBool | StrictInt | StrictFloat | StrictStr  # a v2 $parameter: bool, number or string
Count = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]


class _Parameters(BaseModel):
    """A v2 `parameters` object: any names, scalar values."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, ParameterValue]


class InputParameters(_Parameters):
    """$request_input parameters: binary_data_size says the tensor follows the JSON as raw bytes."""

    binary_data_size: Count | None = None


class OutputParameters(_Parameters):
    """$request_output parameters: binary_data (overrides binary_data_output); classification is refused."""

    binary_data: StrictBool | None = None
    classification: Count = 0


class RequestParameters(_Parameters):
    """$inference_request parameters: binary_data_output, the default for every output."""

    binary_data_output: StrictBool = False


class RequestInput(BaseModel):
    """$request_input: one input tensor, its values in `data` or in the binary section."""

    name: StrictStr
    shape: list[Count]
    datatype: StrictStr
    parameters: InputParameters | None = None
    data: list[Any] | None = None  # row-major values, flat or nested; numpy checks them against the datatype

    @field_validator("shape", mode="wrap")
    @classmethod
    def _shape(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> list[int]:
        """One message for every bad shape, with the shape as sent."""
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("shape", "'shape' must be a list of non-negative integers (int64), got {shape}",
                                      {"shape": _brief(value)}) from None


class RequestOutput(BaseModel):
    """$request_output: one output wanted, binary or JSON."""

    name: StrictStr
    parameters: OutputParameters | None = None


class InferRequestBody(BaseModel):
    """The JSON part of POST .../infer (extra members such as Triton's `model_name` are ignored)."""

    id: StrictStr | None = None
    parameters: RequestParameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


def _brief(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _field_error(exc: ValidationError) -> ProtocolError:
    """The first schema violation as one line naming the field (inputs[0].datatype ...) and the value sent."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = first["loc"]
    if loc == () or (loc == ("inputs",) and first["type"] == "missing"):
        return ProtocolError("the request must be a JSON object with an 'inputs' list")
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    message = first["msg"] if first["type"] in ("shape", "missing") else f"{first['msg']}, got {_brief(first['input'])}"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return ProtocolError(f"request field {path}: {message}{more}")


def _input_array(entry: RequestInput, spec: TensorSpec, binary: memoryview, offset: int,
                 max_batch: int | None) -> tuple[np.ndarray, int]:
    """One input's array from its JSON `data` or its slice of the binary section; returns the new offset."""
    name, shape, dt = spec.name, tuple(entry.shape), entry.datatype
    want = datatype(spec.dtype)
    if dt not in DATATYPES:
        raise ProtocolError(f"input {name!r}: unknown datatype {dt!r}; the model takes {want}")
    if dt != want:
        raise ProtocolError(f"input {name!r} has datatype {dt}, the model takes {want}")
    expect = v2_shape(spec)
    if len(shape) != len(expect) or any(e >= 0 and g != e for g, e in zip(shape, expect)):
        raise ProtocolError(f"input {name!r} has shape {list(shape)}, the model takes {expect} (-1: any size)")
    if max_batch is not None and shape[0] > max_batch:
        raise ProtocolError(f"input {name!r} has {shape[0]} rows, over this server's max batch of {max_batch}; "
                            "split the request or restart with --max-batch")
    count = math.prod(shape)
    size = entry.parameters.binary_data_size if entry.parameters is not None else None
    if size is not None:
        nbytes = count * spec.dtype.itemsize
        if size != nbytes:
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} does not match shape {list(shape)} of "
                                f"{dt} ({nbytes} bytes)")
        if offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                                f"({len(binary) - offset} bytes left)")
        array = np.frombuffer(binary[offset:offset + size], dtype=spec.dtype).reshape(shape)
        return array, offset + size
    if entry.data is None:
        raise ProtocolError(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
    try:
        array = np.asarray(entry.data, dtype=spec.dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"input {name!r}: 'data' is not a list of {dt} numbers ({exc})") from None
    if array.size != count:
        raise ProtocolError(f"input {name!r}: 'data' holds {array.size} values but shape {list(shape)} needs {count}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ProtocolError(f"input {name!r}: 'data' holds values that are not finite {dt} numbers (over its range); "
                            "JSON carries finite numbers only: send such values as binary data")
    return array.reshape(shape), offset


def parse_infer_request(body: bytes, header_length: str | None, inputs: Sequence[TensorSpec],
                        outputs: Sequence[TensorSpec], *, max_batch: int | None = None,
                        max_json_bytes: int | None = None) -> InferRequest:
    """Parse a POST /v2/models/{name}/infer body (JSON, or JSON + binary tensors); ProtocolError on any fault.

    The JSON part is RFC 8259 JSON (no NaN/Infinity tokens) of at most `max_json_bytes` bytes, parsed by
    pydantic-core's parser, which stops at 200 levels of nesting instead of recursing on; then checked
    against the v2 schema (InferRequestBody) and the model's tensors.
    """
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
    if max_json_bytes is not None and len(head) > max_json_bytes:
        raise ProtocolError(f"the JSON part of the request is {len(head)} bytes, over the {max_json_bytes} bytes "
                            "that a request of this server's max batch can need; send binary tensors or fewer rows",
                            413)
    try:
        document = from_json(body if len(head) == len(body) else bytes(head), allow_inf_nan=False)
    except ValueError as exc:
        raise ProtocolError(f"the request body is not valid JSON ({exc})") from None
    try:
        request = InferRequestBody.model_validate(document)
    except ValidationError as exc:
        raise _field_error(exc) from None
    specs = {s.name: s for s in inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for entry in request.inputs:
        if entry.name not in specs:
            raise ProtocolError(f"unknown input {entry.name!r}; the model takes {sorted(specs)}")
        if entry.name in arrays:
            raise ProtocolError(f"input {entry.name!r} is given twice")
        arrays[entry.name], offset = _input_array(entry, specs[entry.name], binary, offset, max_batch)
    missing = sorted(set(specs) - set(arrays))
    if missing:
        raise ProtocolError(f"missing input(s) {missing}")
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} binary bytes that no input claims")
    binary_default = request.parameters.binary_data_output if request.parameters is not None else False
    names = [o.name for o in outputs]
    wanted: dict[str, bool] = {}
    for out in request.outputs if request.outputs is not None else [RequestOutput(name=n) for n in names]:
        if out.name not in names:
            raise ProtocolError(f"unknown output {out.name!r}; the model has {names}")
        params = out.parameters
        if params is not None and params.classification:
            raise ProtocolError("the classification extension is not supported; request the raw output")
        binary_out = params.binary_data if params is not None else None
        wanted[out.name] = binary_default if binary_out is None else binary_out
    return InferRequest(request.id, arrays, wanted)


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
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                bad = int(array.size - np.count_nonzero(np.isfinite(array)))
                raise ProtocolError(f"output {name!r} holds {bad} non-finite value(s) (NaN or ±Infinity), which JSON "
                                    "cannot carry; request it as binary data (\"binary_data\": true) to receive them",
                                    422)
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    response: dict = {"model_name": model, "model_version": "1", "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    return b"".join([head, *chunks]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
