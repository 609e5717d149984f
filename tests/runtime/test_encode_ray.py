"""`caffeonnx encode --engine ray`: Ray Data actors read the input themselves and give the codes of the local
engine, in input order, as .npy, Parquet or shards; a failing actor fails the job with one line and no output.

Expectations are the single-process `encode` (--engine ort) on the same input: allclose at atol 1e-6, rtol 0 (both
run the same onnxruntime CPU kernels at one thread, so in practice the codes are bit-identical), same count, same
order.  One local Ray of 2 CPUs serves the module; every pool fits in it (1 CPU per actor, at most 2 actors).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.session import SessionConfig
from tests.helpers import rng

ray = pytest.importorskip("ray", reason="Ray is the optional extra caffeonnx[ray]")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ATOL = 1e-6
COMMON = ["--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs, shared by this module's tests (encode uses it and leaves it running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """300 seeded uint8 28x28 images (MNIST's layout)."""
    return rng(13).integers(0, 256, size=(300, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def mnist_like(tmp_path_factory: pytest.TempPathFactory, images: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("ray") / "images.npy"
    np.save(path, images)
    return path


@pytest.fixture(scope="module")
def want(deep_encoder_path: Path, mnist_like: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The local engine's codes of `images` (every input below holds the same pixels)."""
    out = tmp_path_factory.mktemp("ort") / "codes.npy"
    _encode(str(deep_encoder_path), str(mnist_like), "-o", str(out), *COMMON, "--batch-size", "100")
    return np.load(out)


def _encode(*args: str) -> None:
    result = CliRunner().invoke(app, ["encode", *args])
    assert result.exit_code == 0, result.output


def _same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=what)


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporaries left behind"


def test_ray_codes_equal_the_local_engine_in_order(local_ray, deep_encoder_path: Path, mnist_like: Path,
                                                   tmp_path: Path) -> None:
    local, distributed = tmp_path / "ort.npy", tmp_path / "ray.npy"
    common = [*COMMON, "--batch-size", "64"]  # 5 blocks, the last one short
    _encode(str(deep_encoder_path), str(mnist_like), "-o", str(local), *common)
    _encode(str(deep_encoder_path), str(mnist_like), "-o", str(distributed), *common, "--engine", "ray",
            "--actors", "2")
    want, got = np.load(local), np.load(distributed)
    assert got.shape == want.shape == (300, 8) and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)  # same provider and threads: bit-identical, same order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ort.npy", "ray.npy"]  # no temporaries left


def test_idx_input_to_one_parquet_file(local_ray, deep_encoder_path: Path, images: np.ndarray, want: np.ndarray,
                                       tmp_path: Path) -> None:
    """Gzipped IDX, as MNIST ships: the driver inflates it once to a scratch file, which the actors map.
    Parquet out: an id column and a fixed-size list per code."""
    idx = tmp_path / "images-idx3-ubyte.gz"
    idx.write_bytes(gzip.compress(b"\0\0\x08\x03" + struct.pack(">3I", *images.shape) + images.tobytes()))
    out = tmp_path / "codes.parquet"
    _encode(str(deep_encoder_path), str(idx), "-o", str(out), *COMMON, "--batch-size", "64", "--engine", "ray")
    table = pq.read_table(out)
    assert table.schema.names == ["id", "code"] and table.schema.field("code").type == pa.list_(pa.float32(), 8)
    np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(300))
    codes = table.column("code").combine_chunks().flatten().to_numpy().reshape(-1, 8)
    _same(codes, want, "IDX -> Parquet")
    meta = json.loads(table.schema.metadata[b"caffeonnx"])
    assert meta["rows"] == 300 and meta["shape"] == [8] and meta["dtype"] == "float32"
    assert meta["model"]["sha256"] == hashlib.sha256(deep_encoder_path.read_bytes()).hexdigest()
    assert meta["source"] == {"path": str(idx), "kind": "array file", "key": None}
    _no_temporaries(tmp_path)


def test_lmdb_input_to_npy_shards_and_the_driver_reads_no_rows(local_ray, deep_encoder_path: Path,
                                                                images: np.ndarray, want: np.ndarray,
                                                                tmp_path: Path, monkeypatch) -> None:
    """The actors read the LMDB; the driver reads one record (its shape), whatever the input's size."""
    from caffeonnx.data.lmdb_source import DatumDB
    from caffeonnx.data.lmdb_writer import write_datum_lmdb

    write_datum_lmdb(tmp_path / "lmdb", images, np.arange(300))
    read = DatumDB.read
    rows_in_driver: list[int] = []

    def counting(self, indices, color=None):
        rows_in_driver.append(len(indices))
        return read(self, indices, color)

    monkeypatch.setattr(DatumDB, "read", counting)  # this process only: the actors are other processes
    out = tmp_path / "out"
    (out).mkdir()
    (out / "stale.npy").write_bytes(b"")  # an earlier output is replaced as a whole
    (out / "manifest.json").write_text("{}")
    _encode(str(deep_encoder_path), str(tmp_path / "lmdb"), "-o", f"{out}/", *COMMON, "--batch-size", "64",
            "--shard-rows", "128", "--engine", "ray", "--actors", "2")
    assert sum(rows_in_driver) == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["file"], s["rows"], s["first_row"]) for s in manifest["shards"]] == [
        ("codes-00000.npy", 128, 0), ("codes-00001.npy", 128, 128), ("codes-00002.npy", 44, 256)]
    assert (manifest["rows"], manifest["dtype"], manifest["shape"], manifest["source"]["kind"]) == (300, "float32", [8],
                                                                                                   "LMDB")
    assert sorted(p.name for p in out.iterdir()) == ["codes-00000.npy", "codes-00001.npy", "codes-00002.npy",
                                                     "manifest.json"]
    _same(np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]]), want, "LMDB -> .npy shards")
    _no_temporaries(tmp_path)


