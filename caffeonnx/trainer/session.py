"""`caffeonnx train` as a function: Caffe's Solver::Solve around the Trainer.

Order of events per iteration, as in Caffe: test (every test_interval, at 0 only with
test_initialization), the iteration itself, then a snapshot every `snapshot`
iterations.  At the end: a last test (when iter is a multiple of test_interval), a snapshot
(snapshot_after_train), then the -o outputs.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from caffeonnx.converter.caffe_io import read_prototxt
from caffeonnx.converter.caffe_to_onnx import ConvertedModel, convert_net
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.upgrade import upgrade_net
from caffeonnx.errors import CaffeOnnxError, DataError, SolverError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.build import TrainNet, build_module, load_solver, read_weights, resolve_path, train_net
from caffeonnx.trainer.data import BatchSource, LmdbSource, input_shapes, load_source, transforms_of
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.loop import Iteration, Trainer
from caffeonnx.trainer.snapshot import SnapshotFiles, export_onnx, resume, write_snapshot
from caffeonnx.trainer.stacked import parse_pairs, train_stacked
from caffeonnx.trainer.visualize import write_pictures
from caffeonnx.trainer.wta import apply_wta, parse_wta, take_wta_layers

Say = Callable[[str], None]


@dataclass
class TrainOptions:
    """Everything `caffeonnx train` takes."""

    solver: Path
    weights: Path | None = None
    snapshot: Path | None = None  # resume from this .solverstate
    data: str | None = None
    test_data: str | None = None
    max_iter: int | None = None  # run this many iterations (solver.step(N)); the schedule keeps max_iter
    output: Path | None = None  # PREFIX for PREFIX.caffemodel / PREFIX.onnx at the end
    log: Path | None = None
    device: str = "auto"
    deterministic: bool = False
    wta: list[str] = field(default_factory=list)  # LAYER=k% winner-take-all specs (training only)
    stacked: list[str] = field(default_factory=list)  # ENCODER:DECODER pairs, bottom-up: greedy phases first
    stacked_iters: int | None = None  # iterations per greedy phase (default: the solver's max_iter)
    pictures: bool = True  # PNGs (filters, reconstructions, loss curve) beside snapshots and outputs


@dataclass
class TrainResult:
    """What a run did."""

    iterations: list[Iteration] = field(default_factory=list)
    tests: list[dict] = field(default_factory=list)
    snapshots: list[SnapshotFiles] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)  # -o files and every picture written
    seconds: float = 0.0
    samples: int = 0


def pick_device(name: str) -> torch.device:
    """auto: CUDA when available, else CPU; cuda without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CaffeOnnxError(f"--device cuda: CUDA is not available to torch {torch.__version__}; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise CaffeOnnxError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _data_source(spec: str | None, module: GraphModule, tn: TrainNet, what: str, say: Say,
                 seed: int = 0) -> BatchSource | LmdbSource:
    """Batches for the inputs the loss (or the outputs) read: --data, else the net's Data layer LMDB."""
    outputs = module.loss_outputs() or module.output_names
    needed = module.required_inputs(outputs)
    layers = list(module.layers.values())
    shapes = input_shapes({n: module.input_dims[n] for n in needed}, layers)
    if spec is None:
        feeding = [layer for layer in layers if set(layer.top) & set(needed)]
        if len(feeding) == 1 and feeding[0].type == "Data" and set(needed) <= set(feeding[0].top):
            say(f"reading {what} batches from the Data layer's LMDB {feeding[0].data_param.source!r}")
            return LmdbSource(feeding[0], shapes, what == "train", seed)
        kinds = sorted({layer.type for layer in feeding})
        raise DataError(f"{tn.source}: the {what} net reads {needed} from {', '.join(kinds)} layer(s); give the "
                        f"samples with {'--data' if what == 'train' else '--test-data'} FILE.npz (one array per blob) "
                        "or an MNIST IDX file")
    source = load_source(spec, shapes, transforms_of(layers))
    for name, arr in source.arrays.items():
        if arr.dtype == np.uint8 and name not in source.transforms and name == needed[0]:
            say(f"note: {name!r} gets raw 0..255 byte values (its layer has no transform_param scale; Caffe's MNIST "
                "nets use scale: 0.00390625)")
    return source


