"""Layer-by-layer comparison of a conversion against blobs dumped from Caffe.

How users with a Caffe dump come to trust a conversion: every blob of the net is
made a graph output, run through onnxruntime, and compared with the reference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from caffeonnx.converter.caffe_to_onnx import ConvertedModel, convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.metadata import layer_records
from caffeonnx.errors import InputFileError
from caffeonnx.npz import load_npz


@dataclass
class BlobCheck:
    """How one Caffe blob compares with its ONNX value."""

    blob: str
    layer: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""


def check_inputs(inputs: dict[str, np.ndarray], graph_inputs: dict[str, list[int | str]], source: str) -> None:
    """Every graph input has an array of its rank and fixed dims (a symbolic batch may be any size)."""
    missing = [n for n in graph_inputs if n not in inputs]
    if missing:
        raise InputFileError(f"{source}: no array for graph input(s) {missing}; the npz has {sorted(inputs)}")
    for name, dims in graph_inputs.items():
        arr = inputs[name]
        fits = arr.ndim == len(dims) and all(isinstance(d, str) or d == n for d, n in zip(dims, arr.shape))
        if not fits:
            raise InputFileError(f"{source}: array {name!r} has shape {list(arr.shape)} but graph input {name!r} "
                                 f"takes {dims} (float32); save the blob Caffe was fed")


def run_model(converted: ConvertedModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a converted model on CPU onnxruntime; returns every graph output by name."""
    import onnxruntime as ort

    model = converted.to_proto()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    check_inputs(inputs, {i.name: [d if isinstance(d, int) else str(d) for d in i.shape] for i in sess.get_inputs()},
                 "inputs")
    feed = {n: np.asarray(inputs[n], dtype=np.float32) for n in names}
    outs = sess.run(None, feed)
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def compare_blobs(
    converted: ConvertedModel,
    inputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> list[BlobCheck]:
    """Compare every reference blob with the model's value of it (in net order)."""
    values = run_model(converted, inputs)
    values.update({k: v for k, v in inputs.items() if k not in values})
    writer = {}
    for rec in layer_records(converted.model):
        for top in rec.tops:
            writer[top] = rec.name
    checks = []
    for blob, ref in reference.items():
        got = values.get(blob)
        if got is None:
            checks.append(BlobCheck(blob, writer.get(blob, "?"), tuple(ref.shape), float("inf"), float("inf"), False, "not in the model"))
            continue
        if got.shape != ref.shape:
            checks.append(BlobCheck(blob, writer.get(blob, "?"), tuple(ref.shape), float("inf"), float("inf"), False,
                                    f"shape {got.shape} != reference {ref.shape}"))
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        rel = diff / np.maximum(np.abs(ref.astype(np.float64)), 1e-12)
        max_rel = float(rel.max()) if rel.size else 0.0
        ok = bool(np.all(diff <= atol + rtol * np.abs(ref)))
        checks.append(BlobCheck(blob, writer.get(blob, "(split)" if "_split_" in blob else "?"), tuple(ref.shape), max_abs, max_rel, ok))
    return checks


def verify_files(
    prototxt: str | os.PathLike[str],
    caffemodel: str | os.PathLike[str],
    inputs_npz: str | os.PathLike[str],
    reference_npz: str | os.PathLike[str],
    atol: float = 1e-5,
    rtol: float = 1e-4,
    options: ConvertOptions | None = None,
) -> list[BlobCheck]:
    """Convert with every blob as an output and compare against a Caffe blob dump."""
    opts = options or ConvertOptions()
    opts.all_blobs = True
    inputs = load_npz(inputs_npz, "inputs")
    reference = load_npz(reference_npz, "reference")
    converted = convert_files(prototxt, caffemodel, opts)
    return compare_blobs(converted, inputs, reference, atol, rtol)
