"""The chain a user runs, through the real commands: the tie survives every step.

Caffe tied AE (bundled net.prototxt + weights.caffemodel) --convert--> converted.onnx
--train (bundled Caffe solver, 300 MNIST images)--> trained.onnx + trained.caffemodel
--to-caffe--> deploy.prototxt + deploy.caffemodel --convert--> roundtrip.onnx;
trained.onnx --encoder--> encoder.onnx --serve (a child process)--> codes over HTTP.

Every ONNX written holds the 64x784 matrix as exactly one initializer read by each layer
that uses it; every prototxt (and caffemodel) written names it as one shared param; the
served codes equal onnxruntime's value of the trained model's code blob, computed here.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.converter.caffe_io import read_caffemodel, read_prototxt
from caffeonnx.proto import caffe_pb2
from caffeonnx.runtime.child import serve_in_child
from caffeonnx.runtime.inputs import open_samples
from tests.helpers import assert_close, rng

ROOT = Path(__file__).parents[1]
TIED_AE = ROOT / "caffeonnx" / "examples" / "tied_ae"
MNIST = ROOT / "caffeonnx" / "examples" / "mnist_subset"
SHARED, SHAPE = "encode1_matrix", (64, 784)
ITERS = 30
MODEL = "tied_encoder"


def images(name: str, n: int) -> np.ndarray:
    """The first `n` bundled MNIST images as float32 rows scaled by 1/255."""
    with open_samples(MNIST / name, scratch_dir=None) as raw:
        return np.array(raw[:n]).reshape(n, -1).astype(np.float32) * np.float32(1 / 255)


def cli(*args: str | Path) -> str:
    """Run one `caffeonnx` command in-process; its output (fails on a non-zero exit)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"caffeonnx {' '.join(map(str, args))}: exit {result.exit_code}\n{result.output}" \
                                  f"{result.exception!r}"
    return result.output


@dataclass
class Chain:
    """The files the chain wrote."""

    dir: Path
    test_x: np.ndarray


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    d = tmp_path_factory.mktemp("chain")
    np.savez(d / "train.npz", data=images("train-images-idx3-ubyte.gz", 300))
    cli("convert", TIED_AE / "net.prototxt", TIED_AE / "weights.caffemodel", "-o", d / "converted.onnx")
    cli("train", TIED_AE / "solver.prototxt", "--weights", d / "converted.onnx", "--data", d / "train.npz",
        "--max-iter", ITERS, "-o", d / "trained", "--device", "cpu", "-q")
    cli("to-caffe", d / "trained.onnx", "-o", d / "deploy.prototxt", "--weights", d / "deploy.caffemodel")
    cli("convert", d / "deploy.prototxt", d / "deploy.caffemodel", "-o", d / "roundtrip.onnx")
    cli("encoder", d / "trained.onnx", "-o", d / "encoder.onnx")
    return Chain(d, images("t10k-images-idx3-ubyte.gz", 64))


def shared_matrix(model: onnx.ModelProto) -> onnx.TensorProto:
    """The one initializer holding 64x784 values (fails when there are none or several)."""
    found = [t for t in model.graph.initializer if int(np.prod(t.dims)) == int(np.prod(SHAPE))]
    assert len(found) == 1, (f"{len(found)} initializers hold {int(np.prod(SHAPE))} values "
                             f"({[(t.name, list(t.dims)) for t in found]}); the tie must be one initializer")
    return found[0]


@pytest.mark.parametrize(("file", "readers"), [
    ("converted.onnx", ["decode1", "encode1"]),
    ("trained.onnx", ["decode1", "encode1"]),
    ("roundtrip.onnx", ["decode1", "encode1"]),
    ("encoder.onnx", ["encode1"]),
])
def test_every_onnx_written_holds_the_shared_matrix_once(chain: Chain, file: str, readers: list[str]) -> None:
    model = onnx.load(str(chain.dir / file))
    matrix = shared_matrix(model)
    assert (matrix.name, tuple(matrix.dims)) == (SHARED, SHAPE), f"{file}: {matrix.name!r} {list(matrix.dims)}"
    reading = sorted(o for n in model.graph.node if matrix.name in n.input for o in n.output)
    assert reading == readers, f"{file}: {matrix.name!r} is read by the nodes making {reading}, expected {readers}"


