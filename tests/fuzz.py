"""Seeded mutation fuzzing of the CLI: mutants of real fixtures, run through `caffeonnx` in one worker process.

Mutators are structure-aware where the format has structure (prototxt tokens, ONNX protos and
their caffeonnx metadata) and byte-level elsewhere (caffemodel, npz).  Each mutant is one CLI
call, run in-process by `tests/fuzz_worker.py` (importing caffeonnx once keeps thousands of
runs affordable) in a directory of its own.  An outcome is acceptable when the command exits 0,
or exits 2 (or 1 for verify's "blobs differ") with one `error:` line and no traceback, and leaves
no hidden temp file behind (nor any output when it failed).

`train` mutants (a training fixture with its solver, net, weights or data mutated, two iterations)
come from a random stream of their own, one per round of the other commands.

Used by tests/test_fuzz.py (a bounded slice in CI) and benchmarks/fuzz_campaign.py (long runs).
"""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "data" / "caffe_reference"
SEED_CASES = ("tied_ae", "lenet", "layer_zoo", "conv_wta_ae")
TRAIN_CASES = ("train_tied_sgd", "train_deep_adam", "train_siamese_sgd")
EXTREMES = ["0", "-1", "1", "3", "2147483647", "4294967295", "99999999", "1e30", "nan", "-inf"]


def _prototxt_mutants(text: str, rng: random.Random) -> str:
    """One structure-aware edit of prototxt text: a number, a name, an enum, a line, a truncation."""
    kind = rng.randrange(7)
    if kind == 0:  # a numeric literal to an extreme
        spots = [m.span() for m in re.finditer(r"(?<=: )-?[0-9][0-9.e+-]*", text)]
        if spots:
            a, b = rng.choice(spots)
            return text[:a] + rng.choice(EXTREMES) + text[b:]
    if kind == 1:  # a quoted name to another name in the file (wrong bottom/top/param)
        spots = [m.span() for m in re.finditer(r'"[^"\n]*"', text)]
        if len(spots) > 1:
            a, b = rng.choice(spots)
            c, d = rng.choice(spots)
            return text[:a] + text[c:d] + text[b:]
    if kind == 2:  # an enum / identifier value to something else
        spots = [m.span() for m in re.finditer(r"(?<=: )[A-Z][A-Z_0-9]+", text)]
        if spots:
            a, b = rng.choice(spots)
            return text[:a] + rng.choice(["MAX", "AVE", "TRAIN", "TEST", "CEIL", "BOGUS", "LMDB"]) + text[b:]
    lines = text.splitlines(keepends=True)
    if kind == 3 and len(lines) > 1:  # delete a line
        del lines[rng.randrange(len(lines))]
        return "".join(lines)
    if kind == 4 and lines:  # duplicate a line (repeated layers, repeated fields)
        i = rng.randrange(len(lines))
        lines.insert(i, lines[i])
        return "".join(lines)
    if kind == 5:  # an unknown or misplaced field
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice([" bogus_field: 1 ", " top: \"x\" ", " bottom: \"nowhere\" ", " {", "}",
                                      " include { stage: \"s\" } ", " loss_weight: 2 "]) + text[i:]
    return text[:rng.randrange(len(text) + 1)]  # truncated


def _byte_mutant(data: bytes, rng: random.Random) -> bytes:
    """Flip, drop, insert or truncate bytes."""
    buf = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0 and buf:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1 and buf:
        a = rng.randrange(len(buf))
        del buf[a:a + rng.randint(1, 64)]
    elif kind == 2:
        a = rng.randrange(len(buf) + 1)
        buf[a:a] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:
        del buf[rng.randrange(len(buf) + 1):]
    return bytes(buf)


