"""`caffeonnx encode --engine ray`: the same encoding as encode.py, spread over Ray Data actors.

The driver reads the samples with the project's readers (`open_inputs`, every format the local
engine takes) and resolves the transform exactly as `encode_file` does (the model's data layer's
transform_param, `--scale`).  The raw samples go to Ray as one block per `--batch-size` rows
(`ray.data.from_numpy`); `map_batches` runs `EncodeActor`, a callable class holding one
`EncoderSession` per actor (K actors; CUDA when the actor is given GPUs, CPU otherwise), which
applies Caffe's TEST-phase transform and the encoder to each block.  Execution is ordered
(`DataContext.execution_options.preserve_order`), so the codes come back in input order and are
written into a `.npy` under a temporary name, renamed over the target only when every block
succeeded (`atomic_path`): a failed job leaves no partial output.

Without an address a local Ray is started with this machine's CPUs and shut down afterwards; with
one (`auto`, `ray://host:10001`) the running cluster is joined and left running, and the model and
samples are shipped to it (the paths need not exist on the workers).  The driver holds the input
while it is handed to Ray (Ray spills its object store to disk past its memory).
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from caffeonnx.converter.onnx_io import load_onnx
from caffeonnx.errors import CaffeOnnxError
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
from caffeonnx.runtime.inputs import open_inputs
from caffeonnx.runtime.session import EncoderSession, SessionConfig

INSTALL_HINT = "pip install 'caffeonnx[ray]'"


def import_ray() -> Any:
    """The `ray` module with Ray Data, or one clear error saying how to install it."""
    try:
        import ray
        import ray.data  # Ray Data ships in the ray[data] extra
    except ImportError as exc:
        raise CaffeOnnxError(f"--engine ray needs Ray Data, which is not installed ({exc}); {INSTALL_HINT}") from None
    return ray


class EncodeActor:
    """One encoder session per Ray actor: transforms a block of raw samples as Caffe's TEST phase, encodes it."""

    def __init__(self, model: bytes, config: SessionConfig, transform: InputTransform,
                 chw: tuple[int, int, int], model_shape: tuple[int, ...]) -> None:
        import onnx

        self.session = EncoderSession(onnx.load_from_string(model), config)
        self.transformer = transform.transformer()
        self.chw = chw
        self.model_shape = model_shape
        self.no_draws = np.random.default_rng(0)  # TEST phase without mirror: the transformer draws nothing

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{"data": raw rows} -> {"codes": the encoder's codes of those rows, in the same order}."""
        rows = np.asarray(batch["data"])
        x = self.transformer(rows.reshape((len(rows), *self.chw)), self.no_draws)
        spec = self.session.input
        x = np.ascontiguousarray(x.reshape((len(rows), *self.model_shape)), dtype=spec.dtype)
        return {"codes": self.session.run(x)}


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
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CaffeOnnxError(f"--address {address!r}: cannot connect to Ray ({exc})") from None
    else:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def check_actors(actors: int, gpus_per_actor: float) -> None:
    """--actors and --gpus-per-actor as given, before Ray starts."""
    if actors < 1:
        raise CaffeOnnxError(f"--actors must be a positive number of Ray actors, got {actors}")
    if gpus_per_actor < 0:
        raise CaffeOnnxError(f"--gpus-per-actor must be 0 (CPU actors) or positive, got {gpus_per_actor:g}")


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
            return CaffeOnnxError((str(seen).splitlines() or [type(seen).__name__])[0])
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__ or seen.__context__
    raised = re.findall(r"caffeonnx\.errors\.\w+: (.+)", str(exc))  # an actor's __init__: only the text survives
    if raised:
        return CaffeOnnxError(f"a Ray actor failed: {raised[-1].strip()}")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return CaffeOnnxError(f"the Ray encode job failed ({type(exc).__name__}): {first}")


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
) -> EncodeResult:
    """Encode every sample of `input_path` into `output_path` (.npy) on `actors` Ray actors; equal to `encode_file`.

    Actors run on CUDA when `gpus_per_actor` > 0, else on CPU; the rest of `config` (threads, fp16...) is
    used as given.
    """
    check_actors(actors, gpus_per_actor)
    if batch_size <= 0:
        raise CaffeOnnxError(f"--batch-size must be positive, got {batch_size}")
    config = replace(config, device="cuda" if gpus_per_actor > 0 else "cpu", warmup=())
    ray = import_ray()  # before any work: a missing Ray is one line
    proto = load_onnx(model_path)
    probe_session = EncoderSession(proto, replace(config, device="cpu", fp16=False, tf32=False, cuda_graphs=()))
    spec = probe_session.input
    del probe_session
    model_shape = streamed_sample_shape(spec, batch_size)
    transform, images = model_transform(model_path, spec.name)
    target = Path(output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(target)
    with sigterm_exits(), open_inputs(input_path, key, scratch_dir=target.parent, blob=spec.name,
                                      images=images) as opened:
        samples = opened.samples
        n = samples.shape[0]
        transform, chw = fit_samples(samples, spec, model_shape, transform, scale, str(input_path))
        if n == 0:
            raise CaffeOnnxError(f"{input_path}: no samples to encode")
        blocks = [np.ascontiguousarray(samples[start:min(n, start + batch_size)]) for start in range(0, n, batch_size)]
        with ray_running(address) as ray:
            _check_fits(ray, actors, gpus_per_actor)
            context = ray.data.DataContext.get_current()
            ordered, bars = context.execution_options.preserve_order, context.enable_progress_bars
            context.execution_options.preserve_order = True  # codes come back in input order
            context.enable_progress_bars = False
            try:
                codes = ray.data.from_numpy(blocks).map_batches(
                    EncodeActor, batch_size=batch_size, batch_format="numpy", concurrency=actors, num_cpus=1,
                    num_gpus=gpus_per_actor or None, zero_copy_batch=True,
                    fn_constructor_kwargs={"model": proto.SerializeToString(), "config": config,
                                           "transform": transform, "chw": chw, "model_shape": model_shape})
                del blocks
                code_shape = _write_ordered(codes.iter_batches(batch_size=None, batch_format="numpy"), target, n,
                                            progress)
            except CaffeOnnxError:
                raise
            except Exception as exc:  # Ray wraps what the actors raised; the CLI shows one line
                if not isinstance(exc, ray.exceptions.RayError) and not type(exc).__module__.startswith("ray"):
                    raise
                raise _user_error(exc) from exc
            finally:
                context.execution_options.preserve_order, context.enable_progress_bars = ordered, bars
    return EncodeResult(n, code_shape, transform.scale, target, transform.describe(), opened.kind, stale)


def _write_ordered(batches: Iterator[dict[str, np.ndarray]], target: Path, n: int,
                   progress: Callable[[int, int], None] | None) -> tuple[int, ...]:
    """Write the code batches, in the order they come, into `target` atomically; the per-sample code shape."""
    with atomic_path(target) as tmp:  # renamed over the target only when every block arrived
        out: np.memmap | None = None
        done = 0
        for batch in batches:
            block = np.asarray(batch["codes"])
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=block.dtype, shape=(n, *block.shape[1:]))
            if done + len(block) > n:
                raise CaffeOnnxError(f"Ray returned more than the {n} codes asked for")
            out[done:done + len(block)] = block
            done += len(block)
            if progress:
                progress(done, n)
        if out is None or done != n:
            raise CaffeOnnxError(f"Ray returned {done} codes for {n} samples")
        shape = tuple(int(d) for d in out.shape[1:])
        out.flush()
        del out
    return shape
