#!/usr/bin/env bash
# `make gpu-check`: on the GPU machine, the test suite (GPU tests included) and the op benchmark
# in one call. Logs and JSON go under $OUT (the device tool brings that folder back).
#   GPU_TEST_ARGS  pytest arguments (default: tests)      BENCH_ARGS  extra benchmark arguments
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Wheels the machine lacks (expecttest) travel in .whl/ (see README "GPU machine").
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    | tee "$OUT/gpu.txt"
status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    # shellcheck disable=SC2086
    python3 -m pytest -q -p no:cacheprovider ${GPU_TEST_ARGS:-tests} 2>&1 | tee "$OUT/gpu_tests.log" || status=1
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
    # shellcheck disable=SC2086
    python3 benchmarks/bench_fftconv.py --out "$OUT/bench_fftconv.json" ${BENCH_ARGS:-} 2>&1 \
        | tee "$OUT/bench_fftconv.txt" || status=1
fi
exit $status
