"""export-triton: config.pbtxt parses as Triton's own ModelConfig and says what the model and the options are.

The parser is tritonclient's generated `model_config_pb2` (Triton's model_config.proto), with protobuf's text
format, as Triton reads config.pbtxt: a misspelt field or a wrong enum value fails the parse.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.encoder import extract_encoder, save_model
from caffeonnx.runtime.triton import TritonOptions, export_triton

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
ModelConfig = model_config_pb2.ModelConfig
Kind = model_config_pb2.ModelInstanceGroup.Kind
FP32 = model_config_pb2.DataType.Value("TYPE_FP32")


def parse(target: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((target / "config.pbtxt").read_text(), ModelConfig())


@pytest.fixture(scope="module")
def fixed_encoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deep encoder converted with --batch 16: its batch dimension is fixed."""
    from caffeonnx.converter.caffe_to_onnx import convert_files
    from caffeonnx.converter.context import ConvertOptions
    from tests.runtime.conftest import DEEP

    model = convert_files(DEEP / "net.prototxt", DEEP / "weights.caffemodel", ConvertOptions(batch=16)).to_proto()
    src = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    save_model(extract_encoder(model)[0], src)
    return src


@pytest.mark.parametrize("max_batch, delay", [(64, 100), (4096, 0)])
def test_repository_entry_for_the_deep_encoder(deep_encoder_path: Path, tmp_path: Path, max_batch: int,
                                               delay: int) -> None:
    result = export_triton(deep_encoder_path, tmp_path / "repo", "deep", TritonOptions(max_batch, delay))
    assert result.path == tmp_path / "repo" / "deep" and result.batching and result.notes == []
    assert (result.path / "1" / "model.onnx").read_bytes() == deep_encoder_path.read_bytes()
    cfg = parse(result.path)
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("deep", "onnxruntime_onnx", max_batch)
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("data", FP32, [784])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("encode4", FP32, [8])]
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == delay
    assert list(cfg.dynamic_batching.preferred_batch_size) == []
    assert not cfg.instance_group and not cfg.HasField("optimization") and not cfg.parameters  # Triton's defaults


def test_every_option_lands_in_its_model_config_field(deep_encoder_path: Path, tmp_path: Path) -> None:
    opts = TritonOptions(max_batch=128, max_queue_delay_us=250, preferred_batch=(64, 16, 64), instances=3, kind="gpu",
                         graph_level="extended", threads=2, tensorrt=True, trt_precision="FP16",
                         trt_workspace_bytes=1 << 30, trt_engine_cache="/cache/trt")
    cfg = parse(export_triton(deep_encoder_path, tmp_path, "enc", opts).path)
    assert cfg.max_batch_size == 128
    assert list(cfg.dynamic_batching.preferred_batch_size) == [16, 64]  # sorted, once each
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(3, Kind.KIND_GPU)]
    assert cfg.optimization.graph.level == 1  # the onnxruntime backend's ORT_ENABLE_EXTENDED
    [trt] = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and not cfg.optimization.execution_accelerators.cpu_execution_accelerator
    assert dict(trt.parameters) == {
        "precision_mode": "FP16", "max_workspace_size_bytes": str(1 << 30),
        "trt_engine_cache_enable": "true", "trt_engine_cache_path": "/cache/trt",
        # one TensorRT profile for every batch the dynamic batcher can form, optimised for the largest preferred
        "trt_profile_min_shapes": "data:1x784", "trt_profile_opt_shapes": "data:64x784",
        "trt_profile_max_shapes": "data:128x784",
    }
    assert cfg.parameters["intra_op_thread_count"].string_value == "2"


@pytest.mark.parametrize("level, expected", [("all", None), ("extended", 1), ("basic", -1), ("disable", 2)])
def test_graph_levels_use_the_backends_numbers(deep_encoder_path: Path, tmp_path: Path, level: str,
                                               expected: int | None) -> None:
    """onnxruntime_backend maps level -1 to ORT_ENABLE_BASIC, 1 to EXTENDED, 2 to DISABLE_ALL, absent to ALL."""
    cfg = parse(export_triton(deep_encoder_path, tmp_path, "e", TritonOptions(graph_level=level)).path)
    assert cfg.optimization.HasField("graph") == (expected is not None)
    if expected is not None:
        assert cfg.optimization.graph.level == expected


@pytest.mark.parametrize("instances, kind, group", [(1, "auto", None), (4, "cpu", (4, Kind.KIND_CPU)),
                                                    (2, "auto", (2, Kind.KIND_AUTO)), (1, "gpu", (1, Kind.KIND_GPU))])
def test_instance_groups(deep_encoder_path: Path, tmp_path: Path, instances: int, kind: str,
                         group: tuple | None) -> None:
    cfg = parse(export_triton(deep_encoder_path, tmp_path, "e", TritonOptions(instances=instances, kind=kind)).path)
    assert [(g.count, g.kind) for g in cfg.instance_group] == ([group] if group else [])


