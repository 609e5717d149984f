"""`caffeonnx bench`: ONNX Runtime vs torch eager on one encoder, and the server under load.

Engines: the same encoder (same weights) run by EncoderSession and, in torch eager
mode, by the trainer's GraphModule (which interprets any ONNX graph the trainer's
kernels cover: fully connected, convolutional, pooling...), with the same number of
threads; batch-1 latency p50/p99 over many single calls (numpy in, numpy out, as a
caller sees it) and large-batch throughput from the median time of one large batch.
Rounds alternate the two engines so that noise from other processes falls on both alike.

Server: `caffeonnx serve` in its own process, batching on and off, under
closed-loop load (loadgen.py) at each concurrency: requests/s and latency p50/p99.

The report holds measurements and their ratios only; what counts as good enough is
for the reader (benchmarks/README.md records results against the project's targets).
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import ModelProto

from caffeonnx.converter.onnx_io import load_onnx
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.child import serve_in_child
from caffeonnx.runtime.encoder import extract_encoder, save_model
from caffeonnx.runtime.loadgen import LoadResult, infer_request_bytes, run_load
from caffeonnx.runtime.session import EncoderSession, SessionConfig
from caffeonnx.trainer.graph_module import GraphModule

DEEP_AE_SIZES = (784, 1000, 500, 250, 30)  # the MNIST deep autoencoder of Hinton & Salakhutdinov (2006)
SMALL_AND_LARGE = ((784, 128, 64, 32, 8), DEEP_AE_SIZES)  # deep_tied_ae's shape, then the large one
SERVER_ROUNDS = 3  # alternating measurement windows per server point


def deep_ae_prototxt(sizes: Sequence[int] = DEEP_AE_SIZES) -> str:
    """A tied deep autoencoder prototxt: sigmoid encoder layers, linear code, transposed decoder."""
    layers = [f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {sizes[0]} }} }} }}']
    bottom = "data"
    for k, n in enumerate(sizes[1:], 1):
        layers.append(f'layer {{ name: "encode{k}" type: "InnerProduct" bottom: "{bottom}" top: "encode{k}" '
                      f'param {{ name: "w{k}" }} inner_product_param {{ num_output: {n} '
                      f'weight_filler {{ type: "gaussian" std: 0.05 }} bias_filler {{ type: "gaussian" std: 0.1 }} }} }}')
        bottom = f"encode{k}"
        if k < len(sizes) - 1:
            layers.append(f'layer {{ name: "encode{k}neuron" type: "Sigmoid" bottom: "{bottom}" top: "encode{k}neuron" }}')
            bottom = f"encode{k}neuron"
    for k in range(len(sizes) - 1, 0, -1):
        layers.append(f'layer {{ name: "decode{k}" type: "InnerProduct" bottom: "{bottom}" top: "decode{k}" '
                      f'param {{ name: "w{k}" }} inner_product_param {{ num_output: {sizes[k - 1]} transpose: true }} }}')
        layers.append(f'layer {{ name: "decode{k}neuron" type: "Sigmoid" bottom: "decode{k}" top: "decode{k}neuron" }}')
        bottom = f"decode{k}neuron"
    return f'name: "deep_ae_{"_".join(map(str, sizes))}"\n' + "\n".join(layers) + "\n"


def deep_ae_encoder(seed: int = 0, sizes: Sequence[int] = DEEP_AE_SIZES) -> ModelProto:
    """The encoder of `deep_ae_prototxt`, weights from its fillers (seeded), batch dimension dynamic."""
    from caffeonnx.converter.caffe_io import parse_prototxt
    from caffeonnx.converter.caffe_to_onnx import convert_net
    from caffeonnx.converter.context import ConvertOptions
    from caffeonnx.converter.upgrade import upgrade_net

    net = upgrade_net(parse_prototxt(deep_ae_prototxt(sizes), "<bench>"), "<bench>")
    return extract_encoder(convert_net(net, None, ConvertOptions(seed=seed), source="<bench>").to_proto())[0]


@dataclass
class EngineResult:
    """One engine's numbers: batch-1 latency and large-batch throughput."""

    engine: str
    latency_p50_us: float  # over every call of every round
    latency_p99_us: float
    throughput: float  # samples per second at the large batch
    round_p50_us: list[float]  # batch-1 p50 of each round (the ratio is taken round by round)


