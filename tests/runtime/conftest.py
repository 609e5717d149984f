"""Fixtures of the runtime tests: the deep tied autoencoder computed by real Caffe, as ONNX."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.runtime.encoder import extract_encoder_file
from tests.helpers import REFERENCE

DEEP = REFERENCE / "deep_tied_ae"


@pytest.fixture(scope="session")
def deep_blobs() -> dict[str, np.ndarray]:
    """Every blob of deep_tied_ae after Caffe's forward (16 MNIST images)."""
    with np.load(DEEP / "blobs.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def deep_ae_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deep_tied_ae (784-128-64-32-8, tied decoder) converted to ONNX with a dynamic batch."""
    path = tmp_path_factory.mktemp("deep") / "deep_tied_ae.onnx"
    convert_files(DEEP / "net.prototxt", DEEP / "weights.caffemodel").save(path)
    return path


@pytest.fixture(scope="session")
def deep_ae(deep_ae_path: Path) -> onnx.ModelProto:
    return onnx.load(str(deep_ae_path))


@pytest.fixture(scope="session")
def deep_encoder_path(deep_ae_path: Path) -> Path:
    """The encoder of deep_tied_ae, cut at its default code blob (encode4)."""
    path = deep_ae_path.with_name("deep_encoder.onnx")
    extract_encoder_file(deep_ae_path, path)
    return path
