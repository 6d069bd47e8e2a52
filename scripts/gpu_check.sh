#!/usr/bin/env bash
# `make gpu-check`: on the GPU machine, the GPU tests and the benchmarks, in parts. Logs and
# JSON go under $OUT (the device tool brings that folder back). Each part has its own time limit,
# so one slow part cannot eat the others' time; the tail of each log is printed as it ends.
#   GPU_PARTS      parts to run, in order (default: tests bench sweep explore)
#   GPU_TEST_ARGS  pytest arguments (default: -m cuda tests)  TEST_LIMIT    seconds (default 480)
#   GPU_TEST_WORKERS  pytest-xdist workers for the tests part (default 10; 0 or 1: one process)
#   BENCH_ARGS     bench_fftconv.py arguments                 BENCH_LIMIT   seconds (default 240)
#   SWEEP_ARGS     sweep_shortconv.py arguments               SWEEP_LIMIT   seconds (default 150)
#   EXPLORE_ARGS   explore_blockfft_conv.py arguments            EXPLORE_LIMIT seconds (default 200)
#   V6_ARGS        explore_monarch_conv.py arguments (part "v6", not in the default list: FlashConv
#                  v6, Gluon, not yet dispatched)             V6_LIMIT      seconds (default 150)
#   LCCONV_COMMIT  the commit measured, written into every JSON (a copied tree may have no .git)
# A device call lasts at most 10 minutes. The suite (~1300 tests) does not fit one in a single
# process; with pytest-xdist `pytest -n 10` took 5m38 on the H100 machine (16 cores), so the tests
# part runs GPU_TEST_WORKERS workers and may take 8 minutes: GPU_PARTS=tests fits one call, and
# the benchmark parts go in another (GPU_PARTS="bench sweep explore"). --durations lists the
# slowest tests in the log, to see what to trim if the suite grows past that. By default only the
# tests marked `cuda` run here (those a CPU machine skips): CI runs all the others on torch 2.13
# and, for the compile path, on 2.11, this machine's version. The whole suite
# (GPU_TEST_ARGS=tests) stopped at 81% after 340 s with 14 workers at 0c0bb7d.
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
export LCCONV_COMMIT=${LCCONV_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit $LCCONV_COMMIT"; } | tee "$OUT/gpu.txt"

status=0
run_part() {  # name, time limit, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - start)) s (limit $limit)"
    tail -n "${TAIL_LINES:-30}" "$OUT/$name.log" | cut -c1-220
    [ "$rc" = 0 ] || status=1
}

test_workers() {  # pytest's -n for GPU_TEST_WORKERS, or nothing (one process, or no pytest-xdist)
    local workers=${GPU_TEST_WORKERS:-10}
    if [ "$workers" -gt 1 ] 2>/dev/null; then
        if python3 -c "import xdist" 2>/dev/null; then
            echo "-n $workers"
        else
            echo "gpu_check: pytest-xdist is missing, the tests run in one process" >&2
        fi
    fi
}

for part in ${GPU_PARTS:-tests bench sweep explore}; do
    case $part in
        # shellcheck disable=SC2086
        tests) run_part tests "${TEST_LIMIT:-480}" python3 -m pytest -q -p no:cacheprovider $(test_workers) \
                   --durations=15 ${GPU_TEST_ARGS:--m cuda tests} ;;
        # shellcheck disable=SC2086
        bench) run_part bench "${BENCH_LIMIT:-240}" python3 benchmarks/bench_fftconv.py \
                   --out "$OUT/bench_fftconv.json" ${BENCH_ARGS:-} ;;
        # shellcheck disable=SC2086
        sweep) run_part sweep "${SWEEP_LIMIT:-150}" python3 benchmarks/sweep_shortconv.py \
                   --out "$OUT/sweep_shortconv.json" ${SWEEP_ARGS:-} ;;
        # shellcheck disable=SC2086
        explore) run_part explore "${EXPLORE_LIMIT:-200}" python3 benchmarks/explore_blockfft_conv.py \
                     --out "$OUT/explore_blockfft_conv.json" ${EXPLORE_ARGS:-} ;;
        # shellcheck disable=SC2086
        v6) run_part v6 "${V6_LIMIT:-150}" python3 benchmarks/explore_monarch_conv.py \
                --out "$OUT/explore_monarch_conv.json" ${V6_ARGS:-} ;;
        *) echo "unknown part $part (tests bench sweep explore v6)"; status=1 ;;
    esac
done
exit $status
