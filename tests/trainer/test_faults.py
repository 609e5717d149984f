"""Faults while training: SIGINT/SIGTERM, unwritable and full snapshot directories, damaged resume files, stale temps.

Signals go to a real `caffeonnx train` subprocess; the resumed run must end bitwise equal (final .caffemodel bytes)
to one that was never interrupted, on a net with Dropout, whose random masks make any off-by-one RNG state visible.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caffeonnx.cli import main
from caffeonnx.errors import CaffeOnnxError, InputFileError
from caffeonnx.trainer.session import TrainOptions, run_training
from caffeonnx.runtime.inputs import process_start_time
from caffeonnx.trainer.snapshot import clean_stale_temps

NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 16 dim: 64 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 256 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 64 weight_filler { type: "gaussian" std: 0.05 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "data" top: "loss" }
"""


def dropout_case(tmp_path: Path, **fields: str) -> Path:
    """A tiny autoencoder with Dropout, its solver (fields added) and data.npz; returns the solver path."""
    d = tmp_path / "case"
    d.mkdir()
    (d / "net.prototxt").write_text(NET)
    solver = {"net": '"net.prototxt"', "base_lr": "0.01", "momentum": "0.9", "lr_policy": '"fixed"',
              "max_iter": "100000", "random_seed": "5", "snapshot_prefix": f'"{d}/snap/run"', **fields}
    (d / "solver.prototxt").write_text("".join(f"{k}: {v}\n" for k, v in solver.items()))
    np.savez(d / "data.npz", data=np.random.default_rng(0).uniform(0, 1, (64, 64)).astype(np.float32))
    return d / "solver.prototxt"


