"""v2 protocol parsing and responses, JSON and binary tensors, without a server."""
from __future__ import annotations

import json

import numpy as np
import pytest

from caffeonnx.runtime.protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    infer_response,
    model_metadata,
    parse_infer_request,
    triton_config,
)
from caffeonnx.runtime.session import TensorSpec
from tests.helpers import rng

X = TensorSpec("data", np.dtype(np.float32), (4,), None)
MASK = TensorSpec("mask", np.dtype(np.int64), (2,), None)
CODE = TensorSpec("code", np.dtype(np.float32), (3,), None)


def _binary_body(header: dict, *arrays: np.ndarray) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(a.tobytes() for a in arrays), str(len(head))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("nested", [False, True])
def test_json_tensors_parse_flat_or_nested(seed: int, nested: bool) -> None:
    x = rng(seed).standard_normal((3, 4)).astype(np.float32)
    data = x.tolist() if nested else x.reshape(-1).tolist()
    body = json.dumps({"id": "r1", "inputs": [{"name": "data", "shape": [3, 4], "datatype": "FP32", "data": data}]})
    req = parse_infer_request(body.encode(), None, [X], [CODE])
    assert req.id == "r1" and req.outputs == {"code": False}
    np.testing.assert_array_equal(req.inputs["data"], x)


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_tensors_are_read_in_input_order(seed: int) -> None:
    g = rng(seed)
    x, m = g.standard_normal((2, 4)).astype(np.float32), g.integers(0, 9, (2, 2))
    header = {"inputs": [{"name": "mask", "shape": [2, 2], "datatype": "INT64", "parameters": {"binary_data_size": 32}},
                         {"name": "data", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}],
              "outputs": [{"name": "code", "parameters": {"binary_data": True}}]}
    body, length = _binary_body(header, m, x)
    req = parse_infer_request(body, length, [X, MASK], [CODE])
    np.testing.assert_array_equal(req.inputs["data"], x)
    np.testing.assert_array_equal(req.inputs["mask"], m)
    assert req.outputs == {"code": True}


def test_binary_data_output_is_the_default_for_unlisted_parameters() -> None:
    body = json.dumps({"parameters": {"binary_data_output": True},
                       "inputs": [{"name": "data", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    assert parse_infer_request(body.encode(), None, [X], [CODE]).outputs == {"code": True}


ONE = [{"name": "data", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]


@pytest.mark.parametrize("body, length, message", [
    (b"not json at all", None, r"the request body is not valid JSON"),
    (b"[1, 2]", None, r"must be a JSON object with an 'inputs' list"),
    (json.dumps({"inputs": [{**ONE[0], "shape": [1, 5], "data": [0] * 5}]}).encode(), None,
     r"input 'data' has shape \[1, 5\], the model takes \[-1, 4\]"),
    (json.dumps({"inputs": [{**ONE[0], "datatype": "FP64"}]}).encode(), None,
     r"input 'data' has datatype FP64, the model takes FP32"),
    (json.dumps({"inputs": [{**ONE[0], "datatype": "FLOAT"}]}).encode(), None, r"unknown datatype 'FLOAT'"),
    (json.dumps({"inputs": [{**ONE[0], "shape": [2, 4]}]}).encode(), None,
     r"'data' holds 4 values but shape \[2, 4\] needs 8"),
    (json.dumps({"inputs": [{**ONE[0], "data": ["a", "b", "c", "d"]}]}).encode(), None,
     r"'data' is not a list of FP32 numbers"),
    (json.dumps({"inputs": [{**ONE[0], "shape": [1, -4]}]}).encode(), None, r"'shape' must be a list of non-negative"),
    (json.dumps({"inputs": [{**ONE[0], "name": "pixels"}]}).encode(), None,
     r"unknown input 'pixels'; the model takes \['data'\]"),
    (json.dumps({"inputs": ONE * 2}).encode(), None, r"input 'data' is given twice"),
    (json.dumps({"inputs": []}).encode(), None, r"missing input\(s\) \['data'\]"),
    (json.dumps({"inputs": [{k: v for k, v in ONE[0].items() if k != "data"}]}).encode(), None,
     r"has neither 'data' nor a binary_data_size"),
    (json.dumps({"inputs": ONE, "outputs": [{"name": "encode9"}]}).encode(), None,
     r"unknown output 'encode9'; the model has \['code'\]"),
    (json.dumps({"inputs": ONE}).encode(), "abc", rf"{HEADER_LENGTH} must be an integer, got 'abc'"),
    (json.dumps({"inputs": ONE}).encode(), "99999", rf"{HEADER_LENGTH} 99999 is outside the body"),
])
def test_malformed_requests_are_protocol_errors(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as info:
        parse_infer_request(body, length, [X], [CODE])
    assert info.value.status == 400


@pytest.mark.parametrize("size, payload, message", [
    (12, 12, r"binary_data_size 12 does not match shape \[1, 4\] of FP32 \(16 bytes\)"),
    (16, 8, r"binary_data_size 16 runs past the end of the body \(8 bytes left\)"),
    (16, 20, r"the body has 4 binary bytes that no input claims"),
])
def test_binary_size_disagreements_are_refused(size: int, payload: int, message: str) -> None:
    header = {"inputs": [{"name": "data", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": size}}]}
    head = json.dumps(header).encode()
    with pytest.raises(ProtocolError, match=message):
        parse_infer_request(head + b"\0" * payload, str(len(head)), [X], [CODE])


@pytest.mark.parametrize("binary", [False, True])
def test_responses_round_trip_float32_exactly(binary: bool) -> None:
    codes = rng(3).standard_normal((5, 3)).astype(np.float32)
    body, headers = infer_response("enc", InferRequest("7", {}, {"code": binary}), {"code": codes})
    if binary:
        n = int(headers[HEADER_LENGTH])
        head = json.loads(body[:n])
        out = head["outputs"][0]
        assert out["parameters"] == {"binary_data_size": codes.nbytes} and headers["content-type"] == \
            "application/octet-stream"
        got = np.frombuffer(body[n:], dtype=np.float32).reshape(out["shape"])
    else:
        head = json.loads(body)
        out = head["outputs"][0]
        got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    assert (head["model_name"], head["model_version"], head["id"], out["datatype"]) == ("enc", "1", "7", "FP32")
    np.testing.assert_array_equal(got, codes)


def test_metadata_and_config_describe_the_same_tensors() -> None:
    meta = model_metadata("enc", [X], [CODE])
    assert meta["inputs"] == [{"name": "data", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "code", "datatype": "FP32", "shape": [-1, 3]}]
    cfg = triton_config("enc", [X], [CODE], 32, 500)
    assert cfg["input"] == [{"name": "data", "data_type": "TYPE_FP32", "dims": [4]}]
    assert cfg["max_batch_size"] == 32 and cfg["dynamic_batching"] == {"max_queue_delay_microseconds": 500}
