"""`python -m caffeonnx`: the same CLI as the `caffeonnx` console script (what torchrun -m and subprocesses use)."""
from caffeonnx.cli import main

main()
