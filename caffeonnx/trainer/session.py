"""`caffeonnx train` as a function: Caffe's Solver::Solve around the Trainer.

Order of events per iteration, as in Caffe: test (every test_interval, at 0 only with
test_initialization), the iteration itself, then a snapshot every `snapshot`
iterations.  At the end: a last test (when iter is a multiple of test_interval), a snapshot
(snapshot_after_train), then the -o outputs.

Under torchrun (distributed.py) every rank runs this same loop on its shard of the TRAIN data;
rank 0 alone tests, logs, writes snapshots, pictures and outputs, as Caffe's root solver does.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
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
from caffeonnx.trainer.data import DataSource, ShardedSource, input_shapes, load_source, net_source, transforms_of
from caffeonnx.trainer.distributed import Synchronizer, environment, process_group, rank_device
from caffeonnx.trainer.graph_module import GraphModule
from caffeonnx.trainer.loop import Iteration, StopSignals, Trainer
from caffeonnx.trainer.snapshot import (
    SnapshotFiles,
    check_log,
    check_snapshot_prefix,
    clean_stale_temps,
    export_onnx,
    resume,
    rng_extras,
    snapshot_files,
    write_snapshot,
)
from caffeonnx.trainer.solvers import check_solver
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
    threads: int | None = None  # torch intra-op CPU threads while training (None: leave torch's setting)
    shard: str = "skip"  # under torchrun: TRAIN data split as Caffe's DataLayer::Skip, or "contiguous" sub-batches
    dist_timeout: float = 300.0  # under torchrun: seconds a collective waits for the other ranks


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
    """auto: CUDA when available, else CPU; cuda (or cuda:N, Caffe's --gpu N) without that GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    index = name.removeprefix("cuda:")
    if index != name and index.isdigit():
        if not torch.cuda.is_available():
            raise CaffeOnnxError(f"--gpu {index}: CUDA is not available to torch {torch.__version__}; train on the "
                                 "CPU (leave out --gpu)")
        if int(index) >= torch.cuda.device_count():
            raise CaffeOnnxError(f"--gpu {index}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                                 f"numbered from 0")
        return torch.device(name)
    if name == "cuda" and not torch.cuda.is_available():
        raise CaffeOnnxError(f"--device cuda: CUDA is not available to torch {torch.__version__}; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise CaffeOnnxError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _data_source(spec: str | None, module: GraphModule, tn: TrainNet, what: str, say: Say,
                 seed: int = 0) -> DataSource:
    """Batches for the inputs the loss (or the outputs) read: --data, else the net's Data layer LMDB."""
    outputs = module.loss_outputs() or module.output_names
    needed = module.required_inputs(outputs)
    layers = [layer for layer in module.caffe_layers if layer is not None]
    shapes = input_shapes({n: module.input_dims[n] for n in needed}, layers)
    if spec is None:
        feeding = [layer for layer in layers if set(layer.top) & set(needed)]
        user_fed = sorted({layer.type for layer in feeding if layer.type in ("Input", "MemoryData")})
        if user_fed or not feeding:
            raise DataError(f"{tn.source}: the {what} net reads {needed} from {', '.join(user_fed) or 'no'} data "
                            f"layer(s); give the samples with {'--data' if what == 'train' else '--test-data'} "
                            "FILE.npz (one array per blob) or an MNIST IDX file")
        source = net_source(layers, needed, shapes, what == "train", seed)
        say(f"reading {what} batches from " + ", ".join(f"{layer.type} layer {layer.name!r} ({_source_of(layer)!r})"
                                                         for layer in feeding))
        return source
    source = load_source(spec, shapes, transforms_of(layers))
    for name, arr in source.arrays.items():
        if arr.dtype == np.uint8 and name not in source.transforms and name == needed[0]:
            say(f"note: {name!r} gets raw 0..255 byte values (its layer has no transform_param scale; Caffe's MNIST "
                "nets use scale: 0.00390625)")
    return source


def _source_of(layer: caffe_pb2.LayerParameter) -> str:
    """What a data layer reads, for the log."""
    sources = {"Data": layer.data_param.source, "HDF5Data": layer.hdf5_data_param.source,
               "ImageData": layer.image_data_param.source, "WindowData": layer.window_data_param.source}
    return sources.get(layer.type) or "fillers"


def _export_model(tn: TrainNet, module: GraphModule, param: caffe_pb2.SolverParameter, say: Say) -> ConvertedModel:
    """The graph written as .onnx: the TEST-phase net (what one deploys; with the first test net's test_state,
    so a net whose data layers are chosen by stage still has its inputs), else the training graph."""
    state = caffe_pb2.NetState(phase=caffe_pb2.TEST)
    state.MergeFrom(tn.net.state)
    if param.test_state:
        state.MergeFrom(param.test_state[0])
    opts = ConvertOptions(phase=caffe_pb2.TEST, stages=tuple(state.stage), level=state.level, init_missing=True)
    try:
        return convert_net(tn.net, None, opts, tn.source)
    except CaffeOnnxError as exc:
        say(f"note: the TEST-phase net does not convert ({exc}); .onnx files hold the training graph")
        return module.to_converted()


@dataclass
class _TestNet:
    """One of Caffe's test nets; its data layers' cursor carries on from one test to the next, as in Caffe."""

    module: GraphModule
    data: DataSource
    iters: int
    cursor: int = 0  # the next batch its data layers read


def count_tests_before(param: caffe_pb2.SolverParameter, iteration: int) -> int:
    """How many tests Caffe's Solve runs before iteration `iteration` (every test_interval, at 0 if test_initialization).

    A resumed run starts its test nets' cursors there, so it reads what an uninterrupted run would.
    """
    if not param.test_iter or param.test_interval <= 0 or iteration <= 0:
        return 0
    done = (iteration - 1) // param.test_interval + 1  # multiples of test_interval in [0, iteration)
    return done if param.test_initialization else done - 1


def _test_nets(param: caffe_pb2.SolverParameter, solver_path: Path, tn: TrainNet, train: GraphModule,
               spec: str | None, device: torch.device, say: Say) -> list[_TestNet]:
    """Caffe's InitTestNets: test_net_param nets, then test_net files, then the generic net for the remaining
    test_iter (TEST phase merged with the net's state and test_state[i]; weights shared with the train net)."""
    if not param.test_iter:
        return []
    if param.test_interval <= 0:
        raise SolverError(f"{param.test_iter} test_iter given but test_interval is {param.test_interval}; "
                          "Caffe needs test_interval > 0 to test")
    inline, files = list(param.test_net_param), list(param.test_net)
    generic = param.HasField("net") or param.HasField("net_param")
    given = len(inline) + len(files)
    if (len(param.test_iter) < given) if generic else (len(param.test_iter) != given):
        raise SolverError("test_iter must be specified for each test network "
                          f"({len(param.test_iter)} test_iter for {len(inline)} test_net_param and {len(files)} "
                          "test_net)")
    if param.test_state and len(param.test_state) != len(param.test_iter):
        raise SolverError(f"test_state must be unspecified or specified once per test net ({len(param.test_state)} "
                          f"test_state for {len(param.test_iter)} test nets)")
    nets = []
    for i, iters in enumerate(param.test_iter):
        if i < len(inline):
            net = caffe_pb2.NetParameter()
            net.CopyFrom(inline[i])
            source = f"{solver_path} (test_net_param #{i})"
            upgrade_net(net, source)
        elif i < given:
            notes: list[str] = []
            path = resolve_path(files[i - len(inline)], solver_path, "test_net", notes)
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
                values = net.module(net.data.batch(net.cursor), net.module.output_names)
                net.cursor += 1
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
    if opts.threads is not None and opts.threads < 1:
        raise CaffeOnnxError(f"--threads must be a positive number of CPU threads, got {opts.threads}")
    ranks = environment(opts.dist_timeout, opts.shard)
    previous, previous_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if opts.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable GEMMs
        torch.use_deterministic_algorithms(True)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        device = pick_device(opts.device)
        if ranks is None:
            return _train(opts, say, progress, device, None)
        device = rank_device(device, ranks)
        with process_group(ranks, device):
            return _train(opts, say if ranks.root else (lambda _: None), progress if ranks.root else None, device,
                          Synchronizer(ranks))
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.set_num_threads(previous_threads)


def _train(opts: TrainOptions, say: Say, progress: Progress | None, device: torch.device,
           sync: Synchronizer | None) -> TrainResult:
    param = load_solver(opts.solver)
    warnings = check_solver(param, str(opts.solver))
    tn = train_net(param, opts.solver)
    if opts.weights is not None and opts.snapshot is not None:
        raise SolverError("Give a snapshot to resume training or weights to finetune but not both.")
    if opts.stacked and opts.snapshot is not None:
        raise SolverError("--stacked starts from the initial weights; resume the fine-tuning with --snapshot alone")
    if opts.max_iter is not None and opts.max_iter < 0:
        raise SolverError(f"--max-iter must be >= 0, got {opts.max_iter}")
    rank, world = (sync.ranks.rank, sync.ranks.world) if sync is not None else (0, 1)
    root = rank == 0
    for warning in warnings:
        say(f"warning: {warning}")
    prefix = param.snapshot_prefix or str(opts.solver.with_suffix(""))
    if root and (param.snapshot or param.snapshot_after_train):
        check_snapshot_prefix(prefix)
    if root and opts.log is not None:
        check_log(opts.log)
    for stale in clean_stale_temps(prefix) if root else []:
        say(f"note: removed {stale}, left by an interrupted snapshot write")
    seed = int(param.random_seed) if param.random_seed >= 0 else 0
    torch.manual_seed(seed + rank)  # Caffe's Solver::Init: random_seed + solver_rank
    weights_path = opts.weights or (Path(param.weights[0]) if param.weights else None)
    weights = read_weights(weights_path) if weights_path is not None else None
    wta = take_wta_layers(tn.net, tn.source) + [parse_wta(text) for text in opts.wta]
    module = build_module(tn, weights, seed)
    if rank:  # each rank's Dropout draws its own masks (the fillers are overwritten by rank 0's broadcast)
        module.seed = seed + rank
        module.generator = torch.Generator().manual_seed(seed + rank)
    for value in apply_wta(module, wta):
        say(f"winner-take-all sparsity on {value!r} while training (inference and exports stay dense)")
    for note in tn.notes:
        say(f"note: {note}")
    data = _data_source(opts.data, module, tn, "train", say, seed)
    if sync is not None:
        data = ShardedSource(data, rank, world, sync.ranks.shard)
        say(f"{world} ranks: {sync.ranks.shard} shards of the TRAIN data, effective batch {world} × "
            f"{next(iter(data.shapes.values()))[0]} × iter_size {param.iter_size}")
    module.to(device)
    if opts.stacked:
        if sync is not None:  # the phases start from rank 0's weights too
            sync.broadcast(list(module.params))
        phase_iters = opts.stacked_iters if opts.stacked_iters is not None else param.max_iter
        train_stacked(module, param, data, parse_pairs(opts.stacked), phase_iters, str(opts.solver), say, sync)
        say("stacked phases done: fine-tuning the whole net")
    trainer = Trainer(module, param, data, str(opts.solver), sync=sync)
    if opts.snapshot is not None:
        for note in resume(trainer, opts.snapshot, rank, world):
            say(f"note: {note}")
        say(f"resumed from {opts.snapshot} at iteration {trainer.iter}")
    if sync is not None:
        sync.broadcast(list(module.params))
    tests = _test_nets(param, opts.solver, tn, module, opts.test_data, device, say) if root else []
    for net in tests:
        net.cursor = count_tests_before(param, trainer.iter) * net.iters
    export = _export_model(tn, module, param, say)
    result = TrainResult()
    batch = next(iter(data.shapes.values()))[0] * param.iter_size * world
    stop = trainer.iter + opts.max_iter if opts.max_iter is not None else param.max_iter
    trainer.solver.lr.check_until(stop)

    def pictures(at: str) -> None:
        if opts.pictures:
            result.outputs += write_pictures(at, module, data.batch(0), result.iterations)

    last_snapshot: int | None = None

    def snapshot() -> None:
        nonlocal last_snapshot
        rngs = (sync.gather_objects(rng_extras(trainer), "gathering the ranks' random generators for a snapshot")
                if sync is not None else None)  # every rank joins; rank 0 writes
        last_snapshot = trainer.iter
        if root:
            result.snapshots.append(write_snapshot(trainer, prefix, export, rngs))
            pictures(f"{prefix}_iter_{trainer.iter}")

    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(opts.log, "a")) if opts.log and root else None

        def emit(record: dict) -> None:
            if log is not None:
                try:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                except OSError as exc:
                    raise CaffeOnnxError(f"--log {str(opts.log)!r}: cannot write ({exc.strerror or exc}); snapshots "
                                         "so far are kept") from None

        def test_now() -> None:
            for entry in _run_tests(tests, trainer.iter, param.test_compute_loss):
                result.tests.append(entry)
                emit(entry)
                say(f"Iteration {trainer.iter}, test net #{entry['net']}: "
                    + ", ".join(f"{k} = {v:.6g}" for k, v in entry["outputs"].items()))

        start = time.perf_counter()
        # Under torchrun a second signal does not discard the iteration: the other ranks wait for this one.
        stopper = StopSignals(lambda: trainer.in_passes and sync is None)
        discarded = False

        def stopping() -> bool:  # ranks stop together, at the boundary after the iteration that saw a signal
            return bool(sync.stop_signal) if sync is not None else stopper.signum is not None

        if sync is not None:
            sync.local_signal = lambda: stopper.signum or 0
        with stopper.installed():
            try:
                while trainer.iter < stop and not stopping():
                    if tests and trainer.iter % param.test_interval == 0 and (trainer.iter > 0
                                                                              or param.test_initialization):
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
            except KeyboardInterrupt:  # a second signal discarded the iteration in progress, or a callback stopped
                discarded = stopper.signum is not None
                stopper.signum = stopper.signum or signal.SIGINT
            finally:
                result.seconds = time.perf_counter() - start
            if sync is not None:  # what the ranks agreed on; a signal after the last agreement comes too late
                stopper.signum = sync.stop_signal or None
            if stopper.signum is not None:  # between two iterations: snapshot that state (still deferring signals)
                files = snapshot_files(prefix, trainer.iter)
                kept = last_snapshot == trainer.iter
                if not kept:
                    snapshot()
                say(f"{'interrupted' if stopper.signum == signal.SIGINT else 'terminated'} by {stopper.name} at "
                    f"iteration {trainer.iter}: {'kept' if kept else 'wrote'} {files.caffemodel}, {files.onnx}, "
                    f"{files.solverstate}" + (f" (the iteration in progress, {trainer.iter}, was discarded)"
                                               if discarded else ""))
                if stopper.signum != signal.SIGINT:
                    raise SystemExit(stopper.exit_code)
                raise KeyboardInterrupt
        if tests and trainer.iter % param.test_interval == 0:
            test_now()
    if param.snapshot_after_train and (not param.snapshot or trainer.iter % param.snapshot != 0) and result.iterations:
        snapshot()
    if sync is not None:
        digest = sync.check_replicas(trainer.solver.blobs, trainer.solver.history_arrays())
        say(f"all {world} ranks end with identical weights and solver history (blake2b {digest})")
    if opts.output is not None and root:
        model_path, onnx_path = Path(f"{opts.output}.caffemodel"), Path(f"{opts.output}.onnx")
        module.save_caffemodel(model_path)
        export_onnx(export, trainer, onnx_path)
        result.outputs += [model_path, onnx_path]
        pictures(str(opts.output))
    return result

