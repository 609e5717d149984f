"""Export an ONNX model as a Triton Inference Server model repository entry.

Layout: `REPO/NAME/config.pbtxt` (platform onnxruntime_onnx, inputs and outputs,
max_batch_size, dynamic_batching) and `REPO/NAME/1/model.onnx` (the file as is):
the path from `caffeonnx serve` on one machine to an existing serving engine.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnxruntime as ort

from caffeonnx.converter.onnx_io import load_onnx
from caffeonnx.errors import CaffeOnnxError, UnsupportedError
from caffeonnx.fileio import atomic_path, write_bytes_atomic
from caffeonnx.runtime.protocol import check_model_name, triton_config
from caffeonnx.runtime.session import _spec


def _pbtxt_value(value: object, indent: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value if value.startswith("TYPE_") else f'"{value}"'
    if isinstance(value, dict):
        inner = "".join(f"{indent}  {k}{_pbtxt_field(v, indent + '  ')}\n" for k, v in value.items())
        return "{\n" + inner + indent + "}"
    raise TypeError(f"cannot render {value!r} in protobuf text format")


def _pbtxt_field(value: object, indent: str) -> str:
    """` <value>` for a field: scalars after ': ', messages as blocks, lists in brackets."""
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            items = ",\n".join(f"{indent}  {_pbtxt_value(v, indent + '  ')}" for v in value)
            return f" [\n{items}\n{indent}]"
        return ": [ " + ", ".join(_pbtxt_value(v, indent) for v in value) + " ]"
    if isinstance(value, dict):
        return " " + _pbtxt_value(value, indent)
    return ": " + _pbtxt_value(value, indent)


def config_pbtxt(config: dict) -> str:
    """Triton's config.pbtxt (protobuf text format) for a model configuration dict."""
    return "".join(f"{key}{_pbtxt_field(value, '')}\n" for key, value in config.items())


def export_triton(model_path: str | os.PathLike[str], repo_dir: str | os.PathLike[str], name: str | None = None,
                  max_batch: int = 64, max_delay_us: int = 100) -> Path:
    """Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx; returns the model's directory."""
    src = Path(model_path)
    name = name if name is not None else src.stem
    check_model_name(name)
    if max_batch < 0 or max_delay_us < 0:
        raise CaffeOnnxError(f"--max-batch and the queue delay must be >= 0, got {max_batch} and {max_delay_us}")
    model = load_onnx(src)
    if any(t.data_location == 1 for t in model.graph.initializer):  # TensorProto.EXTERNAL
        raise UnsupportedError(f"{src} keeps its weights in external data files; save it with the weights inline")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs, outputs = [_spec(i) for i in sess.get_inputs()], [_spec(o) for o in sess.get_outputs()]
    config = triton_config(name, inputs, outputs, max_batch, max_delay_us)
    target = Path(repo_dir) / name
    (target / "1").mkdir(parents=True, exist_ok=True)
    with atomic_path(target / "1" / "model.onnx") as tmp:
        shutil.copyfile(src, tmp)
    write_bytes_atomic(target / "config.pbtxt", config_pbtxt(config).encode())
    return target