def _export_model(tn: TrainNet, module: GraphModule, say: Say) -> ConvertedModel:
    """The graph written as .onnx: the TEST-phase net (what one deploys), else the training graph."""
    try:
        return convert_net(tn.net, None, ConvertOptions(phase=caffe_pb2.TEST, init_missing=True), tn.source)
    except CaffeOnnxError as exc:
        say(f"note: the TEST-phase net does not convert ({exc}); .onnx files hold the training graph")
        return module.to_converted()


@dataclass
class _TestNet:
    module: GraphModule
    data: BatchSource | LmdbSource
    iters: int


def _test_nets(param: caffe_pb2.SolverParameter, solver_path: Path, tn: TrainNet, train: GraphModule,
               spec: str | None, device: torch.device, say: Say) -> list[_TestNet]:
    """Caffe's InitTestNets for `test_net` files and the generic `net` (TEST phase, sharing the train weights)."""
    if not param.test_iter:
        return []
    if param.test_interval <= 0:
        raise SolverError(f"{param.test_iter} test_iter given but test_interval is {param.test_interval}; "
                          "Caffe needs test_interval > 0 to test")
    files = list(param.test_net)
    generic = param.HasField("net") or param.HasField("net_param")
    if (len(param.test_iter) < len(files)) if generic else (len(param.test_iter) != len(files)):
        raise SolverError("test_iter must be specified for each test network "
                          f"({len(param.test_iter)} test_iter for {len(files)} test_net)")
    if param.test_net_param:
        raise SolverError("test_net_param is not supported; put the test net in a file and name it in test_net")
    nets = []
    for i, iters in enumerate(param.test_iter):
        if i < len(files):
            notes: list[str] = []
            path = resolve_path(files[i], solver_path, "test_net", notes)
            for note in notes:
                say(f"note: {note}")
            net = upgrade_net(read_prototxt(path), str(path))
            source = str(path)
        else:
            net, source = tn.net, tn.source
        state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
        state.MergeFrom(net.state)
        if param.test_state:
            state.MergeFrom(param.test_state[i])
        test_tn = TrainNet(net, source, state)
        module = build_module(test_tn, None, seed=0, phase=caffe_pb2.TEST)
        module.share_parameters(train)
        module.to(device).eval()
        try:
            source = _data_source(spec, module, test_tn, "test", say)
        except DataError:
            if spec is not None:
                raise
            say("note: test_iter/test_interval are set but the test net has no Data layer and no --test-data was "
                "given: testing is skipped")
            return []
        nets.append(_TestNet(module, source, int(iters)))
    return nets


def _run_tests(nets: list[_TestNet], iteration: int, compute_loss: bool) -> list[dict]:
    """Caffe's Test: each output averaged over test_iter forward passes (and the loss when asked)."""
    results = []
    for k, net in enumerate(nets):
        sums: dict[str, float] = {}
        loss = 0.0
        with torch.no_grad():
            for i in range(net.iters):
                values = net.module(net.data.batch(i), net.module.output_names)
                for name, v in values.items():
                    sums[name] = sums.get(name, 0.0) + float(v.float().mean() if v.numel() > 1 else v)
                if compute_loss and net.module.loss_terms:
                    loss += float(net.module.loss(values))
        entry = {"phase": "test", "iter": iteration, "net": k, "outputs": {n: s / net.iters for n, s in sums.items()}}
        if compute_loss:
            entry["loss"] = loss / net.iters
        results.append(entry)
    return results


Progress = Callable[[Iteration, float], None]


