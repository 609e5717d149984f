"""Bad input never gets a traceback or leaves a file behind.

Every case runs the real CLI in a subprocess (`python -m caffeonnx.cli convert ...`) and
checks: exit code 2, exactly one `error:` line on stderr naming the problem, nothing on
stdout, and an output directory that is still empty (no -o file, no leftover temp file).
The same inputs through the Python API raise the documented CaffeOnnxError subclass.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter.caffe_io import parse_prototxt, read_caffemodel, write_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.errors import (
    CaffeOnnxError,
    InputFileError,
    PrototxtError,
    SharedParamError,
    UnsupportedError,
    WeightsError,
)
from tests.helpers import REFERENCE, rng

TIED = REFERENCE / "tied_ae"
MALFORMED = {  # prototxt text -> (line, column) protobuf reports, and the reason it gives
    "bad_int": (
        (
            'name: "bad"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 20 } } }\n'
            'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
            "  inner_product_param { num_output: ten } }\n"
        ),
        (4, 37), "Couldn't parse integer: ten",
    ),
    "unknown_field": ('name: "x"\nlayerz { }\n', (2, 1), 'has no field named "layerz"'),
    "unquoted_string": ('name: "x"\nlayer { name: "a" type: Input }\n', (2, 25), "Expected string"),
    "unclosed_brace": ('name: "x"\nlayer { name: "a"\n  type: "Input"\n', (3, 9), 'Expected "}"'),
}
UNSUPPORTED_NET = """
name: "odd"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 8 } } }
layer { name: "f1" type: "FancyNorm" bottom: "data" top: "f1" }
layer { name: "w" type: "Warp" bottom: "f1" top: "w" }
layer { name: "f2" type: "FancyNorm" bottom: "w" top: "f2" }
"""
PERMISSIVE_COUNT_NET = """
name: "permissive_count"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 20 } } }
layer { name: "enc" type: "InnerProduct" bottom: "data" top: "enc" param { name: "W" }
  inner_product_param { num_output: 10 bias_term: false } }
layer { name: "dec" type: "InnerProduct" bottom: "data" top: "dec" param { name: "W" share_mode: PERMISSIVE }
  inner_product_param { num_output: 5 bias_term: false } }
"""


def _caffe_wording(case: str) -> str:
    """The message real Caffe aborted with (error.txt), from the words after its failed condition."""
    line = (REFERENCE / case / "error.txt").read_text().strip()
    match = re.search(r"(Shared param .*|Cannot share param .*)$", line)
    assert match, f"{case}/error.txt: no Caffe message in {line!r}"
    return match.group(1)


def _tied_blobs() -> dict[str, list[np.ndarray]]:
    """The tied autoencoder's own blobs, per layer, as Caffe stored them."""
    stored = read_caffemodel(TIED / "weights.caffemodel").blobs
    return {name: [np.array(b.data) for b in blobs] for name, blobs in stored.items()}


def _tied_with(d: Path, **layer_blobs: list[np.ndarray]) -> tuple[Path, Path]:
    """The tied AE prototxt with a caffemodel whose named layers carry other blobs."""
    blobs = {**_tied_blobs(), **layer_blobs}
    model = d / "weights.caffemodel"
    write_caffemodel(model, parse_prototxt((TIED / "net.prototxt").read_text()), blobs)
    return TIED / "net.prototxt", model


def _head(path: Path, size: int) -> bytes:
    """The first `size` bytes of a file (a caffemodel cut short, as by an interrupted download)."""
    return path.read_bytes()[:size]


def _write(d: Path, name: str, data: bytes | str) -> Path:
    path = d / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@dataclass(frozen=True)
class Case:
    """Inputs to build in a fresh folder, the API's error type and what its message must say."""

    build: Callable[[Path], tuple[Path, Path | None]]  # -> (prototxt, caffemodel)
    error: type[CaffeOnnxError]
    says: tuple[str, ...]  # each must be in the message; "{prototxt}"/"{caffemodel}" are filled in


