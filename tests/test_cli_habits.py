"""Caffe's command-line habits: --version, `train --solver/--gpu/--threads`, exit codes (Ctrl-C: 130),
files that honour the umask, `serve` on a busy port, and child processes beside a folder named caffeonnx."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from caffeonnx import __version__
from caffeonnx.cli import main
from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.demo import example_dir
from caffeonnx.runtime.child import serve_in_child
from caffeonnx.runtime.encoder import extract_encoder_file
from caffeonnx.trainer.session import TrainOptions, run_training
from tests.helpers import REFERENCE

CLI = [sys.executable, "-m", "caffeonnx.cli"]


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """The real `caffeonnx` entry point, in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["caffeonnx", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit 2 with a single `error:` line holding every fragment, no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def tied_case(tmp_path: Path, max_iter: int) -> Path:
    """A writable copy of the reference tied-AE training case whose solver runs `max_iter` iterations."""
    d = tmp_path / "case"
    shutil.copytree(REFERENCE / "train_tied_sgd", d)
    solver = d / "solver.prototxt"
    solver.write_text(solver.read_text().replace("max_iter: 1000", f"max_iter: {max_iter}"))
    return solver


def test_version_and_the_exit_codes_in_the_help() -> None:
    proc = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stdout) == (0, f"caffeonnx {__version__}\n"), proc.stderr
    help_text = " ".join(subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout.split())
    assert ("Exit codes: 0 ok; 1 a check found differences (verify, demo); 2 user error (bad option, file or model: "
            "one line on stderr); 130 interrupted (Ctrl-C/SIGINT); 143 terminated (SIGTERM).") in help_text


@pytest.mark.parametrize("form", ["positional", "--solver"])
def test_train_takes_the_solver_either_way_and_shows_iter_of_max_iter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], form: str) -> None:
    solver = tied_case(tmp_path, max_iter=4)
    monkeypatch.chdir(solver.parent)
    given = ["solver.prototxt"] if form == "positional" else ["--solver", "solver.prototxt"]
    code, _, err = cli(monkeypatch, capsys, "train", *given, "--data", "data.npz", "--device", "cpu", "--no-png")
    assert code == 0, err
    assert "iter 4/4" in err and "trained 4 iteration(s)" in err, "the bar counts to the solver's max_iter"
    code, _, err = cli(monkeypatch, capsys, "train", *given, "--data", "data.npz", "--device", "cpu", "--no-png",
                       "--max-iter", "2")
    assert code == 0 and "iter 2/2" in err, err


@pytest.mark.parametrize(("args", "fragments"), [
    ([], ["give the solver once", "caffeonnx train --solver SOLVER"]),
    (["solver.prototxt", "--solver", "solver.prototxt"], ["give the solver once", "not both"]),
    (["solver.prototxt", "--gpu", "all", "--device", "cpu"], ["give --gpu all or --device cpu, not both"]),
    (["solver.prototxt", "--gpu", "0,1"], ["--gpu 0,1: to train on those GPUs", "CUDA_VISIBLE_DEVICES=0,1",
                                           "--gpu all"]),
    (["solver.prototxt", "--gpu", "first"], ["--gpu expects a device number", "'first'"]),
    (["solver.prototxt", "--gpu", "0", "--device", "cpu"], ["give --gpu 0 or --device cpu, not both"]),
    (["solver.prototxt", "--threads", "0"], ["--threads must be a positive number of CPU threads, got 0"]),
])
def test_train_option_mistakes_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], args: list[str],
                                                    fragments: list[str]) -> None:
    solver = tied_case(tmp_path, max_iter=2)
    monkeypatch.chdir(solver.parent)
    one_line_error(*cli(monkeypatch, capsys, "train", *args, "--data", "data.npz")[::2], *fragments)