def timed_calls(call: Callable[[], object], count: int) -> np.ndarray:
    """Seconds taken by each of `count` calls."""
    times = np.empty(count)
    for k in range(count):
        start = time.perf_counter()
        call()
        times[k] = time.perf_counter() - start
    return times


class TorchEngine:
    """The encoder in torch eager mode: the trainer's GraphModule, in inference mode, numpy in and out."""

    def __init__(self, model: ModelProto, input_name: str, output_name: str) -> None:
        self.net = GraphModule(model).eval()
        self.input, self.output = input_name, output_name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.net({self.input: torch.from_numpy(x)}, (self.output,))[self.output].numpy()


def sample_batch(g: np.random.Generator, session: EncoderSession, batch: int) -> np.ndarray:
    """Random inputs of the encoder's per-sample shape and type: floats in [0, 1), zeros for integer inputs."""
    spec = session.input
    if not spec.static:
        raise CaffeOnnxError(f"input {spec.name!r} has symbolic per-sample dims {list(spec.sample_shape)}; the "
                             "benchmark needs them fixed (convert with --input-shape)")
    shape = (batch, *(int(d) for d in spec.sample_shape))
    if np.issubdtype(spec.dtype, np.floating):
        return g.random(shape, dtype=np.float32).astype(spec.dtype)
    return np.zeros(shape, dtype=spec.dtype)


