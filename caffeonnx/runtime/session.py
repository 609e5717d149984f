"""EncoderSession: one encoder on ONNX Runtime, CUDA when available, CPU otherwise.

CUDA path (per the onnxruntime docs): inputs and outputs live in device buffers
bound with IOBinding, allocated once per batch size, so a run copies the batch in,
runs, and copies the codes out, with no allocation; batch sizes listed in
`cuda_graphs` are each captured as a CUDA graph (provider option
`enable_cuda_graph`, one `gpu_graph_id` per size, fixed buffer addresses) and
replayed afterwards.  TF32 is an explicit choice (`use_tf32`, off by default: full
float32 precision), and fp16 compute keeps float32 inputs and outputs.  CUDA sessions
run each biased Gemm as Gemm + Add (bias_split.py says why).

CPU path: plain `run` (or the same IOBinding code on CPU buffers when asked).
`provider` says which execution provider runs the model.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper

from caffeonnx.converter.onnx_io import load_onnx
from caffeonnx.errors import CaffeOnnxError, TensorError, UnsupportedError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8}


@dataclass
class SessionConfig:
    """How to run an encoder: device, threads, precision and CUDA features."""

    device: str = "auto"  # auto: CUDA when it can start, else CPU
    device_id: int = 0
    intra_threads: int = 0  # 0: onnxruntime's default (one per physical core)
    inter_threads: int = 0
    spin: bool = True  # intra-op threads busy-wait between ops (lower latency, burns idle CPU)
    fp16: bool = False  # CUDA only: float16 compute, float32 inputs/outputs
    tf32: bool = False  # CUDA only: allow TF32 tensor-core math for float32 MatMul/Gemm/Conv
    io_binding: bool | None = None  # None: on for CUDA, off for CPU
    cuda_graphs: Sequence[int] = ()  # batch sizes captured as CUDA graphs
    warmup: Sequence[int] = (1,)  # batch sizes run once at start (captures the CUDA graphs)


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of the encoder: name, element type and per-sample dims."""

    name: str
    dtype: np.dtype
    sample_shape: tuple[int | str, ...]  # dims after the batch dimension (str: symbolic)
    batch: int | None  # fixed batch size, or None when the batch is dynamic

    @property
    def static(self) -> bool:
        return all(isinstance(d, int) for d in self.sample_shape)

    @property
    def sample_size(self) -> int:
        return math.prod(int(d) for d in self.sample_shape)


def _spec(arg: ort.NodeArg) -> TensorSpec:
    if arg.type not in _NUMPY_TYPES:
        raise UnsupportedError(f"tensor {arg.name!r} has type {arg.type!r}; EncoderSession runs numeric tensors only")
    dims = [d if isinstance(d, int) and d > 0 else str(d) for d in arg.shape]
    if not dims:
        raise UnsupportedError(f"tensor {arg.name!r} is a scalar; an encoder's input and output have a batch dimension")
    batch = dims[0] if isinstance(dims[0], int) else None
    return TensorSpec(arg.name, np.dtype(_NUMPY_TYPES[arg.type]), tuple(dims[1:]), batch)


def _cuda_options(cfg: SessionConfig) -> dict[str, str]:
    """CUDA execution provider options (documented keys of the CUDA EP)."""
    return {
        "device_id": str(cfg.device_id),
        "use_tf32": "1" if cfg.tf32 else "0",
        "enable_cuda_graph": "1" if cfg.cuda_graphs else "0",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": "1",
    }


@functools.cache
def cuda_available() -> bool:
    """Whether the CUDA execution provider starts here (GPU present, CUDA and cuDNN libraries found)."""
    if CUDA not in ort.get_available_providers():
        return False
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels (or torch's), when installed
        with contextlib.redirect_stdout(io.StringIO()):  # it prints advice when a library is missing
            ort.preload_dlls()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    probe = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ort.set_default_logger_severity(4)  # the failure is expected on CPU-only machines: keep it quiet
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), providers=[CUDA, CPU])
    finally:
        ort.set_default_logger_severity(2)
    return sess.get_providers()[0] == CUDA


