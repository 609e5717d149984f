"""The `caffeonnx` command line: thin typer commands over the Python API.

User errors (CaffeOnnxError) become one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from caffeonnx.errors import CaffeOnnxError

app = typer.Typer(
    help="Caffe <-> ONNX conversion, Caffe-exact training and ONNX Runtime serving.\n\n"
         "Exit codes: 0 ok; 1 a check found differences (verify, demo); 2 user error (bad option, file or "
         "model: one line on stderr); 130 interrupted (Ctrl-C/SIGINT); 143 terminated (SIGTERM). train stops at "
         "the next iteration boundary and snapshots it first (a second signal discards the iteration in "
         "progress); encode removes its temporary files.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)


def _batch_value(text: str) -> int:
    """Parse --batch: a positive integer (a bad value is a one-line user error, not a usage box)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise CaffeOnnxError(f"--batch must be a positive integer, got {text!r}")
    return value


OutOption = Annotated[Path, typer.Option("-o", "--output", help="File to write (written atomically).")]
BatchOption = Annotated[
    Optional[int], typer.Option("--batch", parser=_batch_value, help="Fix the batch dimension (default: dynamic).")
]
OpsetOption = Annotated[int, typer.Option("--opset", help="ONNX opset to target.")]
PhaseOption = Annotated[str, typer.Option("--phase", help="Caffe phase whose layers to convert: TEST or TRAIN.")]
StageOption = Annotated[
    Optional[list[str]],
    typer.Option("--stage", help="A NetState stage, as `caffe --stage` (repeatable): selects include/exclude "
                                 "{ stage / not_stage } layers; added to the prototxt's own state { stage }."),
]
LevelOption = Annotated[
    int, typer.Option("--level", help="The NetState level, as `caffe --level`: selects min_level/max_level layers.")
]
InputShapeOption = Annotated[
    Optional[list[str]],
    typer.Option("--input-shape", help="NAME=D0,D1,... for inputs whose shape the prototxt does not give."),
]


def _options(opset: int = 21, batch: int | None = None, phase: str = "TEST", input_shape: list[str] | None = None,
             stage: list[str] | None = None, level: int = 0, **kw: object):
    from caffeonnx.converter.context import ConvertOptions
    from caffeonnx.proto import caffe_pb2

    phase_up = phase.upper()
    if phase_up not in ("TEST", "TRAIN"):
        raise CaffeOnnxError(f"--phase must be TEST or TRAIN, got {phase!r}")
    shapes: dict[str, tuple[int, ...]] = {}
    for item in input_shape or []:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise CaffeOnnxError(f"--input-shape expects NAME=D0,D1,..., got {item!r}") from None
        if any(d <= 0 for d in shapes[name]):
            raise CaffeOnnxError(f"--input-shape dimensions must be positive integers, got {item!r}")
    return ConvertOptions(opset=opset, batch=batch, phase=caffe_pb2.Phase.Value(phase_up), input_shapes=shapes,
                          stages=tuple(stage or ()), level=level, **kw)


@app.command()
def convert(
    prototxt: Annotated[Path, typer.Argument(help="Caffe net definition (.prototxt).")],
    weights: Annotated[Optional[Path], typer.Argument(help="Trained weights (.caffemodel); fillers otherwise.")] = None,
    output: OutOption = Path("model.onnx"),
    all_blobs: Annotated[bool, typer.Option("--all-blobs", help="Make every Caffe blob a graph output.")] = False,
    opset: OpsetOption = 21,
    batch: BatchOption = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Store weights as float16.")] = False,
    phase: PhaseOption = "TEST",
    stage: StageOption = None,
    level: LevelOption = 0,
    input_shape: InputShapeOption = None,
    init_missing: Annotated[
        bool, typer.Option("--init-missing", help="Initialise layers missing from the caffemodel with their fillers.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for filler initialisation.")] = 0,
    prior_graph: Annotated[bool, typer.Option(
        "--prior-graph", help="Compute SSD PriorBox tops from the run-time input size instead of storing them as "
                              "constants (for a model whose input size you make symbolic afterwards).")] = False,
) -> None:
    """Convert a Caffe prototxt (+ caffemodel) to ONNX."""
    from caffeonnx.converter.caffe_to_onnx import convert_files

    from caffeonnx.fileio import check_output

    opts = _options(opset, batch, phase, input_shape, stage, level, all_blobs=all_blobs, fp16=fp16,
                    init_missing=init_missing, seed=seed, fold_priors=not prior_graph)
    check_output(output, inputs=[p for p in (prototxt, weights) if p is not None])
    with err.status(f"converting {prototxt.name}"):
        converted = convert_files(prototxt, weights, opts)
        converted.save(output)
    n_params = sum(a.size for a in converted.weights.values())
    out.print(
        f"wrote {output} ({len(converted.model.graph.node)} nodes, {len(converted.weights)} initializers, "
        f"{n_params:,} parameters)"
    )


