#!/bin/bash
# The GPU checks and benchmarks, run from the repository root on a GPU machine whose Python has torch with
# CUDA but neither onnxruntime-gpu nor some of caffeonnx's dependencies (the lent machine's image):
#   .ortgpu/part-*  the onnxruntime-gpu wheel in pieces (../shared/tools/ort-gpu-chunks.sh makes them)
#   .whl/*.whl      protobuf 7, starlette, uvicorn, lmdb wheels for that Python
# Usage: bash benchmarks/gpu_session.sh [tests|bench|suite|all]   (results go to $OUT, default ./gpu-out)
# Each step runs even when an earlier one fails; the exit status is the number of failed steps.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
what=${1:-all}
failed=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, count a failure
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
if [ ! -d /tmp/ortgpu ]; then
    wheel=/tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_27_x86_64.whl  # pip wants a wheel's own file name
    cat .ortgpu/part-* > $wheel && python3 -m pip install -q --no-deps --target /tmp/ortgpu $wheel
fi
if [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/ortgpu:/tmp/site:$PWD
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import onnxruntime as o, torch; o.preload_dlls(); print('onnxruntime', o.__version__, \
o.get_available_providers(), '| torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
    step tests python3 -m pytest -q -p no:cacheprovider -rs tests/runtime/test_cuda.py tests/trainer/test_cuda.py \
        tests/runtime/test_session.py tests/runtime/test_encode.py \
        tests/runtime/test_bias_split.py tests/runtime/test_bench.py
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    step bench_runtime python3 benchmarks/runtime_bench.py --device cuda --seconds 3
    step bench_trainer python3 benchmarks/trainer_mnist_autoencoder_gpu.py
    cp benchmarks/results/runtime_gpu.json benchmarks/results/runtime_gpu.md \
        benchmarks/results/trainer_mnist_autoencoder_gpu.json "$OUT"/ 2>/dev/null
fi
if [ "$what" = suite ]; then
    # the whole suite where CUDA is present (auto picks it); tritonclient and grpcio-tools are not carried
    step suite python3 -m pytest -q -p no:cacheprovider -n 8 --ignore tests/runtime/test_server.py \
        --ignore tests/test_end_to_end.py --ignore tests/test_proto_current.py
fi
exit $failed
