"""Damaged or hostile model files get one line and exit 2 from every command that opens them.

One ONNX loading path (converter.onnx_io.load_onnx) checks the file once: a regular file, ONNX
that parses, initializers whose size matches their dims and type, the ONNX checker's verdict,
and caffeonnx's metadata (each key parsed and its schema checked).  Inputs that are not regular
files (a FIFO would block forever, /dev/zero would be read until memory runs out) are refused
before they are opened.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from caffeonnx.converter.caffe_to_onnx import convert_files

TIED = Path(__file__).parents[1] / "caffeonnx" / "examples" / "tied_ae"


def _cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "caffeonnx", *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def _one_line_error(proc: subprocess.CompletedProcess[str], *says: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    text = " ".join(lines)
    assert lines and lines[0].startswith("error:"), proc.stderr
    for s in says:
        assert s in text, (s, proc.stderr)


@pytest.fixture(scope="module")
def tied_onnx(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    net = TIED / "net.prototxt"
    weights = TIED / "weights.caffemodel"
    return convert_files(net, weights).to_proto()


def _with_meta(key: str, value: str) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        entry = next(p for p in model.metadata_props if p.key == key)
        entry.value = value
    return edit


def _truncate_raw(model: onnx.ModelProto) -> None:
    t = model.graph.initializer[0]
    if not t.HasField("raw_data"):
        arr = onnx.numpy_helper.to_array(t)
        t.CopyFrom(onnx.numpy_helper.from_array(arr, t.name))
    t.raw_data = t.raw_data[:-4]


def _bad_dtype(model: onnx.ModelProto) -> None:
    model.graph.initializer[0].data_type = 999


def _dangling_input(model: onnx.ModelProto) -> None:
    model.graph.node[0].input[0] = "no_such_value"


DAMAGE = {
    "net not prototxt": (_with_meta("caffe.net", "layer { name: "), "'caffe.net' is damaged"),
    "layers not json": (_with_meta("caffe.layers", "[{"), "'caffe.layers' is damaged"),
    "layers a dict": (_with_meta("caffe.layers", '{"name": "x"}'), "'caffe.layers' is damaged"),
    "layer field wrong type": (_with_meta("caffe.layers", '[{"name": 3, "type": "X", "bottoms": [], "tops": [], '
                                                          '"params": []}]'), "'caffe.layers' is damaged"),
    "layer position out of range": (_with_meta("caffe.layers", '[{"name": "x", "type": "X", "bottoms": [], "tops": '
                                                               '[], "params": [], "index": 99}]'), "position 99"),
    "params users wrong": (_with_meta("caffe.params", '[{"name": "encode1_matrix", "shape": [64, 784], "users": '
                                                      '[5]}]'), "'caffe.params' is damaged"),
    "params unknown initializer": (_with_meta("caffe.params", '[{"name": "nope", "shape": [1], "users": []}]'),
                                   "'nope' is not in the graph"),
    "phase not an enum": (_with_meta("caffe.phase", "SOMETIMES"), "'caffe.phase' is damaged"),
    "raw data truncated": (_truncate_raw, "bytes of raw_data"),
    "unknown data type": (_bad_dtype, "unknown data_type 999"),
    "checker": (_dangling_input, "the ONNX checker refuses this model"),
}


@pytest.mark.parametrize("command", ["inspect", "to-caffe", "encoder"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_onnx_is_one_line_and_writes_nothing(case: str, command: str, tied_onnx: onnx.ModelProto,
                                                     tmp_path: Path) -> None:
    damage, says = DAMAGE[case]
    model = onnx.ModelProto()
    model.CopyFrom(tied_onnx)
    damage(model)
    path = tmp_path / "damaged.onnx"
    path.write_bytes(model.SerializeToString())
    args = {"inspect": ["inspect", path], "to-caffe": ["to-caffe", path, "-o", tmp_path / "out.prototxt"],
            "encoder": ["encoder", path, "-o", tmp_path / "out.onnx"]}[command]
    _one_line_error(_cli(*args), str(path), says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.onnx"], "no output, no temp file"


def test_a_fifo_or_a_device_as_input_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "net.prototxt"
    os.mkfifo(fifo)
    _one_line_error(_cli("convert", fifo, "-o", tmp_path / "m.onnx"), "is a FIFO, not a regular file")
    _one_line_error(_cli("inspect", "/dev/zero"), "is a device, not a regular file")
    proto = TIED / "net.prototxt"
    _one_line_error(_cli("convert", proto, "/dev/zero", "-o", tmp_path / "m.onnx"), "caffemodel '/dev/zero' is a device")
    _one_line_error(_cli("to-caffe", fifo, "-o", tmp_path / "x.prototxt"), "is a FIFO")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.prototxt"]


def test_an_intact_model_still_opens(tied_onnx: onnx.ModelProto, tmp_path: Path) -> None:
    path = tmp_path / "ok.onnx"
    path.write_bytes(tied_onnx.SerializeToString())
    proc = _cli("inspect", path)
    assert proc.returncode == 0, proc.stderr
    foreign = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]))
    onnx.save(foreign, tmp_path / "foreign.onnx")
    assert _cli("inspect", tmp_path / "foreign.onnx").returncode == 0, "foreign ONNX has no caffeonnx metadata to check"


HUGE = {
    "num_output": ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 8 } } }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                   'inner_product_param { num_output: 4000000000 } }\n', "layer 'ip' (InnerProduct)"),
    "input dim": ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 100000 dim: 100000 '
                  'dim: 100000 } } }\n', "layer 'in' (Input)"),
    "pooled size": ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }\n'
                    'layer { name: "pool" type: "Pooling" bottom: "x" top: "y" pooling_param { pool: AVE '
                    'kernel_size: 2000000000 pad: 1999999999 stride: 1 } }\n', "layer 'pool' (Pooling)"),
    "filler memory": ('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 60000 } } }\n'
                      'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
                      'inner_product_param { num_output: 30000 } }\n'
                      'layer { name: "ip2" type: "InnerProduct" bottom: "y" top: "z" '
                      'inner_product_param { num_output: 60000 } }\n'
                      'layer { name: "ip3" type: "InnerProduct" bottom: "z" top: "w" '
                      'inner_product_param { num_output: 60000 } }\n'
                      'layer { name: "ip4" type: "InnerProduct" bottom: "w" top: "v" '
                      'inner_product_param { num_output: 60000 } }\n', "over half of this machine's memory"),
}


@pytest.mark.parametrize("case", list(HUGE))
def test_huge_sizes_are_refused_before_allocating(case: str, tmp_path: Path) -> None:
    text, says = HUGE[case]
    if case == "filler memory":
        from caffeonnx.converter import context

        if context._FILL_BUDGET > 24 * 2**30:  # the net fills ~36 GiB: only meaningful where that is over budget
            pytest.skip("this machine has memory for the whole net")
    proto = tmp_path / "net.prototxt"
    proto.write_text(text)
    proc = _cli("convert", proto, "-o", tmp_path / "m.onnx")
    _one_line_error(proc, says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.prototxt"]


def _npz_bytes(**arrays: object) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _bad_crc() -> bytes:
    import numpy as np

    data = bytearray(_npz_bytes(data=np.ones((2, 784), np.float32)))
    data[200] ^= 0xFF  # inside the stored array's bytes: the zip CRC no longer matches
    return bytes(data)


def _zip_bomb() -> bytes:
    """A deflated member whose .npy header claims 4 TB of float32 in a few kilobytes."""
    import io
    import zipfile

    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**7, 10**5)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data.npy", header.getvalue() + bytes(1 << 20))
    return buf.getvalue()


def _verify_inputs(kind: str) -> tuple[bytes, str]:
    import numpy as np

    good = np.load(TIED / "inputs.npz")["data"]
    return {
        "truncated": (_npz_bytes(data=good)[:300], "not a readable .npz file"),
        "bad crc": (_bad_crc(), "not a readable .npz file"),
        "complex": (_npz_bytes(data=good.astype(np.complex64)), "holds complex64 values"),
        "strings": (_npz_bytes(data=np.array(["a", "b"])), "holds <U1 values"),
        "wrong shape": (_npz_bytes(data=good.reshape(len(good), 28, 28)), "array 'data' has shape"),
        "wrong name": (_npz_bytes(pixels=good), "no array for graph input(s) ['data']"),
        "zip bomb": (_zip_bomb(), "array 'data' of shape [10000000, 100000] brings the inputs to 4,000,000,000,000 "
                                  "bytes, more than half this machine's memory"),
    }[kind]


@pytest.mark.parametrize("kind", ["truncated", "bad crc", "complex", "strings", "wrong shape", "wrong name",
                                  "zip bomb"])
def test_verify_refuses_bad_input_arrays_by_name(kind: str, tmp_path: Path) -> None:
    data, says = _verify_inputs(kind)
    bad = tmp_path / "inputs.npz"
    bad.write_bytes(data)
    proc = _cli("verify", TIED / "net.prototxt", TIED / "weights.caffemodel", "--inputs", bad,
                "--reference", TIED / "blobs.npz")
    _one_line_error(proc, says)


def _out_cases(tmp: Path) -> dict[str, tuple[str, str]]:
    (tmp / "adir").mkdir()
    (tmp / "afile").write_text("x")
    return {"empty": ("", "is a directory"),  # typer makes '' the path '.'
            "directory": (str(tmp / "adir"), "is a directory"),
            "under a file": (str(tmp / "afile" / "m.onnx"), "is a file, not a directory"),
            "the input itself": (str(TIED / "net.prototxt"), "is also")}


@pytest.mark.parametrize("case", ["empty", "directory", "under a file", "the input itself"])
def test_bad_output_targets_are_refused_before_any_work(case: str, tmp_path: Path) -> None:
    target, says = _out_cases(tmp_path)[case]
    before = (TIED / "net.prototxt").read_bytes()
    _one_line_error(_cli("convert", TIED / "net.prototxt", TIED / "weights.caffemodel", "-o", target), says)
    assert (TIED / "net.prototxt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]


def test_a_device_or_fifo_output_is_written_through_never_replaced(tmp_path: Path) -> None:
    import stat
    import threading

    proc = _cli("convert", TIED / "net.prototxt", TIED / "weights.caffemodel", "-o", "/dev/null")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "/dev/null is still the device"
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    proc = _cli("encoder", _tied_model(tmp_path), "-o", fifo)
    reader.join(timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO is still a FIFO"
    assert onnx.load_from_string(got[0]).graph.node, "the encoder came through the FIFO"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.fifo"]


def _tied_model(where: Path) -> Path:
    path = where / "m.onnx"
    path.write_bytes(convert_files(TIED / "net.prototxt", TIED / "weights.caffemodel").to_proto().SerializeToString())
    return path


def test_to_caffe_refuses_the_same_file_for_both_outputs(tied_onnx: onnx.ModelProto, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(tied_onnx.SerializeToString())
    _one_line_error(_cli("to-caffe", path, "-o", tmp_path / "x", "--weights", tmp_path / "x"), "is also")
    _one_line_error(_cli("to-caffe", path, "-o", path), "is also")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