def _onnx_mutant(model: onnx.ModelProto, rng: random.Random) -> bytes:
    """One structure-aware edit of an ONNX model (graph, initializers, metadata), or a byte-level one."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    kind = rng.randrange(8)
    g = m.graph
    if kind == 0 and g.node:
        del g.node[rng.randrange(len(g.node))]
    elif kind == 1 and g.node:
        node = rng.choice(list(g.node))
        if node.input:
            node.input[rng.randrange(len(node.input))] = rng.choice(["", "nowhere", *[o for n in g.node for o in n.output]])
    elif kind == 2 and g.initializer:
        t = rng.choice(list(g.initializer))
        choice = rng.randrange(3)
        if choice == 0 and t.dims:
            t.dims[rng.randrange(len(t.dims))] = rng.choice([0, -1, 3, 2**40])
        elif choice == 1:
            t.data_type = rng.choice([0, 2, 7, 11, 16, 999])
        elif t.HasField("raw_data"):
            t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)]
    elif kind == 3 and m.metadata_props:
        p = rng.choice(list(m.metadata_props))
        p.value = rng.choice([p.value[: rng.randrange(len(p.value) + 1)], "[]", "{}", "null", "[1, 2]",
                              'layer { name: "x" }', "TRAIN", json.dumps([{"name": 1}])])
    elif kind == 4 and g.input:
        dims = g.input[0].type.tensor_type.shape.dim
        if dims:
            dims[rng.randrange(len(dims))].dim_value = rng.choice([0, 1, 2**40])
    elif kind == 5:
        m.opset_import[0].version = rng.choice([1, 7, 13, 99])
    elif kind == 6 and g.output:
        g.output[0].name = "no_such_output"
    else:
        return _byte_mutant(m.SerializeToString(), rng)
    return m.SerializeToString()


@dataclass
class Mutant:
    """One CLI call on mutated copies of a fixture's files."""

    command: str
    case: str
    files: dict[str, bytes]  # file name in the run directory -> content
    argv: list[str]
    seed: int


@dataclass
class Outcome:
    """How one mutant ended."""

    mutant: Mutant
    code: int | str
    stderr: str
    leftovers: list[str] = field(default_factory=list)

    @property
    def acceptable(self) -> bool:
        """Exit 0; or exit 2 (1 for verify) with one `error:` line, no traceback; never a temp file left."""
        if self.leftovers:
            return False
        if self.code == 0:
            return True
        if self.code == 1 and self.mutant.command == "verify":
            return "Traceback" not in self.stderr
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return self.code == 2 and bool(lines) and lines[0].startswith("error:") and "Traceback" not in self.stderr


def _seed_files(case: str) -> dict[str, bytes]:
    d = CASES / case
    return {name: (d / name).read_bytes() for name in ("net.prototxt", "weights.caffemodel", "inputs.npz")}


def mutants(seed: int, count: int, onnx_models: dict[str, onnx.ModelProto]) -> Iterator[Mutant]:
    """`count` seeded mutants spread over the commands and the fixtures, plus a train mutant per six."""
    rng = random.Random(seed)
    seeds = {case: _seed_files(case) for case in SEED_CASES}
    training = {case: {name: (CASES / case / name).read_bytes()
                       for name in ("solver.prototxt", "train.prototxt", "init.caffemodel", "data.npz")}
                for case in TRAIN_CASES}
    commands = ["convert", "convert", "inspect", "to-caffe", "encoder", "verify"]
    train_rng = random.Random(seed + 7919)  # its own stream: adding train mutants left the others as they were
    for k in range(count):
        case = rng.choice(SEED_CASES)
        files = dict(seeds[case])
        command = commands[k % len(commands)]
        if k % len(commands) == len(commands) - 1:  # one train mutant per round of the other commands
            yield _train_mutant(training, train_rng, seed * 1_000_003 + 500_000 + k)
        if command in ("convert", "inspect") and rng.random() < 0.6 or command == "verify" and rng.random() < 0.4:
            files["net.prototxt"] = _prototxt_mutants(files["net.prototxt"].decode(), rng).encode()
        elif command in ("convert", "verify") and rng.random() < 0.5:
            files["weights.caffemodel"] = _byte_mutant(files["weights.caffemodel"], rng)
        elif command == "verify":
            files["inputs.npz"] = _byte_mutant(files["inputs.npz"], rng)
        if command == "convert":
            argv = ["convert", "net.prototxt", "weights.caffemodel", "-o", "out.onnx"]
        elif command == "verify":
            argv = ["verify", "net.prototxt", "weights.caffemodel", "--inputs", "inputs.npz", "--reference",
                    "inputs.npz"]
        elif command == "inspect":
            argv = ["inspect", rng.choice(["net.prototxt", "weights.caffemodel"]), "--json"]
            if argv[1] == "weights.caffemodel":
                files["weights.caffemodel"] = _byte_mutant(files["weights.caffemodel"], rng)
        else:
            files = {"model.onnx": _onnx_mutant(onnx_models[case], rng)}
            argv = ["to-caffe", "model.onnx", "-o", "out.prototxt", "--weights", "out.caffemodel"] \
                if command == "to-caffe" else ["encoder", "model.onnx", "-o", "enc.onnx"]
        yield Mutant(command, case, files, argv, seed * 1_000_003 + k)


