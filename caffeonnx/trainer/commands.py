"""`caffeonnx train` and `caffeonnx time`: thin typer commands over run_training and timing.time_net,
with Caffe's spellings (`--solver`, `--gpu N`, `--iterations`) and a thread count that suits a loaded machine."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from caffeonnx.errors import CaffeOnnxError

if TYPE_CHECKING:  # torch loads only when a command trains, not with every CLI call
    from caffeonnx.trainer.loop import Iteration

err = Console(stderr=True)


def busy_cpus(seconds: float = 0.1) -> float:
    """How many CPUs other processes keep busy now: /proc/stat over `seconds`, else the 1-minute load average."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def default_threads() -> int:
    """torch's threads less the CPUs busy elsewhere, at least 1: on a loaded machine extra threads collapse.

    benchmarks/results/train_threads.md: with every core busy, torch's default thread count trains the
    bundled tied autoencoder several times slower than 1 thread (its threads wait for each other at
    every barrier), while on an idle machine it is at best somewhat faster.
    """
    import torch

    cores = min(torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1 << 16)
    return max(1, min(cores, round((os.cpu_count() or 1) - busy_cpus())))


def _device(device: str, gpu: str | None) -> str:
    """--device, or Caffe's --gpu N (one CUDA device); `train --gpu all` is handled by _launch_plan first."""
    if gpu is None:
        return device
    if device != "auto":
        raise CaffeOnnxError(f"give --gpu {gpu} or --device {device}, not both")
    if gpu.isdigit():
        return f"cuda:{int(gpu)}"
    if gpu == "all":
        raise CaffeOnnxError("--gpu all: only `caffeonnx train` uses several GPUs; give one device number such as 0")
    if all(part.strip().isdigit() for part in gpu.split(",")):
        raise CaffeOnnxError(f"--gpu {gpu}: to train on those GPUs run `CUDA_VISIBLE_DEVICES={gpu.replace(' ', '')} "
                             "caffeonnx train ... --gpu all`; otherwise give one device number such as 0")
    raise CaffeOnnxError(f"--gpu expects a device number such as 0 (or all), got {gpu!r}")


def _launch_plan(gpu: str | None, procs: int | None, device: str, under_torchrun: bool) -> tuple[int, str] | None:
    """(ranks, --device for each) when this command should start the ranks itself, else None (train here).

    --gpu all: one rank per visible CUDA device (torch.cuda.device_count(), so CUDA_VISIBLE_DEVICES chooses them);
    --procs N: N CPU ranks.  One device or --procs 1 trains in this process.
    """
    if procs is None and gpu != "all":
        return None
    what = "--gpu all" if procs is None else f"--procs {procs}"
    if procs is not None and gpu is not None:
        raise CaffeOnnxError(f"give --procs {procs} (CPU ranks) or --gpu {gpu}, not both")
    if under_torchrun:
        raise CaffeOnnxError(f"{what} under torchrun: torchrun has started the ranks already; leave {what} out")
    if procs is not None:
        if procs < 1:
            raise CaffeOnnxError(f"--procs must be a positive number of CPU ranks, got {procs}")
        if device not in ("auto", "cpu"):
            raise CaffeOnnxError(f"--procs {procs} starts CPU ranks; for one rank per GPU give --gpu all "
                                 f"instead of --device {device}")
        return (procs, "cpu") if procs > 1 else None
    if device != "auto":
        raise CaffeOnnxError(f"give --gpu all or --device {device}, not both")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise CaffeOnnxError(f"--gpu all: torch {torch.__version__} sees no CUDA device; train on the CPU (leave out "
                             "--gpu), or as N CPU ranks with --procs N")
    return (count, "cuda") if count > 1 else None


