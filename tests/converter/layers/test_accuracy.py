"""Accuracy against a line-by-line numpy transcription of Caffe's AccuracyLayer::Forward_cpu (exact)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from caffeonnx.errors import LayerError
from tests.converter.layers.test_loss import net
from tests.helpers import assert_close, convert_text, rng, run


def accuracy_ref(
    x: np.ndarray, label: np.ndarray, axis: int, top_k: int, ignore: int | None
) -> tuple[float, np.ndarray]:
    """Caffe's loop: a label is a hit when fewer than top_k other scores are >= its own."""
    outer, classes, inner = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1 :])
    x3, lab = x.reshape(outer, classes, inner), label.reshape(-1)
    hits, count = 0, 0
    class_hits, class_count = np.zeros(classes), np.zeros(classes)
    for i in range(outer):
        for j in range(inner):
            v = int(lab[i * inner + j])
            if ignore is not None and v == ignore:
                continue
            class_count[v] += 1
            better = -1  # the true class counts itself
            for k in range(classes):
                if better >= top_k:
                    break
                better += int(x3[i, k, j] >= x3[i, v, j])
            if better < top_k:
                hits += 1
                class_hits[v] += 1
            count += 1
    per_class = np.where(class_count == 0, 0.0, class_hits / np.maximum(class_count, 1))
    return (0.0 if count == 0 else hits / count), per_class.astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "axis", "label_shape"), [((8, 5), 1, (8,)), ((3, 4, 2, 3), 1, (3, 1, 2, 3)), ((2, 3, 6), -1, (2, 3))]
)
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("ignore", [None, 0])
def test_accuracy(
    shape: tuple[int, ...], axis: int, label_shape: tuple[int, ...], top_k: int, ignore: int | None
) -> None:
    g = rng(7)
    ax = axis % len(shape)
    # Rounded scores make ties, which Caffe counts against the true class (>=).
    x = np.round(g.normal(size=shape), 1).astype(np.float32)
    label = g.integers(0, shape[ax], size=label_shape).astype(np.float32)
    extra = f"accuracy_param {{ axis: {axis} top_k: {top_k} {'' if ignore is None else f'ignore_label: {ignore}'} }}"
    out = run(
        convert_text(net("Accuracy", shape, label_shape, extra, tops='top: "acc" top: "per_class"')),
        {"x": x, "label": label},
    )
    acc, per_class = accuracy_ref(x, label, ax, top_k, ignore)
    assert_close(
        out["acc"], np.array(acc, dtype=np.float32), f"acc (top_k {top_k}, ignore {ignore})", atol=1e-6, rtol=0
    )
    assert_close(out["per_class"], per_class, f"per_class (top_k {top_k}, ignore {ignore})", atol=1e-6, rtol=0)


def test_accuracy_single_top_and_dynamic_batch() -> None:
    g = rng(8)
    x = g.normal(size=(13, 6)).astype(np.float32)
    label = g.integers(0, 6, size=(13,)).astype(np.float32)
    out = run(convert_text(net("Accuracy", (4, 6), (4,), tops='top: "acc"')), {"x": x, "label": label})
    assert list(out) == ["acc"], f"graph outputs {list(out)}"
    assert_close(out["acc"], np.array(accuracy_ref(x, label, 1, 1, None)[0], np.float32), "acc", atol=1e-6, rtol=0)


def test_accuracy_all_ignored_is_zero() -> None:
    x = rng(9).normal(size=(3, 4)).astype(np.float32)
    out = run(
        convert_text(net("Accuracy", (3, 4), (3,), "accuracy_param { ignore_label: 1 }", tops='top: "acc"')),
        {"x": x, "label": np.ones((3,), np.float32)},
    )
    assert out["acc"] == 0.0, f"acc: {out['acc']!r} with every label ignored (Caffe reports 0)"


def test_accuracy_refuses_top_k_above_classes() -> None:
    with pytest.raises(
        LayerError, match=r"top_k must be less than or equal to the number of classes: .*top_k is 6 .* 5 classes"
    ):
        convert_text(net("Accuracy", (4, 5), (4,), "accuracy_param { top_k: 6 }", tops='top: "acc"'))