CASES: dict[str, Case] = {
    "truncated_caffemodel": Case(
        lambda d: (TIED / "net.prototxt", _write(d, "w.caffemodel", _head(TIED / "weights.caffemodel", 70_000))),
        InputFileError, ("{caffemodel}: truncated or corrupt caffemodel", "re-download or re-export"),
    ),
    "empty_caffemodel": Case(
        lambda d: (TIED / "net.prototxt", _write(d, "w.caffemodel", b"")),
        InputFileError, ("{caffemodel}: empty caffemodel (0 bytes)",),
    ),
    "random_bytes_caffemodel": Case(
        lambda d: (TIED / "net.prototxt", _write(d, "w.caffemodel", rng(2).bytes(4096))),
        InputFileError, ("{caffemodel}: truncated or corrupt caffemodel",),
    ),
    "random_bytes_prototxt": Case(
        lambda d: (_write(d, "net.prototxt", rng(7).bytes(4096)), None),
        PrototxtError, ("{prototxt}: not a text prototxt",),
    ),
    "prototxt_as_caffemodel": Case(
        lambda d: (TIED / "net.prototxt", TIED / "net.prototxt"),
        InputFileError,
        ("{caffemodel}: this is a text file, not a binary caffemodel", "prototxt where the caffemodel goes"),
    ),
    "caffemodel_as_prototxt": Case(
        lambda d: (TIED / "weights.caffemodel", None),
        PrototxtError, ("{prototxt}: not a text prototxt", "caffemodel where the prototxt goes"),
    ),
    **{
        f"malformed_prototxt_{name}": Case(
            lambda d, text=text: (_write(d, "net.prototxt", text), None),
            PrototxtError, (f"{{prototxt}}:{line}:{col}: ", reason),
        )
        for name, (text, (line, col), reason) in MALFORMED.items()
    },
    "caffemodel_of_another_net": Case(
        lambda d: (TIED / "net.prototxt", REFERENCE / "siamese_shared" / "weights.caffemodel"),
        WeightsError, ("{caffemodel}: no weights for layer(s) 'encode1', 'decode1'", "--init-missing"),
    ),
    "wrong_blob_shape": Case(
        lambda d: _tied_with(d, encode1=[np.zeros((32, 784), np.float32), np.zeros(64, np.float32)]),
        WeightsError, (
            (
                "{caffemodel}: Cannot copy param 0 weights from layer 'encode1'; shape mismatch.  Source param shape "
                "is 32 784 (25088); target param shape is 64 784 (50176)"
            ),
        ),
    ),
    "too_few_blobs": Case(
        lambda d: _tied_with(d, encode1=[_tied_blobs()["encode1"][0]]),
        WeightsError, ("{caffemodel}: layer 'encode1' has 1 blob(s)", "Incompatible number of blobs for layer encode1"),
    ),
    "too_many_blobs": Case(
        lambda d: _tied_with(d, encode1=[*_tied_blobs()["encode1"], np.zeros(3, np.float32)]),
        WeightsError, ("{caffemodel}: Incompatible number of blobs for layer encode1: the caffemodel has 3",),
    ),
    "unsupported_layer_types": Case(
        lambda d: (_write(d, "net.prototxt", UNSUPPORTED_NET), None),
        UnsupportedError, (
            "{prototxt}: 3 layer(s) of unsupported type: FancyNorm (2: 'f1', 'f2'); Warp (1: 'w')",
            "caffeonnx layers",
        ),
    ),
    "missing_prototxt": Case(
        lambda d: (d / "absent.prototxt", None),
        InputFileError, ("prototxt '{prototxt}' does not exist",),
    ),
    "missing_caffemodel": Case(
        lambda d: (TIED / "net.prototxt", d / "absent.caffemodel"),
        InputFileError, ("caffemodel '{caffemodel}' does not exist",),
    ),
    "directory_as_caffemodel": Case(
        lambda d: (TIED / "net.prototxt", d),
        InputFileError, ("caffemodel '{caffemodel}' is a directory",),
    ),
    "caffe_shared_lr_mismatch": Case(
        lambda d: (REFERENCE / "shared_lr_mismatch" / "net.prototxt", None),
        SharedParamError, ("{prototxt}: layer 'ip1_b'", _caffe_wording("shared_lr_mismatch"), "(10 vs. 1)"),
    ),
    "caffe_shared_shape_mismatch": Case(
        lambda d: (REFERENCE / "shared_shape_mismatch" / "net.prototxt", None),
        SharedParamError, ("{prototxt}: layer 'dec'", _caffe_wording("shared_shape_mismatch"), "transpose: true"),
    ),
    "permissive_count_mismatch": Case(
        lambda d: (_write(d, "net.prototxt", PERMISSIVE_COUNT_NET), None),
        SharedParamError, (
            (
                "Cannot share param 'W' owned by layer 'enc' with layer 'dec'; count mismatch.  Owner layer param "
                "shape is 10 20 (200); sharing layer expects shape 5 20 (100)"
            ),
        ),
    ),
    "differing_shared_copies": Case(
        lambda d: _tied_with(d, decode1=[_tied_blobs()["decode1"][0] * 2, _tied_blobs()["decode1"][1]]),
        WeightsError,
        ("{caffemodel}: shared param 'encode1_matrix' differs between layer 'encode1' and layer 'decode1'",),
    ),
}


