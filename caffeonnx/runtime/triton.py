"""Export an ONNX model as a Triton Inference Server model repository entry.

Layout: `REPO/NAME/config.pbtxt` and `REPO/NAME/1/model.onnx` (the file as is): the
path from `caffeonnx serve` on one machine to N model instances in Triton, or N
replicas behind KServe (kserve.py).  The config is Triton's ModelConfig
(model_config.proto) in protobuf text format, for the ONNX Runtime backend:

- `max_batch_size` and dims without the batch when every input and output has a
  dynamic batch dimension; a model with a fixed batch gets `max_batch_size: 0` and its
  full dims, and `TritonExport.notes` says so (Triton cannot batch such a model);
- `instance_group [{ count, kind }]`: N copies of the model, each with its own ONNX
  Runtime session, on CPU or on every GPU;
- `dynamic_batching { preferred_batch_size, max_queue_delay_microseconds }`;
- `optimization { graph { level } }`: the backend reads -1 as ORT_ENABLE_BASIC, 1 as
  ORT_ENABLE_EXTENDED and 2 as ORT_DISABLE_ALL; no `graph` block is ORT_ENABLE_ALL;
- `optimization { execution_accelerators { gpu_execution_accelerator [{ name: "tensorrt"
  parameters {...} }] } }`: ONNX Runtime's TensorRT execution provider inside the backend,
  with the parameter names the backend maps (precision_mode, max_workspace_size_bytes,
  trt_engine_cache_enable/path, trt_profile_min/opt/max_shapes);
- `parameters { key: "intra_op_thread_count" ... }`: threads of each instance's session.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from caffeonnx.converter.onnx_io import load_onnx
from caffeonnx.errors import CaffeOnnxError, UnsupportedError
from caffeonnx.fileio import atomic_path, write_bytes_atomic
from caffeonnx.runtime.protocol import check_model_name, triton_config, v2_shape
from caffeonnx.runtime.session import TensorSpec, _spec

KINDS = ("auto", "cpu", "gpu")
# ModelOptimizationPolicy.Graph.level as the onnxruntime backend reads it (absent: ORT_ENABLE_ALL)
GRAPH_LEVELS: dict[str, int | None] = {"all": None, "extended": 1, "basic": -1, "disable": 2}
TRT_PRECISIONS = ("FP32", "FP16")
_ENUM_FIELDS = {"data_type", "kind"}  # written bare (TYPE_FP32, KIND_GPU), not quoted


@dataclass
class TritonOptions:
    """What the config.pbtxt asks of Triton besides the model's tensors."""

    max_batch: int = 64  # max_batch_size (0: no batching)
    max_queue_delay_us: int = 100  # dynamic_batching.max_queue_delay_microseconds
    preferred_batch: Sequence[int] = ()  # dynamic_batching.preferred_batch_size
    instances: int = 1  # instance_group count (per GPU for KIND_GPU)
    kind: str = "auto"  # auto: Triton's default (one instance per GPU if there are GPUs, else on CPU)
    graph_level: str = "all"  # ONNX Runtime graph optimisations: all, extended, basic, disable
    threads: int = 0  # intra_op_thread_count per instance (0: ONNX Runtime's default, every core)
    tensorrt: bool = False  # the TensorRT execution accelerator (GPU instances)
    trt_precision: str = "FP32"
    trt_workspace_bytes: int | None = None
    trt_engine_cache: str | None = None  # directory, in the Triton container, for built TensorRT engines

    def check(self) -> None:
        """Refuse contradictory or out-of-range options with one line naming them."""
        if self.max_batch < 0 or self.max_queue_delay_us < 0:
            raise CaffeOnnxError(f"--max-batch and --max-queue-delay must be >= 0, got {self.max_batch} and "
                                 f"{self.max_queue_delay_us}")
        if self.instances < 1:
            raise CaffeOnnxError(f"--instances must be at least 1, got {self.instances}")
        if self.kind not in KINDS:
            raise CaffeOnnxError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.graph_level not in GRAPH_LEVELS:
            raise CaffeOnnxError(f"--graph-level must be one of {', '.join(GRAPH_LEVELS)}, got {self.graph_level!r}")
        if self.threads < 0:
            raise CaffeOnnxError(f"--threads must be 0 or positive, got {self.threads}")
        bad = [b for b in self.preferred_batch if not 0 < b <= self.max_batch]
        if bad:
            raise CaffeOnnxError(f"--preferred-batch sizes must be between 1 and --max-batch {self.max_batch}, got "
                                 f"{', '.join(map(str, bad))}")
        if self.trt_precision not in TRT_PRECISIONS:
            raise CaffeOnnxError(f"--trt-precision must be one of {', '.join(TRT_PRECISIONS)}, got "
                                 f"{self.trt_precision!r}")
        trt_only = self.trt_precision != "FP32" or self.trt_workspace_bytes is not None or self.trt_engine_cache
        if trt_only and not self.tensorrt:
            raise CaffeOnnxError("--trt-precision, --trt-workspace-mb and --trt-engine-cache go with --tensorrt")
        if self.tensorrt and self.kind != "gpu":
            raise CaffeOnnxError(f"--tensorrt runs on GPU instances: add --kind gpu (got --kind {self.kind})")
        if self.trt_workspace_bytes is not None and self.trt_workspace_bytes <= 0:
            raise CaffeOnnxError(f"--trt-workspace-mb must be positive, got {self.trt_workspace_bytes / 2**20:g}")