def test_gpu_n_needs_that_cuda_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    solver = tied_case(tmp_path, max_iter=2)
    monkeypatch.chdir(solver.parent)
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        one_line_error(*cli(monkeypatch, capsys, "train", "solver.prototxt", "--data", "data.npz", "--gpu",
                            str(n))[::2], f"--gpu {n}: torch sees {n} CUDA device(s)")
    else:
        one_line_error(*cli(monkeypatch, capsys, "train", "solver.prototxt", "--data", "data.npz", "--gpu",
                            "0")[::2], "--gpu 0: CUDA is not available")


def test_threads_hold_while_training_and_are_restored(tmp_path: Path) -> None:
    solver = tied_case(tmp_path, max_iter=3)
    before = torch.get_num_threads()
    seen: list[int] = []
    run_training(TrainOptions(solver, data=str(solver.parent / "data.npz"), device="cpu", pictures=False,
                              threads=1), say=lambda _: None, progress=lambda *_: seen.append(torch.get_num_threads()))
    assert seen == [1, 1, 1] and torch.get_num_threads() == before


def test_ctrl_c_exits_130_with_one_line(tmp_path: Path) -> None:
    solver = tied_case(tmp_path, max_iter=10_000_000)
    log = solver.parent / "log.jsonl"
    proc = subprocess.Popen([*CLI, "train", "solver.prototxt", "--data", "data.npz", "--device", "cpu", "--no-png",
                             "--log", "log.jsonl"], cwd=solver.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and log.stat().st_size) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert "solver_iter_" in err, "training still snapshots before it stops"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled tied autoencoder's encoder (784 -> 64)."""
    d = tmp_path_factory.mktemp("enc")
    ex = example_dir()
    convert_files(ex / "net.prototxt", ex / "weights.caffemodel").save(d / "ae.onnx")
    extract_encoder_file(d / "ae.onnx", d / "encoder.onnx")
    return d / "encoder.onnx"


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """This process's umask set for the test (and restored)."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_every_written_file_honours_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], encoder: Path, umask: int) -> None:
    ex = example_dir()
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "samples.npy", np.random.default_rng(0).random((8, 784), dtype=np.float32))
    solver = tied_case(tmp_path, max_iter=2)
    commands = [
        ["convert", ex / "net.prototxt", ex / "weights.caffemodel", "-o", "model.onnx"],
        ["to-caffe", "model.onnx", "-o", "back.prototxt", "--weights", "back.caffemodel"],
        ["encoder", "model.onnx", "-o", "enc.onnx"],
        ["encode", encoder, "samples.npy", "-o", "codes.npy", "--device", "cpu"],
        ["export-triton", encoder, "repo", "--name", "enc"],
        ["train", solver, "--data", solver.parent / "data.npz", "--device", "cpu", "-o", "trained"],
    ]
    for args in commands:
        code, _, err = cli(monkeypatch, capsys, *args)
        assert code == 0, f"{args}: {err}"
    written = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("samples.npy",)
                     and p.parent != solver.parent)
    names = {str(p.relative_to(tmp_path)) for p in written}
    assert {"model.onnx", "back.prototxt", "back.caffemodel", "enc.onnx", "codes.npy", "repo/enc/config.pbtxt",
            "repo/enc/1/model.onnx", "trained.caffemodel", "trained.onnx", "trained_loss.png"} <= names, names
    want = 0o666 & ~umask
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {oct(want)}, f"umask {umask:03o}: {modes}"


def test_serve_on_a_busy_port_fails_before_saying_it_serves(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str],
                                                            encoder: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = cli(monkeypatch, capsys, "serve", encoder, "--port", str(port), "--device", "cpu")
    one_line_error(code, err, f"port {port} on 127.0.0.1 is already in use", "--port")
    assert "serving" not in out + err


def test_child_server_starts_beside_a_folder_named_caffeonnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              encoder: Path) -> None:
    """`python -m` would import ./caffeonnx (here an empty folder) instead of the package: the child must not."""
    (tmp_path / "caffeonnx").mkdir()
    monkeypatch.chdir(tmp_path)
    with serve_in_child(encoder, "enc", "--threads", "1") as server:
        assert server.proc.poll() is None
