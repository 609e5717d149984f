"""PNG pictures of a training run, written beside its snapshots (no imaging library needed).

- PREFIX_iter_N_filters.png: the first learnable layer's filters as image tiles (each
  InnerProduct row or Convolution kernel, min-max scaled on its own);
- PREFIX_iter_N_recon.png: inputs (top row) above their reconstructions (bottom row),
  when the net's loss compares a prediction with an image-shaped input (logits of a
  SigmoidCrossEntropyLoss are shown through the sigmoid);
- PREFIX_iter_N_loss.png: the loss (grey) and smoothed loss (black) per iteration.
Pictures that do not apply to a net (its input is not image-shaped) are skipped.
"""
from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from caffeonnx.fileio import write_bytes_atomic
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.loop import Iteration


def png_bytes(image: np.ndarray) -> bytes:
    """An 8-bit greyscale (H, W) or RGB (H, W, 3) image as PNG bytes."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = img.shape[:2]
    color = 2 if img.ndim == 3 else 0
    rows = b"".join(b"\x00" + img[y].tobytes() for y in range(h))  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 6)) + chunk(b"IEND", b"")


def image_shape(sample: Sequence[int]) -> tuple[int, ...] | None:
    """How one input sample looks as a picture: (H, W) or (H, W, 3); None when it is not image-like."""
    dims = tuple(int(d) for d in sample)
    if len(dims) == 3 and dims[0] in (1, 3):
        return (dims[1], dims[2]) if dims[0] == 1 else (dims[1], dims[2], 3)
    side = math.isqrt(dims[0]) if len(dims) == 1 else 0
    if side >= 4 and side * side == dims[0]:
        return side, side  # a flattened square image (MNIST's 784 = 28 x 28)
    return None


def _to_picture(values: np.ndarray, shape: tuple[int, ...], per_tile: bool = True) -> np.ndarray:
    """A flat sample as uint8 pixels of `shape` (min-max scaled, or clipped to [0, 1] when not per tile)."""
    v = values.astype(np.float64)
    if len(shape) == 3:
        v = v.reshape(3, shape[0], shape[1]).transpose(1, 2, 0)
    else:
        v = v.reshape(shape)
    if per_tile:
        lo, hi = v.min(), v.max()
        v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return (np.clip(v, 0, 1) * 255).round().astype(np.uint8)


def tile(pictures: list[np.ndarray], columns: int | None = None) -> np.ndarray:
    """Pictures of one shape in a grid with 1-pixel grey borders."""
    h, w = pictures[0].shape[:2]
    cols = columns or math.ceil(math.sqrt(len(pictures)))
    rows = math.ceil(len(pictures) / cols)
    shape = (rows * (h + 1) + 1, cols * (w + 1) + 1) + pictures[0].shape[2:]
    grid = np.full(shape, 128, dtype=np.uint8)
    for k, pic in enumerate(pictures):
        r, c = divmod(k, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = pic
    return grid


def first_layer_filters(module: GraphModule, limit: int = 256) -> np.ndarray | None:
    """The first learnable layer's weights as tiles, if its input is image-shaped."""
    for rec in module.records:
        layer = module.layers.get(rec.name)
        if layer is None or layer.type not in ("InnerProduct", "Convolution") or not rec.params:
            continue
        w = module.parameter(rec.params[0]).detach().cpu().numpy()
        if layer.type == "Convolution":
            shape = image_shape((w.shape[1], *w.shape[2:])) if w.shape[1] in (1, 3) else None
            if shape is None or w.ndim != 4:
                return None
            pics = [_to_picture(k.reshape(-1), shape) for k in w[:limit]]
        else:
            bottom = rec.bottoms[0]
            dims = module.input_dims.get(bottom)
            rows = w.T if layer.inner_product_param.transpose else w
            shape = image_shape(dims[1:]) if dims else image_shape((rows.shape[1],))
            if shape is None or math.prod(shape) != rows.shape[1]:
                return None
            pics = [_to_picture(row, shape) for row in rows[:limit]]
        return tile(pics)
    return None


def reconstructions(module: GraphModule, batch: dict[str, np.ndarray], count: int = 10) -> np.ndarray | None:
    """Inputs over reconstructions for the first loss that compares a prediction with an image-shaped input."""
    for term in module.loss_terms:
        rec = next(r for r in module.records if r.name == term.layer)
        layer = module.layers[term.layer]
        if len(rec.bottoms) < 2 or rec.bottoms[1] not in batch:
            continue
        target = batch[rec.bottoms[1]]
        shape = image_shape(target.shape[1:])
        if shape is None:
            continue
        was_training = module.training
        with torch.no_grad():
            pred = module.eval()(batch, [rec.bottoms[0]])[rec.bottoms[0]]
        module.train(was_training)
        if layer.type == "SigmoidCrossEntropyLoss":
            pred = torch.sigmoid(pred)
        n = min(count, target.shape[0])
        pred_np = pred.cpu().numpy().reshape(target.shape[0], -1)
        tops = [_to_picture(target[i].reshape(-1), shape, per_tile=False) for i in range(n)]
        bottoms = [_to_picture(pred_np[i], shape, per_tile=False) for i in range(n)]
        return tile(tops + bottoms, columns=n)
    return None


def loss_curve(iterations: Sequence[Iteration], width: int = 480, height: int = 300) -> np.ndarray | None:
    """Loss (grey) and smoothed loss (black) against the iteration, on a white canvas with axes."""
    if len(iterations) < 2:
        return None
    canvas = np.full((height, width), 255, dtype=np.uint8)
    left, bottom, pad = 8, height - 8, 8
    canvas[pad:bottom + 1, left] = 0
    canvas[bottom, left:width - pad] = 0
    x = np.array([r.iter for r in iterations], dtype=np.float64)
    series = [(np.array([r.loss for r in iterations]), 170), (np.array([r.smoothed_loss for r in iterations]), 0)]
    finite = np.concatenate([s[np.isfinite(s)] for s, _ in series])
    lo, hi = float(finite.min()), float(finite.max())
    span = hi - lo if hi > lo else 1.0
    px = left + 1 + (x - x[0]) / max(x[-1] - x[0], 1) * (width - pad - left - 2)
    for values, shade in series:
        py = bottom - 1 - (values - lo) / span * (bottom - pad - 2)
        for a in range(len(px) - 1):  # straight segments, one point per pixel of their length
            steps = int(max(abs(px[a + 1] - px[a]), abs(py[a + 1] - py[a]), 1)) + 1
            xs = np.linspace(px[a], px[a + 1], steps).round().astype(int)
            ys = np.linspace(py[a], py[a + 1], steps).round().astype(int)
            ok = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
            canvas[ys[ok], xs[ok]] = shade
    return canvas


def write_pictures(prefix: str, module: GraphModule, batch: dict[str, np.ndarray],
                   iterations: Sequence[Iteration]) -> list[Path]:
    """Write the pictures that apply to this net as PREFIX_*.png; returns the files written."""
    written = []
    for name, image in (("filters", first_layer_filters(module)), ("recon", reconstructions(module, batch)),
                        ("loss", loss_curve(iterations))):
        if image is not None:
            path = Path(f"{prefix}_{name}.png")
            write_bytes_atomic(path, png_bytes(image))
            written.append(path)
    return written
