"""docs/deploy.md works as written: its bash blocks run in order, every `caffeonnx` command in it (run or not)
parses with the CLI, what it says the commands print is printed, and its Ray Serve class runs with a stand-in for
Ray Serve's decorators (ray[serve] is not a test dependency)."""
from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
from pathlib import Path

import click
import numpy as np
import pytest
import typer.main
import yaml

from caffeonnx.cli import app

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
BLOCK = re.compile(r"^```(bash|text|py)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(kind: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(DOC.read_text()) if m.group(1) == kind]


def caffeonnx_commands() -> list[list[str]]:
    """The argument lists of every `caffeonnx ...` command line in the bash and text blocks."""
    commands = []
    for code in blocks("bash") + blocks("text"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("caffeonnx "):
                commands.append(shlex.split(line.split(" | ")[0].removesuffix("&"))[1:])
    return commands


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Run the bash blocks in order in an empty directory: (the directory, their standard output)."""
    work = tmp_path_factory.mktemp("deploy")
    outputs = []
    for i, code in enumerate(blocks("bash")):
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, capture_output=True, text=True,
                             timeout=300, check=False)
        assert res.returncode == 0, f"deploy.md bash block {i} failed ({res.returncode}):\n{code}\n{res.stderr[-3000:]}"
        outputs.append(res.stdout)
    return work, "\n".join(outputs)


def test_every_caffeonnx_command_parses() -> None:
    group = typer.main.get_command(app)
    commands = caffeonnx_commands()
    assert {c[0] for c in commands} >= {"train", "encoder", "serve", "export-triton", "export-kserve", "encode",
                                        "convert"}
    for args in commands:
        ctx = click.Context(group, info_name="caffeonnx")
        command = group.get_command(ctx, args[0])
        assert command is not None, f"no command {args[0]!r}"
        command.make_context(args[0], args[1:], parent=ctx)  # unknown options, bad values and missing ones raise


def test_bash_blocks_run_and_print_what_the_page_says(ran: tuple[Path, str]) -> None:
    work, text = ran
    assert "(4, 64)" in text and "inferences 4 runs 1" in text
    assert text.count("note: model 'fixed_encoder' has a fixed batch dimension") == 1
    # export-triton's config.pbtxt, as `cat` showed it (export-kserve rewrote the entry after)
    assert "kind: KIND_CPU" in text and "preferred_batch_size: [ 16, 64 ]" in text
    assert "max_queue_delay_microseconds: 200" in text and 'key: "intra_op_thread_count"' in text
    config = (work / "model_repository" / "encoder" / "config.pbtxt").read_text()
    assert "preferred_batch_size: [ 32 ]" in config  # export-kserve's
    assert re.search(r"^1$", text, re.MULTILINE)  # grep -c: the one infer request, logged
    manifest = yaml.safe_load((work / "encoder-isvc.yaml").read_text())
    pred = manifest["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleTarget"]) == (2, 8, 64)
    assert pred["model"]["storageUri"] == "s3://my-bucket/model_repository"


class _FakeServe:
    """The two decorators the page uses, with Ray Serve's call shapes: a batched method takes one item per call
    and its wrapped body gets the list; a deployment gets `.bind(*args)`."""

    @staticmethod
    def deployment(**options):
        def wrap(cls):
            cls.bind = classmethod(lambda c, *args: c(*args))
            return cls
        return wrap

    @staticmethod
    def batch(**options):
        def wrap(method):
            async def one(self, item):
                [result] = await method(self, [item])
                return result
            one.batched = method
            return one
        return wrap


class _Request:
    def __init__(self, body: dict) -> None:
        self.body = body

    async def json(self) -> dict:
        return self.body


def test_ray_serve_class_runs(ran: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    work, _ = ran
    [code] = blocks("py")
    monkeypatch.chdir(work)
    namespace: dict = {"serve": _FakeServe}
    exec(compile(code.replace("from ray import serve\n", ""), str(DOC), "exec"), namespace)  # noqa: S102  (the doc)
    encoder = namespace["app"]
    x = np.linspace(0, 1, 3 * 784, dtype=np.float32).reshape(3, 784)
    reply = asyncio.run(encoder(_Request({"data": x.tolist()})))
    expected = encoder.session.run(x)
    np.testing.assert_array_equal(np.asarray(reply["codes"], np.float32), expected)
    # the batched body splits one run's codes back into each caller's rows
    parts = asyncio.run(type(encoder).encode.batched(encoder, [x[:1], x[1:]]))
    assert [p.shape for p in parts] == [(1, 64), (2, 64)]
    np.testing.assert_array_equal(np.concatenate(parts), expected)
    json.dumps(reply)  # what Ray Serve sends back must be JSON