def _run_cli(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "caffeonnx.cli", *map(str, args)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], out_dir: Path, says: tuple[str, ...]) -> None:
    """Exit 2, one `error:` line containing every fragment, nothing on stdout, nothing written."""
    where = f"stdout={proc.stdout!r} stderr={proc.stderr!r}"
    assert proc.returncode == 2, f"exit code {proc.returncode}; {where}"
    assert "Traceback" not in proc.stderr, where
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"want one 'error:' line; {where}"
    for fragment in says:
        assert fragment in lines[0], f"missing {fragment!r}; {where}"
    assert proc.stdout == "", where
    assert sorted(os.listdir(out_dir)) == [], f"files left in the output folder: {os.listdir(out_dir)}"


def _fill(says: tuple[str, ...], prototxt: Path, caffemodel: Path | None) -> tuple[str, ...]:
    return tuple(s.replace("{prototxt}", str(prototxt)).replace("{caffemodel}", str(caffemodel)) for s in says)


@pytest.mark.parametrize("name", list(CASES))
def test_cli_bad_input_one_line_no_output(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out_dir.mkdir()
    prototxt, caffemodel = case.build(inputs)
    output = out_dir / "model.onnx"
    proc = _run_cli("convert", prototxt, *([caffemodel] if caffemodel else []), "-o", output)
    _assert_one_line_error(proc, out_dir, _fill(case.says, prototxt, caffemodel))
    assert not output.exists()


@pytest.mark.parametrize("name", list(CASES))
def test_api_raises_the_documented_error(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    prototxt, caffemodel = case.build(tmp_path)
    with pytest.raises(case.error) as info:
        convert_files(prototxt, caffemodel)
    for fragment in _fill(case.says, prototxt, caffemodel):
        assert fragment in str(info.value), f"{name}: {fragment!r} not in {str(info.value)!r}"


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--batch", "abc", "--batch must be a positive integer, got 'abc'"),
        ("--batch", "0", "--batch must be a positive integer, got '0'"),
        ("--batch", "-4", "--batch must be a positive integer, got '-4'"),
        ("--batch", "2.5", "--batch must be a positive integer, got '2.5'"),
        ("--input-shape", "data", "--input-shape expects NAME=D0,D1,..., got 'data'"),
        ("--input-shape", "data=", "--input-shape expects NAME=D0,D1,..., got 'data='"),
        ("--input-shape", "=16,784", "--input-shape expects NAME=D0,D1,..., got '=16,784'"),
        ("--input-shape", "data=a,784", "--input-shape expects NAME=D0,D1,..., got 'data=a,784'"),
        ("--input-shape", "data=0,784", "--input-shape dimensions must be positive integers, got 'data=0,784'"),
        ("--input-shape", "data=-1,784", "--input-shape dimensions must be positive integers, got 'data=-1,784'"),
        (
            "--input-shape",
            "image=1,784",
            "an input shape was given for 'image', which no data layer produces; the net's inputs are: 'data'",
        ),
        ("--phase", "VALIDATE", "--phase must be TEST or TRAIN, got 'VALIDATE'"),
    ],
)
def test_cli_bad_option_values(option: str, value: str, says: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _run_cli(
        "convert", TIED / "net.prototxt", TIED / "weights.caffemodel", "-o", out_dir / "m.onnx", f"{option}={value}"
    )
    _assert_one_line_error(proc, out_dir, (says,))


def test_api_unknown_input_shape_name() -> None:
    with pytest.raises(CaffeOnnxError, match="an input shape was given for 'image', which no data layer produces"):
        convert_files(TIED / "net.prototxt", None, ConvertOptions(input_shapes={"image": (1, 784)}))


def test_control_the_same_command_succeeds(tmp_path: Path) -> None:
    """The harness can pass: good inputs write the file (and only it), with and without weights."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for weights in ([TIED / "weights.caffemodel"], []):
        proc = _run_cli("convert", TIED / "net.prototxt", *weights, "-o", out_dir / "m.onnx", "--batch", "3")
        assert proc.returncode == 0, proc.stderr
        assert os.listdir(out_dir) == ["m.onnx"]


def test_failed_convert_keeps_an_existing_output(tmp_path: Path) -> None:
    """An error never replaces (or truncates) a file already at the -o path."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "m.onnx"
    output.write_bytes(b"previous model")
    proc = _run_cli("convert", TIED / "net.prototxt", TIED / "net.prototxt", "-o", output)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert output.read_bytes() == b"previous model" and os.listdir(out_dir) == ["m.onnx"]