def test_the_driver_holds_no_input_rows(local_ray, deep_encoder_path: Path, mnist_like: Path,
                                        tmp_path: Path) -> None:
    """tracemalloc in the driver: the peak stays a fraction of a 40 MB input (Ray's own upkeep, a few MB).

    Parquet shards out, read back through `open_inputs` as the local engine reads them.
    """
    from caffeonnx.runtime.encode import encode_file
    from caffeonnx.runtime.inputs import open_inputs
    from caffeonnx.runtime.ray_encode import encode_file_ray
    from caffeonnx.runtime.session import EncoderSession

    config = SessionConfig(device="cpu", intra_threads=1)
    encode_file_ray(deep_encoder_path, mnist_like, tmp_path / "warm.npy", config, actors=1)  # Ray Data imported
    big = tmp_path / "big.npy"
    np.save(big, rng(5).random((12800, 1, 28, 28), dtype=np.float32))
    tracemalloc.start()
    try:
        result = encode_file_ray(deep_encoder_path, big, f"{tmp_path}/codes/", config, batch_size=1024, actors=2,
                                 fmt="parquet", shard_rows=5000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < big.stat().st_size / 4, f"driver peak {peak / 1e6:.1f} MB for a {big.stat().st_size / 1e6:.0f} MB input"
    assert (result.samples, result.shards, result.format) == (12800, 3, "parquet")
    encode_file(EncoderSession(deep_encoder_path, config), big, tmp_path / "want.npy", 1024)
    with open_inputs(tmp_path / "codes") as opened:
        assert opened.kind == "directory of 3 parquet shard(s)" and opened.samples.shape == (12800, 8)
        _same(opened.samples[0:12800], np.load(tmp_path / "want.npy"), "npy -> Parquet shards")


def test_shard_directories_and_parquet_are_inputs_too(local_ray, deep_encoder_path: Path, images: np.ndarray,
                                                      want: np.ndarray, tmp_path: Path) -> None:
    """.npy shards without a manifest (name order, part-2 before part-10) and a Parquet file of pixels, read by
    the actors with the same readers as the local engine."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, part in zip(["part-1.npy", "part-2.npy", "part-10.npy"], np.split(images, [90, 200])):
        np.save(shards / name, part)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 784)
    pq.write_table(pa.table({"id": np.arange(300), "pixels": flat}), tmp_path / "pixels.parquet", row_group_size=128)
    for src, engine in [(shards, "ray"), (tmp_path / "pixels.parquet", "ray"), (shards, "ort"),
                        (tmp_path / "pixels.parquet", "ort")]:
        out = tmp_path / f"{src.stem}-{engine}.npy"
        _encode(str(deep_encoder_path), str(src), "-o", str(out), *COMMON, "--batch-size", "50", "--engine", engine)
        _same(np.load(out), want, f"{src.name} with --engine {engine}")


def _bad_shard_dir(folder: Path, images: np.ndarray) -> Path:
    """Three .npy shards and their manifest; the middle shard then overwritten with junk."""
    folder.mkdir()
    shards = []
    for k, part in enumerate(np.split(images, [100, 200])):
        np.save(folder / f"s{k}.npy", part)
        shards.append({"file": f"s{k}.npy", "rows": len(part)})
    (folder / "manifest.json").write_text(json.dumps({"dtype": "|u1", "shape": [28, 28], "shards": shards}))
    (folder / "s1.npy").write_bytes(b"\x93NUMPY\x01\x00garbage, not a header")
    return folder


def test_a_bad_input_shard_fails_the_job_exit_2_without_output(local_ray, deep_encoder_path: Path,
                                                                images: np.ndarray, tmp_path: Path,
                                                                monkeypatch, capsys) -> None:
    """The driver reads only the manifest: the actor opening s1.npy fails, and the job with it."""
    from caffeonnx.cli import main

    bad = _bad_shard_dir(tmp_path / "bad", images)
    earlier = tmp_path / "codes"
    earlier.mkdir()
    (earlier / "manifest.json").write_text('{"earlier": true}')
    monkeypatch.setattr(sys, "argv", ["caffeonnx", "encode", str(deep_encoder_path), str(bad), "-o", f"{earlier}/",
                                      *COMMON, "--batch-size", "50", "--engine", "ray"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-1].startswith("error: a Ray actor failed: ") and "s1.npy: not a readable .npy header" in stderr[-1]
    assert "Traceback" not in "\n".join(stderr)
    assert sorted(p.name for p in earlier.iterdir()) == ["manifest.json"]  # the earlier output is untouched
    assert json.loads((earlier / "manifest.json").read_text()) == {"earlier": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "codes"]  # no temporary directory left


def test_api_scale_and_a_pool_too_large(local_ray, deep_encoder_path: Path, mnist_like: Path, tmp_path: Path) -> None:
    from caffeonnx.runtime.encode import encode_file
    from caffeonnx.runtime.ray_encode import encode_file_ray
    from caffeonnx.runtime.session import EncoderSession

    config = SessionConfig(device="cpu", intra_threads=1)
    result = encode_file_ray(deep_encoder_path, mnist_like, tmp_path / "ray.npy", config, batch_size=100,
                             scale=1 / 256, actors=1)
    encode_file(EncoderSession(deep_encoder_path, config), mnist_like, tmp_path / "ort.npy", 100, scale=1 / 256)
    np.testing.assert_array_equal(np.load(tmp_path / "ray.npy"), np.load(tmp_path / "ort.npy"))
    assert (result.samples, result.code_shape, result.scale) == (300, (8,), 1 / 256)
    with pytest.raises(CaffeOnnxError, match=r"--actors 3 needs 3 CPUs .* has 2; pass --actors 2"):
        encode_file_ray(deep_encoder_path, mnist_like, tmp_path / "big.npy", config, actors=3)
    with pytest.raises(CaffeOnnxError, match=r"--gpus-per-actor 0.5 needs 0.5 GPUs but the Ray cluster has 0"):
        encode_file_ray(deep_encoder_path, mnist_like, tmp_path / "big.npy", config, actors=1, gpus_per_actor=0.5)
    assert not (tmp_path / "big.npy").exists()


def test_a_failing_actor_fails_the_job_with_its_message(local_ray, deep_encoder_path: Path, mnist_like: Path,
                                                         tmp_path: Path) -> None:
    from caffeonnx.runtime.ray_encode import encode_file_ray

    np.save(tmp_path / "codes.npy", np.zeros(3))  # an older output stays as it was
    with pytest.raises(CaffeOnnxError, match=r"^a Ray actor failed: --fp16 is a CUDA setting .* drop --fp16$"):
        encode_file_ray(deep_encoder_path, mnist_like, tmp_path / "codes.npy", SessionConfig(fp16=True), actors=1)
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), np.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes.npy"]


def test_address_goes_to_ray_init(local_ray, deep_encoder_path: Path, mnist_like: Path, tmp_path: Path,
                                  monkeypatch) -> None:
    """No cluster here: ray.init is stood in for, to see that --address reaches it and a refusal is one line."""
    from caffeonnx.runtime.ray_encode import encode_file_ray

    calls: list[dict] = []

    def refuse(**kwargs):
        calls.append(kwargs)
        raise ConnectionError("Failed to connect to the Ray Client server at head.example:10001\nretrying...")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(CaffeOnnxError, match=r"^--address 'ray://head.example:10001': cannot connect to Ray "
                                             r"\(Failed to connect to the Ray Client server at head.example:10001\)$"):
        encode_file_ray(deep_encoder_path, mnist_like, tmp_path / "c.npy", SessionConfig(), actors=1,
                        address="ray://head.example:10001")
    assert [c["address"] for c in calls] == ["ray://head.example:10001"]
    _no_temporaries(tmp_path)
    assert not (tmp_path / "c.npy").exists()


def test_gpu_actors_use_cuda_when_it_starts_else_cpu(deep_encoder_path: Path, mnist_like: Path,
                                                      want: np.ndarray) -> None:
    """--gpus-per-actor > 0 makes the actor's session 'auto' (CUDA when it starts); run in-process on CPU here."""
    from caffeonnx.converter.onnx_io import load_onnx
    from caffeonnx.runtime.encode import fit_samples, model_transform
    from caffeonnx.runtime.ray_encode import EncodeActor, InputSource, actor_config
    from caffeonnx.runtime.session import EncoderSession, cuda_available

    assert actor_config(SessionConfig(device="auto"), 0).device == "cpu"
    assert actor_config(SessionConfig(device="cuda"), 1).device == "cuda"  # --device cuda insists
    gpu = actor_config(SessionConfig(device="auto"), 0.5)
    assert (gpu.device, gpu.intra_threads, tuple(gpu.warmup)) == ("auto", 1, ())
    samples = np.load(mnist_like, mmap_mode="r")
    spec = EncoderSession(deep_encoder_path, SessionConfig(device="cpu")).input
    transform, images = model_transform(deep_encoder_path, spec.name)
    transform, chw = fit_samples(samples, spec, tuple(spec.sample_shape), transform, None, "images")
    actor = EncodeActor(load_onnx(deep_encoder_path).SerializeToString(), gpu, transform, chw,
                        tuple(spec.sample_shape), InputSource.of(samples, mnist_like, None, spec.name, images), 64, 128, 300)
    assert actor.session.provider == ("CUDAExecutionProvider" if cuda_available() else "CPUExecutionProvider")
    got = actor({"id": np.array([0, 2])})  # blocks of 128 rows, encoded 64 at a time
    np.testing.assert_array_equal(got["id"], np.r_[0:128, 256:300])
    _same(got["codes"], want[np.r_[0:128, 256:300]], "one actor's blocks 0 and 2")


def test_blocks_are_whole_batches_and_bounded() -> None:
    from caffeonnx.runtime.ray_encode import block_rows

    assert block_rows(300, 64, 2, 32) == 64  # a small input: one batch per block, every actor busy
    assert block_rows(60000, 1024, 2, 120) == 7 * 1024  # 7 batches: 9 blocks, 4+ per actor
    assert block_rows(10**7, 1024, 2, 120) == 16 * 1024  # at most 16 batches
    assert block_rows(10**7, 1024, 2, 4096) == 4 * 1024  # at most 16 MB of codes (4 KB a row)
    assert block_rows(10**7, 1024, 2, None) == 1024  # codes of unknown size: one batch


def test_cli_starts_and_stops_its_own_local_ray(deep_encoder_path: Path, mnist_like: Path, tmp_path: Path) -> None:
    _encode(str(deep_encoder_path), str(mnist_like), "-o", str(tmp_path / "ort.npy"), "--batch-size", "128")
    proc = _cli("encode", str(deep_encoder_path), str(mnist_like), "-o", str(tmp_path / "ray.npy"), "--batch-size",
                "128", "--engine", "ray", "--actors", "2")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "300 codes of shape [8]" in proc.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "ray.npy"), np.load(tmp_path / "ort.npy"))


