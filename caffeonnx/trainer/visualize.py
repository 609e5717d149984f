"""PNG pictures of a training run, written beside its snapshots.

- PREFIX_iter_N_filters.png: the first learnable layer's filters as image tiles (each
  InnerProduct row or Convolution kernel, min-max scaled on its own, enlarged so that a
  tile is at least MIN_TILE pixels wide);
- PREFIX_iter_N_recon.png: inputs (top row) above their reconstructions (bottom row),
  when the net's loss compares a prediction with an image-shaped input, or with a blob
  computed from one (Caffe's autoencoders compare against `Flatten(data)`); logits of a
  SigmoidCrossEntropyLoss are shown through the sigmoid;
- PREFIX_iter_N_loss.png: the loss and smoothed loss per iteration, a matplotlib chart
  with axes, ticks, labels and a title.
Pictures that do not apply to a net (its input is not image-shaped) are skipped.
"""
from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from caffeonnx.errors import CaffeOnnxError
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


MIN_TILE = 32  # pixels: a 5x5 kernel or a 28x28 digit drawn 1:1 is too small to read


def enlarge(picture: np.ndarray, minimum: int = MIN_TILE) -> np.ndarray:
    """Nearest-neighbour upscaling by the smallest whole factor that makes both sides >= `minimum`."""
    factor = max(1, math.ceil(minimum / min(picture.shape[:2])))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


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


def picture_shape(module: GraphModule, blob: str, size: int) -> tuple[int, ...] | None:
    """How a sample of `size` values of `blob` looks as a picture: its own dims, else those of a net input
    with as many values per sample (Flatten(data) keeps data's layout), else a flat square."""
    candidates = [module.input_dims.get(blob)] + list(module.input_dims.values())
    for dims in candidates:
        if dims and math.prod(dims[1:]) == size:
            shape = image_shape(dims[1:])
            if shape is not None:
                return shape
    return image_shape((size,))


def first_layer_filters(module: GraphModule, limit: int = 256) -> np.ndarray | None:
    """The first learnable layer's weights as enlarged tiles, if its input is image-shaped."""
    for rec, layer in zip(module.records, module.caffe_layers):
        if layer is None or layer.type not in ("InnerProduct", "Convolution") or not rec.params:
            continue
        w = module.parameter(rec.params[0]).detach().cpu().numpy()
        if layer.type == "Convolution":
            shape = image_shape((w.shape[1], *w.shape[2:])) if w.shape[1] in (1, 3) and w.ndim == 4 else None
            if shape is None:
                return None
            pics = [_to_picture(k.reshape(-1), shape) for k in w[:limit]]
        else:
            rows = w.T if layer.inner_product_param.transpose else w
            shape = picture_shape(module, rec.bottoms[0], rows.shape[1])
            if shape is None:
                return None
            pics = [_to_picture(row, shape) for row in rows[:limit]]
        return tile([enlarge(pic) for pic in pics])
    return None


def reconstructions(module: GraphModule, batch: dict[str, np.ndarray], count: int = 10) -> np.ndarray | None:
    """Inputs over reconstructions for the first loss that compares a prediction with an image-shaped input
    (fed, or computed from the inputs, as Caffe's Flatten(data))."""
    for term in module.loss_terms:
        k = next(k for k, r in enumerate(module.records) if r.index == term.position)
        rec, layer = module.records[k], module.caffe_layers[k]
        if len(rec.bottoms) < 2:
            continue
        prediction, target = rec.bottoms[0], rec.bottoms[1]
        was_training = module.training
        try:
            with torch.no_grad():
                values = module.eval()(batch, [prediction, target])
        except CaffeOnnxError:  # the target needs inputs the batch does not hold: no picture
            continue
        finally:
            module.train(was_training)
        pred, want = values[prediction], values[target].float().cpu().numpy()
        n_all = want.shape[0]
        size = want.size // max(n_all, 1)
        shape = picture_shape(module, target, size)
        if shape is None or pred.numel() != want.size:
            continue
        if layer.type == "SigmoidCrossEntropyLoss":
            pred = torch.sigmoid(pred)
        n = min(count, n_all)
        pred_np = pred.float().cpu().numpy().reshape(n_all, -1)
        tops = [enlarge(_to_picture(want[i].reshape(-1), shape, per_tile=False)) for i in range(n)]
        bottoms = [enlarge(_to_picture(pred_np[i], shape, per_tile=False)) for i in range(n)]
        return tile(tops + bottoms, columns=n)
    return None


def loss_chart(iterations: Sequence[Iteration], title: str = "training loss") -> bytes | None:
    """The loss and smoothed loss against the iteration as a PNG chart (matplotlib, Agg: no display needed)."""
    if len(iterations) < 2:
        return None
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = [r.iter for r in iterations]
    ax.plot(x, [r.loss for r in iterations], color="0.65", linewidth=0.8, label="loss")
    ax.plot(x, [r.smoothed_loss for r in iterations], color="black", linewidth=1.5,
            label="smoothed loss (Caffe's average_loss)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, color="0.9")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_pictures(prefix: str, module: GraphModule, batch: dict[str, np.ndarray],
                   iterations: Sequence[Iteration]) -> list[Path]:
    """Write the pictures that apply to this net as PREFIX_*.png; returns the files written."""
    filters, pairs = first_layer_filters(module), reconstructions(module, batch)
    pictures = {"filters": png_bytes(filters) if filters is not None else None,
                "recon": png_bytes(pairs) if pairs is not None else None,
                "loss": loss_chart(iterations, f"training loss: {Path(prefix).name}")}
    written = []
    for name, data in pictures.items():
        if data is not None:
            path = Path(f"{prefix}_{name}.png")
            write_bytes_atomic(path, data)
            written.append(path)
    return written
