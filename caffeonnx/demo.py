"""`caffeonnx demo`: the whole chain on data bundled in the package, every step checked.

A Caffe tied autoencoder (examples/tied_ae: 784-64-784, `encode1_matrix` shared by the
encoder and the transposed decoder) is converted to ONNX and checked blob by blob against
Caffe's own forward pass, fine-tuned with its Caffe solver on 2,000 MNIST images
(examples/mnist_subset), written back as ONNX and caffemodel, cut down to its encoder,
used to encode the 500 test images, and served by `caffeonnx serve` in a child process
that is queried once over HTTP (Open Inference Protocol v2, JSON tensors) and stopped.
The tie is checked in every file written.  Any failed check makes the run fail.
"""
from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from rich.console import Console
from rich.text import Text

from caffeonnx.converter.caffe_io import read_caffemodel
from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.inspect import inspect_onnx
from caffeonnx.converter.onnx_to_caffe import onnx_to_caffe
from caffeonnx.converter.verify import compare_blobs, load_npz
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.child import serve_in_child
from caffeonnx.runtime.encode import encode_file
from caffeonnx.runtime.encoder import extract_encoder, save_model
from caffeonnx.runtime.inputs import open_samples
from caffeonnx.runtime.session import EncoderSession, SessionConfig

SHARED = "encode1_matrix"  # the tied weight: encode1 reads it as W, decode1 as Wᵀ (transpose: true)
SHARED_SHAPE = (64, 784)
RECONSTRUCTION = "decode1neuron"  # the deploy net's output: sigmoid of the decoder
MODEL_NAME = "tied_ae_encoder"
SERVED_ROWS = 8  # test images sent in the one infer request
SERVER_START_S = 60.0
CAFFE_ATOL, CAFFE_RTOL = 1e-5, 1e-4  # converted blobs vs Caffe's (float32 sums in another order)


def example_dir(name: str = "tied_ae") -> Path:
    """A bundled example: tied_ae (prototxts, caffemodel, Caffe's blobs) or mnist_subset (IDX gz)."""
    return Path(str(resources.files("caffeonnx") / "examples" / name))


def mnist_scaled(images_gz: Path, scratch: Path) -> np.ndarray:
    """MNIST images as float32 rows (N, 784) scaled by 1/255, as `caffeonnx encode` scales uint8 pixels."""
    with open_samples(images_gz, scratch_dir=scratch) as images:
        return np.array(images).reshape(len(images), -1).astype(np.float32) * np.float32(1 / 255)


def shared_matrix_check(model: onnx.ModelProto, readers: int) -> tuple[bool, str]:
    """Whether the tied matrix is stored exactly once, as one initializer read by `readers` nodes."""
    size = int(np.prod(SHARED_SHAPE))
    copies = [t for t in model.graph.initializer if int(np.prod(t.dims)) == size]
    if len(copies) != 1:
        return False, f"{len(copies)} initializers of {size} values ({[t.name for t in copies]}); the tie is broken"
    name = copies[0].name
    reading = [n for n in model.graph.node if name in n.input]
    desc = ", ".join(f"{n.output[0]} ({n.op_type}" + (", transposed)" if _transposed(n) else ")") for n in reading)
    ok = len(reading) == readers and tuple(copies[0].dims) == SHARED_SHAPE
    return ok, f"one {'x'.join(map(str, copies[0].dims))} initializer {name!r}, read by {desc or 'no node'}"


def _transposed(node: onnx.NodeProto) -> bool:
    """A Gemm reading its B as stored (transB 0) applies the (64, 784) matrix as Wᵀ: the decoder's use."""
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return node.op_type == "Gemm" and trans_b == 0


@dataclass
class Report:
    """The demo's output: numbered steps with their time, checks marked ok/FAIL, plain lines."""

    console: Console
    checks: list[tuple[str, bool]] = field(default_factory=list)
    step_no: int = 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        """A numbered step; its wall time is printed when it ends."""
        self.step_no += 1
        start = time.perf_counter()
        self.console.print(Text.assemble((f"{self.step_no}. ", "bold"), (title, "bold")), soft_wrap=True)
        try:
            yield
        finally:
            self.line(f"({time.perf_counter() - start:.1f} s)")

    def check(self, ok: bool, text: str) -> bool:
        """Record and print one check."""
        self.checks.append((text, ok))
        self.console.print(Text.assemble("   ", ("ok  " if ok else "FAIL", "green" if ok else "bold red"), " ", text),
                           soft_wrap=True)
        return ok

    def line(self, text: str) -> None:
        """An indented line of information."""
        self.console.print(Text("        " + text), soft_wrap=True)

    @property
    def failed(self) -> list[str]:
        """The checks that failed."""
        return [text for text, ok in self.checks if not ok]


