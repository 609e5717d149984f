"""`caffeonnx encode --engine ray`: the same encoding as encode.py, spread over Ray Data actors.

Reading.  The driver opens the input only for what it needs to plan: the row count, the sample
shape and dtype (arrays and IDX are memory-mapped, an LMDB lists its keys, a shard directory reads
its manifest), and resolves the transform exactly as `encode_file` does (the model's data layer's
transform_param, `--scale`).  The Ray dataset it builds holds no samples: `ray.data.range` gives
one block per range of rows (whole batches: `block_rows`), holding only that block's number.  Each
actor (`EncodeActor`, K of them, one `EncoderSession` each) opens the input itself with the
project's readers (`open_inputs`: .npy/.npz/IDX re-mapped from the file the driver mapped, LMDB,
HDF5, image lists, Parquet, shard directories), reads its block's rows `--batch-size` at a time,
applies Caffe's TEST-phase transform and the encoder, and returns the codes with their input row
ids.  The same readers as the local engine
give the same rows; Ray's own read_numpy/read_parquet would read neither IDX nor LMDB.

Memory.  The driver never holds input rows: it holds the input's index (an LMDB's key list, a
manifest), one tiny block per range in Ray's plan, and the code blocks Ray hands back (at most
BLOCK_CODE_BYTES each), which it writes as they come (a memory-mapped .npy, or Parquet row groups of
at most ROW_GROUP_ROWS rows).  Each actor holds one batch of samples at a time and one block of
codes; Ray Data's streaming executor bounds the blocks in flight between the actors and the driver
(it backs off when its object-store budget is used).

Order and output.  Execution is ordered (`preserve_order`) and every code batch carries its input
row ids, checked on arrival, so codes are written in input order: one `.npy` (as the local
engine), one Parquet file (`id` + `code` columns), or for `-o DIR/` a directory of .npy or Parquet
shards of `shard_rows` rows plus `manifest.json` (see shards.py).  Output goes to a temporary file
or sibling directory, renamed over the target only when every block succeeded: a failed job (an
actor that cannot read its rows, say) raises one CaffeOnnxError and leaves no partial output.

Cluster.  Without an address a local Ray is started with this machine's CPUs and shut down
afterwards; with one (`auto`, `HOST:PORT`, `ray://HOST:10001` for Ray Client) the running cluster
is joined and left running.  The model is shipped to the actors; the input is read by them, so it
must be readable at the same path on the cluster's nodes (a shared filesystem), and the codes come
back to the driver, which writes them.  Each actor takes one CPU and runs one intra-op thread
unless --threads says otherwise; with `--gpus-per-actor G` it also takes G GPUs and runs on CUDA
when CUDA starts there (CPU otherwise, unless `--device cuda` insists).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from caffeonnx.converter.onnx_io import load_onnx
from caffeonnx.errors import CaffeOnnxError, InputFileError
from caffeonnx.fileio import atomic_path
from caffeonnx.runtime.encode import (
    EncodeResult,
    InputTransform,
    fit_samples,
    model_transform,
    remove_stale_temps,
    sigterm_exits,
    streamed_sample_shape,
)
from caffeonnx.runtime.inputs import ImageOptions, Samples, open_inputs, process_start_time
from caffeonnx.runtime.session import EncoderSession, SessionConfig
from caffeonnx.runtime.shards import FORMATS, CodeWriter, atomic_dir, check_output_dir, remove_stale_dirs

INSTALL_HINT = "pip install 'caffeonnx[ray]'"
DEFAULT_SHARD_ROWS = 1 << 20
BLOCKS_PER_ACTOR = 4  # at least this many blocks per actor when the input allows: the pool stays balanced
MAX_BATCHES_PER_BLOCK = 16  # batches per block at most: Ray's per-block cost is paid once for all of them
BLOCK_CODE_BYTES = 16 << 20  # codes per block at most (they travel through the object store)
_ADDRESS = re.compile(r"auto|ray://[^\s/:]+(:\d+)?|[^\s/:]+:\d+")


def import_ray() -> Any:
    """The `ray` module with Ray Data, or one clear error saying how to install it."""
    try:
        import ray
        import ray.data  # Ray Data ships in the ray[data] extra
    except ImportError as exc:
        raise CaffeOnnxError(f"--engine ray needs Ray Data, which is not installed ({exc}); {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class RayEncodeResult(EncodeResult):
    """What a Ray encode produced; `shards` > 0 for a directory output."""

    format: str = "npy"
    shards: int = 0


@dataclass(frozen=True)
class InputSource:
    """How an actor opens the input itself: re-map the file the driver mapped, or open the path with the readers.

    Arrays (.npy, a stored .npz member, IDX, and gzip/deflated ones the driver inflated to a scratch file) are
    memory maps: the actor maps the same bytes (`mapped`: file, dtype, shape, offset, order), inflating nothing.
    """

    path: str
    key: str | None
    blob: str
    images: ImageOptions | None
    mapped: tuple[str, str, tuple[int, ...], int, str] | None = None

    @classmethod
    def of(cls, samples: Samples, path: str | os.PathLike[str], key: str | None, blob: str,
           images: ImageOptions | None) -> InputSource:
        mapped = None
        if isinstance(samples, np.memmap) and samples.filename:
            order = "F" if samples.flags.f_contiguous and not samples.flags.c_contiguous else "C"
            mapped = (str(samples.filename), samples.dtype.str, tuple(samples.shape), int(samples.offset), order)
        return cls(str(Path(path).absolute()), key, blob, images, mapped)

    def open(self, stack: contextlib.ExitStack) -> Samples:
        """The input's rows in this process (kept open by `stack`)."""
        if self.mapped is not None:
            name, dtype, shape, offset, order = self.mapped
            try:
                return np.memmap(name, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape, order=order)
            except (OSError, ValueError) as exc:
                raise InputFileError(f"{self.path}: cannot map {name} on this node ({exc})") from None
        return stack.enter_context(open_inputs(self.path, self.key, blob=self.blob, images=self.images)).samples