def train_cli(solver: Path, *args: str) -> subprocess.Popen[str]:
    """`caffeonnx train` as a real process: one CPU thread, deterministic kernels, no pictures, no progress bar."""
    cmd = [sys.executable, "-m", "caffeonnx.cli", "train", str(solver), "--data", str(solver.parent / "data.npz"),
           "--device", "cpu", "--threads", "1", "--deterministic", "--no-png", "-q", *args]
    return subprocess.Popen(cmd, cwd=solver.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], solver: Path,
        *args: str) -> tuple[int, str]:
    """`caffeonnx train` through the real entry point, in this process, from the solver's directory; returns
    (exit code, stderr)."""
    monkeypatch.chdir(solver.parent)
    monkeypatch.setattr(sys, "argv", ["caffeonnx", "train", str(solver), "--data", str(solver.parent / "data.npz"),
                                      "--device", "cpu", "--no-png", "-q", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return int(exit_info.value.code or 0), capsys.readouterr().err


def wait_for_lines(log: Path, count: int, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Wait until the JSONL log has `count` lines (the run is well inside its loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, f"training ended early: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"{log} did not reach {count} lines")


def run_quiet(opts: TrainOptions) -> None:
    """Train in this process, CPU, deterministic, without pictures."""
    opts.device, opts.deterministic, opts.pictures, opts.threads = "cpu", True, False, 1
    run_training(opts, say=lambda _: None)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_snapshot_resumes_bitwise_equal_with_dropout(tmp_path: Path, sig: int, code: int) -> None:
    solver = dropout_case(tmp_path, snapshot="7")
    d = solver.parent
    proc = train_cli(solver, "--log", str(d / "log.jsonl"))
    wait_for_lines(d / "log.jsonl", 12, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    done = len((d / "log.jsonl").read_text().splitlines())  # iterations finished, each logged before its snapshot
    name = signal.Signals(sig).name
    assert f"by {name} at iteration {done}:" in err, err
    state = d / f"snap/run_iter_{done}.solverstate"
    extras = json.loads(state.with_name(state.name + ".json").read_text())
    assert extras["iter"] == done
    total = done + 5  # the resumed run first: the full one rewrites the periodic snapshots
    run_quiet(TrainOptions(solver, snapshot=state, data=str(d / "data.npz"), max_iter=total - done,
                           output=d / "resumed"))
    run_quiet(TrainOptions(solver, data=str(d / "data.npz"), max_iter=total, output=d / "full"))
    assert (d / "resumed.caffemodel").read_bytes() == (d / "full.caffemodel").read_bytes(), \
        f"resumed from iteration {done} after {name} differs from an uninterrupted run of {total}"
    assert not list((d / "snap").glob(".*.tmp")), "no temporaries are left behind"


def test_second_signal_discards_the_iteration_in_progress(tmp_path: Path) -> None:
    """A long iteration (iter_size 800): the second SIGINT drops it, and the snapshot is of the one before."""
    solver = dropout_case(tmp_path, iter_size="800")
    d = solver.parent
    proc = train_cli(solver, "--log", str(d / "log.jsonl"))
    wait_for_lines(d / "log.jsonl", 1, proc)  # an iteration takes ~0.8 s: both signals land inside the next one
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    done = len((d / "log.jsonl").read_text().splitlines())
    assert f"(the iteration in progress, {done}, was discarded)" in err, err
    state = d / f"snap/run_iter_{done}.solverstate"
    assert state.is_file(), err
    run_quiet(TrainOptions(solver, snapshot=state, data=str(d / "data.npz"), max_iter=1, output=d / "resumed"))
    run_quiet(TrainOptions(solver, data=str(d / "data.npz"), max_iter=done + 1, output=d / "full"))
    assert (d / "resumed.caffemodel").read_bytes() == (d / "full.caffemodel").read_bytes()


def test_read_only_snapshot_directory_is_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    solver = dropout_case(tmp_path)
    d = solver.parent
    ro = d / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root writes anyway: a path under a regular file cannot be made by anyone
            (d / "file").write_text("")
            prefix = d / "file" / "sub" / "snap"
        else:
            prefix = ro / "snap"
        solver.write_text(solver.read_text().replace(f'"{d}/snap/run"', f'"{prefix}"'))
        code, err = cli(monkeypatch, capsys, solver, "--max-iter", "3")
    finally:
        ro.chmod(0o700)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert f"Cannot write to snapshot prefix '{prefix}'" in err and "exists and is writeable" in err


def test_unwritable_log_is_refused_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    solver = dropout_case(tmp_path)
    (solver.parent / "file").write_text("")
    code, err = cli(monkeypatch, capsys, solver, "--max-iter", "3", "--log", str(solver.parent / "file" / "log.jsonl"))
    assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "--log" in err and "cannot append" in err
    assert not list((solver.parent / "snap").glob("*")), "nothing was trained or written"


def test_a_snapshot_set_that_cannot_be_written_leaves_none_of_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The .solverstate's place is taken by a directory: the last write of the set fails, so the whole set is
    dropped, the earlier set stays, and the run ends with one line (exit 2)."""
    solver = dropout_case(tmp_path, snapshot="3")
    snap = solver.parent / "snap"
    (snap / "run_iter_6.solverstate").mkdir(parents=True)
    code, err = cli(monkeypatch, capsys, solver, "--max-iter", "9")
    assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert "cannot write snapshot" in err and "run_iter_6" in err and "earlier snapshots are kept" in err
    names = sorted(p.name for p in snap.iterdir())
    assert names == ["run_iter_3.caffemodel", "run_iter_3.onnx", "run_iter_3.solverstate",
                     "run_iter_3.solverstate.json", "run_iter_6.solverstate"], names
    assert not any((snap / "run_iter_6.solverstate").iterdir())


@pytest.mark.skipif(not Path("/dev/shm").is_dir() or os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_a_full_disk_keeps_the_last_good_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A real full filesystem (a 1 MiB tmpfs): the first set fits, a later one does not; exit 2, one line."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        solver = dropout_case(tmp_path, snapshot="1", snapshot_prefix=f'"{mnt}/run"')
        code, err = cli(monkeypatch, capsys, solver, "--max-iter", "50")
        assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err
        assert "No space left on device" in err
        states = sorted(mnt.glob("run_iter_*.solverstate"))
        assert states, "at least one set fitted"
        for state in states:
            base = str(state.with_suffix(""))
            assert all(Path(base + ext).is_file() for ext in (".caffemodel", ".onnx", ".solverstate.json"))
        assert len(list(mnt.glob("run_iter_*.caffemodel"))) == len(states), "no set without its solverstate"
        assert not list(mnt.glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def damaged(extras: dict, what: str) -> bytes:
    """The extras file with one kind of damage."""
    if what == "truncated":
        return json.dumps(extras).encode()[:40]
    if what == "a list":
        return b"[1, 2, 3]"
    if what == "short rng state":
        extras["rng"]["state"] = base64.b64encode(b"\0" * 17).decode()
    elif what == "losses not numbers":
        extras["smoothed_loss"]["losses"] = ["x"]
    elif what == "no rng":
        del extras["rng"]
    return json.dumps(extras).encode()


@pytest.mark.parametrize(("what", "field"), [("truncated", "not the JSON"), ("a list", "a list"),
                                             ("short rng state", "'rng.state'"),
                                             ("losses not numbers", "'smoothed_loss.losses'"), ("no rng", "'rng'")])
def test_damaged_solverstate_json_is_one_line_naming_file_and_field(tmp_path: Path, what: str, field: str) -> None:
    solver = dropout_case(tmp_path, snapshot="2")
    d = solver.parent
    run_quiet(TrainOptions(solver, data=str(d / "data.npz"), max_iter=2))
    extras_path = d / "snap/run_iter_2.solverstate.json"
    extras_path.write_bytes(damaged(json.loads(extras_path.read_text()), what))
    with pytest.raises(InputFileError) as info:
        run_quiet(TrainOptions(solver, snapshot=d / "snap/run_iter_2.solverstate", data=str(d / "data.npz"),
                               max_iter=1))
    message = str(info.value)
    assert str(extras_path) in message and field in message and "\n" not in message, message


def test_stale_temporaries_of_our_naming_are_removed_on_start(tmp_path: Path) -> None:
    solver = dropout_case(tmp_path)
    snap = solver.parent / "snap"
    snap.mkdir()
    stale = [snap / ".run_iter_40.caffemodel.a1b2c3d4.tmp", snap / ".run_iter_40.solverstate.json.zz_9x8y7.tmp",
             snap / "..run_iter_40.onnx.abcdefgh.tmp.12345678.tmp"]
    kept = [snap / ".other_iter_40.caffemodel.a1b2c3d4.tmp", snap / ".run_iter_40.caffemodel.tmp",
            snap / "run_iter_40.caffemodel", snap / ".run_iter_40.caffemodel.a1b2c3d4.tmp.bak"]
    fresh = snap / ".run_iter_41.onnx.q1w2e3r4.tmp"
    old = process_start_time() - 60
    for p in stale + kept:
        p.write_bytes(b"x" * 100)
        os.utime(p, (old, old))
    fresh.write_bytes(b"x")  # newer than this process: maybe another run's write in progress
    removed = clean_stale_temps(snap / "run")
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in [*kept, fresh])


def test_poly_past_max_iter_is_refused_before_training(tmp_path: Path) -> None:
    solver = dropout_case(tmp_path, lr_policy='"poly"', power="0.5", max_iter="10")
    with pytest.raises(CaffeOnnxError, match=r"poly' reaches 0 at max_iter 10; training to iteration 12"):
        run_quiet(TrainOptions(solver, data=str(solver.parent / "data.npz"), max_iter=12))
    assert not (solver.parent / "snap").exists() or not list((solver.parent / "snap").iterdir())
