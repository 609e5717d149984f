"""`caffeonnx encode --engine ray`: Ray Data actors give exactly the codes of the local engine, in input order."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from caffeonnx.cli import app
from caffeonnx.errors import CaffeOnnxError
from caffeonnx.runtime.session import SessionConfig
from tests.helpers import rng

ray = pytest.importorskip("ray", reason="Ray is the optional extra caffeonnx[ray]")


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs, shared by this module's tests (encode uses it and leaves it running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def mnist_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 seeded uint8 28x28 images (MNIST's layout), as .npy."""
    path = tmp_path_factory.mktemp("ray") / "images.npy"
    np.save(path, rng(13).integers(0, 256, size=(300, 28, 28), dtype=np.uint8))
    return path


def _encode(*args: str) -> None:
    result = CliRunner().invoke(app, ["encode", *args])
    assert result.exit_code == 0, result.output


def test_ray_codes_equal_the_local_engine_in_order(local_ray, deep_encoder_path: Path, mnist_like: Path,
                                                   tmp_path: Path) -> None:
    local, distributed = tmp_path / "ort.npy", tmp_path / "ray.npy"
    common = ["--threads", "1", "--device", "cpu", "--batch-size", "64"]  # 5 blocks, the last one short
    _encode(str(deep_encoder_path), str(mnist_like), "-o", str(local), *common)
    _encode(str(deep_encoder_path), str(mnist_like), "-o", str(distributed), *common, "--engine", "ray",
            "--actors", "2")
    want, got = np.load(local), np.load(distributed)
    assert got.shape == want.shape == (300, 8) and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)  # same provider and threads: bit-identical, same order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ort.npy", "ray.npy"]  # no temporaries left


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
])
def test_bad_ray_options_are_one_line_exit_2(deep_encoder_path: Path, mnist_like: Path, tmp_path: Path,
                                             args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["encode", str(deep_encoder_path), str(mnist_like), "-o",
                                      str(tmp_path / "c.npy"), *args])
    assert isinstance(result.exception, CaffeOnnxError) and message in str(result.exception), result.output
    assert not (tmp_path / "c.npy").exists()


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
