"""An LMDB of Caffe Datum records as Caffe's `convert_mnist_data` / `convert_imageset` tools write one.

`convert_mnist_data` stores each image as one `Datum` (channels 1, height, width, the raw
uint8 pixels in `data`, the digit in `label`) under the key `"%08d"` of its index, so a
cursor walks the records in file order.  Writing the same records here lets users (and the
tests) make the databases Caffe's Data layers read without Caffe's tools.
"""
from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np

from caffeonnx.proto import caffe_pb2


def write_datum_lmdb(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write uint8 `images` ((N, H, W) as MNIST, or (N, C, H, W)) and their labels as Datums keyed "%08d"."""
    if images.dtype != np.uint8:
        raise ValueError(f"Datum.data holds bytes: images must be uint8, got {images.dtype}")
    chw = images[:, None] if images.ndim == 3 else images
    if chw.ndim != 4:
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {images.shape}")
    labels = np.zeros(len(chw), dtype=np.int64) if labels is None else np.asarray(labels)
    if labels.shape != (len(chw),):
        raise ValueError(f"need one label per image: {len(chw)} images, labels of shape {labels.shape}")
    n, c, h, w = chw.shape
    env = lmdb.open(str(path), map_size=max(1 << 20, 4 * chw.nbytes))
    try:
        with env.begin(write=True) as txn:
            for i in range(n):
                datum = caffe_pb2.Datum(channels=c, height=h, width=w, data=chw[i].tobytes(), label=int(labels[i]))
                txn.put(f"{i:08d}".encode(), datum.SerializeToString())
    finally:
        env.close()
    return path
