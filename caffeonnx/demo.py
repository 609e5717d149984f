"""`caffeonnx demo`: the README's first command, on the example bundled in the package."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from rich.console import Console

from caffeonnx.converter.caffe_to_onnx import convert_files
from caffeonnx.converter.context import ConvertOptions
from caffeonnx.converter.verify import compare_blobs, load_npz


def example_dir() -> Path:
    """The bundled tied autoencoder (prototxt, caffemodel, Caffe's inputs and blobs)."""
    return Path(str(resources.files("caffeonnx") / "examples" / "tied_ae"))


def run_demo(workdir: Path, console: Console) -> bool:
    """Convert the bundled tied AE, check the tie, verify every blob; True when all pass."""
    ex = example_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_path = workdir / "tied_ae.onnx"
    converted = convert_files(ex / "net.prototxt", ex / "weights.caffemodel", ConvertOptions())
    converted.save(onnx_path)
    names = list(converted.weights)
    n_params = sum(a.size for a in converted.weights.values())
    console.print(f"converted {ex / 'net.prototxt'} -> {onnx_path}")
    console.print(f"initializers: {names} ({n_params:,} parameters; the 64x784 matrix is stored once)")
    checked = convert_files(ex / "net.prototxt", ex / "weights.caffemodel", ConvertOptions(all_blobs=True))
    checks = compare_blobs(checked, load_npz(ex / "inputs.npz", "inputs"), load_npz(ex / "blobs.npz", "reference"))
    for c in checks:
        console.print(f"  {c.blob:<16} max abs err vs Caffe {c.max_abs:.2e}  {'ok' if c.ok else 'FAIL'}")
    ok = all(c.ok for c in checks) and len(names) == 3
    console.print("demo: [green]all blobs match Caffe[/green]" if ok else "demo: [red]mismatch[/red]")
    return ok