def _print_checks(checks: list, atol: float, rtol: float) -> bool:
    table = Table(title=f"blobs vs reference (atol {atol:g}, rtol {rtol:g})")
    for col in ("blob", "layer", "shape", "max abs err", "max rel err", ""):
        table.add_column(col)
    for c in checks:
        table.add_row(c.blob, c.layer, "x".join(map(str, c.shape)), f"{c.max_abs:.3g}", f"{c.max_rel:.3g}",
                      ("ok" if c.ok else "[red]FAIL[/red]") + (f" {c.note}" if c.note else ""))
    out.print(table)
    bad = [c for c in checks if not c.ok]
    if bad:
        out.print(f"[red]{len(bad)} of {len(checks)} blobs differ[/red]; worst: {bad[0].blob!r} (layer {bad[0].layer!r})")
    else:
        out.print(f"all {len(checks)} blobs match")
    return not bad


@app.command()
def verify(
    prototxt: Annotated[Path, typer.Argument(help="Caffe net definition (.prototxt).")],
    weights: Annotated[Path, typer.Argument(help="Trained weights (.caffemodel).")],
    inputs: Annotated[Path, typer.Option("--inputs", help=".npz with one array per input blob.")],
    reference: Annotated[Path, typer.Option("--reference", help=".npz of Caffe's blobs after forward.")],
    atol: Annotated[float, typer.Option("--atol")] = 1e-5,
    rtol: Annotated[float, typer.Option("--rtol")] = 1e-4,
    phase: PhaseOption = "TEST",
    stage: StageOption = None,
    level: LevelOption = 0,
) -> None:
    """Convert and compare every blob with a Caffe dump; prints the worst error per blob."""
    from caffeonnx.converter.verify import verify_files

    checks = verify_files(prototxt, weights, inputs, reference, atol, rtol, _options(phase=phase, stage=stage, level=level))
    if not _print_checks(checks, atol, rtol):
        raise typer.Exit(1)