def _rank_args(ctx: typer.Context, leave_out: set[str], device: str) -> list[str]:
    """This command's own arguments, as each launched rank gets them: every option given or defaulted, spelled
    out (so the ranks read the same values), less the launcher's own, with --device for the ranks."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if param.name in leave_out or value is None:
            continue
        if param.param_type_name != "option":
            args.append(str(value))
            continue
        name = max(param.opts, key=len)
        secondary = getattr(param, "secondary_opts", [])
        if getattr(param, "is_flag", False):
            if secondary or value:
                args.append(name if value else max(secondary, key=len))
        elif param.multiple:
            for item in value:
                args += [name, str(item)]
        else:
            args += [name, str(value)]
    return [*args, "--device", device]


def train(
    ctx: typer.Context,
    solver: Annotated[Path | None, typer.Argument(
        help="Caffe solver definition (solver.prototxt); or give it with --solver.")] = None,
    solver_option: Annotated[Path | None, typer.Option(
        "--solver", help="The solver, as Caffe's `caffe train --solver` spells it.")] = None,
    weights: Annotated[Path | None, typer.Option(
        "--weights", help="Initial weights: .caffemodel, or an .onnx written by caffeonnx.")] = None,
    snapshot: Annotated[Path | None, typer.Option(
        "--snapshot", help="Resume from PREFIX_iter_N.solverstate (Caffe's or ours).")] = None,
    data: Annotated[str | None, typer.Option(
        "--data", help="Training samples: .npz (one array per input blob), .npy/IDX(.gz) for the first input "
                       "(MNIST images bring their labels), or blob=path,blob=path.")] = None,
    test_data: Annotated[str | None, typer.Option(
        "--test-data", help="Samples for the TEST-phase net (test_iter/test_interval), same forms as --data.")] = None,
    max_iter: Annotated[int | None, typer.Option(
        "--max-iter", help="Stop after N iterations; the lr schedule still uses the solver's max_iter.")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Write PREFIX.caffemodel and PREFIX.onnx at the end.")] = None,
    log: Annotated[Path | None, typer.Option(
        "--log", "--log-file", help="Append one JSON line per iteration (and test); under torchrun spell it "
                                   "--log-file (torchrun takes --log for its --log-dir).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")] = "auto",
    gpu: Annotated[str | None, typer.Option(
        "--gpu", help="Caffe's --gpu: N trains on CUDA device N; all starts one data-parallel rank per visible "
                      "GPU (NCCL) through torch's elastic launcher.")] = None,
    procs: Annotated[int | None, typer.Option(
        "--procs", help="Start N data-parallel CPU ranks (gloo on 127.0.0.1) through torch's elastic launcher, "
                        "as `torchrun --standalone --nproc_per_node N -m caffeonnx train` would.")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="torch intra-op CPU threads (default: one per core, less the cores other processes "
                          "keep busy).")] = None,
    deterministic: Annotated[bool, typer.Option(
        "--deterministic", help="Use only deterministic torch kernels (bitwise repeatable runs).")] = False,
    wta: Annotated[list[str] | None, typer.Option(
        "--wta", help="Winner-take-all sparsity while training: LAYER=k% on that layer's top (FC: lifetime; "
                      "conv: spatial + lifetime). Repeatable.")] = None,
    stacked: Annotated[list[str] | None, typer.Option(
        "--stacked", help="Greedy layer-wise training first: ENCODER:DECODER layer pairs, bottom-up (repeat or "
                          "comma-separate); each pair trains alone on the cached codes below, then the whole net "
                          "is fine-tuned.")] = None,
    stacked_iters: Annotated[int | None, typer.Option(
        "--stacked-iters", help="Iterations per greedy phase (default: the solver's max_iter).")] = None,
    png: Annotated[bool, typer.Option(
        "--png/--no-png", help="Write filters, input/reconstruction pairs and the loss curve as PNGs beside "
                               "snapshots and -o outputs.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    shard: Annotated[str, typer.Option(
        "--shard", help="Under torchrun: how ranks split the TRAIN data. skip: rank r reads items r, r+N, ... of "
                        "one stream (Caffe's DataLayer::Skip); contiguous: rank r reads the r-th sub-batch, so N "
                        "ranks equal one process with iter_size × N.")] = "skip",
    dist_timeout: Annotated[float, typer.Option(
        "--dist-timeout", help="Under torchrun: seconds a rank waits for the others in a collective before all "
                               "stop (a dead or hung rank). Must exceed rank 0's longest test or snapshot.")] = 300.0,
) -> None:
    """Train a Caffe net with Caffe's solver semantics (exact updates, lr policies, snapshots).

    Under `torchrun --nproc_per_node N -m caffeonnx train ...`, or started by `--gpu all` / `--procs N`, the N ranks
    train data-parallel as Caffe's multi-GPU training does (gradients averaged over ranks; rank 0 tests and writes
    every file).
    """
    from caffeonnx.trainer.build import load_solver
    from caffeonnx.trainer.distributed import environment, record_error
    from caffeonnx.trainer.session import TrainOptions, run_training

    if (solver is None) == (solver_option is None):
        raise CaffeOnnxError("give the solver once: `caffeonnx train SOLVER` or `caffeonnx train --solver SOLVER`"
                             + ("" if solver is None else f", not both ({str(solver)!r} and {str(solver_option)!r})"))
    solver_path = solver if solver is not None else solver_option
    assert solver_path is not None
    schedule_end = load_solver(solver_path).max_iter
    ranks = environment(dist_timeout, shard)
    plan = _launch_plan(gpu, procs, device, ranks is not None)
    if plan is not None:
        from caffeonnx.trainer.distributed import launch

        count, rank_device = plan
        err.print(f"starting {count} ranks through torch's elastic launcher ("
                  + ("one per GPU, NCCL" if rank_device == "cuda" else "CPU, gloo on 127.0.0.1") + ")",
                  markup=False, highlight=False)
        launch(_rank_args(ctx, {"gpu", "procs", "device"}, rank_device), count, dist_timeout)
        return
    if gpu == "all" or procs == 1:  # one GPU, or one process: train here
        gpu, device = (None, "cpu") if procs == 1 else ("0", device)
    root = ranks is None or ranks.root
    opts = TrainOptions(solver_path, weights, snapshot, data, test_data, max_iter, output, log, _device(device, gpu),
                        deterministic, wta or [], stacked or [], stacked_iters, png,
                        threads if threads is not None else default_threads(), shard, dist_timeout)
    columns = [TextColumn("iter"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn()]
    bar = Progress(*columns, console=err, disable=quiet or not root, transient=False)
    task = bar.add_task("train", total=max_iter if max_iter is not None else schedule_end, status="")
    first = True

    def on_iteration(record: Iteration, samples_per_s: float) -> None:
        nonlocal first
        if first:  # the bar appears with the first iteration: a setup error stays one line
            if max_iter is not None:  # a resumed run counts on from its snapshot's iteration
                bar.update(task, total=record.iter + max_iter)
            bar.start()
            first = False
        bar.update(task, completed=record.iter + 1,
                   status=f"loss {record.loss:.5g}  lr {record.lr:.3g}  {samples_per_s:,.0f} samples/s")

    try:
        result = run_training(opts, say=lambda text: bar.console.print(text, markup=False, highlight=False),
                              progress=on_iteration)
    except CaffeOnnxError as exc:
        if ranks is not None and record_error(exc):  # a launched rank: the launcher says it, once for all ranks
            raise SystemExit(2) from None
        raise
    finally:
        bar.stop()
    last = result.iterations[-1] if result.iterations else None
    summary = f"trained {len(result.iterations)} iteration(s) in {result.seconds:.1f}s"
    if last is not None:
        summary += f", last loss {last.loss:.6g} (smoothed {last.smoothed_loss:.6g})"
    if ranks is not None and not ranks.root:
        summary = f"rank {ranks.rank} of {ranks.world}: {summary} (rank 0 writes the files)"
    written = [str(p) for s in result.snapshots for p in (s.caffemodel, s.onnx, s.solverstate)]
    written += [str(p) for p in result.outputs if p.suffix != ".png"]
    pngs = [p for p in result.outputs if p.suffix == ".png"]
    if pngs:
        written.append(f"{len(pngs)} PNG picture(s)")
    err.print(summary + (f"; wrote {', '.join(written)}" if written else ""), markup=False, highlight=False)


def time_command(
    model: Annotated[Path, typer.Argument(help="Caffe net definition (.prototxt), as `caffe time -model`.")],
    iterations: Annotated[int, typer.Option("--iterations", help="Iterations to average over (Caffe's default).")] = 50,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")] = "cpu",
    gpu: Annotated[str | None, typer.Option("--gpu", help="Caffe's --gpu N: time on CUDA device N.")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="torch intra-op CPU threads (default: as `caffeonnx train`).")] = None,
) -> None:
    """Per-layer forward and backward time of the net's TRAIN phase, like `caffe time`.

    Weights from the fillers; inputs random in [0, 1) of the net's input shapes (Caffe's reads its data layers).
    """
    import torch

    from caffeonnx.trainer.session import pick_device
    from caffeonnx.trainer.timing import time_net

    if threads is not None and threads < 1:
        raise CaffeOnnxError(f"--threads must be a positive number of CPU threads, got {threads}")
    target = pick_device(_device(device, gpu))
    torch.set_num_threads(threads if threads is not None else default_threads())
    with err.status(f"timing {model.name}"):
        result = time_net(model, iterations, str(target))
    shapes = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in result.input_shapes.items())
    print(f"{model}: TRAIN phase on {result.device} ({torch.get_num_threads()} CPU threads), {iterations} "
          f"iterations after one warm-up; random inputs {shapes}")
    for line in result.lines():
        print(line)


def test_command(
    model: Annotated[Path, typer.Argument(help="Caffe net definition (.prototxt), as `caffe test -model`.")],
    weights: Annotated[Path | None, typer.Option(
        "--weights", help="Trained weights: .caffemodel, or an .onnx written by caffeonnx (fillers without).")] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="Batches to score (Caffe's default).")] = 50,
    stage: Annotated[list[str] | None, typer.Option(
        "--stage", help="NetState stage selecting layers (repeatable), as `caffe test --stage`.")] = None,
    level: Annotated[int, typer.Option("--level", help="NetState level, as `caffe test --level`.")] = 0,
    data: Annotated[str | None, typer.Option(
        "--data", help="Samples instead of the net's TEST data layers: .npz (one array per blob), .npy or IDX.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")] = "cpu",
    gpu: Annotated[str | None, typer.Option("--gpu", help="Caffe's --gpu N: score on CUDA device N.")] = None,
) -> None:
    """Score a trained net on its TEST-phase data, like `caffe test -model NET -weights W -iterations N`.

    Prints each batch's outputs, then the mean of every output and the mean loss.
    """
    from caffeonnx.trainer.evaluate import run_test

    run_test(model, weights, iterations, tuple(stage or ()), level, data, _device(device, gpu),
             say=lambda text: print(text))


def register(app: typer.Typer) -> None:
    """Add the trainer's commands to the `caffeonnx` CLI."""
    app.command("train")(train)
    app.command("time")(time_command)
    app.command("test")(test_command)
