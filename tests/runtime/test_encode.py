"""Streaming batch encoding: every input format, batch sizes, atomic output, bounded memory, CLI."""
from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.errors import CaffeOnnxError, InputFileError, TensorError
from caffeonnx.runtime.encode import encode_file
from caffeonnx.runtime.inputs import open_samples
from caffeonnx.runtime.session import EncoderSession, SessionConfig, cuda_available
from tests.helpers import assert_close, rng


def _idx(array: np.ndarray, code: int) -> bytes:
    """IDX bytes as in the MNIST files: magic, big-endian dims, big-endian data."""
    dtype = {0x08: ">u1", 0x0D: ">f4"}[code]
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(dtype).tobytes()


def _savez(path: Path, save, **arrays: np.ndarray) -> Path:
    with open(path, "wb") as fh:  # a file object: numpy would append .npz to the name
        save(fh, **arrays)
    return path


def _write(fmt: str, data: np.ndarray, path: Path) -> Path:
    """Write Caffe's 16 input images in format `fmt`; returns the file."""
    pixels = np.rint(data * 255).astype(np.uint8).reshape(-1, 28, 28)
    if fmt == "npy":
        np.save(path, data)
    elif fmt == "npz":
        _savez(path, np.savez, data=data)
    elif fmt == "npz-deflated":
        _savez(path, np.savez_compressed, data=data)
    elif fmt == "npz-key":
        _savez(path, np.savez, labels=np.arange(16), images=data)
    elif fmt == "npy.gz":
        tmp = path.parent / "raw.npy"
        np.save(tmp, data)
        path.write_bytes(gzip.compress(tmp.read_bytes()))
    elif fmt == "idx-ubyte":
        path.write_bytes(_idx(pixels, 0x08))
    elif fmt == "idx-ubyte.gz":
        path.write_bytes(gzip.compress(_idx(pixels, 0x08)))
    elif fmt == "idx-float":
        path.write_bytes(_idx(data, 0x0D))
    return path


FORMATS = ["npy", "npz", "npz-deflated", "npz-key", "npy.gz", "idx-ubyte", "idx-ubyte.gz", "idx-float"]


@pytest.fixture(scope="module")
def cpu_session(deep_encoder_path: Path) -> EncoderSession:
    return EncoderSession(deep_encoder_path, SessionConfig(device="cpu", intra_threads=1))


@pytest.mark.parametrize("batch_size", [1, 5, 16, 100])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_encodes_to_caffes_codes(cpu_session: EncoderSession, deep_blobs: dict, tmp_path: Path,
                                              fmt: str, batch_size: int) -> None:
    src = _write(fmt, deep_blobs["data"], tmp_path / f"in.{fmt}")
    seen: list[tuple[int, int]] = []
    result = encode_file(cpu_session, src, tmp_path / "codes.npy", batch_size,
                         key="images" if fmt == "npz-key" else None, progress=lambda d, t: seen.append((d, t)))
    assert result.samples == 16 and result.code_shape == (8,)
    assert result.scale == (1 / 255 if fmt.startswith("idx-ubyte") else 1.0)
    assert seen[-1] == (16, 16) and len(seen) == -(-16 // batch_size)
    # uint8 pixels round Caffe's float inputs to 1/255 steps: within 1/510 per pixel, codes within 2e-4
    tol = 2e-4 if fmt.startswith("idx-ubyte") else 1e-5
    assert_close(np.load(tmp_path / "codes.npy"), deep_blobs["encode4"], f"encode4 from {fmt}", atol=tol)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "codes.npy"] + (
        ["raw.npy"] if fmt == "npy.gz" else [])), "scratch and temporary files must be removed"


@pytest.mark.parametrize("fmt", ["npy", "npz", "idx-ubyte", "idx-ubyte.gz", "npz-deflated"])
def test_inputs_are_memory_mapped(deep_blobs: dict, tmp_path: Path, fmt: str) -> None:
    src = _write(fmt, deep_blobs["data"], tmp_path / f"in.{fmt}")
    with open_samples(src) as samples:
        assert isinstance(samples, np.memmap), f"{fmt} was read into memory ({type(samples).__name__})"
        assert samples.shape[0] == 16


@pytest.mark.parametrize("make, message", [
    (lambda p: p, r"does not exist"),
    (lambda p: (p.write_bytes(b"hello world, no array here"), p)[1], r"not an \.npy, \.npz or IDX file"),
    (lambda p: _savez(p, np.savez, a=np.zeros(3), b=np.zeros(3)), r"holds arrays \['a', 'b'\]; choose one with --key"),
    (lambda p: (p.write_bytes(_idx(np.zeros((4, 28, 28), np.uint8), 0x08)[:-100]), p)[1],
     r"IDX header says shape \[4, 28, 28\] \(3152 bytes\) but the file has 3052 bytes"),
    (lambda p: (p.write_bytes(gzip.compress(b"x" * 5000)[:-20]), p)[1], r"cannot decompress"),
])
def test_bad_input_files_are_input_errors(tmp_path: Path, make, message: str) -> None:
    src = make(tmp_path / "in.bin")
    with pytest.raises(InputFileError, match=message), open_samples(src):
        pass