@pytest.mark.parametrize(("args", "message"), [
    (["--engine", "ray", "--actors", "0"], "--actors must be a positive number of Ray actors, got 0"),
    (["--engine", "ray", "--gpus-per-actor", "-1"], "--gpus-per-actor must be 0"),
    (["--actors", "2"], "--address, --actors and --gpus-per-actor go with --engine ray"),
    (["--engine", "spark"], "--engine must be ort or ray, got 'spark'"),
    (["--engine", "ray", "--device", "cuda"], "runs actors on CUDA exactly when --gpus-per-actor > 0"),
    (["--engine", "ray", "--format", "csv"], "--format must be npy or parquet, got 'csv'"),
    (["--format", "parquet"], "are written by --engine ray; --engine ort writes one .npy"),
    (["--engine", "ray", "--shard-rows", "10"], "--shard-rows goes with a directory output: end -o with '/'"),
    (["--engine", "ray", "--address", "http://head:8265"], "--address must be auto, HOST:PORT"),
    (["--engine", "ray", "--address", "head"], "--address must be auto, HOST:PORT"),
])
def test_bad_ray_options_are_one_line_exit_2(deep_encoder_path: Path, mnist_like: Path, tmp_path: Path,
                                             args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["encode", str(deep_encoder_path), str(mnist_like), "-o",
                                      str(tmp_path / "c.npy"), *args])
    assert isinstance(result.exception, CaffeOnnxError) and message in str(result.exception), result.output
    assert not (tmp_path / "c.npy").exists()


