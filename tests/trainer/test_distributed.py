"""`caffeonnx train` under torchrun: real ranks (gloo on 127.0.0.1, 2 processes) against one process.

Each distributed run is `python -m torch.distributed.run ... -m caffeonnx train`; the one-process
references run in this process with --threads 1, as the ranks do (torchrun sets OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caffeonnx.converter.caffe_io import read_caffemodel
from caffeonnx.trainer.data import BatchSource, ShardedSource
from caffeonnx.trainer.session import TrainOptions, run_training
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]
BATCH, FEATURES = 4, 12

NET = f"""name: "tiny_tied"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: {BATCH} dim: {FEATURES} }} }} }}
layer {{ name: "encode" type: "InnerProduct" bottom: "data" top: "code"
  param {{ name: "tied" lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: 5 weight_filler {{ type: "gaussian" std: 0.1 }}
                         bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "act" type: "Sigmoid" bottom: "code" top: "act" }}
DROPOUT
layer {{ name: "decode" type: "InnerProduct" bottom: "act" top: "recon"
  param {{ name: "tied" lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 0.5 decay_mult: 2 }}
  inner_product_param {{ num_output: {FEATURES} transpose: true bias_filler {{ type: "constant" value: 0 }} }} }}
layer {{ name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "recon" bottom: "data" top: "loss" }}
"""
DROPOUT = 'layer { name: "drop" type: "Dropout" bottom: "act" top: "act" dropout_param { dropout_ratio: 0.3 } }'

SOLVERS = {
    "SGD": 'base_lr: 0.1\nmomentum: 0.9\nlr_policy: "step"\ngamma: 0.5\nstepsize: 5',
    "Nesterov": 'base_lr: 0.05\nmomentum: 0.9\nlr_policy: "inv"\ngamma: 0.1\npower: 0.75',
    "AdaGrad": 'base_lr: 0.1\nlr_policy: "fixed"\ndelta: 1e-6',
    "RMSProp": 'base_lr: 0.01\nlr_policy: "fixed"\nrms_decay: 0.9\ndelta: 1e-6',
    "AdaDelta": 'base_lr: 1.0\nmomentum: 0.95\nlr_policy: "fixed"\ndelta: 1e-6',
    "Adam": 'base_lr: 0.01\nmomentum: 0.9\nmomentum2: 0.999\nlr_policy: "fixed"\ndelta: 1e-8',
}


def make_case(d: Path, kind: str = "SGD", iter_size: int = 1, max_iter: int = 12, snapshot: int = 6,
              dropout: bool = False, samples: np.ndarray | None = None) -> Path:
    """A tied autoencoder with lr_mult/decay_mult, its solver and 40 seeded samples in `d`; returns the solver."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "net.prototxt").write_text(NET.replace("DROPOUT", DROPOUT if dropout else ""))
    (d / "solver.prototxt").write_text(
        f'net: "net.prototxt"\ntype: "{kind}"\n{SOLVERS[kind]}\nweight_decay: 0.001\nmax_iter: {max_iter}\n'
        f'iter_size: {iter_size}\nsnapshot: {snapshot}\nsnapshot_prefix: "snap"\nrandom_seed: 7\n')
    data = samples if samples is not None else np.random.default_rng(0).random((40, FEATURES)).astype(np.float32)
    np.savez(d / "data.npz", data=data)
    return d / "solver.prototxt"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(solver: Path, *args: str, nproc: int = 2) -> list[str]:
    """torch's own launcher starting `nproc` ranks of `caffeonnx train` on loopback."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "caffeonnx", "train", str(solver.name),
            "--data", "data.npz", "--no-png", "-q", *args]


def torchrun(solver: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """Run the ranks to the end in the solver's directory; fails the test with their output if they fail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(torchrun_command(solver, *args, nproc=nproc), cwd=solver.parent, env=env,
                         capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def one_process(solver: Path, log: Path | None = None) -> None:
    """The same training in this process, one thread, in the solver's directory (relative snapshot names)."""
    cwd = os.getcwd()
    os.chdir(solver.parent)
    try:
        run_training(TrainOptions(Path(solver.name), data="data.npz", output=Path("out"), pictures=False, threads=1,
                                  log=log), say=lambda _: None)
    finally:
        os.chdir(cwd)


def weights(path: Path) -> dict[str, np.ndarray]:
    """Every blob of a caffemodel by layer/index."""
    return {f"{layer}/{i}": b.data for layer, blobs in read_caffemodel(path).blobs.items() for i, b in enumerate(blobs)}


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_caffes_skip_rule_or_contiguous_sub_batches(world: int) -> None:
    n = 10  # not a multiple of the batch or of the ranks: the stream wraps mid-batch, as Caffe's cursor does
    source = BatchSource({"x": np.arange(n, dtype=np.float32)[:, None], "y": np.arange(n, dtype=np.float32) * 10},
                         {"x": (3, 1), "y": (2,)})
    for rank in range(world):
        skip, contiguous = ShardedSource(source, rank, world, "skip"), ShardedSource(source, rank, world, "contiguous")
        for k in range(7):
            for name, size in (("x", 3), ("y", 2)):
                items = [((k * size + i) * world + rank) % n for i in range(size)]
                scale = 10 if name == "y" else 1
                assert skip.batch(k)[name].reshape(-1).tolist() == [float(i * scale) for i in items], (name, rank, k)
                assert np.array_equal(contiguous.batch(k)[name], source.batch(k * world + rank)[name])


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_contiguous_ranks_equal_one_process_with_iter_size_bytewise(tmp_path: Path, kind: str) -> None:
    ranks = make_case(tmp_path / "ranks", kind)
    single = make_case(tmp_path / "single", kind, iter_size=2)
    res = torchrun(ranks, "--shard", "contiguous", "-o", "out", "--log-file", "log.jsonl")
    one_process(single, log=Path("log.jsonl"))
    assert (ranks.parent / "log.jsonl").read_text() == (single.parent / "log.jsonl").read_text(), \
        "rank 0 logs the loss of all passes, as one process logs the mean of its iter_size passes"
    for name in ("out.caffemodel", "snap_iter_6.caffemodel", "snap_iter_6.solverstate", "snap_iter_12.caffemodel",
                 "snap_iter_12.solverstate"):
        got, want = (ranks.parent / name).read_bytes(), (single.parent / name).read_bytes()
        assert got == want, f"{kind}: {name} differs from one process with iter_size 2"
    assert "all 2 ranks end with identical weights and solver history" in res.stderr
    assert "rank 1 of 2: trained 12 iteration(s)" in res.stderr and "(rank 0 writes the files)" in res.stderr
    written = sorted(p.name for p in ranks.parent.iterdir())
    assert written == sorted(["data.npz", "net.prototxt", "solver.prototxt", "log.jsonl", "out.caffemodel", "out.onnx",
                              *(f"snap_iter_{n}.{ext}" for n in (6, 12)
                                for ext in ("caffemodel", "onnx", "solverstate", "solverstate.json"))])


def test_three_ranks_equal_iter_size_3_up_to_the_all_reduce_order(tmp_path: Path) -> None:
    ranks = make_case(tmp_path / "ranks")
    single = make_case(tmp_path / "single", iter_size=3)
    torchrun(ranks, "--shard", "contiguous", "-o", "out", nproc=3)
    one_process(single)
    got, want = weights(ranks.parent / "out.caffemodel"), weights(single.parent / "out.caffemodel")
    for name in got:  # gloo's ring adds the three ranks' diffs in its own order: an ulp apart, not bitwise
        assert_close(got[name], want[name], name, atol=1e-7, rtol=1e-5)


def test_skip_sharding_equals_one_process_fed_the_same_items(tmp_path: Path) -> None:
    x = np.random.default_rng(1).random((40, FEATURES)).astype(np.float32)
    iters, world = 12, 2
    # DataLayer::Skip: rank r's batch k holds stream items (k·B + i)·N + r; one process with iter_size N gets rank
    # r's batch k as pass r of iteration k, i.e. its batch k·N + r.
    fed = np.stack([x[((k * BATCH + i) * world + r) % len(x)]
                    for k in range(iters) for r in range(world) for i in range(BATCH)])
    ranks = make_case(tmp_path / "ranks", samples=x)
    single = make_case(tmp_path / "single", iter_size=2, samples=fed)
    torchrun(ranks, "-o", "out")
    one_process(single)
    got, want = weights(ranks.parent / "out.caffemodel"), weights(single.parent / "out.caffemodel")
    assert got.keys() == want.keys()
    for name in got:
        assert_close(got[name], want[name], name, atol=0.0, rtol=1e-5)


def test_resumed_ranks_continue_exactly_with_per_rank_dropout(tmp_path: Path) -> None:
    full = make_case(tmp_path / "full", dropout=True)
    torchrun(full, "-o", "out")
    resumed = make_case(tmp_path / "resumed", dropout=True)
    torchrun(resumed, "--max-iter", "6")  # stops at the snapshot of iteration 6
    torchrun(resumed, "--snapshot", "snap_iter_6.solverstate", "-o", "out")
    assert (resumed.parent / "out.caffemodel").read_bytes() == (full.parent / "out.caffemodel").read_bytes()
    single = make_case(tmp_path / "single", dropout=True, iter_size=2)
    one_process(single)
    assert (single.parent / "out.caffemodel").read_bytes() != (full.parent / "out.caffemodel").read_bytes(), \
        "Dropout draws random_seed + rank on each rank, unlike one process's single stream"


def test_ctrl_c_on_the_launcher_stops_every_rank_at_one_iteration_and_the_snapshot_resumes_exactly(
        tmp_path: Path) -> None:
    total = 800
    full = make_case(tmp_path / "full", max_iter=total, snapshot=0, dropout=True)
    torchrun(full, "-o", "out")
    cut = make_case(tmp_path / "cut", max_iter=total, snapshot=0, dropout=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(torchrun_command(cut, "--log-file", "log.jsonl"), cwd=cut.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        log = cut.parent / "log.jsonl"
        while not (log.exists() and log.read_text().count("\n") > 40):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # Ctrl-C on torchrun: it passes SIGINT on to every rank
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    states = list(cut.parent.glob("snap_iter_*.solverstate"))
    assert len(states) == 1, err[-4000:]
    at = int(states[0].stem.rsplit("_", 1)[1])
    assert 40 < at < total, at
    assert f"interrupted by SIGINT at iteration {at}" in err
    torchrun(cut, "--snapshot", states[0].name, "-o", "out")
    assert (cut.parent / "out.caffemodel").read_bytes() == (full.parent / "out.caffemodel").read_bytes()


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker with RANK=`rank` among the launcher's children, once it is running."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _gone(pid: int) -> bool:
    """Whether process `pid` has ended (exited or a zombie waiting for the launcher)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dead", "hung"])
def test_a_dead_or_hung_rank_stops_the_other_with_one_message(tmp_path: Path, fault: signal.Signals) -> None:
    solver = make_case(tmp_path / "run", max_iter=10**6, snapshot=200)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(torchrun_command(solver, "--dist-timeout", "5"), cwd=solver.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    victim = None
    try:
        deadline = time.monotonic() + 120
        while not (solver.parent / "snap_iter_200.solverstate").exists():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        survivor, victim = _rank_pid(proc.pid, 0), _rank_pid(proc.pid, 1)
        assert survivor is not None and victim is not None
        os.kill(victim, fault)
        faulted = time.monotonic()
        while not _gone(survivor) and time.monotonic() < faulted + 60:
            time.sleep(0.05)
        seconds = time.monotonic() - faulted
        if fault == signal.SIGSTOP:  # a stopped rank never acts on the launcher's SIGTERM
            os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert seconds < 20, f"rank 0 took {seconds:.1f}s to stop after rank 1 {'died' if fault == signal.SIGKILL else 'hung'}"
    errors = [line for line in err.splitlines() if line.startswith("error: rank 0 of 2: ")]
    assert len(errors) == 1, err[-4000:]
    assert "failed: another rank died, hung for more than --dist-timeout 5s or lost its connection" in errors[0]
    assert "resume all ranks from the last snapshot with --snapshot" in errors[0]
