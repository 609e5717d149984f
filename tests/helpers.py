"""Shared test helpers: convert prototxt text, run with onnxruntime, compare arrays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format

from caffeonnx.converter.caffe_io import Blob, CaffeWeights, parse_prototxt, read_prototxt
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
    g, w = got.astype(np.float64), want.astype(np.float64)
    same = (g == w) | (np.isnan(g) & np.isnan(w))  # equal infinities and NaN where NaN is expected
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(g - w))
        # NaN or an infinity on one side only is a mismatch, whatever the tolerance
        bad = ~same & ~(np.isfinite(diff) & (diff <= atol + rtol * np.abs(w)))
    if bad.any():
        idx = np.unravel_index(np.argmax(diff), diff.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.size} values differ (shape {got.shape}, dtype {got.dtype}); worst at "
            f"{idx}: got {got[idx]!r}, expected {want[idx]!r}, |diff| {diff[idx]:.3g} (atol {atol}, rtol {rtol})"
        )


def rng(seed: int = 0) -> np.random.Generator:
    """A seeded generator (tests never use unseeded data)."""
    return np.random.default_rng(seed)


def reference_subnet(case: str, layers: list[str]) -> tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Prototxt running only `layers` of reference `case`, every outside bottom an Input fed from
    the case's blobs.npz; returns (text, feeds, expected tops), so one layer family is checked
    against real Caffe without the rest of the net."""
    d = REFERENCE / case
    chosen = [layer for layer in read_prototxt(d / "net.prototxt").layer if layer.name in layers]
    assert [layer.name for layer in chosen] == layers, f"{case}: layers {layers} not all in net.prototxt (in that order)"
    blobs = np.load(d / "blobs.npz")
    tops = {t for layer in chosen for t in layer.top}
    bottoms = [b for b in dict.fromkeys(b for layer in chosen for b in layer.bottom) if b not in tops]
    text = "".join(
        f'layer {{ name: "input_{b}" type: "Input" top: "{b}" input_param {{ shape {{ '
        + " ".join(f"dim: {n}" for n in blobs[b].shape) + " } } }\n"
        for b in bottoms
    ) + "".join(f"layer {{ {text_format.MessageToString(layer, as_one_line=True)} }}\n" for layer in chosen)
    return text, {b: blobs[b] for b in bottoms}, {t: blobs[t] for t in tops}
