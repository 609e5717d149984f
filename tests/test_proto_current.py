"""The committed caffe_pb2.py is what scripts/gen_proto.py generates from caffe.proto."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_module_is_current() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_field_numbers_match_bvlc_caffe() -> None:
    from caffeonnx.proto import caffe_pb2

    def num(msg, field: str) -> int:
        return msg.DESCRIPTOR.fields_by_name[field].number

    assert num(caffe_pb2.NetParameter, "layer") == 100 and num(caffe_pb2.NetParameter, "layers") == 2
    assert num(caffe_pb2.NetParameter, "input_dim") == 4 and num(caffe_pb2.NetParameter, "input_shape") == 8
    assert num(caffe_pb2.LayerParameter, "inner_product_param") == 117
    assert num(caffe_pb2.InnerProductParameter, "transpose") == 6
    assert num(caffe_pb2.PoolingParameter, "round_mode") == 13
    assert num(caffe_pb2.BlobProto, "double_data") == 8
    assert num(caffe_pb2.V1LayerParameter, "blobs_lr") == 7
    assert caffe_pb2.V1LayerParameter.INNER_PRODUCT == 14
