"""InfogainLoss against a numpy transcription of BVLC master's InfogainLossLayer (softmax inside,
atol 1e-5, rtol 1e-4): H from a binaryproto source or a third bottom, axis, ignore_label, normalization."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caffeonnx.errors import InputFileError, LayerError
from caffeonnx.proto import caffe_pb2
from tests.converter.layers.graph_grad import forward_backward
from tests.helpers import assert_close, convert_text, rng, run

MODES = ["FULL", "VALID", "BATCH_SIZE", "NONE"]


def dims(s: tuple[int, ...]) -> str:
    return " ".join(f"dim: {d}" for d in s)


def net(x_shape: tuple[int, ...], label_shape: tuple[int, ...], extra: str = "", h_shape: tuple[int, ...] | None = None,
        tops: str = 'top: "loss"') -> str:
    shapes = f"shape {{ {dims(x_shape)} }} shape {{ {dims(label_shape)} }}"
    inputs, bottoms = 'top: "x" top: "label"', 'bottom: "x" bottom: "label"'
    if h_shape is not None:
        shapes += f" shape {{ {dims(h_shape)} }}"
        inputs += ' top: "H"'
        bottoms += ' bottom: "H"'
    return (f'layer {{ name: "in" type: "Input" {inputs} input_param {{ {shapes} }} }}\n'
            f'layer {{ name: "loss" type: "InfogainLoss" {bottoms} {tops} {extra} }}\n')


def caffe_infogain(x: np.ndarray, label: np.ndarray, h: np.ndarray, axis: int, ignore: int | None,
                   mode: str) -> tuple[float, np.ndarray, np.ndarray]:
    """Forward_cpu and Backward_cpu: softmax on `axis`, Σ -H[l, k]·log(max(p_k, 1e-20)) / normaliser;
    diff = (p·ΣH[l, :] - H[l, :]) / normaliser, 0 for ignored labels.  Returns (loss, prob, dx)."""
    outer, classes = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:]))
    x3 = x.reshape(outer, classes, inner).astype(np.float64)
    e = np.exp(x3 - x3.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    lab = label.reshape(outer, inner).astype(np.int64)
    hm = h.reshape(classes, classes).astype(np.float64)
    loss, count = 0.0, 0
    dx = np.zeros_like(p)
    for i in range(outer):
        for j in range(inner):
            lv = lab[i, j]
            if ignore is not None and lv == ignore:
                continue
            loss -= float((hm[lv] * np.log(np.maximum(p[i, :, j], np.float32(1e-20)))).sum())
            dx[i, :, j] = p[i, :, j] * hm[lv].sum() - hm[lv]
            count += 1
    normalizer = {"FULL": outer * inner, "VALID": count if ignore is not None else outer * inner,
                  "BATCH_SIZE": outer, "NONE": 1}[mode]
    normalizer = max(1.0, float(normalizer))
    return loss / normalizer, p.reshape(x.shape), (dx / normalizer).reshape(x.shape)


def write_blob(path: Path, h: np.ndarray) -> None:
    """H as Caffe's tools write it: a BlobProto with the legacy (1, 1, C, C) dims."""
    blob = caffe_pb2.BlobProto(num=1, channels=1, height=h.shape[0], width=h.shape[1])
    blob.data.extend(h.reshape(-1).tolist())
    path.write_bytes(blob.SerializeToString())


@pytest.mark.parametrize("mode", [None, *MODES])
@pytest.mark.parametrize("ignore", [None, 2])
@pytest.mark.parametrize(("x_shape", "axis"), [((5, 4), 1), ((3, 4, 2, 3), 1), ((2, 3, 4), -1)])
def test_infogain_from_a_third_bottom(mode: str | None, ignore: int | None, x_shape: tuple[int, ...],
                                      axis: int) -> None:
    g = rng(22)
    ax = axis % len(x_shape)
    classes = x_shape[ax]
    label_shape = (*x_shape[:ax], *x_shape[ax + 1:])
    x = (g.normal(size=x_shape) * 3).astype(np.float32)
    label = g.integers(0, classes, size=label_shape).astype(np.float32)
    h = g.uniform(0, 2, size=(1, 1, classes, classes)).astype(np.float32)
    fields = " ".join(f for f in [f"normalization: {mode}" if mode else "",
                                  f"ignore_label: {ignore}" if ignore is not None else ""] if f)
    extra = (f"loss_param {{ {fields} }} " if fields else "") + f"infogain_loss_param {{ axis: {axis} }}"
    text = net(x_shape, label_shape, extra, h.shape, tops='top: "loss" top: "prob" loss_weight: 1 loss_weight: 0')
    want, prob, dx = caffe_infogain(x, label, h, ax, ignore, mode or "VALID")
    feeds = {"x": x, "label": label, "H": h}
    out = run(convert_text(text), feeds)
    assert_close(out["loss"], np.float32(want), "loss")
    assert_close(out["prob"], prob, "prob")
    loss, grads = forward_backward(text, feeds, "loss", 1.0, ["x"])
    assert_close(loss, np.float32(want), "loss (trainer)")
    assert_close(grads["x"], dx, "dx")


def test_infogain_from_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = rng(23)
    x = g.normal(size=(6, 3)).astype(np.float32)
    label = g.integers(0, 3, size=(6,)).astype(np.float32)
    h = g.uniform(0, 1, size=(3, 3)).astype(np.float32)
    write_blob(tmp_path / "H.binaryproto", h)
    monkeypatch.chdir(tmp_path)  # Caffe reads `source` relative to the current directory
    converted = convert_text(net((6, 3), (6,), 'infogain_loss_param { source: "H.binaryproto" }'))
    assert not converted.weights, "H is a constant, not a learnable blob"
    want, _, _ = caffe_infogain(x, label, h, 1, None, "VALID")
    assert_close(run(converted, {"x": x, "label": label})["loss"], np.float32(want), "loss")


def test_identity_infogain_is_softmax_with_loss() -> None:
    g = rng(24)
    x, label = g.normal(size=(4, 5)).astype(np.float32), g.integers(0, 5, size=(4,)).astype(np.float32)
    h = np.eye(5, dtype=np.float32).reshape(1, 1, 5, 5)
    got = run(convert_text(net((4, 5), (4,), "", h.shape)), {"x": x, "label": label, "H": h})["loss"]
    softmax = run(convert_text(net((4, 5), (4,)).replace("InfogainLoss", "SoftmaxWithLoss")),
                  {"x": x, "label": label})["loss"]
    assert_close(got, softmax, "loss")


def test_infogain_refusals(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="Infogain matrix source must be specified"):
        convert_text(net((4, 3), (4,)))
    with pytest.raises(LayerError, match="normalize is deprecated"):
        convert_text(net((4, 3), (4,), "loss_param { normalize: true }", (1, 1, 3, 3)))
    with pytest.raises(LayerError, match="H must be 3x3: the infogain matrix holds 16 values"):
        convert_text(net((4, 3), (4,), "", (1, 1, 4, 4)))
    with pytest.raises(InputFileError, match="does not exist"):
        convert_text(net((4, 3), (4,), f'infogain_loss_param {{ source: "{tmp_path / "missing"}" }}'))
