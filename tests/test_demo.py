"""`caffeonnx demo`: the README's first command runs the whole chain, reports it, and fails loudly."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caffeonnx.cli import main
from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.demo import example_dir, shared_matrix_check
from caffeonnx.runtime.encoder import extract_encoder
from tests.helpers import convert_text

STEPS = ["1. convert", "2. train", "3. evaluate", "4. encoder", "5. serve"]
FILES = ["tied_ae.onnx", "mnist_train.npz", "train_log.jsonl", "trained.onnx", "trained.caffemodel",
         "trained_deploy.prototxt", "encoder.onnx", "test_codes.npy"]
TIME_LIMIT_S = 120  # the demo's promise on a 2-core CPU


def _number(pattern: str, text: str) -> list[float]:
    found = re.search(pattern, text)
    assert found, f"no line matching {pattern!r} in the report:\n{text}"
    return [float(g.replace(",", "")) for g in found.groups()]


@pytest.mark.parametrize("args", [[], ["--iters", "25", "--workdir", "elsewhere"]], ids=["no-arguments", "iters"])
def test_demo_runs_the_chain_and_reports_it(tmp_path: Path, args: list[str]) -> None:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "caffeonnx.cli", "demo", *args], cwd=tmp_path, check=False,
                          capture_output=True, text=True, timeout=2 * TIME_LIMIT_S)
    seconds = time.monotonic() - start
    report = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{report}\n{proc.stderr}"
    assert seconds < TIME_LIMIT_S, f"the demo took {seconds:.0f} s (promised: under {TIME_LIMIT_S} s)"
    lines = report.splitlines()
    assert [s for s in STEPS if any(line.startswith(s) for line in lines)] == STEPS, report
    assert "FAIL" not in report
    checks = [line for line in lines if line.startswith("   ok ")]
    (count,) = _number(r"demo: all (\d+) checks passed", report)
    assert count == len(checks) >= 12, report

    iters = 25 if args else 400  # the bundled solver's max_iter
    assert f"{iters} iterations in" in report
    first, last = _number(r"loss \(SigmoidCrossEntropyLoss per image\): ([\d.]+) at iteration 0 -> ([\d.]+)", report)
    before, after = _number(r"reconstruction error \(mean squared, per pixel\): ([\d.]+) before -> ([\d.]+)", report)
    assert last < first and after < before
    unique, per_layer = _number(r"parameters: ([\d,]+) stored .* would be ([\d,]+)", report)
    assert (unique, per_layer) == (64 * 784 + 64 + 784, 2 * 64 * 784 + 64 + 784)
    (rate,) = _number(r"encoder throughput: ([\d,]+) images/s", report)
    assert rate > 0

    workdir = tmp_path / ("elsewhere" if args else "caffeonnx-demo")
    for name in FILES:
        assert (workdir / name).is_file(), f"{name} missing from {workdir}"
        assert re.search(rf"^\s+{re.escape(name)}\s+[\d,.]+ KiB$", report, re.MULTILINE), f"{name} not listed:\n{report}"
    log = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == list(range(iters))
    assert log[0]["loss"] == pytest.approx(first, abs=0.005)
    assert np.load(workdir / "test_codes.npy").shape == (500, 64)


@pytest.mark.parametrize(("args", "message"), [
    (["--iters", "0"], "--iters must be a positive number of training iterations, got 0"),
    (["--workdir", "{file}"], "is a file; give a directory"),
])
def test_bad_options_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(sys, "argv", ["caffeonnx", "demo", *(a.replace("{file}", str(tmp_path / "a_file")) for a in args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err


UNTIED = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 784 } } }
layer { name: "encode1" type: "InnerProduct" bottom: "data" top: "encode1" inner_product_param { num_output: 64 } }
layer { name: "encode1neuron" type: "Sigmoid" bottom: "encode1" top: "encode1neuron" }
layer { name: "decode1" type: "InnerProduct" bottom: "encode1neuron" top: "decode1"
  inner_product_param { num_output: 784 } }
"""


def test_the_tie_check_fails_on_untied_weights_and_on_wrong_readers() -> None:
    untied = convert_text(UNTIED).to_proto()  # decode1 has its own 784x64 weight: two copies of 50,176 values
    ok, text = shared_matrix_check(untied, readers=2)
    assert not ok and "2 initializers" in text, text
    ex = example_dir()
    tied = convert_files(ex / "net.prototxt", ex / "weights.caffemodel", ConvertOptions()).to_proto()
    ok, text = shared_matrix_check(tied, readers=2)
    assert ok and "one 64x784 initializer 'encode1_matrix'" in text, text
    assert not shared_matrix_check(tied, readers=1)[0], "the decoder reads the matrix too"
    encoder, _ = extract_encoder(tied)
    ok, text = shared_matrix_check(encoder, readers=1)
    assert ok and "read by encode1 (Gemm)" in text, text
