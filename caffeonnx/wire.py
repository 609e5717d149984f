"""Protobuf wire-format pieces for the writers that stream large payloads.

caffemodel, .onnx and solverstate writers splice numpy buffers into messages
instead of building protobuf objects holding a copy of every weight.
"""
from __future__ import annotations


def varint(value: int) -> bytes:
    """`value` (non-negative) as a base-128 varint."""
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | 0x80 if value else b)
        if not value:
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    """The tag of field `field` with wire type `wire_type`."""
    return varint((field << 3) | wire_type)


def length_delimited(field: int, length: int) -> bytes:
    """Tag and length prefix of a length-delimited field whose payload is `length` bytes."""
    return key(field, 2) + varint(length)