def run_demo(workdir: Path, console: Console, iters: int | None = None) -> bool:
    """Run the chain in `workdir`, printing a report; True when every check passed."""
    if iters is not None and iters <= 0:
        raise CaffeOnnxError(f"--iters must be a positive number of training iterations, got {iters}")
    if workdir.exists() and not workdir.is_dir():
        raise CaffeOnnxError(f"--workdir {str(workdir)!r} is a file; give a directory (it is created if missing)")
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = Report(console)
    console.print(Text("caffeonnx demo: a Caffe tied autoencoder -> ONNX -> fine-tuned in torch -> served encoder",
                       style="bold"), soft_wrap=True)
    report.line(f"workdir: {workdir}")
    ex, mnist = example_dir(), example_dir("mnist_subset")
    train_x = mnist_scaled(mnist / "train-images-idx3-ubyte.gz", workdir)
    test_x = mnist_scaled(mnist / "t10k-images-idx3-ubyte.gz", workdir)
    converted = _convert(report, ex, workdir)
    trained = _train(report, ex, workdir, converted, train_x, iters)
    _evaluate(report, converted, trained, test_x)
    encoder, codes, provider = _encoder(report, workdir, trained, test_x, mnist)
    _serve(report, encoder, test_x[:SERVED_ROWS], codes[:SERVED_ROWS], provider)
    console.print(Text(f"files written in {workdir}:", style="bold"), soft_wrap=True)
    for path in sorted(p for p in workdir.iterdir() if p.is_file()):
        report.line(f"{path.name:<28} {path.stat().st_size / 1024:>9,.1f} KiB")
    seconds = time.perf_counter() - started
    if report.failed:
        console.print(Text(f"demo: {len(report.failed)} of {len(report.checks)} checks FAILED ({seconds:.1f} s): "
                           + "; ".join(report.failed), style="bold red"), soft_wrap=True)
        return False
    console.print(Text(f"demo: all {len(report.checks)} checks passed in {seconds:.1f} s", style="bold green"),
                  soft_wrap=True)
    return True


def _convert(report: Report, ex: Path, workdir: Path) -> Path:
    """Step 1: Caffe -> ONNX, every blob against Caffe's own forward pass, the tie and the parameter counts."""
    onnx_path = workdir / "tied_ae.onnx"
    with report.step("convert: net.prototxt + weights.caffemodel (Caffe) -> tied_ae.onnx"):
        converted = convert_files(ex / "net.prototxt", ex / "weights.caffemodel", ConvertOptions())
        converted.save(onnx_path)
        checked = convert_files(ex / "net.prototxt", ex / "weights.caffemodel", ConvertOptions(all_blobs=True))
        checks = compare_blobs(checked, load_npz(ex / "inputs.npz", "inputs"), load_npz(ex / "blobs.npz", "reference"),
                               CAFFE_ATOL, CAFFE_RTOL)
        worst = max(checks, key=lambda c: c.max_abs)
        bad = [c.blob for c in checks if not c.ok]
        report.check(not bad,
                     f"{len(checks)} blobs match Caffe 1.0's forward pass ({', '.join(c.blob for c in checks)}; "
                     f"max abs err {worst.max_abs:.1e} in {worst.blob}; tolerance atol {CAFFE_ATOL:g}, rtol {CAFFE_RTOL:g})"
                     + (f"; differ: {bad}" if bad else ""))
        model = onnx.load(str(onnx_path))
        report.check(*shared_matrix_check(model, readers=2))
        info = inspect_onnx(model, str(onnx_path))
        params = ", ".join(f"{p.name} {'x'.join(map(str, p.shape))}" for p in info.params)
        report.line(f"parameters: {info.unique_param_count:,} stored ({params}); "
                    f"a copy per layer, as a caffemodel keeps them, would be {info.per_layer_param_count:,}")
    return onnx_path


