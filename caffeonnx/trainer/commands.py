"""`caffeonnx train`: thin typer command over caffeonnx.trainer.session.run_training."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:  # torch loads only when a command trains, not with every CLI call
    from caffeonnx.trainer.loop import Iteration

err = Console(stderr=True)


def train(
    solver: Annotated[Path, typer.Argument(help="Caffe solver definition (solver.prototxt).")],
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
    log: Annotated[Path | None, typer.Option("--log", help="Append one JSON line per iteration (and test).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")] = "auto",
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
) -> None:
    """Train a Caffe net with Caffe's solver semantics (exact updates, lr policies, snapshots)."""
    from caffeonnx.trainer.session import TrainOptions, run_training

    opts = TrainOptions(solver, weights, snapshot, data, test_data, max_iter, output, log, device, deterministic,
                        wta or [], stacked or [], stacked_iters, png)
    columns = [TextColumn("iter"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err, disable=quiet, transient=False) as bar:
        task = bar.add_task("train", total=max_iter, status="")

        def on_iteration(record: Iteration, samples_per_s: float) -> None:
            bar.update(task, advance=1, status=f"loss {record.loss:.5g}  lr {record.lr:.3g}  {samples_per_s:,.0f} samples/s")

        result = run_training(opts, say=lambda text: bar.console.print(text, markup=False, highlight=False),
                              progress=on_iteration)
    last = result.iterations[-1] if result.iterations else None
    summary = f"trained {len(result.iterations)} iteration(s) in {result.seconds:.1f}s"
    if last is not None:
        summary += f", last loss {last.loss:.6g} (smoothed {last.smoothed_loss:.6g})"
    written = [str(p) for s in result.snapshots for p in (s.caffemodel, s.onnx, s.solverstate)]
    written += [str(p) for p in result.outputs if p.suffix != ".png"]
    pngs = [p for p in result.outputs if p.suffix == ".png"]
    if pngs:
        written.append(f"{len(pngs)} PNG picture(s)")
    err.print(summary + (f"; wrote {', '.join(written)}" if written else ""), markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the trainer's commands to the `caffeonnx` CLI."""
    app.command("train")(train)