@dataclass
class TritonExport:
    """What export_triton wrote: the model's directory, its configuration, and what the user must know."""

    path: Path
    config: dict
    batching: bool
    notes: list[str] = field(default_factory=list)


def _pbtxt_string(text: str) -> str:
    """A protobuf text-format string literal (C escapes; other characters as UTF-8)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _pbtxt_value(key: str, value: object, indent: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value if key in _ENUM_FIELDS else _pbtxt_string(value)
    if isinstance(value, dict):
        inner = "".join(f"{indent}  {k}{_pbtxt_field(k, v, indent + '  ')}\n" for k, v in value.items())
        return "{\n" + inner + indent + "}"
    raise TypeError(f"cannot render {value!r} in protobuf text format")


def _pbtxt_field(key: str, value: object, indent: str) -> str:
    """` <value>` for a field: scalars after ': ', messages as blocks, repeated fields in brackets."""
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            items = ",\n".join(f"{indent}  {_pbtxt_value(key, v, indent + '  ')}" for v in value)
            return f" [\n{items}\n{indent}]"
        return ": [ " + ", ".join(_pbtxt_value(key, v, indent) for v in value) + " ]"
    if isinstance(value, dict):
        return " " + _pbtxt_value(key, value, indent)
    return ": " + _pbtxt_value(key, value, indent)


def config_pbtxt(config: dict) -> str:
    """Triton's config.pbtxt (protobuf text format) for a model configuration dict.

    Map fields (`parameters`) are given as lists of {key, value} entries, as text format writes them.
    """
    return "".join(f"{key}{_pbtxt_field(key, value, '')}\n" for key, value in config.items())


def _fixed_batch(specs: Sequence[TensorSpec]) -> list[str]:
    """'name [dims]' of every tensor whose batch dimension is fixed."""
    return [f"{s.name!r} {v2_shape(s)}" for s in specs if s.batch is not None]


def _trt_profiles(inputs: Sequence[TensorSpec], opts: TritonOptions) -> dict[str, str] | None:
    """trt_profile_{min,opt,max}_shapes covering batch 1..max_batch, so TensorRT builds one engine for every batch
    the dynamic batcher forms (without them the provider rebuilds its engine when a larger batch arrives).
    None when a sample dimension is symbolic or a name cannot be written in the 'name:AxB,...' syntax."""
    if not all(s.static for s in inputs) or any(re.search(r"[:,\s]", s.name) for s in inputs):
        return None
    opt = max(opts.preferred_batch, default=opts.max_batch)

    def shapes(batch: int) -> str:
        return ",".join(f"{s.name}:{'x'.join(str(d) for d in (batch, *s.sample_shape))}" for s in inputs)

    return {"trt_profile_min_shapes": shapes(1), "trt_profile_opt_shapes": shapes(opt),
            "trt_profile_max_shapes": shapes(opts.max_batch)}


def build_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 opts: TritonOptions) -> TritonExport:
    """The model configuration for `inputs`/`outputs` under `opts`, and the notes about what was not honoured."""
    opts.check()
    config = triton_config(name, inputs, outputs, opts.max_batch, opts.max_queue_delay_us)
    batching = config["max_batch_size"] > 0
    notes: list[str] = []
    fixed = _fixed_batch([*inputs, *outputs])
    if not batching:
        if fixed:
            notes.append(f"model {name!r} has a fixed batch dimension ({', '.join(fixed)}): wrote max_batch_size 0 "
                         "and full dims, so Triton does not batch requests and each request carries exactly that "
                         "batch; convert without --batch for a model Triton can batch")
        else:
            notes.append("--max-batch 0: wrote max_batch_size 0 and full dims; Triton does not batch requests")
        if opts.preferred_batch:
            raise CaffeOnnxError(f"--preferred-batch needs a model Triton can batch, but {notes[0]}")
    elif opts.preferred_batch:
        config["dynamic_batching"] = {"preferred_batch_size": sorted(set(opts.preferred_batch)),
                                      "max_queue_delay_microseconds": opts.max_queue_delay_us}
    if opts.kind != "auto" or opts.instances != 1:
        config["instance_group"] = [{"count": opts.instances, "kind": f"KIND_{opts.kind.upper()}"}]
    optimization: dict = {}
    level = GRAPH_LEVELS[opts.graph_level]
    if level is not None:
        optimization["graph"] = {"level": level}
    if opts.tensorrt:
        params = {"precision_mode": opts.trt_precision}
        if opts.trt_workspace_bytes is not None:
            params["max_workspace_size_bytes"] = str(opts.trt_workspace_bytes)
        if opts.trt_engine_cache:
            params |= {"trt_engine_cache_enable": "true", "trt_engine_cache_path": opts.trt_engine_cache}
        profiles = _trt_profiles(inputs, opts) if batching else None
        if profiles is not None:
            params |= profiles
        elif batching:
            notes.append("TensorRT: no optimization profile written (an input has symbolic sample dimensions); "
                         "TensorRT rebuilds its engine for each new input shape")
        accelerator = {"name": "tensorrt", "parameters": [{"key": k, "value": v} for k, v in params.items()]}
        optimization["execution_accelerators"] = {"gpu_execution_accelerator": [accelerator]}
    if optimization:
        config["optimization"] = optimization
    if opts.threads:
        config["parameters"] = [{"key": "intra_op_thread_count", "value": {"string_value": str(opts.threads)}}]
    return TritonExport(Path(), config, batching, notes)


def describe(result: TritonExport) -> str:
    """One line saying how Triton will run the exported model."""
    cfg = result.config
    parts = []
    if result.batching:
        batching = cfg["dynamic_batching"]
        preferred = batching.get("preferred_batch_size")
        parts.append(f"batches of up to {cfg['max_batch_size']} rows (dynamic batching"
                     + (f", preferred {', '.join(map(str, preferred))}" if preferred else "")
                     + f", queue delay {batching['max_queue_delay_microseconds']} µs)")
    else:
        parts.append("no batching (max_batch_size 0)")
    group = cfg.get("instance_group")
    if group:
        count, kind = group[0]["count"], group[0]["kind"].removeprefix("KIND_").lower()
        where = "on CPU" if kind == "cpu" else "on each GPU" if kind == "gpu" else "on each GPU, or on CPU without one"
        parts.append(f"{count} instance{'s' if count > 1 else ''} {where}")
    else:
        parts.append("Triton's default instances (one per GPU, or one on CPU)")
    optimization = cfg.get("optimization", {})
    if "graph" in optimization:
        parts.append(f"graph level {optimization['graph']['level']}")
    for acc in optimization.get("execution_accelerators", {}).get("gpu_execution_accelerator", []):
        precision = next(p["value"] for p in acc["parameters"] if p["key"] == "precision_mode")
        parts.append(f"TensorRT {precision}")
    for param in cfg.get("parameters", []):
        parts.append(f"{param['value']['string_value']} intra-op threads per instance")
    return "; ".join(parts)


def export_triton(model_path: str | os.PathLike[str], repo_dir: str | os.PathLike[str], name: str | None = None,
                  options: TritonOptions | None = None) -> TritonExport:
    """Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx (NAME: the file's stem by default)."""
    src = Path(model_path)
    name = name if name is not None else src.stem
    check_model_name(name)
    opts = options if options is not None else TritonOptions()
    opts.check()
    model = load_onnx(src)
    if any(t.data_location == 1 for t in model.graph.initializer):  # TensorProto.EXTERNAL
        raise UnsupportedError(f"{src} keeps its weights in external data files; save it with the weights inline")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs, outputs = [_spec(i) for i in sess.get_inputs()], [_spec(o) for o in sess.get_outputs()]
    result = build_config(name, inputs, outputs, opts)
    result.path = Path(repo_dir) / name
    (result.path / "1").mkdir(parents=True, exist_ok=True)
    with atomic_path(result.path / "1" / "model.onnx") as tmp:
        shutil.copyfile(src, tmp)
    write_bytes_atomic(result.path / "config.pbtxt", config_pbtxt(result.config).encode())
    return result