@dataclass
class Trained:
    """What training wrote, and the losses it saw."""

    onnx: Path
    caffemodel: Path
    first_loss: float
    last_loss: float


def _train(report: Report, ex: Path, workdir: Path, converted: Path, train_x: np.ndarray, iters: int | None) -> Trained:
    """Step 2: `caffeonnx train` with the bundled solver from the converted ONNX; the tie in every file it writes."""
    from caffeonnx.trainer.build import load_solver
    from caffeonnx.trainer.session import TrainOptions, pick_device, run_training

    solver = load_solver(ex / "solver.prototxt")
    data = workdir / "mnist_train.npz"
    np.savez(data, data=train_x)
    log = workdir / "train_log.jsonl"
    log.unlink(missing_ok=True)  # --log appends
    prefix = workdir / "trained"
    n = iters if iters is not None else solver.max_iter
    with report.step(f"train: solver.prototxt ({solver.type}, momentum {solver.momentum:g}, base_lr "
                     f"{solver.base_lr:g}, lr_policy {solver.lr_policy}) from tied_ae.onnx, {n} iterations of "
                     f"{len(train_x):,} MNIST images"):
        result = run_training(TrainOptions(ex / "solver.prototxt", weights=converted, data=str(data), max_iter=iters,
                                           output=prefix, log=log), say=lambda _: None)
        first, last = result.iterations[0], result.iterations[-1]
        report.line(f"{len(result.iterations)} iterations in {result.seconds:.1f} s on {pick_device('auto')} "
                    f"({result.samples / max(result.seconds, 1e-9):,.0f} images/s)")
        report.check(bool(np.isfinite(last.smoothed_loss)) and last.smoothed_loss < first.loss,
                     f"loss (SigmoidCrossEntropyLoss per image): {first.loss:.2f} at iteration 0 -> "
                     f"{last.smoothed_loss:.2f} (mean of the last {min(len(result.iterations), solver.average_loss)})")
        trained = Trained(Path(f"{prefix}.onnx"), Path(f"{prefix}.caffemodel"), first.loss, last.smoothed_loss)
        model = onnx.load(str(trained.onnx))
        ok, text = shared_matrix_check(model, readers=2)
        report.check(ok, f"{trained.onnx.name}: {text}")
        matrix = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == SHARED)
        blobs = read_caffemodel(trained.caffemodel).blobs
        same = all(np.array_equal(blobs[layer][0].data, matrix) for layer in ("encode1", "decode1"))
        report.check(same, f"{trained.caffemodel.name}: encode1 and decode1 hold the same {SHARED} "
                           f"(Caffe stores it once per layer), equal to {trained.onnx.name}'s")
        deploy = workdir / "trained_deploy.prototxt"
        net = onnx_to_caffe(model)
        net.save(deploy)
        names = {layer.name: [p.name for p in layer.param] for layer in net.net.layer if layer.param}
        report.check(names.get("encode1", [""])[0] == SHARED == names.get("decode1", [""])[0],
                     f"{deploy.name} (to-caffe of {trained.onnx.name}): param names {names}")
    return trained


def _evaluate(report: Report, converted: Path, trained: Trained, test_x: np.ndarray) -> None:
    """Step 3: reconstruction error on the test images before and after training (onnxruntime on both files)."""
    with report.step(f"evaluate: reconstruct the {len(test_x)} test images with tied_ae.onnx and {trained.onnx.name}"):
        errors = []
        for path in (converted, trained.onnx):
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            recon = sess.run([RECONSTRUCTION], {sess.get_inputs()[0].name: test_x})[0]
            errors.append(float(np.mean((recon.astype(np.float64) - test_x) ** 2)))
        report.check(errors[1] < errors[0], f"reconstruction error (mean squared, per pixel): {errors[0]:.4f} before "
                                            f"-> {errors[1]:.4f} after fine-tuning")