@app.command("to-caffe")
def to_caffe(
    model: Annotated[Path, typer.Argument(help="ONNX model (.onnx).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Caffe net definition to write (.prototxt).")],
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Caffe weights to write (.caffemodel).")] = None,
    batch: BatchOption = None,
    allow_extensions: Annotated[
        bool, typer.Option("--allow-extensions",
                           help="Allow layers/fields newer than BVLC Caffe 1.0: Permute, Clip, Swish, pooling round_mode, and the forks' ReLU6, HardSwish, HardSigmoid, PixelShuffle (see --target).")
    ] = False,
    phase: Annotated[Optional[str], typer.Option(
        "--phase", help="Phase for the written prototxt's state { phase } (TEST or TRAIN; default: none, as "
                        "Caffe's tools set it when they load the net).")] = None,
    stage: Annotated[Optional[list[str]], typer.Option(
        "--stage", help="Stages for the written prototxt's state { stage } (repeatable; default: the stages the "
                        "model was converted with, from its metadata).")] = None,
    level: Annotated[Optional[int], typer.Option(
        "--level", help="Level for the written prototxt's state (default: the converted one).")] = None,
    target: Annotated[str, typer.Option(
        "--target", help="The Caffe that will load the files: any (default: each layer as converted), bvlc (refuses "
                         "fork layers, listing them; pooling ceil_mode becomes round_mode), or a fork (see "
                         "`caffeonnx layers`: ssd, segnet, deeplab, ...).")] = "any",
) -> None:
    """Convert ONNX back to a Caffe prototxt (+ caffemodel); exact for models caffeonnx wrote.

    The prototxt keeps every phase's layers and records the stages/level the model was converted with in
    its `state`, so Caffe selects the same layers.
    """
    from caffeonnx.converter.onnx_to_caffe import convert_to_caffe_files
    from caffeonnx.proto import caffe_pb2

    from caffeonnx.fileio import check_output

    check_output(output, inputs=[model])
    if weights is not None:
        check_output(weights, "--weights", inputs=[model, output])
    state = None
    if stage is not None or level is not None or phase is not None:
        if phase is not None and phase.upper() not in ("TEST", "TRAIN"):
            raise CaffeOnnxError(f"--phase must be TEST or TRAIN, got {phase!r}")
        state = caffe_pb2.NetState(stage=stage or [], level=level or 0)
        if phase is not None:
            state.phase = caffe_pb2.Phase.Value(phase.upper())
    result = convert_to_caffe_files(model, output, weights, batch, allow_extensions, state, target)
    n_blobs = sum(len(b) for b in result.blobs.values())
    out.print(f"wrote {output} ({len(result.net.layer)} layers)" + (f" and {weights} ({n_blobs} blobs)" if weights else ""))


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="A .prototxt, .caffemodel or .onnx file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON document.")] = False,
    phase: PhaseOption = "TEST",
    stage: StageOption = None,
    level: LevelOption = 0,
    input_shape: InputShapeOption = None,
) -> None:
    """Show layers, blob shapes, shared params and their users, and unique vs per-layer parameter counts."""
    from caffeonnx.converter.inspect import inspect_file, renderables

    result = inspect_file(file, _options(phase=phase, input_shape=input_shape, stage=stage, level=level))
    if as_json:
        print(result.to_json())
        return
    console = out if out.is_terminal else Console(width=1000)  # piped: full lines, nothing cut or wrapped
    for item in renderables(result):
        console.print(item, markup=False, highlight=False)


@app.command()
def layers(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the docs table.")] = False,
) -> None:
    """List the supported Caffe layer types; a fork's own types name the fork (SSD, SegNet, ...)."""
    from caffeonnx.converter.docs import supported_layers_markdown
    from caffeonnx.converter.forks import FORKS
    from caffeonnx.converter.registry import supported_layers

    if markdown:
        out.print(supported_layers_markdown(), markup=False, highlight=False)
        return
    for h in supported_layers():
        fork = "" if h.fork == "bvlc" else f"[{FORKS[h.fork].name}] "
        out.print(f"{h.layer_type:<26} {fork}{h.summary}", markup=False, highlight=False)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where to write the demo's files.")] = Path("caffeonnx-demo"),
    iters: Annotated[Optional[int], typer.Option(
        "--iters", help="Training iterations (default: the bundled solver's max_iter).")] = None,
) -> None:
    """The whole chain on bundled data: convert a Caffe tied AE, fine-tune it, serve its encoder; every step checked."""
    from caffeonnx.demo import run_demo

    if not run_demo(workdir, out, iters):
        raise typer.Exit(1)


def _print_version(value: bool) -> None:
    """--version: print `caffeonnx X.Y.Z` and stop before any command runs."""
    if value:
        from caffeonnx import __version__

        out.print(f"caffeonnx {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _top(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                         help="Print the version and exit.")] = False,
) -> None:
    """Options given before the command (the help text is the app's)."""


def _say_interrupted() -> None:
    """The one "interrupted" line; a rank under torch's launcher leaves it to the launcher (one line, not N)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        err.print("interrupted", highlight=False)


def main() -> None:
    """Console-script entry point: user errors exit 2 with one line, Ctrl-C exits 130 with one line."""
    try:
        app()
    except CaffeOnnxError as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:  # raised outside typer's command call (typer itself turns it into exit 130)
        _say_interrupted()
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:  # typer's own KeyboardInterrupt handling exits 130 silently
            _say_interrupted()
        raise


from caffeonnx.runtime.commands import register as register_runtime  # noqa: E402
register_runtime(app)
from caffeonnx.trainer.commands import register as register_trainer  # noqa: E402
register_trainer(app)


if __name__ == "__main__":
    main()