def _measure_engines(model: ModelProto, threads: int, large_batch: int, calls: int, large_calls: int, rounds: int,
                     seed: int) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """Per-call seconds of each engine: batch-1 calls and large-batch calls, alternating in rounds."""
    session = EncoderSession(model, SessionConfig(device="cpu", intra_threads=threads, warmup=(1, large_batch)))
    torch_run = TorchEngine(model, session.input.name, session.output.name)
    g = np.random.default_rng(seed)
    one, big = sample_batch(g, session, 1), sample_batch(g, session, large_batch)
    want = session.run(big[:64])
    got = torch_run(big[:64])
    if not np.allclose(got, want, atol=1e-4, rtol=1e-3):
        raise CaffeOnnxError(f"torch (GraphModule) and onnxruntime disagree on this encoder: max |code difference| "
                             f"{np.abs(got - want).max():.3g}; timings of different results would mean nothing")
    engines = {"onnxruntime": session.run, "torch eager": torch_run}
    small: dict[str, list[np.ndarray]] = {k: [] for k in engines}
    large: dict[str, list[np.ndarray]] = {k: [] for k in engines}
    for run in engines.values():  # warm-up
        timed_calls(partial(run, one), 200)
        timed_calls(partial(run, big), 2)
    for _ in range(rounds):
        for name, run in engines.items():
            small[name].append(timed_calls(partial(run, one), calls // rounds))
            large[name].append(timed_calls(partial(run, big), max(1, large_calls // rounds)))
    return small, large


def bench_engines(model: ModelProto, threads: int = 1, large_batch: int = 4096, calls: int = 2000,
                  large_calls: int = 20, rounds: int = 20, seed: int = 0) -> list[EngineResult]:
    """EncoderSession (onnxruntime CPU) and GraphModule (torch eager) on the same inputs and threads.

    Many short alternating rounds: a change in the machine's load (which slows torch more than ORT)
    then falls inside rounds that both engines share, and one disturbed round moves the median little.
    """
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        small, large = _measure_engines(model, threads, large_batch, calls, large_calls, rounds, seed)
    finally:
        torch.set_num_threads(torch_threads)
    results = []
    for name in small:
        lat = np.concatenate(small[name]) * 1e6
        per_batch = float(np.median(np.concatenate(large[name])))
        results.append(EngineResult(name, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
                                    large_batch / per_batch, [float(np.median(r)) * 1e6 for r in small[name]]))
    return results


@dataclass
class ServerResult:
    """Requests/s and latency of the server at one concurrency, batching on or off."""

    batching: bool
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def bench_server(model_path: Path, concurrencies: Sequence[int] = (1, 8, 32), seconds: float = 3.0,
                 threads: int = 1, max_batch: int = 64, max_delay_ms: float = 1.0, *, rounds: int = SERVER_ROUNDS,
                 seed: int = 0, device: str = "cpu") -> list[ServerResult]:
    """Two servers, batching on and off, under closed-loop load of batch-1 binary requests.

    Both run at once but are loaded in turn, in `rounds` short windows per concurrency, so that a change in
    the machine's background load hits both alike; req/s is the median over the windows, latency percentiles
    pool every request.
    """
    if rounds < 1:
        raise CaffeOnnxError(f"rounds must be positive, got {rounds}")
    session = EncoderSession(model_path, SessionConfig(device="cpu", warmup=()))
    x = sample_batch(np.random.default_rng(seed), session, 1)
    common = ["--threads", str(threads), "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms)]
    with serve_in_child(model_path, "enc", *common, "--batching", device=device) as srv_on, \
            serve_in_child(model_path, "enc", *common, "--no-batching", device=device) as srv_off:
        on, off = srv_on.port, srv_off.port
        ports = {True: on, False: off}
        requests = {b: infer_request_bytes("127.0.0.1", p, "enc", session.input.name, session.output.name, x)
                    for b, p in ports.items()}
        windows: dict[tuple[bool, int], list[LoadResult]] = {(b, c): [] for b in ports for c in concurrencies}
        for c in concurrencies:
            for _ in range(rounds):
                for batching, port in ports.items():
                    windows[batching, c].append(run_load("127.0.0.1", port, requests[batching], c, seconds / rounds,
                                                         warmup=0.3))
    results = []
    for (batching, c), loads in windows.items():
        latencies = np.concatenate([w.latencies for w in loads]) * 1000
        results.append(ServerResult(batching, c, float(np.median([w.rate for w in loads])),
                                    float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)),
                                    sum(w.errors for w in loads)))
    return results


def machine() -> dict[str, object]:
    """Where the numbers were taken."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpus_visible": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "torch": torch.__version__,
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _engine_summary(label: str, engines: list[EngineResult]) -> dict:
    """One model's engine numbers and the ratios of ORT to torch."""
    by = {e.engine: e for e in engines}
    throughput = by["onnxruntime"].throughput / by["torch eager"].throughput
    per_round = np.array(by["onnxruntime"].round_p50_us) / np.array(by["torch eager"].round_p50_us)
    latency = float(np.median(per_round))
    return {"model": label, "engines": [asdict(e) for e in engines],
            "throughput_ratio": throughput, "latency_ratio": latency,
            "latency_ratio_quartiles": [float(np.percentile(per_round, 25)), float(np.percentile(per_round, 75))]}


def default_threads() -> tuple[int, ...]:
    """1 thread (per-core efficiency) and every core (what each engine does out of the box)."""
    return tuple(dict.fromkeys((1, os.cpu_count() or 1)))


def run_bench(model_path: Path | None = None, threads: Sequence[int] = (1,), large_batch: int = 4096,
              concurrencies: Sequence[int] = (1, 8, 32), seconds: float = 3.0, server: bool = True,
              max_batch: int = 64, max_delay_ms: float = 1.0, seed: int = 0, device: str = "cpu",
              server_threads: int = 1) -> dict:
    """The whole benchmark in one run: engine timings, server load points and their ratios.

    Without `model_path` the engines run two encoders with seeded weights, the deep_tied_ae shape
    (784-128-64-32-8: per-call overhead dominates) and the MNIST deep autoencoder (784-1000-500-250-30:
    5.6 MB of weights, memory-bound at batch 1); the server runs the larger one.  With `device="cuda"`
    the CPU engines are followed by both engines on the GPU (bench_cuda) for the larger encoder, and
    the servers run on the GPU.
    """
    if device not in ("cpu", "cuda"):
        raise CaffeOnnxError(f"bench --device must be cpu or cuda, got {device!r}")
    with tempfile.TemporaryDirectory() as tmp:
        if model_path is None:
            models = {"-".join(map(str, sizes)): deep_ae_encoder(seed, sizes) for sizes in SMALL_AND_LARGE}
            label = "-".join(map(str, SMALL_AND_LARGE[-1]))
            server_path = Path(tmp) / "encoder.onnx"
            save_model(models[label], server_path)
        else:
            label = str(model_path)
            models, server_path = {label: load_onnx(model_path)}, model_path
        summaries = [{"threads": t, **_engine_summary(name, bench_engines(m, t, large_batch, seed=seed))}
                     for t in threads for name, m in models.items()]
        gpu = None
        if device == "cuda":
            from caffeonnx.runtime.bench_cuda import bench_cuda_engines

            gpu = {"model": label, **bench_cuda_engines(models[label], large_batch, seed=seed)}
        served = bench_server(server_path, concurrencies, seconds, server_threads, max_batch, max_delay_ms,
                              seed=seed, device=device) if server else []
    result: dict = {
        "models": summaries, "threads": list(threads), "server_threads": server_threads,
        "large_batch": large_batch, "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "server": None, "cuda": gpu,
    }
    if served:
        top = max(concurrencies)
        on = next(r for r in served if r.batching and r.concurrency == top)
        off = next(r for r in served if not r.batching and r.concurrency == top)
        speedup = on.requests_per_s / off.requests_per_s
        result["server"] = {"model": label, "device": device, "seconds": seconds, "max_batch": max_batch, "max_delay_ms": max_delay_ms,
                            "points": [asdict(r) for r in served], "top_concurrency": top,
                            "batching_speedup": speedup}
    return result


def render_markdown(result: dict) -> str:
    """The benchmark result as a Markdown report."""
    m = result["machine"]
    setup = (f"CPU: {m['cpu']} ({m['cpus_visible']} visible, shared; 1-min load average {m['load_average_1m']:.2f} "
             f"at the end); onnxruntime {m['onnxruntime']}, torch {m['torch']}, Python {m['python']}; "
             f"engines compared at the same thread count ({', '.join(map(str, result['threads']))}); the server "
             f"runs {result['server_threads']} thread(s). torch eager is the trainer's GraphModule running the "
             "same ONNX graph.")
    lines = [f"# Runtime benchmark ({result['when']})", "", setup, "",
             f"## Engines (batch-1 latency, batch-{result['large_batch']} throughput)", "",
             "| encoder | threads | engine | p50 µs | p99 µs | samples/s |", "|---|---:|---|---:|---:|---:|"]
    for s in result["models"]:
        for e in s["engines"]:
            lines.append(f"| {s['model']} | {s['threads']} | {e['engine']} | {e['latency_p50_us']:.1f} | "
                         f"{e['latency_p99_us']:.1f} | {e['throughput']:,.0f} |")
    srv = result["server"]
    if srv:
        where = f" on {srv['device']}" if srv.get("device", "cpu") != "cpu" else ""
        title = (f"## Server{where} ({srv['model']}; batch-1 binary requests; {srv['seconds']:g} s per point in "
                 f"{SERVER_ROUNDS} alternating windows; max batch {srv['max_batch']}, max delay "
                 f"{srv['max_delay_ms']:g} ms)")
        lines += ["", title, "", "| batching | concurrency | req/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|---:|"]
        for p in srv["points"]:
            lines.append(f"| {'on' if p['batching'] else 'off'} | {p['concurrency']} | {p['requests_per_s']:,.0f} | "
                         f"{p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['errors']} |")
    lines += ["", "## Ratios", "", "| ratio | value |", "|---|---:|"]
    for s in result["models"]:
        lines.append(f"| {s['model']}, {s['threads']} thread(s): ORT / torch large-batch throughput | "
                     f"{s['throughput_ratio']:.2f} |")
        q1, q3 = s["latency_ratio_quartiles"]
        lines.append(f"| {s['model']}, {s['threads']} thread(s): ORT / torch batch-1 p50 latency (median of "
                     f"rounds; IQR {q1:.2f}-{q3:.2f}) | {s['latency_ratio']:.2f} |")
    if srv:
        lines.append(f"| server req/s, batching on / off, concurrency {srv['top_concurrency']} | "
                     f"{srv['batching_speedup']:.2f} |")
    if result.get("cuda"):
        from caffeonnx.runtime.bench_cuda import render_cuda_markdown

        lines += ["", render_cuda_markdown(result["cuda"]).rstrip("\n")]
    return "\n".join(lines) + "\n"