def test_fixed_batch_model_is_exported_without_batching_and_says_so(fixed_encoder_path: Path, tmp_path: Path) -> None:
    result = export_triton(fixed_encoder_path, tmp_path / "repo")
    cfg = parse(result.path)
    assert cfg.name == "fixed" and cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert [list(i.dims) for i in cfg.input] == [[16, 784]] and [list(o.dims) for o in cfg.output] == [[16, 8]]
    assert not result.batching and len(result.notes) == 1
    assert "fixed batch dimension ('data' [16, 784], 'encode4' [16, 8])" in result.notes[0]
    res = CliRunner().invoke(app, ["export-triton", str(fixed_encoder_path), str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "note: model 'fixed' has a fixed batch dimension" in res.output and "max_batch_size 0" in res.output
    assert "Triton: no batching (max_batch_size 0)" in res.output


def test_max_batch_zero_is_said_too(deep_encoder_path: Path, tmp_path: Path) -> None:
    result = export_triton(deep_encoder_path, tmp_path, "e", TritonOptions(max_batch=0))
    assert parse(result.path).max_batch_size == 0 and result.notes[0].startswith("--max-batch 0: wrote")


def test_preferred_batch_on_a_fixed_batch_model_is_refused(fixed_encoder_path: Path, tmp_path: Path) -> None:
    with pytest.raises(CaffeOnnxError, match=r"--preferred-batch needs a model Triton can batch, but model 'fixed' "
                                             r"has a fixed batch dimension"):
        export_triton(fixed_encoder_path, tmp_path, options=TritonOptions(preferred_batch=(8,)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opts, message", [
    (TritonOptions(instances=0), r"--instances must be at least 1, got 0"),
    (TritonOptions(kind="tpu"), r"--kind must be one of auto, cpu, gpu, got 'tpu'"),
    (TritonOptions(max_batch=32, preferred_batch=(16, 64)), r"between 1 and --max-batch 32, got 64"),
    (TritonOptions(preferred_batch=(0,)), r"got 0"),
    (TritonOptions(max_queue_delay_us=-1), r"--max-queue-delay must be >= 0"),
    (TritonOptions(graph_level="max"), r"--graph-level must be one of all, extended, basic, disable, got 'max'"),
    (TritonOptions(tensorrt=True), r"--tensorrt runs on GPU instances: add --kind gpu \(got --kind auto\)"),
    (TritonOptions(trt_precision="FP16"), r"go with --tensorrt"),
    (TritonOptions(tensorrt=True, kind="gpu", trt_precision="INT8"), r"--trt-precision must be one of FP32, FP16"),
    (TritonOptions(threads=-2), r"--threads must be 0 or positive"),
])
def test_bad_options_are_refused_before_anything_is_written(deep_encoder_path: Path, tmp_path: Path,
                                                            opts: TritonOptions, message: str) -> None:
    with pytest.raises(CaffeOnnxError, match=message):
        export_triton(deep_encoder_path, tmp_path, "e", opts)
    assert list(tmp_path.iterdir()) == []


def test_whole_autoencoder_lists_its_outputs(deep_ae_path: Path, tmp_path: Path) -> None:
    cfg = parse(export_triton(deep_ae_path, tmp_path, "ae").path)
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("decode1neuron", [784])]


@pytest.mark.parametrize("name", ["a/b", "", "sp ace", ".."])
def test_bad_model_names_are_refused(deep_encoder_path: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(CaffeOnnxError, match=r"model name .* is not valid"):
        export_triton(deep_encoder_path, tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_triton(deep_encoder_path: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, [
        "export-triton", str(deep_encoder_path), str(tmp_path / "repo"), "--name", "enc", "--max-batch", "32",
        "--preferred-batch", "8", "--preferred-batch", "32", "--max-delay-us", "500", "--instances", "2",
        "--kind", "cpu", "--threads", "1", "--graph-level", "basic"])
    assert res.exit_code == 0, res.output
    cfg = parse(tmp_path / "repo" / "enc")
    assert cfg.max_batch_size == 32 and list(cfg.dynamic_batching.preferred_batch_size) == [8, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500  # --max-delay-us: the older spelling
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, Kind.KIND_CPU)]
    assert cfg.optimization.graph.level == -1
    assert ("Triton: batches of up to 32 rows (dynamic batching, preferred 8, 32, queue delay 500 µs); 2 instances "
            "on CPU; graph level -1; 1 intra-op threads per instance") in res.output


def test_cli_tensorrt(deep_encoder_path: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, [
        "export-triton", str(deep_encoder_path), str(tmp_path), "--kind", "gpu", "--tensorrt", "--trt-precision",
        "fp16", "--trt-workspace-mb", "512", "--max-queue-delay", "50"])
    assert res.exit_code == 0, res.output
    cfg = parse(tmp_path / "deep_encoder")
    params = dict(cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
    assert params["precision_mode"] == "FP16" and params["max_workspace_size_bytes"] == str(512 << 20)
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 50 and "TensorRT FP16" in res.output
