"""`caffeonnx encode` on hostile inputs and under signals: one `error:` line, never a traceback or a leftover file.

Array headers that lie (negative, overflowing, too many dims) and values that are not real numbers are refused before
anything is mapped; SIGTERM removes the temporary output and scratch files as Ctrl-C does; what a SIGKILL leaves is
removed by the next encode into the same directory, unless a live process holds it.
"""
from __future__ import annotations

import gzip
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from caffeonnx.cli import main
from caffeonnx.errors import InputFileError
from caffeonnx.runtime.encode import encode_file, remove_stale_temps
from caffeonnx.runtime.inputs import process_start_time
from caffeonnx.runtime.session import EncoderSession, SessionConfig


def npy_bytes(header: str, data: bytes = b"\0" * 64) -> bytes:
    """A version 1.0 .npy with a hand-written header dict (padded as numpy pads it)."""
    text = header.encode("latin1")
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def npz_bytes(member: bytes, compression: int) -> bytes:
    """An .npz holding `member` as data.npy, stored or deflated."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        zf.writestr("data.npy", member)
    return buf.getvalue()


def npy_of(array: np.ndarray) -> bytes:
    """np.save's bytes of `array` (object arrays pickled, as numpy writes them)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def idx_bytes(code: int, dims: list[int], data: bytes = b"\0" * 16) -> bytes:
    """An IDX file: magic, type code, rank, big-endian dims, data."""
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data


LIES = {
    "negative dim": ("(-16, 784)", "shape [-16, 784]; dimensions must be >= 0"),
    "overflowing dims": ("(4611686018427387904, 4611686018427387904)", "bytes) but the file holds 64 bytes of data"),
    "255 dims": ("(" + "1, " * 255 + ")", "declares 255 dimensions; at most 32 are supported"),
}
CONTAINERS = {
    "npy": lambda b: b,
    "npz stored": lambda b: npz_bytes(b, zipfile.ZIP_STORED),
    "npz deflated": lambda b: npz_bytes(b, zipfile.ZIP_DEFLATED),
    "npy.gz": gzip.compress,
}
HOSTILE = [(f"{c}, {lie}", wrap(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % shape)), says)
           for lie, (shape, says) in LIES.items() for c, wrap in CONTAINERS.items()]
HOSTILE += [
    ("IDX 255 dims", idx_bytes(0x08, [1] * 255), "declares 255 dimensions"),
    ("IDX overflowing dims", idx_bytes(0x0E, [0xFFFFFFFF] * 4), "IDX header says shape [4294967295, 4294967295"),
]
NOT_REAL = {
    "complex": (np.ones((4, 784), np.complex64), "complex numbers, whose imaginary part would be dropped"),
    "datetime": (np.zeros((4, 784), "M8[s]"), "datetimes"),
    "timedelta": (np.zeros((4, 784), "m8[s]"), "time deltas"),
    "structured": (np.zeros((4, 784), [("a", "f4"), ("b", "f4")]), "structured records"),
    "string": (np.zeros((4, 784), "U3"), "text"),
    "bytes": (np.zeros((4, 784), "S3"), "byte strings"),
    "object": (np.zeros((4, 784), object), "Python objects"),
    "void": (np.zeros((4, 784), "V4"), "raw records"),
}
HOSTILE += [(f"{c}, {kind}", wrap(npy_of(arr)), says) for kind, (arr, says) in NOT_REAL.items()
            for c, wrap in list(CONTAINERS.items())[:3]]


@pytest.fixture(scope="module")
def session(deep_encoder_path: Path) -> EncoderSession:
    """The deep_tied_ae encoder (784 -> 8) on the CPU."""
    return EncoderSession(deep_encoder_path, SessionConfig(device="cpu"))


