"""export-triton: config.pbtxt parses as Triton's ModelConfig and says what the model is."""
from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.encoder import extract_encoder, save_model
from caffeonnx.runtime.triton import export_triton

F = descriptor_pb2.FieldDescriptorProto


def _model_config_class():
    """The part of Triton's inference.ModelConfig (field names, numbers and enum values of model_config.proto)
    that export-triton writes, so the test parses config.pbtxt the way Triton would."""
    fd = descriptor_pb2.FileDescriptorProto(name="triton_subset.proto", package="inference", syntax="proto3")
    dtype = fd.enum_type.add(name="DataType")
    for k, n in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
                           "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32",
                           "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]):
        dtype.value.add(name=n, number=k)

    def message(name: str, fields: list[tuple[str, int, int, int, str | None]]) -> None:
        m = fd.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    tensor = [("name", 1, F.TYPE_STRING, opt, None), ("data_type", 2, F.TYPE_ENUM, opt, ".inference.DataType")]
    message("ModelInput", [*tensor, ("dims", 4, F.TYPE_INT64, rep, None)])
    message("ModelOutput", [*tensor, ("dims", 3, F.TYPE_INT64, rep, None)])
    message("ModelDynamicBatching", [("max_queue_delay_microseconds", 3, F.TYPE_UINT64, opt, None)])
    message("ModelConfig", [
        ("name", 1, F.TYPE_STRING, opt, None), ("platform", 2, F.TYPE_STRING, opt, None),
        ("max_batch_size", 4, F.TYPE_INT32, opt, None), ("input", 5, F.TYPE_MESSAGE, rep, ".inference.ModelInput"),
        ("output", 6, F.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
        ("dynamic_batching", 11, F.TYPE_MESSAGE, opt, ".inference.ModelDynamicBatching"),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ModelConfig = _model_config_class()


@pytest.mark.parametrize("max_batch, delay", [(64, 100), (4096, 0)])
def test_repository_entry_for_the_deep_encoder(deep_encoder_path: Path, tmp_path: Path, max_batch: int,
                                               delay: int) -> None:
    target = export_triton(deep_encoder_path, tmp_path / "repo", "deep", max_batch, delay)
    assert target == tmp_path / "repo" / "deep"
    assert (target / "1" / "model.onnx").read_bytes() == deep_encoder_path.read_bytes()
    cfg = text_format.Parse((target / "config.pbtxt").read_text(), ModelConfig())
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("deep", "onnxruntime_onnx", max_batch)
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("data", 11, [784])]  # 11: TYPE_FP32
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("encode4", 11, [8])]
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds == delay


def test_fixed_batch_model_is_exported_without_batching(tmp_path: Path) -> None:
    from caffeonnx.converter.caffe_to_onnx import convert_files
    from caffeonnx.converter.context import ConvertOptions
    from tests.runtime.conftest import DEEP

    model = convert_files(DEEP / "net.prototxt", DEEP / "weights.caffemodel", ConvertOptions(batch=16)).to_proto()
    src = tmp_path / "fixed.onnx"
    save_model(extract_encoder(model)[0], src)
    target = export_triton(src, tmp_path / "repo")
    cfg = text_format.Parse((target / "config.pbtxt").read_text(), ModelConfig())
    assert cfg.name == "fixed" and cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert [list(i.dims) for i in cfg.input] == [[16, 784]] and [list(o.dims) for o in cfg.output] == [[16, 8]]


def test_whole_autoencoder_lists_its_outputs(deep_ae_path: Path, tmp_path: Path) -> None:
    cfg = text_format.Parse((export_triton(deep_ae_path, tmp_path, "ae") / "config.pbtxt").read_text(), ModelConfig())
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("decode1neuron", [784])]


@pytest.mark.parametrize("name", ["a/b", "", "sp ace", ".."])
def test_bad_model_names_are_refused(deep_encoder_path: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(CaffeOnnxError, match=r"model name .* is not valid"):
        export_triton(deep_encoder_path, tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_triton(deep_encoder_path: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["export-triton", str(deep_encoder_path), str(tmp_path / "repo"), "--name", "enc",
                                   "--max-batch", "32"])
    assert res.exit_code == 0, res.output
    cfg = text_format.Parse((tmp_path / "repo" / "enc" / "config.pbtxt").read_text(), ModelConfig())
    assert cfg.max_batch_size == 32
