"""`caffeonnx train --procs N` / `--gpu all`: ranks started through torch's elastic launcher (gloo on 127.0.0.1).

The launched runs are real 2-rank runs; the one-process references run in this process with one thread, as
each rank does (the launcher sets OMP_NUM_THREADS=1, as torchrun does).  With --shard contiguous, 2 ranks of
batch B equal one process with iter_size 2 byte for byte (test_distributed.py shows the same for torchrun), so
the references here are one-process runs, which also makes the launcher equal to torchrun started by hand.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.trainer import commands
from caffeonnx.trainer.distributed import DistributedError, RankExit, explain
from caffeonnx.trainer.session import TrainOptions, run_training
from caffeonnx.trainer.wta import lifetime_sparsity, spatial_lifetime_sparsity
from tests.trainer.test_distributed import _gone, _rank_pid, make_case
from tests.trainer.test_stacked import NET as DEEP_NET

ROOT = Path(__file__).resolve().parents[2]
STACK = ["encode1:decode1,encode2:decode2,encode3:decode3"]


def launcher_command(solver: Path, *args: str, procs: int = 2) -> list[str]:
    """`caffeonnx train SOLVER --procs N ...` in the solver's directory."""
    return [sys.executable, "-m", "caffeonnx", "train", solver.name, "--data", "data.npz", "--no-png", "-q",
            "--procs", str(procs), *args]