@pytest.mark.parametrize(("what", "data", "says"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_lying_headers_and_unreal_values_are_input_errors(tmp_path: Path, session: EncoderSession, what: str,
                                                          data: bytes, says: str) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    with pytest.raises(InputFileError) as info:
        encode_file(session, src, tmp_path / "out" / "codes.npy", batch_size=4)
    assert says in str(info.value) and str(src) in str(info.value), f"{what}: {info.value}"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["in.bin", "out"], f"{what}: files left behind"


@pytest.mark.parametrize("kind", ["complex", "255 dims"])
def test_cli_says_one_line_and_exits_2(tmp_path: Path, deep_encoder_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], kind: str) -> None:
    src = tmp_path / "in.npy"
    src.write_bytes(npy_of(NOT_REAL["complex"][0]) if kind == "complex" else
                    npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (" + "1, " * 255 + "), }"))
    monkeypatch.setattr(sys, "argv", ["caffeonnx", "encode", str(deep_encoder_path), str(src), "-o",
                                      str(tmp_path / "codes.npy"), "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("running on")]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and not (tmp_path / "codes.npy").exists()


def test_bool_and_float16_samples_are_real_numbers(tmp_path: Path, session: EncoderSession) -> None:
    for dtype in (bool, np.float16):
        src = tmp_path / f"{np.dtype(dtype).name}.npy"
        np.save(src, np.ones((3, 784), dtype))
        assert encode_file(session, src, tmp_path / "c.npy", batch_size=2).samples == 3


def start_encode(model: Path, src: Path, out: Path) -> subprocess.Popen[str]:
    """A real `caffeonnx encode` process, one sample per run so it lasts a few seconds."""
    cmd = [sys.executable, "-m", "caffeonnx.cli", "encode", str(model), str(src), "-o", str(out), "--batch-size", "1",
           "--device", "cpu"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftovers(folder: Path) -> list[str]:
    """Hidden files in `folder`: temporary outputs and scratch files."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def wait_for_temp_output(folder: Path, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Wait until the process is writing its temporary output (its scratch file is made before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(name.endswith(".tmp") for name in leftovers(folder)):
            return
        assert proc.poll() is None, f"encode ended early: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError("no temporary output appeared")


@pytest.fixture()
def long_input(tmp_path: Path) -> Path:
    """100,000 gzipped samples: inflated to a scratch .npy beside the output, then encoded one per run."""
    src = tmp_path / "in" / "samples.npy.gz"
    src.parent.mkdir()
    src.write_bytes(gzip.compress(npy_of(np.zeros((100_000, 784), np.uint8)), 1))
    return src


def test_sigterm_removes_the_temporary_output_and_scratch(tmp_path: Path, deep_encoder_path: Path,
                                                          long_input: Path) -> None:
    out = tmp_path / "out" / "codes.npy"
    out.parent.mkdir()
    proc = start_encode(deep_encoder_path, long_input, out)
    wait_for_temp_output(out.parent, proc)
    assert any(name.endswith(".raw") for name in leftovers(out.parent)), "the scratch file is in use"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert leftovers(out.parent) == [] and not out.exists()


def test_sigkill_leftovers_are_removed_by_the_next_encode(tmp_path: Path, deep_encoder_path: Path, long_input: Path,
                                                          session: EncoderSession) -> None:
    out = tmp_path / "out" / "codes.npy"
    out.parent.mkdir()
    proc = start_encode(deep_encoder_path, long_input, out)
    wait_for_temp_output(out.parent, proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = [out.parent / name for name in leftovers(out.parent)]
    assert {p.suffix for p in left} == {".tmp", ".raw"}, left
    old = process_start_time() - 60  # a killed run's files are older than the next process (here: pytest)
    for p in left:
        os.utime(p, (old, old))
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((5, 784), np.float32))
    result = encode_file(session, small, out, batch_size=5)
    assert sorted(result.stale_removed) == sorted(left)
    assert leftovers(out.parent) == [] and np.load(out).shape == (5, 8)


def test_a_live_runs_files_are_not_removed(tmp_path: Path) -> None:
    """An aged temporary that another process holds locked is in use: left alone."""
    target = tmp_path / "codes.npy"
    busy, stale = tmp_path / ".codes.npy.abcd1234.tmp", tmp_path / ".caffeonnx-zyxw9876.raw"
    old = process_start_time() - 60
    for p in (busy, stale):
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert remove_stale_temps(target) == (stale,)
        assert busy.exists() and not stale.exists()
    finally:
        holder.kill()
        holder.communicate()