def test_training_changed_the_matrix_and_every_copy_agrees(chain: Chain) -> None:
    def onnx_matrix(file: str) -> np.ndarray:
        return numpy_helper.to_array(shared_matrix(onnx.load(str(chain.dir / file))))

    before, trained = onnx_matrix("converted.onnx"), onnx_matrix("trained.onnx")
    assert np.abs(trained - before).max() > 1e-3, f"{ITERS} SGD iterations left {SHARED} unchanged"
    for file in ("roundtrip.onnx", "encoder.onnx"):
        assert np.array_equal(onnx_matrix(file), trained), f"{file}: {SHARED} differs from trained.onnx's"
    for caffemodel in ("trained.caffemodel", "deploy.caffemodel"):
        blobs = read_caffemodel(chain.dir / caffemodel).blobs
        for layer in ("encode1", "decode1"):  # Caffe stores a shared blob once per layer that uses it
            got = blobs[layer][0].data
            assert got.shape == SHAPE and np.array_equal(got, trained), (
                f"{caffemodel}: {layer} blob 0 {list(got.shape)} differs from trained.onnx's {SHARED}")


def _shared_names(net: caffe_pb2.NetParameter) -> dict[str, list[str]]:
    """Param name -> the layers naming it, for names used by more than one layer."""
    users: dict[str, list[str]] = {}
    for layer in net.layer:
        for spec in layer.param:
            if spec.name:
                users.setdefault(spec.name, []).append(layer.name)
    return {name: layers for name, layers in users.items() if len(layers) > 1}


@pytest.mark.parametrize("source", ["deploy.prototxt", "trained.caffemodel", "deploy.caffemodel"])
def test_every_prototxt_written_names_one_shared_param(chain: Chain, source: str) -> None:
    path = chain.dir / source
    net = read_caffemodel(path).net if source.endswith(".caffemodel") else read_prototxt(path)
    assert _shared_names(net) == {SHARED: ["encode1", "decode1"]}, f"{source}: shared params {_shared_names(net)}"
    layers = {layer.name: layer for layer in net.layer}
    assert layers["decode1"].inner_product_param.transpose, f"{source}: decode1 lost transpose: true"
    assert not layers["encode1"].inner_product_param.transpose, f"{source}: encode1 became transposed"


def _code_blob(trained: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime's value of the trained autoencoder's code blob (encode1neuron), made a graph output."""
    model = onnx.load(str(trained))
    model.graph.output.append(helper.make_tensor_value_info("encode1neuron", onnx.TensorProto.FLOAT, [None, 64]))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["encode1neuron"], {"data": x})[0]


@pytest.fixture(scope="module")
def server(chain: Chain) -> Iterator[triton.InferenceServerClient]:
    with serve_in_child(chain.dir / "encoder.onnx", MODEL, "--threads", "1") as server:
        url, proc = server.url, server.proc
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        yield client
        client.close()
    assert proc.returncode == 0, f"the server did not stop cleanly on SIGTERM (exit {proc.returncode})"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_served_codes_equal_the_trained_models_code_blob(chain: Chain, server: triton.InferenceServerClient,
                                                         binary: bool, rows: int) -> None:
    x = chain.test_x[rng(rows).permutation(len(chain.test_x))[:rows]]
    meta = server.get_model_metadata(MODEL)
    assert [(t["name"], t["shape"]) for t in meta["outputs"]] == [("encode1neuron", [-1, 64])], meta
    inp = triton.InferInput("data", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = triton.InferRequestedOutput("encode1neuron", binary_data=binary)
    served = server.infer(MODEL, [inp], outputs=[out]).as_numpy("encode1neuron")
    assert_close(served, _code_blob(chain.dir / "trained.onnx", x), f"served encode1neuron ({rows} rows)",
                 atol=1e-6, rtol=1e-5)
