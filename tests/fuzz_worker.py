"""Runs fuzz jobs (one JSON object per stdin line) through caffeonnx's CLI entry point in this one process.

Each job names a directory holding its input files and the argv to run there.  For every job one
JSON line goes to stdout: the exit code (or "exception" when one escaped main(), i.e. a traceback),
the captured stderr, and the files left behind that should not be (hidden temp files always;
anything new when the command failed).  The address space is capped (argv[1] MiB) so a runaway
allocation fails as a MemoryError instead of swapping the machine; the last line is the peak RSS.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import traceback


def _run(argv: list[str]) -> tuple[int | str, str]:
    from caffeonnx.cli import main

    err = io.StringIO()
    sys.argv = ["caffeonnx", *argv]
    code: int | str
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - anything escaping main() is what the fuzzer looks for
            code = "exception"
            err.write(traceback.format_exc())
    return code, err.getvalue()


def main() -> None:
    limit = int(sys.argv[1]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        os.chdir(job["dir"])
        code, stderr = _run(job["argv"])
        names = sorted(os.listdir("."))
        leftovers = [n for n in names if n.startswith(".") and n.endswith(".tmp")]
        if code != 0:
            leftovers += [n for n in names if n not in job["inputs"] and n not in leftovers]
        out.write(json.dumps({"code": code, "stderr": stderr[-4000:], "leftovers": leftovers}) + "\n")
        out.flush()
    out.write(f"PEAK_RSS_MIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}\n")


if __name__ == "__main__":
    main()