class EncodeActor:
    """One encoder session per Ray actor: reads its blocks' rows, transforms them as Caffe's TEST phase, encodes."""

    def __init__(self, model: Any, config: SessionConfig, transform: InputTransform, chw: tuple[int, int, int],
                 model_shape: tuple[int, ...], source: InputSource, batch_size: int, block_rows: int,
                 rows: int) -> None:
        import onnx

        if not isinstance(model, bytes):  # an ObjectRef: one copy in the object store, fetched by each actor
            import ray

            model = ray.get(model)
        self.stack = contextlib.ExitStack()
        self.samples = source.open(self.stack)
        self.session = EncoderSession(onnx.load_from_string(model), config)
        self.transformer = transform.transformer()
        self.chw, self.model_shape = chw, model_shape
        self.batch_size, self.block_rows, self.rows = batch_size, block_rows, rows
        self.no_draws = np.random.default_rng(0)  # TEST phase without mirror: the transformer draws nothing

    def encode(self, start: int, stop: int) -> np.ndarray:
        """The codes of input rows [start, stop)."""
        rows = np.asarray(self.samples[start:stop])
        x = self.transformer(rows.reshape((len(rows), *self.chw)), self.no_draws)
        x = np.ascontiguousarray(x.reshape((len(rows), *self.model_shape)), dtype=self.session.input.dtype)
        return self.session.run(x)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"id": block numbers} -> {"id": the input rows of those blocks, "codes": their codes}, in order.

        A block is read and encoded --batch-size rows at a time: only one batch of samples is held."""
        ids, codes = [], []
        for block in np.asarray(batch["id"]).tolist():
            start, stop = block * self.block_rows, min(self.rows, (block + 1) * self.block_rows)
            ids.append(np.arange(start, stop, dtype=np.int64))
            codes.extend(self.encode(lo, min(stop, lo + self.batch_size)) for lo in range(start, stop, self.batch_size))
        return {"id": np.concatenate(ids), "codes": np.concatenate(codes)}


def check_address(address: str | None) -> None:
    """--address as Ray takes it: auto, HOST:PORT (a cluster's GCS) or ray://HOST[:PORT] (Ray Client)."""
    if address is not None and not _ADDRESS.fullmatch(address):
        raise CaffeOnnxError(f"--address must be auto, HOST:PORT (a running cluster) or ray://HOST:PORT (Ray Client), "
                             f"got {address!r}")


@contextlib.contextmanager
def ray_running(address: str | None) -> Iterator[Any]:
    """Ray, connected: the cluster at `address`, else a local one with this machine's CPUs (stopped after).

    A Ray the caller already initialised is used as it is and left running.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is not None:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CaffeOnnxError(f"--address {address!r}: cannot connect to Ray ({first})") from None
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """Ray's Python loggers at ERROR (Ray Data's at CRITICAL) while the job runs: the CLI reports in one line what
    they would log over several (plans, log paths, deprecations, the failed task)."""
    levels = {name: logging.getLogger(name).level for name in ("ray", "ray.data")}
    logging.getLogger("ray").setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def check_actors(actors: int, gpus_per_actor: float) -> None:
    """--actors and --gpus-per-actor as given, before Ray starts."""
    if actors < 1:
        raise CaffeOnnxError(f"--actors must be a positive number of Ray actors, got {actors}")
    if gpus_per_actor < 0:
        raise CaffeOnnxError(f"--gpus-per-actor must be 0 (CPU actors) or positive, got {gpus_per_actor:g}")


def actor_config(config: SessionConfig, gpus_per_actor: float) -> SessionConfig:
    """The session each actor runs: CUDA when given GPUs (falling back to CPU unless --device cuda), else CPU,
    with one intra-op thread (the one CPU an actor reserves) unless --threads says otherwise."""
    device = "cpu" if gpus_per_actor <= 0 else "cuda" if config.device == "cuda" else "auto"
    return replace(config, device=device, intra_threads=config.intra_threads or 1, warmup=())


def _check_fits(ray: Any, actors: int, gpus_per_actor: float) -> None:
    """Refuse a pool the cluster cannot hold (Ray would wait for it forever)."""
    have = ray.cluster_resources()
    cpus, gpus = float(have.get("CPU", 0)), float(have.get("GPU", 0))
    if actors > cpus:
        raise CaffeOnnxError(f"--actors {actors} needs {actors} CPUs (one per actor) but the Ray cluster has "
                             f"{cpus:g}; pass --actors {max(1, int(cpus))} or fewer")
    if actors * gpus_per_actor > gpus:
        raise CaffeOnnxError(f"--actors {actors} --gpus-per-actor {gpus_per_actor:g} needs "
                             f"{actors * gpus_per_actor:g} GPUs but the Ray cluster has {gpus:g}")


def _user_error(exc: BaseException) -> CaffeOnnxError:
    """The CaffeOnnxError an actor raised (Ray wraps it, or only its traceback text), else one line naming Ray's."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, CaffeOnnxError):
            return CaffeOnnxError(f"a Ray actor failed: {(str(seen).splitlines() or [type(seen).__name__])[0]}")
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__ or seen.__context__
    raised = re.findall(r"caffeonnx\.errors\.\w+: (.+)", str(exc))  # an actor's __init__: only the text survives
    if raised:
        return CaffeOnnxError(f"a Ray actor failed: {raised[-1].strip()}")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return CaffeOnnxError(f"the Ray encode job failed ({type(exc).__name__}): {first}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def output_format(output_path: str | os.PathLike[str], fmt: str | None) -> str:
    """--format as given, else parquet for a .parquet/.pq file name and npy otherwise."""
    if fmt is None:
        return "parquet" if Path(output_path).suffix.lower() in (".parquet", ".pq") else "npy"
    if fmt not in FORMATS:
        raise CaffeOnnxError(f"--format must be npy or parquet, got {fmt!r}")
    return fmt


def block_rows(rows: int, batch_size: int, actors: int, code_bytes: int | None) -> int:
    """Rows per Ray block: whole batches, enough blocks to keep every actor busy (BLOCKS_PER_ACTOR each), few
    enough that Ray's per-block cost stays small, and at most BLOCK_CODE_BYTES of codes (None: not known, one
    batch per block)."""
    batches = rows // (batch_size * actors * BLOCKS_PER_ACTOR)
    if code_bytes is None:
        batches = 1
    else:
        batches = min(batches, BLOCK_CODE_BYTES // max(1, code_bytes * batch_size))
    return batch_size * max(1, min(MAX_BATCHES_PER_BLOCK, batches))


def encode_file_ray(
    model_path: str | os.PathLike[str],
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    config: SessionConfig,
    batch_size: int = 1024,
    key: str | None = None,
    scale: float | None = None,
    address: str | None = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    *,
    fmt: str | None = None,
    directory: bool | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
) -> RayEncodeResult:
    """Encode every sample of `input_path` into `output_path` on `actors` Ray actors; the codes of `encode_file`.

    `fmt`: npy or parquet (default from the file name); `directory` (default: `output_path` ends with '/'):
    write shards of `shard_rows` rows and a manifest into that directory instead of one file.
    """
    check_actors(actors, gpus_per_actor)
    check_address(address)
    if batch_size <= 0:
        raise CaffeOnnxError(f"--batch-size must be positive, got {batch_size}")
    if shard_rows <= 0:
        raise CaffeOnnxError(f"--shard-rows must be positive, got {shard_rows}")
    fmt = output_format(output_path, fmt)
    if directory is None:
        directory = os.fspath(output_path).endswith(("/", os.sep))
    if directory:  # a directory that is not an earlier output is refused, never replaced
        check_output_dir(output_path, inputs=[model_path, input_path])
    config = actor_config(config, gpus_per_actor)
    import_ray()  # before any work: a missing Ray is one line
    proto = load_onnx(model_path)
    probe_session = EncoderSession(proto, replace(config, device="cpu", fp16=False, tf32=False, cuda_graphs=()))
    spec, out_spec = probe_session.input, probe_session.output
    del probe_session
    model_shape = streamed_sample_shape(spec, batch_size)
    transform, images = model_transform(model_path, spec.name)
    target = Path(output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(target) + tuple(remove_stale_dirs(target, process_start_time()))
    with sigterm_exits(), open_inputs(input_path, key, scratch_dir=target.parent, blob=spec.name,
                                      images=images) as opened:
        samples = opened.samples
        n = samples.shape[0]
        transform, chw = fit_samples(samples, spec, model_shape, transform, scale, str(input_path))
        if n == 0:
            raise CaffeOnnxError(f"{input_path}: no samples to encode")
        if opened.kind == "LevelDB":
            raise CaffeOnnxError(f"{input_path}: a LevelDB opens in one process at a time, so Ray actors cannot share "
                                 "it; convert it to LMDB (Caffe's convert_imageset --backend lmdb) or use --engine ort")
        source = InputSource.of(samples, input_path, key, spec.name, images)
        info = {"source": {"path": source.path, "kind": opened.kind, "key": key},
                "model": {"path": str(Path(model_path).absolute()), "sha256": _sha256(Path(model_path))},
                "transform": transform.describe(), "scale": transform.scale}
        code_bytes = out_spec.sample_size * out_spec.dtype.itemsize if out_spec.static else None
        rows_per_block = block_rows(n, batch_size, actors, code_bytes)
        blocks = -(-n // rows_per_block)
        with ray_running(address) as ray, _quiet_ray():
            _check_fits(ray, actors, gpus_per_actor)
            context = ray.data.DataContext.get_current()
            ordered, bars = context.execution_options.preserve_order, context.enable_progress_bars
            context.execution_options.preserve_order = True  # codes come back in input order
            context.enable_progress_bars = False
            failure: CaffeOnnxError | None = None
            try:
                codes = ray.data.range(blocks, override_num_blocks=blocks).map_batches(
                    EncodeActor, batch_size=None, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, num_gpus=gpus_per_actor or None,
                    fn_constructor_kwargs={"model": ray.put(proto.SerializeToString()), "config": config,
                                           "transform": transform, "chw": chw, "model_shape": model_shape,
                                           "source": source, "batch_size": batch_size,
                                           "block_rows": rows_per_block, "rows": n})
                output = atomic_dir(target) if directory else atomic_path(target)
                with output as where:
                    writer = CodeWriter(where, fmt, directory, n, shard_rows, info)
                    for batch in codes.iter_batches(batch_size=None, batch_format="numpy"):
                        writer.add(batch["id"], np.asarray(batch["codes"]))
                        if progress:
                            progress(writer.done, n)
                    code_shape = writer.finish()
            except CaffeOnnxError:
                raise
            except Exception as exc:  # Ray wraps what the actors raised; the CLI shows one line
                if not isinstance(exc, ray.exceptions.RayError) and not type(exc).__module__.startswith("ray"):
                    raise
                failure = _user_error(exc)
                if address is not None and "does not exist" in str(failure):
                    failure = CaffeOnnxError(f"{failure} (the actors read the input themselves: on a cluster it must "
                                             "be at the same path on every node, e.g. on a shared filesystem)")
            finally:
                context.execution_options.preserve_order, context.enable_progress_bars = ordered, bars
            if failure is not None:
                # Ray's failed executor and its traceback hold the actors in reference cycles: free them now, not
                # at some later collection, so that a next job on this Ray gets their CPUs.
                codes = None
                gc.collect()
                raise failure
    return RayEncodeResult(n, code_shape, transform.scale, target, transform.describe(), opened.kind, stale, fmt,
                           len(writer.shards) if directory else 0)
