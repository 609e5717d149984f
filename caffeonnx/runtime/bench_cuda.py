"""`caffeonnx bench --device cuda`: ONNX Runtime's CUDA provider vs torch eager on CUDA, one encoder.

For each precision (float32, TF32, float16 compute with float32 I/O) both engines run the
same weights and are measured the same way, alternating in rounds:

- batch-1 latency as a caller sees it: a host array in, its codes back on the host
  (ORT: IOBinding with buffers bound once and a CUDA graph replayed; torch: `.to(cuda)`,
  forward, `.cpu()`), p50/p99 over many calls;
- batch-1 latency with device-resident data (ORT `run_bound`, torch forward + synchronize);
- large-batch throughput with device-resident data, each call waited for (samples/s from the
  median call), and pipelined: `queue` runs issued back to back and waited for once.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from onnx import ModelProto

from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.bench import timed_calls
from caffeonnx.runtime.session import CUDA, EncoderSession, SessionConfig
from caffeonnx.runtime.torch_encoder import TorchEncoder

PRECISIONS = ("fp32", "tf32", "fp16")
CUDA_TARGETS = {"throughput_min": 30e6, "latency_p50_us_max": 100.0}
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-2, "fp16": 2e-2}  # max |code difference| between the engines


@dataclass
class CudaEngineResult:
    """One engine at one precision on the GPU."""

    engine: str
    precision: str
    host_p50_us: float  # batch 1, host array in and codes out
    host_p99_us: float
    device_p50_us: float  # batch 1, data already on the device
    device_p99_us: float
    throughput: float  # samples/s at the large batch, each run waited for
    pipelined_throughput: float  # samples/s at the large batch, runs queued back to back


def _pipelined(issue: Callable[[], object], finish: Callable[[], object], queue: int) -> float:
    """Seconds per run when `queue` runs are issued back to back and waited for once."""
    t0 = time.perf_counter()
    for _ in range(queue - 1):
        issue()
    finish()
    return (time.perf_counter() - t0) / queue


class _OrtEngine:
    """EncoderSession on CUDA with IOBinding and CUDA graphs for batch 1 and the large batch."""

    def __init__(self, model: ModelProto, precision: str, large: int, x1: np.ndarray, xl: np.ndarray) -> None:
        self.large = large
        cfg = SessionConfig(device="cuda", fp16=precision == "fp16", tf32=precision == "tf32",
                            cuda_graphs=(1, large), warmup=(1, large))
        self.session = s = EncoderSession(model, cfg)
        if s.provider != CUDA:
            raise CaffeOnnxError(f"onnxruntime runs on {s.provider}, not CUDA")
        self.x1 = x1
        in1, _ = s.device_buffers(1)
        in1.update_inplace(x1)
        inl, _ = s.device_buffers(large)
        inl.update_inplace(xl)

    def codes(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(x)

    def host_one(self) -> object:
        return self.codes(self.x1)

    def device_one(self) -> None:
        self.session.run_bound(1)

    def large_waited(self) -> None:
        self.session.run_bound(self.large)

    def large_queued(self) -> None:
        self.session.run_bound(self.large, wait=False)


class _TorchEngine:
    """TorchEncoder on CUDA in inference mode; fp16 casts inputs in and codes out like the ORT rewrite."""

    def __init__(self, model: ModelProto, precision: str, x1: np.ndarray, xl: np.ndarray) -> None:
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.net = TorchEncoder(model).to("cuda", self.dtype).eval()
        self.x1 = x1
        self.d1 = torch.from_numpy(x1).to("cuda", self.dtype)
        self.dl = torch.from_numpy(xl).to("cuda", self.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net(x.to(self.dtype)).float()

    def codes(self, x: np.ndarray) -> np.ndarray:
        return self._forward(torch.from_numpy(x).to("cuda")).cpu().numpy()

    def host_one(self) -> object:
        return self.codes(self.x1)

    def device_one(self) -> None:
        self._forward(self.d1)
        torch.cuda.synchronize()

    def large_waited(self) -> None:
        self._forward(self.dl)
        torch.cuda.synchronize()

    def large_queued(self) -> None:
        self._forward(self.dl)


def _measure(engines: dict[str, _OrtEngine | _TorchEngine], precision: str, large: int, calls: int,
             large_calls: int, queue: int, rounds: int) -> list[CudaEngineResult]:
    host = {k: [] for k in engines}
    device = {k: [] for k in engines}
    waited = {k: [] for k in engines}
    piped = {k: [] for k in engines}
    for e in engines.values():  # warm-up (allocator, kernel choice, graph capture already done for ORT)
        timed_calls(e.host_one, 50)
        timed_calls(e.large_waited, 5)
    for _ in range(rounds):
        for name, e in engines.items():
            host[name].append(timed_calls(e.host_one, calls // rounds))
            device[name].append(timed_calls(e.device_one, calls // rounds))
            waited[name].append(timed_calls(e.large_waited, max(1, large_calls // rounds)))
            piped[name].append(_pipelined(e.large_queued, e.large_waited, queue))
    results = []
    for name in engines:
        h, d = np.concatenate(host[name]) * 1e6, np.concatenate(device[name]) * 1e6
        results.append(CudaEngineResult(
            name, precision, float(np.percentile(h, 50)), float(np.percentile(h, 99)), float(np.percentile(d, 50)),
            float(np.percentile(d, 99)), large / float(np.median(np.concatenate(waited[name]))),
            large / float(np.median(piped[name]))))
    return results


def bench_cuda_engines(model: ModelProto, large_batch: int = 4096, precisions: Sequence[str] = PRECISIONS,
                       calls: int = 3000, large_calls: int = 60, queue: int = 50, rounds: int = 3,
                       seed: int = 0) -> dict:
    """Both engines at each precision, after checking they compute the same codes."""
    if not torch.cuda.is_available():
        raise CaffeOnnxError("bench --device cuda: torch sees no CUDA device here; use --device cpu")
    bad = sorted(set(precisions) - set(PRECISIONS))
    if bad:
        raise CaffeOnnxError(f"unknown precision(s) {bad!r}; choose from {PRECISIONS!r}")
    spec = EncoderSession(model, SessionConfig(device="cpu", warmup=())).input  # the shape the session checks
    if not spec.static or spec.dtype != np.float32:
        raise CaffeOnnxError(f"bench --device cuda feeds float32 samples of a static shape; input {spec.name!r} is "
                             f"{spec.dtype.name} {list(spec.sample_shape)!r} per sample")
    g = np.random.default_rng(seed)
    x1 = g.random((1, *spec.sample_shape), dtype=np.float32)
    xl = g.random((large_batch, *spec.sample_shape), dtype=np.float32)
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    results: list[CudaEngineResult] = []
    agreement: dict[str, float] = {}
    describe: dict[str, str] = {}
    try:
        for precision in precisions:
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            engines = {"onnxruntime": _OrtEngine(model, precision, large_batch, x1, xl),
                       "torch eager": _TorchEngine(model, precision, x1, xl)}
            describe[precision] = engines["onnxruntime"].session.describe()
            probe = xl[:256]
            diff = float(np.abs(engines["onnxruntime"].codes(probe) - engines["torch eager"].codes(probe)).max())
            if not diff <= TOLERANCE[precision]:
                raise CaffeOnnxError(f"{precision}: torch and onnxruntime codes differ by {diff:.3g} "
                                     f"(> {TOLERANCE[precision]:g})")
            agreement[precision] = diff
            results += _measure(engines, precision, large_batch, calls, large_calls, queue, rounds)
            del engines
            torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    return {"gpu": torch.cuda.get_device_name(), "large_batch": large_batch, "queue": queue,
            "engines": [asdict(r) for r in results], "max_code_difference": agreement, "sessions": describe,
            **_acceptance(results)}


def _acceptance(results: list[CudaEngineResult]) -> dict:
    """The issue's GPU targets, read off ONNX Runtime's best precision for each."""
    ort_rows = [r for r in results if r.engine == "onnxruntime"]
    best_tp = max(ort_rows, key=lambda r: r.throughput)
    best_lat = min(ort_rows, key=lambda r: r.host_p50_us)
    return {"targets": CUDA_TARGETS, "acceptance": {
        "throughput": {"precision": best_tp.precision, "samples_per_s": best_tp.throughput,
                       "passed": best_tp.throughput >= CUDA_TARGETS["throughput_min"]},
        "latency": {"precision": best_lat.precision, "host_p50_us": best_lat.host_p50_us,
                    "passed": best_lat.host_p50_us <= CUDA_TARGETS["latency_p50_us_max"]}}}


def render_cuda_markdown(result: dict) -> str:
    """The GPU section of the benchmark report."""
    lines = [f"## GPU: {result['gpu']} (IOBinding + CUDA graphs for ORT; batch 1 and {result['large_batch']})", "",
             ("| precision | engine | batch-1 p50 µs (host in/out) | p99 µs | batch-1 p50 µs (on device) | p99 µs | "
             f"batch-{result['large_batch']} samples/s | pipelined ({result['queue']} queued) samples/s |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e in result["engines"]:
        lines.append(f"| {e['precision']} | {e['engine']} | {e['host_p50_us']:.1f} | {e['host_p99_us']:.1f} | "
                     f"{e['device_p50_us']:.1f} | {e['device_p99_us']:.1f} | {e['throughput']:,.0f} | "
                     f"{e['pipelined_throughput']:,.0f} |")
    by = {(e["engine"], e["precision"]): e for e in result["engines"]}
    lines += ["", "| precision | ORT / torch batch-1 p50 (host) | ORT / torch throughput | max code difference |",
              "|---|---:|---:|---:|"]
    for p in result["max_code_difference"]:
        o, t = by["onnxruntime", p], by["torch eager", p]
        lines.append(f"| {p} | {o['host_p50_us'] / t['host_p50_us']:.2f} | {o['throughput'] / t['throughput']:.2f} | "
                     f"{result['max_code_difference'][p]:.2g} |")
    acc, t = result["acceptance"], result["targets"]
    lines += ["", "| GPU target | ORT result | met |", "|---|---:|---|",
              (f"| batch-{result['large_batch']} throughput, device-resident data >= {t['throughput_min'] / 1e6:g} M "
              f"samples/s | {acc['throughput']['samples_per_s'] / 1e6:.1f} M ({acc['throughput']['precision']}) | "
              f"{'yes' if acc['throughput']['passed'] else 'NO'} |"),
              (f"| batch-1 p50 <= {t['latency_p50_us_max']:g} µs (host in/out, IOBinding + CUDA graph) | "
              f"{acc['latency']['host_p50_us']:.1f} µs ({acc['latency']['precision']}) | "
              f"{'yes' if acc['latency']['passed'] else 'NO'} |")]
    return "\n".join(lines) + "\n"
