"""`caffeonnx serve` in a child process: how the demo, the benchmark and the tests run a real server."""
from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from caffeonnx.errors import CaffeOnnxError


def cli_command(*args: str) -> list[str]:
    """`caffeonnx ARGS` as a child process of this Python, importing caffeonnx from where this process did.

    `python -m` puts the current directory first on sys.path, so a folder named `caffeonnx` there
    would shadow the package; -P (Python 3.11+) leaves it out, and older Pythons drop it by hand.
    """
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "caffeonnx.cli", *args]
    return [sys.executable, "-c", "import sys; del sys.path[0]; from caffeonnx.cli import main; main()", *args]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ChildServer:
    """A running `caffeonnx serve` child process."""

    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"


def _ready(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False


@contextmanager
def serve_in_child(
    model: Path, name: str, *args: str, device: str = "cpu", capture_output: bool = False,
    start_timeout: float = 60.0, stop_timeout: float = 30.0,
) -> Iterator[ChildServer]:
    """Start `caffeonnx serve MODEL --name NAME ARGS...` on a free port; yield it once ready.

    On exit the child gets SIGTERM (how orchestrators stop a server) and is waited for;
    it is killed only if it has not stopped within `stop_timeout`.  With
    `capture_output` the child's stdout+stderr stay readable via `proc.communicate()`.
    """
    port = free_port()
    cmd = cli_command("serve", str(model), "--port", str(port), "--name", name, "--device", device, *args)
    with tempfile.TemporaryFile("w+") as log:
        out = subprocess.PIPE if capture_output else subprocess.DEVNULL
        err = subprocess.STDOUT if capture_output else log
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        try:
            deadline = time.monotonic() + start_timeout
            while not _ready(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    text = proc.communicate(timeout=10)[0] if capture_output else (log.seek(0) or log.read())
                    raise CaffeOnnxError(f"`caffeonnx serve {model}` did not become ready (exit {proc.poll()}): "
                                         f"{(text or '').strip()[-2000:]}")
                time.sleep(0.1)
            yield ChildServer(port, proc)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
