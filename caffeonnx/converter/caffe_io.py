"""Read and write Caffe's files: prototxt (text) and caffemodel (binary).

Why a hand-rolled caffemodel scanner: parsing a 500 MB caffemodel with protobuf and
then converting each `repeated float` to numpy copies every weight twice through
Python objects.  Instead the file is memory-mapped, the small layer headers are
parsed by protobuf, and each blob's packed float payload becomes a zero-copy
`np.frombuffer` view of the mapping.
"""
from __future__ import annotations

import codecs
import math
import mmap
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from caffeonnx.converter import forks
from caffeonnx.errors import InputFileError, PrototxtError
from caffeonnx.fileio import atomic_write
from caffeonnx.proto import caffe_pb2
from caffeonnx.wire import key, length_delimited

# Field numbers used by the scanner (see caffe.proto).
_NET_LAYER = 100  # NetParameter.layer (LayerParameter)
_NET_LAYERS = 2  # NetParameter.layers (V1LayerParameter)
_LAYER_BLOBS = 7  # LayerParameter.blobs
_V1_BLOBS = 6  # V1LayerParameter.blobs
_V1_V0LAYER = 1  # V1LayerParameter.layer (V0LayerParameter)
_V0_BLOBS = 50  # V0LayerParameter.blobs
_BLOB_DATA, _BLOB_DOUBLE_DATA, _BLOB_SHAPE = 5, 8, 7
_BLOB_LEGACY_DIMS = (1, 2, 3, 4)  # num, channels, height, width


@dataclass
class Blob:
    """One parameter blob of a layer as stored in a caffemodel."""

    data: np.ndarray  # float32, already shaped
    legacy_shape: bool = False  # shape came from num/channels/height/width


@dataclass
class CaffeWeights:
    """A parsed caffemodel: its net (blob payloads stripped) and the blobs per layer."""

    path: Path
    net: caffe_pb2.NetParameter
    blobs: dict[str, list[Blob]] = field(default_factory=dict)


def undecodable_text(message: Message, path: str = "") -> str | None:
    """The path of the first string field whose bytes are not UTF-8 (protobuf returns those as bytes), else None."""
    for descriptor, value in message.ListFields():
        values = value if descriptor.is_repeated else [value]
        where = f"{path}.{descriptor.name}" if path else descriptor.name
        for i, item in enumerate(values):
            here = f"{where}[{i}]" if descriptor.is_repeated else where
            if descriptor.type == FieldDescriptor.TYPE_STRING and not isinstance(item, str):
                return here
            if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
                found = undecodable_text(item, here)
                if found is not None:
                    return found
    return None


def read_blob_file(path: str | os.PathLike[str], what: str) -> np.ndarray:
    """A binaryproto file (one BlobProto: a mean image, an infogain matrix) as a float32 array of its shape.

    Legacy num/channels/height/width dims are read as a 4-D shape; `what` names the file in errors
    (e.g. "layer 'loss' (InfogainLoss): infogain_loss_param.source").
    """
    p = check_input_file(path, what)
    try:
        blob = caffe_pb2.BlobProto.FromString(p.read_bytes())
    except DecodeError as exc:
        raise InputFileError(f"{what} {str(path)!r} is not a BlobProto ({exc})") from None
    dims = list(blob.shape.dim) if blob.HasField("shape") else [blob.num, blob.channels, blob.height, blob.width]
    values = np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float32)
    if values.size != math.prod(dims):
        raise InputFileError(f"{what} {str(path)!r} has shape {dims} but holds {values.size} values")
    return values.reshape(dims)


def check_input_file(path: str | os.PathLike[str], what: str) -> Path:
    """`path` as a Path if it is a regular file; else one clear error.

    A FIFO would block the read forever and a device such as /dev/zero would be read until
    memory runs out, so anything but a regular file is refused before it is opened.
    """
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise InputFileError(f"{what} {str(p)!r} does not exist; check the path") from None
    except OSError as exc:
        raise InputFileError(f"{what} {str(p)!r} cannot be read ({exc.strerror}); check its permissions") from None
    if stat.S_ISDIR(mode):
        raise InputFileError(f"{what} {str(p)!r} is a directory; pass the file itself")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise InputFileError(f"{what} {str(p)!r} is {kind}, not a regular file; save the data to a file and pass that")
    return p