def test_sample_shape_mismatch_names_file_and_shapes(cpu_session: EncoderSession, tmp_path: Path) -> None:
    src = tmp_path / "small.npy"
    np.save(src, np.zeros((3, 10, 10), np.float32))
    with pytest.raises(TensorError, match=r"samples of shape \(10, 10\) \(100 values\) do not fit input 'data'.*"
                                          r"\[784\] \(784 values\)"):
        encode_file(cpu_session, src, tmp_path / "codes.npy")
    assert not (tmp_path / "codes.npy").exists()


def test_interrupted_encode_leaves_the_old_output_untouched(cpu_session: EncoderSession, deep_blobs: dict,
                                                           tmp_path: Path) -> None:
    src = _write("npy", deep_blobs["data"], tmp_path / "in.npy")
    target = tmp_path / "codes.npy"
    target.write_bytes(b"previous result")

    def interrupt(done: int, total: int) -> None:
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_file(cpu_session, src, target, batch_size=4, progress=interrupt)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy", "in.npy"]


def test_bad_batch_size_is_refused(cpu_session: EncoderSession, deep_blobs: dict, tmp_path: Path) -> None:
    with pytest.raises(CaffeOnnxError, match="--batch-size must be positive, got 0"):
        encode_file(cpu_session, _write("npy", deep_blobs["data"], tmp_path / "in.npy"), tmp_path / "c.npy", 0)


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_streaming_keeps_anonymous_memory_bounded(cpu_session: EncoderSession, tmp_path: Path) -> None:
    n = 40_000  # 125 MB of float32 input, 1.3 MB of codes
    src = tmp_path / "big.npy"
    mm = np.lib.format.open_memmap(src, mode="w+", dtype=np.float32, shape=(n, 784))
    for start in range(0, n, 5000):
        mm[start:start + 5000] = rng(start).random((5000, 784), dtype=np.float32)
    del mm
    base = _rss_anon_kib()
    peak = [base]
    encode_file(cpu_session, src, tmp_path / "codes.npy", batch_size=1000,
                progress=lambda d, t: peak.append(_rss_anon_kib()))
    growth_mb = (max(peak) - base) / 1024
    # one 1000-row batch is 3 MB in, 32 KB out; the whole input would be 125 MB
    assert growth_mb < 40, f"anonymous memory grew by {growth_mb:.1f} MB while streaming a 125 MB input"
    codes = np.load(tmp_path / "codes.npy", mmap_mode="r")
    check = np.load(src, mmap_mode="r")[n - 3:]
    assert_close(codes[n - 3:], cpu_session.run(np.array(check)), "last codes")


def test_cli_encoder_then_encode(deep_ae_path: Path, deep_blobs: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    enc = tmp_path / "enc.onnx"
    res = runner.invoke(app, ["encoder", str(deep_ae_path), "-o", str(enc)])
    assert res.exit_code == 0, res.output
    assert "code blob 'encode4' (8 values per sample; narrowest on the path to 'decode1neuron')" in res.output
    src = _write("idx-ubyte.gz", deep_blobs["data"], tmp_path / "t10k-images-idx3-ubyte.gz")
    res = runner.invoke(app, ["encode", str(enc), str(src), "-o", str(tmp_path / "codes.npy"), "--batch-size", "6",
                              "--device", "cpu", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "16 codes of shape [8] (inputs scaled by 0.00392157)" in res.output
    assert_close(np.load(tmp_path / "codes.npy"), deep_blobs["encode4"], "encode4 via CLI", atol=2e-4)


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "caffeonnx.cli", "encoder", str(tmp_path / "nope.onnx"), "-o",
                           str(tmp_path / "e.onnx")], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: ONNX model") and "does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.skipif(cuda_available(), reason="CUDA starts here: the flags are accepted")
@pytest.mark.parametrize("flag", ["--fp16", "--tf32", "--cuda-graph"])
def test_cuda_only_flags_are_refused_on_cpu(tmp_path: Path, deep_encoder_path: Path, flag: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 784), np.float32))
    proc = subprocess.run([sys.executable, "-m", "caffeonnx.cli", "encode", str(deep_encoder_path),
                           str(tmp_path / "x.npy"), "-o", str(tmp_path / "codes.npy"), flag],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "CUDA" in proc.stderr and flag in proc.stderr, proc.stderr
    assert not (tmp_path / "codes.npy").exists()
