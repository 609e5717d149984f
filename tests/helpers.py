"""Shared test helpers: convert prototxt text, run with onnxruntime, compare arrays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from caffeonnx.converter.caffe_io import Blob, CaffeWeights, parse_prototxt
from caffeonnx.converter.caffe_to_onnx import ConvertedModel, convert_net
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.upgrade import upgrade_net

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "caffe_reference"


def convert_text(text: str, weights: dict[str, list[np.ndarray]] | None = None, **options: object) -> ConvertedModel:
    """Convert prototxt text; `weights` maps layer names to their blobs (fillers if None)."""
    net = upgrade_net(parse_prototxt(text, "<test>"), "<test>")
    cw = None
    if weights is not None:
        cw = CaffeWeights(path=Path("<test>.caffemodel"), net=net,
                          blobs={k: [Blob(np.asarray(a, dtype=np.float32)) for a in v] for k, v in weights.items()})
    return convert_net(net, cw, ConvertOptions(**options), source="<test>")  # type: ignore[arg-type]


def run(converted: ConvertedModel, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run on CPU onnxruntime; returns every graph output by name."""
    sess = ort.InferenceSession(converted.to_proto().SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {k: np.asarray(v) for k, v in feeds.items()})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def assert_close(got: np.ndarray, want: np.ndarray, name: str, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Fail with the blob name, shapes, dtypes and worst error when arrays differ."""
    assert got.shape == want.shape, f"{name}: shape {got.shape} != expected {want.shape}"
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bad = diff > atol + rtol * np.abs(want.astype(np.float64))
    if bad.any():
        idx = np.unravel_index(np.argmax(diff), diff.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.size} values differ (shape {got.shape}, dtype {got.dtype}); worst at "
            f"{idx}: got {got[idx]!r}, expected {want[idx]!r}, |diff| {diff[idx]:.3g} (atol {atol}, rtol {rtol})"
        )


def rng(seed: int = 0) -> np.random.Generator:
    """A seeded generator (tests never use unseeded data)."""
    return np.random.default_rng(seed)
