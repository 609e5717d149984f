"""Benchmark: converting a VGG-16-shaped caffemodel (138M parameters) vs merely parsing it.

Baseline, in the same run: protobuf's NetParameter.FromString on the whole file,
then every blob's `data` turned into a numpy array -- the least work any converter
must do.  Each measurement runs in its own subprocess (so peak RSS is per task) and
the two alternate, `--reps` times each; we report the median time ratio and peak
memory relative to the caffemodel's size.  Optionally also times caffe2onnx 2.0.1
from another venv (`--caffe2onnx /path/to/python`).

    python benchmarks/convert_large.py --workdir benchmarks/work --reps 3 [--caffe2onnx /tmp/c2o-venv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VGG16 = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]


def vgg16_prototxt(batch: int = 1) -> str:
    """A VGG-16-shaped deploy net (13 conv, 5 max-pool, 3 fc, dropout, softmax)."""
    lines = ['name: "vgg16_shaped"',
             f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {batch} dim: 3 dim: 224 dim: 224 }} }} }}']
    bottom = "data"
    for stage, (ch, n) in enumerate(VGG16, start=1):
        for i in range(1, n + 1):
            name = f"conv{stage}_{i}"
            lines.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                         f'convolution_param {{ num_output: {ch} kernel_size: 3 pad: 1 }} }}')
            lines.append(f'layer {{ name: "relu{stage}_{i}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
            bottom = name
        lines.append(f'layer {{ name: "pool{stage}" type: "Pooling" bottom: "{bottom}" top: "pool{stage}" '
                     'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }')
        bottom = f"pool{stage}"
    for name, n in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        lines.append(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                     f'inner_product_param {{ num_output: {n} }} }}')
        bottom = name
        if name != "fc8":
            lines.append(f'layer {{ name: "relu_{name}" type: "ReLU" bottom: "{name}" top: "{name}" }}')
            lines.append(f'layer {{ name: "drop_{name}" type: "Dropout" bottom: "{name}" top: "{name}" }}')
    lines.append(f'layer {{ name: "prob" type: "Softmax" bottom: "{bottom}" top: "prob" }}')
    return "\n".join(lines) + "\n"


def build_model(workdir: Path) -> tuple[Path, Path]:
    """Write the prototxt and a seeded random caffemodel with caffeonnx's own writer."""
    from caffeonnx.converter.caffe_io import parse_prototxt, write_caffemodel
    from caffeonnx.converter.caffe_to_onnx import convert_net
    from caffeonnx.converter.context import ConvertOptions

    workdir.mkdir(parents=True, exist_ok=True)
    proto, weights = workdir / "vgg16.prototxt", workdir / "vgg16.caffemodel"
    if proto.exists() and weights.exists():
        return proto, weights
    proto.write_text(vgg16_prototxt())
    net = parse_prototxt(proto.read_text(), str(proto))
    # Shapes come from a filler conversion: the same code decides them as for a real model.
    shapes = {}
    for p in convert_net(net, None, ConvertOptions()).model.metadata_props:
        if p.key == "caffe.params":
            for entry in json.loads(p.value):
                for layer, index in entry["users"]:
                    shapes.setdefault(layer, {})[index] = entry["shape"]
    rng = np.random.default_rng(0)
    blobs = {layer: [(rng.standard_normal(s[i], dtype=np.float32) * 0.01) for i in sorted(s)] for layer, s in shapes.items()}
    write_caffemodel(weights, net, blobs)
    return proto, weights


_BASELINE = """
import sys, time, resource, numpy as np
from caffeonnx.proto import caffe_pb2
t = time.perf_counter()
net = caffe_pb2.NetParameter.FromString(open(sys.argv[1], 'rb').read())
arrays = [np.array(b.data, dtype=np.float32).reshape(tuple(b.shape.dim)) for l in net.layer for b in l.blobs]
dt = time.perf_counter() - t
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, sum(a.size for a in arrays))
"""

_OURS = """
import sys, time, resource
from caffeonnx.converter.caffe_to_onnx import convert_files
t = time.perf_counter()
cm = convert_files(sys.argv[1], sys.argv[2])
cm.save(sys.argv[3])
dt = time.perf_counter() - t
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, sum(a.size for a in cm.weights.values()))
"""

_CAFFE2ONNX = """
import sys, time, resource
t = time.perf_counter()
from caffe2onnx.src.load_save_model import loadcaffemodel, saveonnxmodel
from caffe2onnx.src.caffe2onnx import Caffe2Onnx
graph, params = loadcaffemodel(sys.argv[1], sys.argv[2])
model = Caffe2Onnx(graph, params, "vgg16").createOnnxModel()
saveonnxmodel(model, sys.argv[3])
dt = time.perf_counter() - t
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0)
"""


def _run(python: str, script: str, *args: str) -> tuple[float, int]:
    res = subprocess.run([python, "-c", script, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    dt, rss, _ = res.stdout.split()[-3:]
    return float(dt), int(rss)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--caffe2onnx", help="python of a venv with caffe2onnx==2.0.1 installed")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/convert_large.json"))
    args = ap.parse_args()
    proto, weights = build_model(args.workdir)
    size = weights.stat().st_size
    base, ours = [], []
    for _ in range(args.reps):
        base.append(_run(sys.executable, _BASELINE, str(weights)))
        ours.append(_run(sys.executable, _OURS, str(proto), str(weights), str(args.workdir / "vgg16.onnx")))
    result = {
        "model": "VGG-16-shaped, 138,357,544 parameters",
        "caffemodel_bytes": size,
        "machine": f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()}".strip(),
        "reps": args.reps,
        "baseline_parse_s": [b[0] for b in base],
        "convert_s": [o[0] for o in ours],
        "time_ratio_median": statistics.median(o[0] / b[0] for o, b in zip(ours, base)),
        "baseline_peak_rss_bytes": max(b[1] for b in base),
        "convert_peak_rss_bytes": max(o[1] for o in ours),
        "convert_peak_rss_over_caffemodel": max(o[1] for o in ours) / size,
    }
    if args.caffe2onnx:
        t0 = time.perf_counter()
        try:
            dt, rss = _run(args.caffe2onnx, _CAFFE2ONNX, str(proto), str(weights), str(args.workdir / "vgg16_c2o.onnx"))
            result["caffe2onnx_2.0.1"] = {"convert_s": dt, "peak_rss_bytes": rss, "ratio_vs_baseline": dt / statistics.median(b[0] for b in base)}
        except RuntimeError as exc:
            result["caffe2onnx_2.0.1"] = {"failed_after_s": time.perf_counter() - t0, "error": str(exc)[-500:]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