class _Bound:
    """Device buffers for one batch size, bound once; reused by every run of that size."""

    def __init__(self, sess: ort.InferenceSession, inp: TensorSpec, out: TensorSpec, batch: int,
                 device: str, device_id: int, graph_id: int) -> None:
        self.input = ort.OrtValue.ortvalue_from_shape_and_type((batch, *inp.sample_shape), inp.dtype, device, device_id)
        self.output = ort.OrtValue.ortvalue_from_shape_and_type((batch, *out.sample_shape), out.dtype, device, device_id)
        self.binding = sess.io_binding()
        self.binding.bind_ortvalue_input(inp.name, self.input)
        self.binding.bind_ortvalue_output(out.name, self.output)
        self.options = ort.RunOptions()
        self.options.add_run_config_entry("gpu_graph_id", str(graph_id))
        # the same run, returning once queued: the caller synchronises (a later synchronised run, or a copy out)
        self.queued = ort.RunOptions()
        self.queued.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.queued.add_run_config_entry("disable_synchronize_execution_providers", "1")


class EncoderSession:
    """A one-input one-output encoder on onnxruntime; `run(batch)` returns its codes."""

    def __init__(self, model: str | os.PathLike[str] | ModelProto, config: SessionConfig | None = None) -> None:
        self.config = cfg = config or SessionConfig()
        if cfg.device not in DEVICES:
            raise CaffeOnnxError(f"device must be one of {DEVICES}, got {cfg.device!r}")
        proto = model if isinstance(model, ModelProto) else load_onnx(model)
        self.source = "<model>" if isinstance(model, ModelProto) else str(Path(model))
        self._sess, self.provider = self._create(proto, cfg)
        for wanted, flag in ((cfg.fp16, "--fp16"), (cfg.tf32, "--tf32")):
            if wanted and self.provider != CUDA:
                raise CaffeOnnxError(f"{flag} is a CUDA setting and CUDA is not available here (running on "
                                     f"{self.provider}); drop {flag}")
        inputs, outputs = self._sess.get_inputs(), self._sess.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UnsupportedError(
                f"{self.source}: EncoderSession runs one input and one output, the model has inputs "
                f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}; cut it with "
                "'caffeonnx encoder' first"
            )
        self.input, self.output = _spec(inputs[0]), _spec(outputs[0])
        device = "cuda" if self.provider == CUDA else "cpu"
        self.io_binding = cfg.io_binding if cfg.io_binding is not None else device == "cuda"
        if cfg.cuda_graphs and (device != "cuda" or not self.io_binding or not (self.input.static and self.output.static)):
            raise CaffeOnnxError("CUDA graphs (--cuda-graph) need the CUDA provider, IOBinding and static per-sample "
                                 f"shapes; running on {self.provider}")
        self._device = device
        self._graph_ids = {int(b): k for k, b in enumerate(dict.fromkeys(cfg.cuda_graphs))}
        self._bound: dict[int, _Bound] = {}
        self._lock = threading.Lock()
        self.warm_up(sorted({*cfg.warmup, *self._graph_ids}))

    @staticmethod
    def _create(model: ModelProto, cfg: SessionConfig) -> tuple[ort.InferenceSession, str]:
        """Start onnxruntime on the requested device; auto falls back to CPU when CUDA cannot start."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = cfg.intra_threads
        so.inter_op_num_threads = cfg.inter_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.spin else "0")
        if cfg.device in ("auto", "cuda") and cuda_available():
            from caffeonnx.runtime.bias_split import DISABLED_FUSIONS, split_gemm_bias
            from caffeonnx.runtime.fp16 import to_fp16

            gpu_model = split_gemm_bias(to_fp16(model) if cfg.fp16 else model)
            sess = ort.InferenceSession(gpu_model.SerializeToString(), so, providers=[(CUDA, _cuda_options(cfg)), CPU],
                                        disabled_optimizers=list(DISABLED_FUSIONS))
            if sess.get_providers()[0] == CUDA:
                return sess, CUDA
        if cfg.device == "cuda":
            raise CaffeOnnxError(
                "device 'cuda' was asked for but the CUDA execution provider could not start (no GPU, or "
                "CUDA/cuDNN libraries not found: see onnxruntime's CUDA requirements); use --device auto or cpu"
            )
        return ort.InferenceSession(model.SerializeToString(), so, providers=[CPU]), CPU

    def describe(self) -> str:
        """One line saying what runs the model and how."""
        cfg = self.config
        if self.provider == CUDA:
            graphs = f", CUDA graphs for batch {sorted(self._graph_ids)}" if self._graph_ids else ""
            return (f"{CUDA} (device {cfg.device_id}, IOBinding{graphs}, {'fp16' if cfg.fp16 else 'fp32'}, "
                    f"TF32 {'on' if cfg.tf32 else 'off'})")
        threads = cfg.intra_threads or "default"
        return f"{CPU} ({threads} intra-op threads{', IOBinding' if self.io_binding else ''})"

    def _check(self, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        """Raise a TensorError naming the input when `dtype`/`shape` do not fit the model."""
        spec = self.input
        if dtype != spec.dtype:
            raise TensorError(
                f"input {spec.name!r} has dtype {dtype.name!r}, the model takes {spec.dtype.name!r}; "
                f"convert with .astype(np.{spec.dtype.name})"
            )
        want = ("N", *spec.sample_shape) if spec.batch is None else (spec.batch, *spec.sample_shape)
        if len(shape) != len(want) or any(isinstance(w, int) and g != w for g, w in zip(shape, want)):
            raise TensorError(f"input {spec.name!r} has shape {tuple(shape)!r}, the model takes {list(want)!r}")

    def validate(self, batch: object) -> np.ndarray:
        """`batch` as a C-contiguous array the model accepts, or a TensorError saying what is wrong."""
        if not isinstance(batch, np.ndarray):
            raise TensorError(f"input {self.input.name!r} must be a numpy array, got {type(batch).__name__}")
        self._check(batch.dtype, batch.shape)
        return np.ascontiguousarray(batch)

    def run(self, batch: object) -> np.ndarray:
        """The codes of `batch` (one row per sample) as a new array on the host."""
        x = self.validate(batch)
        if x.shape[0] == 0 and self.output.static:
            return np.empty((0, *self.output.sample_shape), dtype=self.output.dtype)
        if not self.io_binding:
            return self._sess.run([self.output.name], {self.input.name: x})[0]
        with self._lock:
            bound = self._binding(x.shape[0])
            bound.input.update_inplace(x)
            self._sess.run_with_iobinding(bound.binding, bound.options)
            codes = bound.output.numpy()
            # a CPU OrtValue's numpy() is a view of the bound buffer, which the next run overwrites
            return codes.copy() if self._device == "cpu" else codes

    def device_buffers(self, batch: int) -> tuple[ort.OrtValue, ort.OrtValue]:
        """The bound input and output buffers for `batch` rows, in the session's device memory.

        Fill the input (e.g. `update_inplace` from a device OrtValue) and call `run_bound(batch)`: nothing
        crosses the host boundary.  Read the output before the next run of that batch size.
        """
        if not self.io_binding:
            raise CaffeOnnxError("device buffers need IOBinding (the CUDA provider, or io_binding=True)")
        self._check(self.input.dtype, (batch, *self.input.sample_shape))
        with self._lock:
            bound = self._binding(batch)
        return bound.input, bound.output

    def run_bound(self, batch: int, wait: bool = True) -> None:
        """Run the model on the bound buffers of `batch` rows (see `device_buffers`).

        `wait=False` returns once the run is queued on the device, so back-to-back runs overlap their
        launch overhead with the previous run's kernels; a later `run_bound(..., wait=True)` (same device
        stream) returns only when every queued run has finished.
        """
        with self._lock:
            bound = self._bound.get(batch)
            if bound is None:
                raise CaffeOnnxError(f"no buffers are bound for batch {batch}; call device_buffers({batch}) first")
            self._sess.run_with_iobinding(bound.binding, bound.options if wait else bound.queued)

    def _binding(self, batch: int) -> _Bound:
        """The bound buffers for `batch` rows (made on first use; captured sizes get a CUDA graph id)."""
        bound = self._bound.get(batch)
        if bound is None:
            if not (self.input.static and self.output.static):
                raise UnsupportedError("IOBinding here needs static per-sample input and output shapes")
            graph_id = self._graph_ids.get(batch, -1)  # -1: run without capturing a graph
            bound = _Bound(self._sess, self.input, self.output, batch, self._device, self.config.device_id, graph_id)
            self._bound[batch] = bound
        return bound

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run zeros once per batch size: allocations, kernel choice and CUDA graph capture happen here."""
        if not self.input.static:
            return
        for b in batch_sizes:
            if self.input.batch is not None and b != self.input.batch:
                continue
            zeros = np.zeros((b, *self.input.sample_shape), dtype=self.input.dtype)
            for _ in range(3 if b in self._graph_ids else 1):  # onnxruntime captures after a plain run
                self.run(zeros)