def _encoder(report: Report, workdir: Path, trained: Trained, test_x: np.ndarray,
             mnist: Path) -> tuple[Path, np.ndarray, str]:
    """Step 4: the encoder cut from the trained model encodes the test images; codes and throughput."""
    path, codes_path = workdir / "encoder.onnx", workdir / "test_codes.npy"
    with report.step(f"encoder: cut {trained.onnx.name} at its code -> {path.name}; encode the test images"):
        encoder, choice = extract_encoder(onnx.load(str(trained.onnx)))
        save_model(encoder, path)
        report.line(f"code blob {choice.code!r} ({choice.width} values per image), narrowest on the path to "
                    f"{choice.reconstruction!r}")
        ok, text = shared_matrix_check(encoder, readers=1)
        report.check(ok and len(encoder.graph.initializer) == 2, f"{path.name}: {text}; decoder and its bias dropped "
                                                                 f"({len(encoder.graph.initializer)} initializers)")
        session = EncoderSession(path, SessionConfig(warmup=(len(test_x),)))
        result = encode_file(session, mnist / "t10k-images-idx3-ubyte.gz", codes_path, batch_size=len(test_x))
        codes = np.load(codes_path)
        blobs = read_caffemodel(trained.caffemodel).blobs
        w, b = blobs["encode1"][0].data.astype(np.float64), blobs["encode1"][1].data.astype(np.float64)
        want = 1 / (1 + np.exp(-(test_x.astype(np.float64) @ w.T + b)))
        err = float(np.abs(codes - want).max())
        report.check(codes.shape == (len(test_x), 64) and err < 1e-5,
                     f"{result.samples} codes {list(codes.shape)} in {codes_path.name} equal sigmoid(x·Wᵀ + b) from "
                     f"{trained.caffemodel.name} (max abs err {err:.1e}, tolerance 1e-5)")
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < 1.0:
            session.run(test_x)
            runs += 1
        rate = runs * len(test_x) / (time.perf_counter() - start)
        report.line(f"encoder throughput: {rate:,.0f} images/s (batch {len(test_x)}, {session.describe()})")
    return path, codes, session.provider


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # a local server: never via a proxy


def http(method: str, url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    """One HTTP request with a JSON body; (status, JSON reply or {})."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, (json.loads(raw) if raw else {})


def _serve(report: Report, encoder: Path, x: np.ndarray, codes: np.ndarray, provider: str) -> None:
    """Step 5: `caffeonnx serve` in a child process, one JSON infer request over HTTP, SIGTERM."""
    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    with report.step(f"serve: caffeonnx serve {encoder.name} --name {MODEL_NAME} on a free local port "
                     "(Open Inference Protocol v2)"):
        start = time.perf_counter()
        with serve_in_child(encoder, MODEL_NAME, "--threads", "1", device=device) as server:
            url, proc = server.url, server.proc
            report.line(f"{url}/v2 ready after {time.perf_counter() - start:.1f} s")
            status, meta = http("GET", f"{url}/v2/models/{MODEL_NAME}")
            tensors = {k: [(t["name"], t["datatype"], t["shape"]) for t in meta.get(k, [])] for k in ("inputs", "outputs")}
            if not report.check(status == 200 and len(tensors["inputs"]) == 1 and len(tensors["outputs"]) == 1,
                                f"GET /v2/models/{MODEL_NAME}: {status}, inputs {tensors['inputs']}, "
                                f"outputs {tensors['outputs']}"):
                return
            (in_name, _, _), (out_name, _, _) = tensors["inputs"][0], tensors["outputs"][0]
            body = {"inputs": [{"name": in_name, "shape": list(x.shape), "datatype": "FP32",
                                "data": x.ravel().tolist()}], "outputs": [{"name": out_name}]}
            sent = time.perf_counter()
            status, reply = http("POST", f"{url}/v2/models/{MODEL_NAME}/infer", body)
            ms = (time.perf_counter() - sent) * 1000
            out = next((o for o in reply.get("outputs", []) if o.get("name") == out_name), None)
            served = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"]) if out else np.empty(0)
            err = float(np.abs(served - codes).max()) if served.shape == codes.shape else float("inf")
            report.check(status == 200 and err <= 1e-5,
                         f"POST /v2/models/{MODEL_NAME}/infer (JSON, {len(x)} test images): {status} in {ms:.1f} ms, "
                         f"served codes {list(served.shape)} equal the encoder's (max abs err {err:.1e}, "
                         "tolerance 1e-5)" + ("" if status == 200 else f": {reply.get('error')}"))
        report.check(proc.returncode == 0, f"SIGTERM: the server stopped cleanly (exit {proc.returncode})")