def run_training(opts: TrainOptions, say: Say = print, progress: Progress | None = None) -> TrainResult:
    """Train as `caffe train` would, with caffeonnx's additions (data files, .onnx, JSONL log)."""
    previous = torch.are_deterministic_algorithms_enabled()
    if opts.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable GEMMs
        torch.use_deterministic_algorithms(True)
    try:
        return _train(opts, say, progress)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(opts: TrainOptions, say: Say, progress: Progress | None) -> TrainResult:
    param = load_solver(opts.solver)
    tn = train_net(param, opts.solver)
    if opts.weights is not None and opts.snapshot is not None:
        raise SolverError("Give a snapshot to resume training or weights to finetune but not both.")
    if opts.stacked and opts.snapshot is not None:
        raise SolverError("--stacked starts from the initial weights; resume the fine-tuning with --snapshot alone")
    if opts.max_iter is not None and opts.max_iter < 0:
        raise SolverError(f"--max-iter must be >= 0, got {opts.max_iter}")
    device = pick_device(opts.device)
    seed = int(param.random_seed) if param.random_seed >= 0 else 0
    torch.manual_seed(seed)
    weights_path = opts.weights or (Path(param.weights[0]) if param.weights else None)
    weights = read_weights(weights_path) if weights_path is not None else None
    wta = take_wta_layers(tn.net, tn.source) + [parse_wta(text) for text in opts.wta]
    module = build_module(tn, weights, seed)
    for value in apply_wta(module, wta):
        say(f"winner-take-all sparsity on {value!r} while training (inference and exports stay dense)")
    for note in tn.notes:
        say(f"note: {note}")
    data = _data_source(opts.data, module, tn, "train", say, seed)
    module.to(device)
    if opts.stacked:
        phase_iters = opts.stacked_iters if opts.stacked_iters is not None else param.max_iter
        train_stacked(module, param, data, parse_pairs(opts.stacked), phase_iters, str(opts.solver), say)
        say("stacked phases done: fine-tuning the whole net")
    trainer = Trainer(module, param, data, str(opts.solver))
    if opts.snapshot is not None:
        for note in resume(trainer, opts.snapshot):
            say(f"note: {note}")
        say(f"resumed from {opts.snapshot} at iteration {trainer.iter}")
    tests = _test_nets(param, opts.solver, tn, module, opts.test_data, device, say)
    export = _export_model(tn, module, say)
    prefix = param.snapshot_prefix or str(opts.solver.with_suffix(""))
    result = TrainResult()
    batch = next(iter(data.shapes.values()))[0] * param.iter_size
    stop = trainer.iter + opts.max_iter if opts.max_iter is not None else param.max_iter

    def pictures(at: str) -> None:
        if opts.pictures:
            result.outputs += write_pictures(at, module, data.batch(0), result.iterations)

    def snapshot() -> SnapshotFiles:
        files = write_snapshot(trainer, prefix, export)
        result.snapshots.append(files)
        pictures(f"{prefix}_iter_{trainer.iter}")
        return files

    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(opts.log, "a")) if opts.log else None

        def emit(record: dict) -> None:
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()

        def test_now() -> None:
            for entry in _run_tests(tests, trainer.iter, param.test_compute_loss):
                result.tests.append(entry)
                emit(entry)
                say(f"Iteration {trainer.iter}, test net #{entry['net']}: "
                    + ", ".join(f"{k} = {v:.6g}" for k, v in entry["outputs"].items()))

        start = time.perf_counter()
        try:
            while trainer.iter < stop:
                if tests and trainer.iter % param.test_interval == 0 and (trainer.iter > 0 or param.test_initialization):
                    test_now()
                record = trainer.step(1)[0]
                result.iterations.append(record)
                result.samples += batch
                emit({"iter": record.iter, "loss": record.loss, "smoothed_loss": record.smoothed_loss,
                      "lr": float(str(np.float32(record.lr)))})  # the float32 rate Caffe uses, printed short
                if progress is not None:
                    progress(record, result.samples / max(time.perf_counter() - start, 1e-9))
                if param.display and record.iter % param.display == 0:
                    say(f"Iteration {record.iter}, loss = {record.smoothed_loss:.6g}, lr = {record.lr:.6g}")
                if param.snapshot and trainer.iter % param.snapshot == 0:
                    snapshot()
        except KeyboardInterrupt:
            files = snapshot()
            say(f"interrupted at iteration {trainer.iter}: wrote {files.caffemodel}, {files.onnx}, {files.solverstate}")
            raise
        finally:
            result.seconds = time.perf_counter() - start
        if tests and trainer.iter % param.test_interval == 0:
            test_now()
    if param.snapshot_after_train and (not param.snapshot or trainer.iter % param.snapshot != 0) and result.iterations:
        snapshot()
    if opts.output is not None:
        model_path, onnx_path = Path(f"{opts.output}.caffemodel"), Path(f"{opts.output}.onnx")
        module.save_caffemodel(model_path)
        export_onnx(export, trainer, onnx_path)
        result.outputs += [model_path, onnx_path]
        pictures(str(opts.output))
    return result