def launched(solver: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the launcher to the end; with ok, fail the test with its output unless it succeeds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    res = subprocess.run(launcher_command(solver, *args), cwd=solver.parent, env=env, capture_output=True, text=True,
                         timeout=240, check=False)
    if ok:
        assert res.returncode == 0, f"launcher failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def one_process(solver: Path, **options: object) -> None:
    """The same training in this process, one thread, in the solver's directory (relative snapshot names)."""
    cwd = os.getcwd()
    os.chdir(solver.parent)
    try:
        run_training(TrainOptions(Path(solver.name), data="data.npz", output=Path("out"), pictures=False, threads=1,
                                  **options), say=lambda _: None)  # type: ignore[arg-type]
    finally:
        os.chdir(cwd)


def test_procs_2_equals_one_process_with_iter_size_2_bytewise_as_torchrun_does(tmp_path: Path) -> None:
    ranks = make_case(tmp_path / "ranks", "Adam")
    single = make_case(tmp_path / "single", "Adam", iter_size=2)
    res = launched(ranks, "--shard", "contiguous", "-o", "out", "--log-file", "log.jsonl")
    one_process(single, log=Path("log.jsonl"))
    assert (ranks.parent / "log.jsonl").read_text() == (single.parent / "log.jsonl").read_text()
    for name in ("out.caffemodel", "snap_iter_6.caffemodel", "snap_iter_6.solverstate", "snap_iter_12.caffemodel",
                 "snap_iter_12.solverstate"):
        assert (ranks.parent / name).read_bytes() == (single.parent / name).read_bytes(), name
    assert "starting 2 ranks through torch's elastic launcher (CPU, gloo on 127.0.0.1)" in res.stderr
    assert "all 2 ranks end with identical weights and solver history" in res.stderr
    assert "rank 1 of 2: trained 12 iteration(s)" in res.stderr
    assert "error" not in res.stderr.lower() and "warning" not in res.stderr.lower(), res.stderr


def test_wta_under_2_ranks_equals_one_process_with_iter_size_2(tmp_path: Path) -> None:
    """Lifetime sparsity is per pass: a rank's sub-batch of B, exactly as each of one process's iter_size passes."""
    ranks = make_case(tmp_path / "ranks")
    single = make_case(tmp_path / "single", iter_size=2)
    res = launched(ranks, "--shard", "contiguous", "-o", "out", "--wta", "act=30%")
    one_process(single, wta=["act=30%"])
    assert "winner-take-all sparsity on 'act'" in res.stderr
    assert (ranks.parent / "out.caffemodel").read_bytes() == (single.parent / "out.caffemodel").read_bytes()
    dense = make_case(tmp_path / "dense", iter_size=2)
    one_process(dense)
    assert (dense.parent / "out.caffemodel").read_bytes() != (single.parent / "out.caffemodel").read_bytes()


@pytest.mark.parametrize(("batch", "fraction"), [(4, 0.3), (5, 0.3), (4, 0.2)])
def test_what_per_rank_wta_statistics_equal(batch: int, fraction: float) -> None:
    """2 ranks × B against one process with batch 2B: spatial WTA is per sample (the same mask, bit for bit);
    lifetime WTA keeps max(1, round(B·f)) per unit of each rank's B samples, 2·that of the 2B, not round(2B·f) of
    the whole batch: (4, 30%) keeps 2 of 8 either way but the top 1 of each half, not the top 2 of all 8;
    (5, 30%) keeps 4 of 10 (2 + 2) against 3; (4, 20%) keeps 2 (1 + 1) against 2."""
    x = torch.from_numpy(np.random.default_rng(batch).normal(size=(2 * batch, 6, 3, 3)))
    halves = torch.cat([spatial_lifetime_sparsity(x[:batch], 1.0), spatial_lifetime_sparsity(x[batch:], 1.0)])
    assert torch.equal(halves, spatial_lifetime_sparsity(x, 1.0)), "spatial WTA is per sample"
    codes = x.flatten(1)
    per_rank = torch.cat([lifetime_sparsity(codes[:batch], fraction), lifetime_sparsity(codes[batch:], fraction)])
    whole = lifetime_sparsity(codes, fraction)
    kept = {(4, 0.3): (2, 2), (5, 0.3): (4, 3), (4, 0.2): (2, 2)}[(batch, fraction)]
    assert ((per_rank != 0).sum(0) == kept[0]).all() and ((whole != 0).sum(0) == kept[1]).all()
    for half in (slice(0, batch), slice(batch, 2 * batch)):  # each rank's winners are its own sub-batch's top
        assert ((per_rank[half] != 0).sum(0) == kept[0] // 2).all()
    assert not torch.equal(per_rank, whole)


def test_stacked_phases_run_data_parallel_and_equal_one_process_with_iter_size_2(tmp_path: Path) -> None:
    cases = {}
    x = np.random.default_rng(2).uniform(size=(40, 12)).astype(np.float32)
    for name, iter_size in (("ranks", 1), ("single", 2)):
        d = tmp_path / name
        d.mkdir()
        (d / "net.prototxt").write_text(DEEP_NET)
        (d / "solver.prototxt").write_text(
            f'net: "net.prototxt"\nbase_lr: 0.5\nmomentum: 0.9\nlr_policy: "fixed"\nmax_iter: 6\niter_size: {iter_size}'
            '\nsnapshot_after_train: false\nrandom_seed: 3\n')
        np.savez(d / "data.npz", data=x)
        cases[name] = d / "solver.prototxt"
    res = launched(cases["ranks"], "--shard", "contiguous", "-o", "out", "--stacked", *STACK, "--stacked-iters", "5")
    one_process(cases["single"], stacked=STACK, stacked_iters=5)
    for phase in (1, 2, 3):
        assert f"stacked phase {phase} (" in res.stderr, res.stderr
    assert "stacked phase 2: cached 'encode1s' for 40 samples" in res.stderr
    got, want = ((cases[k].parent / "out.caffemodel").read_bytes() for k in ("ranks", "single"))
    assert got == want, "each greedy phase, then the fine-tuning, as one process with iter_size 2"


def test_ctrl_c_on_the_launcher_stops_every_rank_and_rank_0s_snapshot_resumes_exactly(tmp_path: Path) -> None:
    total = 2000
    single = make_case(tmp_path / "single", max_iter=total, snapshot=0, iter_size=2)
    one_process(single)
    cut = make_case(tmp_path / "cut", max_iter=total, snapshot=0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.Popen(launcher_command(cut, "--shard", "contiguous", "--log-file", "log.jsonl"), cwd=cut.parent,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        log = cut.parent / "log.jsonl"
        while not (log.exists() and log.read_text().count("\n") > 40):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # Ctrl-C on the launcher only: its agent passes SIGINT on to every rank
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-4000:]
    states = list(cut.parent.glob("snap_iter_*.solverstate"))
    assert len(states) == 1, err[-4000:]
    at = int(states[0].stem.rsplit("_", 1)[1])
    assert 40 < at < total, at
    assert f"interrupted by SIGINT at iteration {at}" in err
    assert "error" not in err, err[-4000:]
    # rank 0's snapshot line, then the launcher's one "interrupted" (the ranks leave theirs to it)
    assert [line for line in err.splitlines() if line.strip() == "interrupted"] == ["interrupted"], err[-4000:]
    launched(cut, "--shard", "contiguous", "--snapshot", states[0].name, "-o", "out")
    assert (cut.parent / "out.caffemodel").read_bytes() == (single.parent / "out.caffemodel").read_bytes()


def test_a_killed_rank_and_a_user_error_are_one_message_from_the_launcher(tmp_path: Path) -> None:
    solver = make_case(tmp_path / "run", max_iter=10**6, snapshot=200)
    res = launched(solver, "--data", "missing.npz", ok=False)  # every rank fails; the launcher says it once
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert res.returncode == 2 and errors == ["error: data file 'missing.npz' does not exist; check the path"], \
        res.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(launcher_command(solver, "--dist-timeout", "5"), cwd=solver.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (solver.parent / "snap_iter_200.solverstate").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        survivor, victim = _rank_pid(proc.pid, 0), _rank_pid(proc.pid, 1)
        assert survivor is not None and victim is not None
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert _gone(survivor)
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    want = (f"error: rank 1 of 2 (pid {victim}) was killed by SIGKILL; every rank stopped: resume all ranks from "
            "the last snapshot with --snapshot")
    assert proc.returncode == 2 and errors == [want], err[-4000:]


def test_explain_names_the_cause_first() -> None:
    user = "data file 'x.npz' does not exist; check the path"
    collective = "rank 0 of 2: the gradient all-reduce of iteration 7 failed: another rank died, ..."
    assert explain([RankExit(1, 11, 2, user, time=5.0), RankExit(0, 10, 143)], 2) == (user, 2)
    assert explain([RankExit(0, 10, 2, user, time=5.0), RankExit(1, 11, 2, user, time=4.0)], 2) == (user, 2)
    assert explain([RankExit(0, 10, 2, "a", time=5.0), RankExit(2, 12, 2, "b", time=4.0)], 3) == \
        ("rank 2 of 3: b", 2)
    assert explain([RankExit(0, 10, 2, collective, consequence=True, time=1.0), RankExit(1, 11, -9)], 2)[0] == \
        "rank 1 of 2 (pid 11) was killed by SIGKILL; every rank stopped: resume all ranks from the last snapshot " \
        "with --snapshot"
    assert "exited with code 1 without a caffeonnx error" in str(explain([RankExit(1, 11, 1), RankExit(0, 10, -15)],
                                                                         2)[0])
    assert explain([RankExit(0, 10, 2, collective, consequence=True), RankExit(1, 11, -15)], 2) == (collective, 2)
    hung = [RankExit(0, 10, 2, collective, consequence=True, time=100.5), RankExit(1, 11, -9, time=131.0)]
    assert explain(hung, 2) == (collective, 2), "killed by the launcher 30 s after rank 0 gave up on it"
    died = [RankExit(0, 10, 2, collective, consequence=True, time=100.5), RankExit(1, 11, -9, time=100.0)]
    assert explain(died, 2)[0].startswith("rank 1 of 2 (pid 11) was killed by SIGKILL")  # type: ignore[union-attr]
    assert explain([RankExit(0, 10, 130), RankExit(1, 11, 130)], 2) == (None, 130)
    assert explain([RankExit(0, 10, 143), RankExit(1, 11, -15)], 2) == (None, 143)


def test_the_ranks_get_the_commands_own_options_spelled_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    solver = make_case(tmp_path)
    calls: list[tuple[list[str], int, float]] = []
    monkeypatch.setattr("caffeonnx.trainer.distributed.launch", lambda args, n, t: calls.append((list(args), n, t)))
    res = CliRunner().invoke(app, ["train", str(solver), "--procs", "3", "--wta", "act=5%", "--wta", "code=10%",
                                   "--no-png", "-q", "--max-iter", "7", "-o", "out", "--dist-timeout", "9"])
    assert res.exit_code == 0, res.output
    (args, n, timeout), = calls
    assert (n, timeout) == (3, 9.0)
    assert args[0] == str(solver) and args[-2:] == ["--device", "cpu"]
    pairs = {(args[i], args[i + 1]) for i in range(len(args) - 1)}
    assert {("--wta", "act=5%"), ("--wta", "code=10%"), ("--max-iter", "7"), ("--output", "out"),
            ("--shard", "skip"), ("--dist-timeout", "9.0")} <= pairs
    assert "--no-png" in args and "--quiet" in args and "--procs" not in args and "--gpu" not in args
    assert "--deterministic" not in args


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_all_without_a_gpu_and_bad_combinations_are_one_line_errors(tmp_path: Path) -> None:
    solver = make_case(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "caffeonnx", "train", str(solver), "--data", "data.npz", "--gpu", "all"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    want = (f"error: --gpu all: torch {torch.__version__} sees no CUDA device; train on the CPU (leave out --gpu), "
            "or as N CPU ranks with --procs N")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [want], res.stderr
    for gpu, procs, device, torchrun, fragment in [
            (None, 0, "auto", False, "--procs must be a positive number of CPU ranks, got 0"),
            ("all", 2, "auto", False, "give --procs 2 (CPU ranks) or --gpu all, not both"),
            (None, 2, "cuda", False, "for one rank per GPU give --gpu all instead of --device cuda"),
            ("all", None, "cpu", False, "give --gpu all or --device cpu, not both"),
            (None, 2, "auto", True, "--procs 2 under torchrun: torchrun has started the ranks already")]:
        with pytest.raises(CaffeOnnxError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            commands._launch_plan(gpu, procs, device, torchrun)
    assert commands._launch_plan(None, 1, "auto", False) is None, "--procs 1 trains in this process"
    assert commands._launch_plan(None, 4, "cpu", False) == (4, "cpu")
    assert issubclass(DistributedError, CaffeOnnxError)


def test_a_launched_rank_records_its_error_for_the_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from caffeonnx.trainer.distributed import record_error

    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    monkeypatch.delenv("CAFFEONNX_LAUNCHED", raising=False)
    assert not record_error(CaffeOnnxError("x")) and not path.exists(), "under plain torchrun the rank prints it"
    monkeypatch.setenv("CAFFEONNX_LAUNCHED", "1")
    assert record_error(DistributedError("lost"))
    data = json.loads(path.read_text())
    assert data["message"] == "lost" and data["caffeonnx"]["consequence"] is True