def test_directory_outputs_are_checked_first(deep_encoder_path: Path, mnist_like: Path, tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    for out, message in [(f"{tmp_path / 'notes'}/", "is a directory without manifest.json"),
                         (f"{tmp_path / 'file'}/", "exists and is not a directory"),
                         (f"{mnist_like.parent}/", "an input of this command")]:
        result = CliRunner().invoke(app, ["encode", str(deep_encoder_path), str(mnist_like), "-o", out, "--engine",
                                          "ray"])
        assert isinstance(result.exception, CaffeOnnxError) and message in str(result.exception), result.output
    assert (tmp_path / "notes" / "mine.txt").read_text() == (tmp_path / "file").read_text() == "keep"


def _cli(*args: str, block_ray: bool = False) -> subprocess.CompletedProcess[str]:
    """The console script in a fresh process; with block_ray, `import ray` fails as where Ray is not installed."""
    code = ("import sys; " + ("sys.modules['ray'] = None; " if block_ray else "")
            + f"sys.argv = ['caffeonnx', *{list(args)!r}]; from caffeonnx.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)


def test_bad_actors_exit_2_with_one_line(deep_encoder_path: Path, mnist_like: Path, tmp_path: Path) -> None:
    proc = _cli("encode", str(deep_encoder_path), str(mnist_like), "-o", str(tmp_path / "c.npy"), "--engine", "ray",
                "--actors", "-1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: --actors must be a positive number of Ray actors, got -1"


def test_without_ray_installed_says_how_to_install(deep_encoder_path: Path, mnist_like: Path,
                                                   tmp_path: Path) -> None:
    proc = _cli("encode", str(deep_encoder_path), str(mnist_like), "-o", str(tmp_path / "c.npy"), "--engine", "ray",
                block_ray=True)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'caffeonnx[ray]'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.npy").exists()