def read_prototxt(path: str | os.PathLike[str], message: type = caffe_pb2.NetParameter):
    """Parse a text-format Caffe file (net or solver) with file:line:column errors."""
    p = check_input_file(path, "prototxt")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise PrototxtError(
            f"{p}: not a text prototxt (it is binary: did you pass a .caffemodel where the prototxt goes?)"
        ) from None
    return parse_prototxt(text, str(p), message)


def parse_prototxt(text: str, source: str = "<string>", message: type = caffe_pb2.NetParameter):
    """Parse prototxt text; errors name `source`, the line and the column."""
    msg = message()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        line, col = exc.GetLine(), exc.GetColumn()
        detail = str(exc)
        prefix = f"{line}:{col} : "
        if detail.startswith(prefix):
            detail = detail[len(prefix):]
        detail = detail.replace("caffeonnx.caffe.", "")  # users know Caffe's message names
        where = f"{source}:{line}:{col}" if line else source
        raise PrototxtError(f"{where}: {detail} (fix the {message.DESCRIPTOR.name} text at that position)") from None
    return msg


class _Scanner:
    """Minimal protobuf wire-format walker over a buffer (bounds-checked)."""

    def __init__(self, buf: memoryview | bytes | mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.path = path

    def corrupt(self, pos: int, why: str) -> InputFileError:
        return InputFileError(
            f"{self.path}: truncated or corrupt caffemodel ({why} at byte {pos}); "
            "re-download or re-export the file"
        )

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        result = shift = 0
        buf = self.buf
        while True:
            if pos >= end:
                raise self.corrupt(pos, "varint runs past the end")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result, pos
            shift += 7
            if shift > 63:
                raise self.corrupt(pos, "varint longer than 10 bytes")

    def fields(self, start: int, end: int):
        """Yield (field_number, wire_type, field_start, value_start, value_end, varint_value)."""
        pos = start
        while pos < end:
            fstart = pos
            key, pos = self.varint(pos, end)
            fnum, wt = key >> 3, key & 7
            if fnum == 0:
                raise self.corrupt(fstart, "field number 0")
            if wt == 0:
                val, pos = self.varint(pos, end)
                yield fnum, wt, fstart, fstart, pos, val
                continue
            if wt == 2:
                n, vstart = self.varint(pos, end)
                pos = vstart + n
            elif wt == 5:
                vstart, pos = pos, pos + 4
            elif wt == 1:
                vstart, pos = pos, pos + 8
            else:
                raise self.corrupt(fstart, f"unsupported wire type {wt}")
            if pos > end:
                raise self.corrupt(fstart, f"field {fnum} runs past the end")
            yield fnum, wt, fstart, vstart, pos, 0


def _parse_blob(sc: _Scanner, start: int, end: int) -> Blob:
    data: np.ndarray | None = None
    shape: list[int] | None = None
    legacy = [0, 0, 0, 0]
    has_legacy = False
    for fnum, wt, _fs, vs, ve, val in sc.fields(start, end):
        if fnum == _BLOB_DATA and wt == 2:
            if (ve - vs) % 4:
                raise sc.corrupt(vs, "float blob payload not a multiple of 4 bytes")
            data = np.frombuffer(sc.buf, dtype="<f4", count=(ve - vs) // 4, offset=vs)
        elif fnum == _BLOB_DOUBLE_DATA and wt == 2:
            if (ve - vs) % 8:
                raise sc.corrupt(vs, "double blob payload not a multiple of 8 bytes")
            data = np.frombuffer(sc.buf, dtype="<f8", count=(ve - vs) // 8, offset=vs).astype(np.float32)
        elif fnum in (_BLOB_DATA, _BLOB_DOUBLE_DATA):
            # Unpacked repeated floats (legal but rare): let protobuf decode this blob.
            proto = caffe_pb2.BlobProto.FromString(bytes(sc.buf[start:end]))
            vals = proto.data if len(proto.data) else proto.double_data
            data = np.asarray(vals, dtype=np.float32)
        elif fnum == _BLOB_SHAPE and wt == 2:
            shape = list(caffe_pb2.BlobShape.FromString(bytes(sc.buf[vs:ve])).dim)
        elif fnum in _BLOB_LEGACY_DIMS and wt == 0:
            legacy[fnum - 1] = val - (1 << 64) if val >= 1 << 63 else val
            has_legacy = True
    if data is None:
        data = np.zeros(0, dtype=np.float32)
    is_legacy = shape is None
    if shape is None:
        shape = legacy if has_legacy else [data.size]
    if int(np.prod(shape, dtype=np.int64)) != data.size:
        raise sc.corrupt(start, f"blob shape {shape} does not match its {data.size} values")
    return Blob(data.reshape(shape), legacy_shape=is_legacy)


def _strip_blobs(sc: _Scanner, start: int, end: int, blob_field: int, nested: dict[int, int] | None = None):
    """Return (message bytes without blobs, blobs) for a layer message."""
    kept = bytearray()
    blobs: list[Blob] = []
    for fnum, wt, fs, vs, ve, _ in sc.fields(start, end):
        if fnum == blob_field and wt == 2:
            blobs.append(_parse_blob(sc, vs, ve))
        elif nested and fnum in nested and wt == 2:
            inner, inner_blobs = _strip_blobs(sc, vs, ve, nested[fnum])
            blobs.extend(inner_blobs)
            kept += length_delimited(fnum, len(inner)) + inner
        else:
            kept += sc.buf[fs:ve]
    return bytes(kept), blobs


def read_caffemodel(path: str | os.PathLike[str]) -> CaffeWeights:
    """Parse a binary caffemodel; blob arrays are zero-copy views of the mapped file."""
    p = check_input_file(path, "caffemodel")
    size = p.stat().st_size
    if size == 0:
        raise InputFileError(f"{p}: empty caffemodel (0 bytes); re-download or re-export it")
    with open(p, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    head = mm[:8]
    if head.startswith(b"\x89HDF"):
        raise InputFileError(f"{p}: HDF5 snapshots are not supported; save the net as a binary .caffemodel")
    if _is_text(mm[:1024]):
        raise InputFileError(
            f"{p}: this is a text file, not a binary caffemodel; did you pass the prototxt where the caffemodel goes?"
        )
    sc = _Scanner(mm, p)
    kept = bytearray()
    layer_msgs: list[tuple[int, bytes, list[Blob]]] = []
    try:
        for fnum, wt, fs, vs, ve, _ in sc.fields(0, size):
            if fnum == _NET_LAYER and wt == 2:
                layer_msgs.append((fnum, *_strip_blobs(sc, vs, ve, _LAYER_BLOBS)))
            elif fnum == _NET_LAYERS and wt == 2:
                layer_msgs.append((fnum, *_strip_blobs(sc, vs, ve, _V1_BLOBS, {_V1_V0LAYER: _V0_BLOBS})))
            else:
                kept += mm[fs:ve]
        net = caffe_pb2.NetParameter.FromString(bytes(kept))
        for fnum, msg, _ in layer_msgs:
            if fnum == _NET_LAYERS:
                net.layers.add().MergeFromString(msg)
                continue
            layer = net.layer.add()
            layer.MergeFromString(msg)
            numbers = forks.read_numbers(layer.type)
            if numbers:  # a fork numbered this layer type's param field differently from BVLC
                layer.Clear()
                layer.MergeFromString(_renumber(_Scanner(msg, p), 0, len(msg), numbers))
    except DecodeError as exc:
        raise InputFileError(f"{p}: not a binary caffemodel ({exc}); pass the .caffemodel, not the prototxt") from None
    if not layer_msgs:
        raise InputFileError(f"{p}: not a caffemodel: it holds no layers (is it the right file?)")
    bad = undecodable_text(net)
    if bad is not None:
        raise InputFileError(f"{p}: field {bad} is not UTF-8 text; the caffemodel is damaged (re-save it from Caffe)")
    weights = CaffeWeights(path=p, net=net)
    v2 = [m for m in layer_msgs if m[0] == _NET_LAYER]
    v1 = [m for m in layer_msgs if m[0] == _NET_LAYERS]
    for layer, (_, _, blobs) in zip(net.layer, v2):
        weights.blobs[layer.name] = blobs
    for layer, (_, _, blobs) in zip(net.layers, v1):
        name = layer.name or layer.layer.name
        weights.blobs[name] = blobs
    return weights


def _renumber(sc: _Scanner, start: int, end: int, numbers: forks.Renumbering) -> bytes:
    """The message in `sc.buf[start:end]` with the fields in `numbers` moved to their new numbers,
    and, inside a moved message field, its own fields as that field's inner renumbering says."""
    out = bytearray()
    for fnum, wt, fs, vs, ve, _ in sc.fields(start, end):
        if fnum not in numbers:
            out += sc.buf[fs:ve]
            continue
        number, inner = numbers[fnum]
        if inner and wt == 2:
            body = _renumber(sc, vs, ve, inner)
            out += length_delimited(number, len(body)) + body
        else:
            _, after_key = sc.varint(fs, end)
            out += key(number, wt) + sc.buf[after_key:ve]
    return bytes(out)


def _fork_wire_bytes(layer: caffe_pb2.LayerParameter) -> bytes:
    """A bare layer's bytes with fork fields at the numbers that layer's fork reads (see forks.py)."""
    forks.spell_for_wire(layer)
    numbers = forks.write_numbers(layer)
    head = layer.SerializeToString()
    return _renumber(_Scanner(head, Path("<layer>")), 0, len(head), numbers) if numbers else head


def _is_text(head: bytes) -> bool:
    """True for UTF-8 text without control bytes: a caffemodel's first field keys and lengths never are."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end is fine
    except UnicodeDecodeError:
        return False
    return not any(ord(c) < 32 and c not in "\t\n\r\f" for c in text)


def _blob_bytes(array: np.ndarray) -> list[bytes | memoryview]:
    """Serialise one BlobProto (shape + packed float data) without per-element work."""
    arr = np.ascontiguousarray(array, dtype="<f4")
    # The shape of `array` itself: ascontiguousarray turns a 0-axis blob (PReLU channel_shared) into 1-axis.
    shape = caffe_pb2.BlobShape(dim=[int(d) for d in np.shape(array)]).SerializeToString()
    head = length_delimited(_BLOB_SHAPE, len(shape)) + shape
    payload = memoryview(arr).cast("B")
    data_head = length_delimited(_BLOB_DATA, payload.nbytes)
    body_len = len(head) + len(data_head) + payload.nbytes
    return [length_delimited(_LAYER_BLOBS, body_len) + head + data_head, payload]


def write_caffemodel(
    path: str | os.PathLike[str], net: caffe_pb2.NetParameter, blobs: Mapping[int | str, list[np.ndarray]]
) -> None:
    """Write a binary caffemodel atomically, streaming blob payloads from numpy.

    `net` gives the layers (any blobs in it are ignored); `blobs` maps each layer, by its
    position in `net.layer` or by its name (where names are unique), to its parameter
    arrays, written in order as that layer's `blobs`.  Positions let two layers of one
    name hold different blobs, as Caffe's Net::ToProto writes them.
    """
    with atomic_write(path) as fh:
        write_caffemodel_to(fh, net, blobs)


def write_caffemodel_to(fh: BinaryIO, net: caffe_pb2.NetParameter, blobs: Mapping[int | str, list[np.ndarray]]) -> None:
    """Stream a caffemodel to an open binary file (see `write_caffemodel`)."""
    header = caffe_pb2.NetParameter()
    header.CopyFrom(net)
    del header.layer[:]
    del header.layers[:]
    fh.write(header.SerializeToString())
    for position, layer in enumerate(net.layer):
        bare = caffe_pb2.LayerParameter()
        bare.CopyFrom(layer)
        del bare.blobs[:]
        head = _fork_wire_bytes(bare)
        parts: list[bytes | memoryview] = []
        for arr in blobs.get(position, blobs.get(layer.name, [])):
            parts.extend(_blob_bytes(arr))
        total = len(head) + sum(memoryview(p).nbytes for p in parts)
        fh.write(length_delimited(_NET_LAYER, total) + head)
        for part in parts:
            fh.write(part)