def _train_mutant(training: dict[str, dict[str, bytes]], rng: random.Random, seed: int) -> Mutant:
    """`caffeonnx train` for two iterations on a training fixture with one of its four files mutated."""
    case = rng.choice(TRAIN_CASES)
    files = dict(training[case])
    target = rng.choice(["solver.prototxt", "train.prototxt", "init.caffemodel", "data.npz"])
    files[target] = (_prototxt_mutants(files[target].decode(), rng).encode() if target.endswith(".prototxt")
                     else _byte_mutant(files[target], rng))
    argv = ["train", "solver.prototxt", "--weights", "init.caffemodel", "--data", "data.npz", "--max-iter", "2",
            "-o", "out", "--no-png", "-q", "--device", "cpu", "--threads", "1"]
    return Mutant("train", case, files, argv, seed)


def seed_onnx_models() -> dict[str, onnx.ModelProto]:
    """Each fixture converted, the ONNX files the to-caffe and encoder mutants start from."""
    from caffeonnx.converter.caffe_to_onnx import convert_files

    return {case: convert_files(CASES / case / "net.prototxt", CASES / case / "weights.caffemodel").to_proto()
            for case in SEED_CASES}


def run_mutants(batch: list[Mutant], workdir: Path, timeout: float = 600.0,
                memory_mib: int = 4096) -> tuple[list[Outcome], int]:
    """Run every mutant in the worker; returns the outcomes and the worker's peak RSS in MiB."""
    jobs = []
    for i, m in enumerate(batch):
        d = workdir / f"m{i:05d}"
        d.mkdir(parents=True)
        for name, data in m.files.items():
            (d / name).write_bytes(data)
        jobs.append({"dir": str(d), "argv": m.argv, "inputs": sorted(m.files)})
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fuzz_worker.py")), str(memory_mib)],
                          input="\n".join(json.dumps(j) for j in jobs), capture_output=True, text=True,
                          timeout=timeout, cwd=workdir)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    peak = next((int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_MIB")), -1)
    if len(results) != len(batch):
        raise AssertionError(f"the fuzz worker stopped after {len(results)} of {len(batch)} mutants "
                             f"(exit {proc.returncode}): {proc.stderr[-2000:]}")
    return [Outcome(m, r["code"], r["stderr"], r["leftovers"]) for m, r in zip(batch, results)], peak


def summary(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Outcome counts per command: exit codes, and how many were unacceptable."""
    table: dict[str, Counter[str]] = {}
    for o in outcomes:
        c = table.setdefault(o.mutant.command, Counter())
        c[f"exit {o.code}" if isinstance(o.code, int) else str(o.code)] += 1
        c["unacceptable"] += 0 if o.acceptable else 1
    return {k: dict(v) for k, v in table.items()}


Describe = Callable[[Outcome], str]


def describe(o: Outcome) -> str:
    """A failing outcome, with what is needed to replay it."""
    tail = o.stderr.strip().splitlines()[-3:]
    return (f"{o.mutant.command} on a mutant of {o.mutant.case} (seed {o.mutant.seed}, argv {o.mutant.argv}): "
            f"exit {o.code}, leftovers {o.leftovers}: {' | '.join(tail)}")
