"""Regenerate (or check) caffeonnx/proto/caffe_pb2.py from caffe.proto.

Why a script: the generated module is committed so users need no protoc; this
keeps it reproducible.  `--check` exits 1 when the committed module is stale.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "caffeonnx" / "proto"


def generate(out_dir: Path) -> Path:
    """Run the protoc bundled with grpcio-tools; return the generated module."""
    from grpc_tools import protoc

    # The file is registered as caffeonnx/proto/caffe.proto in protobuf's global pool, so it
    # cannot clash with another package's caffe.proto loaded in the same process.
    rc = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={out_dir}", "caffeonnx/proto/caffe.proto"])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return out_dir / "caffeonnx" / "proto" / "caffe_pb2.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if caffe_pb2.py is out of date")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = generate(Path(tmp)).read_text()
        if fresh != (PROTO_DIR / "caffe_pb2.py").read_text():
            print("caffe_pb2.py is stale: run python scripts/gen_proto.py", file=sys.stderr)
            return 1
        return 0
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
