"""Record the runtime benchmark on this machine: benchmarks/results/runtime_cpu.{json,md}.

Usage: python benchmarks/runtime_bench.py [--threads 1,2] [--seconds S] [--device cpu|cuda]
Runs `caffeonnx bench` (ORT vs torch eager on the 784-1000-500-250-30 encoder, then
the server at concurrency 1, 8 and 32 with batching on and off) in one run; with
--device cuda also both engines on the GPU (written to runtime_gpu.{json,md}).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from caffeonnx.runtime.commands import bench

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    """Run the benchmark and write its JSON and Markdown reports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", help="engine thread counts, comma-separated (default: 1 and every core)")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--name", help="file name (without suffix) under results/ (default: runtime_<cpu|gpu>)")
    args = parser.parse_args()
    name = args.name or ("runtime_gpu" if args.device == "cuda" else "runtime_cpu")
    bench(model=None, threads=args.threads, server_threads=1, large_batch=4096, concurrency="1,8,32", seconds=args.seconds, server=True,
          max_batch=64, max_delay_ms=1.0, output=RESULTS / f"{name}.json", device=args.device)


if __name__ == "__main__":
    main()
