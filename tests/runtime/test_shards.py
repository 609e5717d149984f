"""Code files and shard directories (shards.py): what `encode --engine ray` writes reads back, through
`open_inputs`, as the same rows in the same order; damaged or inconsistent shards are one clear error.

No Ray here: CodeWriter gets batches as the driver does, in order; values compare exactly (nothing is computed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from caffeonnx.errors import CaffeOnnxError, InputFileError
from caffeonnx.runtime.inputs import open_inputs
from tests.helpers import rng

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from caffeonnx.runtime.shards import CodeWriter, atomic_dir, remove_stale_dirs


def _write(where: Path, fmt: str, directory: bool, codes: np.ndarray, batch: int, shard_rows: int) -> CodeWriter:
    writer = CodeWriter(where, fmt, directory, len(codes), shard_rows, {"source": {"path": "x"}})
    for start in range(0, len(codes), batch):
        writer.add(np.arange(start, min(len(codes), start + batch)), codes[start:start + batch])
    assert writer.finish() == codes.shape[1:]
    return writer


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
@pytest.mark.parametrize("directory", [False, True])
def test_codes_read_back_in_order(tmp_path: Path, fmt: str, shape: tuple[int, ...], directory: bool) -> None:
    codes = rng(len(shape)).standard_normal((10, *shape)).astype(np.float32)
    where = tmp_path / ("codes" if directory else f"codes.{fmt}")
    if directory:
        where.mkdir()
    writer = _write(where, fmt, directory, codes, batch=3, shard_rows=4)  # batches straddle shard boundaries
    if directory:
        manifest = json.loads((where / "manifest.json").read_text())
        assert [(s["file"], s["rows"], s["first_row"]) for s in manifest["shards"]] == [
            (f"codes-00000.{fmt}", 4, 0), (f"codes-00001.{fmt}", 4, 4), (f"codes-00002.{fmt}", 2, 8)]
        assert (manifest["rows"], manifest["dtype"], manifest["shape"]) == (10, "float32", list(shape))
        assert len(writer.shards) == 3
    elif fmt == "parquet":
        table = pq.read_table(where)
        want = {(): pa.float32(), (3,): pa.list_(pa.float32(), 3), (2, 3): pa.fixed_shape_tensor(pa.float32(), [2, 3])}
        assert table.schema.field("code").type == want[shape]
        np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(10))
    with open_inputs(where) as opened:
        assert opened.samples.shape == codes.shape and opened.samples.dtype == codes.dtype
        np.testing.assert_array_equal(opened.samples[0:10], codes)
        np.testing.assert_array_equal(opened.samples[3:9], codes[3:9])  # across shards / row groups


def test_codes_out_of_order_are_refused(tmp_path: Path) -> None:
    writer = CodeWriter(tmp_path / "c.npy", "npy", False, 4, 4, {})
    writer.add(np.arange(2), np.zeros((2, 3), np.float32))
    with pytest.raises(RuntimeError, match="out of input order"):
        writer.add(np.arange(3, 5), np.zeros((2, 3), np.float32))
    with pytest.raises(CaffeOnnxError, match="returned 2 codes for 4 samples"):
        writer.finish()


def test_shards_without_manifest_go_in_natural_name_order(tmp_path: Path) -> None:
    rows = np.arange(30, dtype=np.int16).reshape(10, 3)
    for name, part in zip(["p-2.npy", "p-10.npy", "p-1.npy"], [rows[2:5], rows[5:], rows[:2]]):
        np.save(tmp_path / name, part)
    with open_inputs(tmp_path) as opened:
        assert opened.kind == "directory of 3 npy shard(s)"
        np.testing.assert_array_equal(opened.samples[0:10], rows)


def _manifest(folder: Path, shards: list[tuple[str, int]], dtype: str = "float32", shape: tuple = (3,)) -> None:
    doc = {"dtype": dtype, "shape": list(shape), "shards": [{"file": f, "rows": r} for f, r in shards]}
    (folder / "manifest.json").write_text(json.dumps(doc))


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: _manifest(d, [("a.npy", 4), ("b.npy", 5)]), r"b.npy: holds \[4, 3\] float32 but manifest.json says \[5, 3\]"),
    (lambda d: _manifest(d, [("a.npy", 4), ("c.npy", 4)]), r"c.npy: the shard is missing"),
    (lambda d: _manifest(d, [("../a.npy", 4)]), r"shard '../a.npy' with 4 rows is not a .npy or .parquet file"),
    (lambda d: (d / "manifest.json").write_text("[1, 2"), r"manifest.json: not a shard manifest"),
    (lambda d: _manifest(d, [("a.npy", 4)], dtype="U3"), r"holds <U3 values, text"),
    (lambda d: np.save(d / "c.npy", np.zeros((2, 4), np.float32)), r"shards hold samples of different shapes"),
    (lambda d: pq.write_table(pa.table({"x": [1.0]}), d / "c.parquet"), r"holds both .npy and .parquet files"),
])
def test_inconsistent_shards_are_one_clear_error(tmp_path: Path, make, message: str) -> None:
    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / name, np.zeros((4, 3), np.float32))
    make(tmp_path)
    with pytest.raises(InputFileError, match=message), open_inputs(tmp_path) as opened:
        opened.samples[0:opened.samples.shape[0]]


@pytest.mark.parametrize(("table", "key", "message"), [
    ({"a": [1.0], "b": [2.0]}, None, r"holds columns \['a', 'b'\]; choose one with --key NAME"),
    ({"a": [1.0]}, "b", r"has no column 'b'; it holds \['a'\]"),
    ({"a": ["x"]}, None, r"column 'a' is string; encode reads numbers"),
    ({"a": [[1.0], [2.0, 3.0]]}, None, r"column 'a' is list<.*double>; encode reads numbers"),
    ({"a": [1.0, None]}, None, r"the column holds null values"),
])
def test_parquet_columns_encode_cannot_read(tmp_path: Path, table: dict, key: str | None, message: str) -> None:
    pq.write_table(pa.table(table), tmp_path / "x.parquet")
    with pytest.raises(InputFileError, match=message), open_inputs(tmp_path / "x.parquet", key) as opened:
        opened.samples[0:2]


def test_atomic_dir_replaces_only_when_complete_and_cleans_up_killed_runs(tmp_path: Path) -> None:
    target = tmp_path / "codes"
    with atomic_dir(target) as tmp:
        (tmp / "manifest.json").write_text("1")
    with pytest.raises(ZeroDivisionError), atomic_dir(target) as tmp:  # a failure leaves the earlier output
        (tmp / "manifest.json").write_text("2")
        raise ZeroDivisionError
    with atomic_dir(target) as tmp:
        (tmp / "new.npy").write_text("3")
    assert sorted(os.listdir(tmp_path)) == ["codes"] and sorted(os.listdir(target)) == ["new.npy"]
    killed = tmp_path / ".codes.abcd1234.tmp"
    killed.mkdir()
    os.utime(killed, (0, 0))
    (tmp_path / ".other.abcd1234.tmp").mkdir()  # another target's: left alone
    assert remove_stale_dirs(target, before=1e9) == [killed]
    assert sorted(os.listdir(tmp_path)) == [".other.abcd1234.tmp", "codes"]
