"""Encoding rows/s of `--engine ray` with K actors (1, 2) against the local engine, side by side in one run.

The 784-1000-500-250-30 deep autoencoder's encoder (seeded weights) encodes MNIST's 60,000 training images
repeated --repeat times (a uint8 .npy written once beforehand, so that no setup pays for gzip), batch 1024,
codes to a .npy, and for K = 2 also to Parquet.  The local engine runs `encode_file` at 1 thread and at
every core; the Ray actors take one CPU and one intra-op thread each.  One local Ray (this machine's
CPUs) serves every Ray job; its start-up is timed on its own, and each job's time includes starting its
actors (what a CLI run pays after `ray.init`), which a one-batch job measures alone.  Rounds alternate
the setups; the medians are compared.  Every setup's codes are checked against the local engine's.
Writes benchmarks/results/ray_encode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from caffeonnx.runtime.bench import deep_ae_encoder
from caffeonnx.runtime.encode import encode_file
from caffeonnx.runtime.encoder import save_model
from caffeonnx.runtime.inputs import open_inputs, open_samples
from caffeonnx.runtime.ray_encode import encode_file_ray
from caffeonnx.runtime.session import EncoderSession, SessionConfig

ROOT = Path(__file__).resolve().parent
MNIST = ROOT.parent.parent / "shared" / "data" / "mnist" / "train-images-idx3-ubyte.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=4, help="copies of MNIST's training images to encode")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "ray_encode.json")
    args = ap.parse_args()
    import ray

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save_model(deep_ae_encoder(seed=0), d / "encoder.onnx")
        with open_samples(MNIST, scratch_dir=d) as images:
            np.save(d / "images.npy", np.concatenate([np.asarray(images)] * args.repeat))
            np.save(d / "one-batch.npy", np.asarray(images[:args.batch_size]))
        rows = int(np.load(d / "images.npy", mmap_mode="r").shape[0])
        started = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray_init_s = time.perf_counter() - started

        def local(threads: int) -> Path:
            out = d / f"local-{threads}.npy"
            session = EncoderSession(d / "encoder.onnx", SessionConfig(device="cpu", intra_threads=threads, warmup=()))
            encode_file(session, d / "images.npy", out, args.batch_size)
            return out

        def distributed(actors: int, fmt: str = "npy", source: str = "images.npy") -> Path:
            out = d / f"ray-{actors}-{source}.{fmt}"
            encode_file_ray(d / "encoder.onnx", d / source, out, SessionConfig(device="cpu", intra_threads=1),
                            args.batch_size, actors=actors, fmt=fmt)
            return out

        setups = {"local engine, 1 thread": lambda: local(1),
                  f"local engine, {cores} threads": lambda: local(cores),
                  "ray, 1 actor": lambda: distributed(1),
                  "ray, 2 actors": lambda: distributed(2),
                  "ray, 2 actors, Parquet out": lambda: distributed(2, "parquet")}
        runs: dict[str, list[float]] = {k: [] for k in setups}
        one_batch: dict[str, list[float]] = {"ray, 1 actor": [], "ray, 2 actors": []}
        outputs: dict[str, Path] = {}
        for _ in range(args.rounds):
            for label, run in setups.items():
                started = time.perf_counter()
                outputs[label] = run()
                runs[label].append(rows / (time.perf_counter() - started))
            for actors, label in enumerate(one_batch, 1):
                started = time.perf_counter()
                distributed(actors, source="one-batch.npy")
                one_batch[label].append(time.perf_counter() - started)
        want = np.load(outputs["local engine, 1 thread"])
        diffs = {}
        for label, path in outputs.items():
            with open_inputs(path) as opened:
                diffs[label] = float(np.max(np.abs(np.asarray(opened.samples[0:rows]) - want)))
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med["local engine, 1 thread"]
    result = {
        "what": f"encode MNIST train x{args.repeat} ({rows} uint8 images) with the 784-1000-500-250-30 encoder, "
                f"batch {args.batch_size}, codes to .npy (and Parquet); Ray jobs include starting their actors",
        "machine": f"{platform.machine()} python {platform.python_version()} cpus {cores}",
        "ray_version": ray.__version__,
        "ray_init_s": ray_init_s,
        "rows_per_s": runs,
        "median_rows_per_s": med,
        "ratio_over_local_1_thread": {k: v / base for k, v in med.items()},
        "one_batch_job_s": one_batch,
        "median_one_batch_job_s": {k: statistics.median(v) for k, v in one_batch.items()},
        "max_abs_diff_vs_local_1_thread": diffs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
