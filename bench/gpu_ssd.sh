#!/usr/bin/env bash
# One call on the lent H200 (the device tool runs it from the repo root, with .gpu_wheels carried):
# the GPU correctness grid for the SSD kernels, then bench/ssd.py; logs and the JSON go to $OUT.
# Example: bash bench/gpu_ssd.sh --lengths 1024 2048 4096 8192 16384
# .gpu_wheels/ holds mamba_ssm-2.2.4-py3-none-any.whl built here with
#   MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE pip wheel --no-deps --no-build-isolation mamba_ssm-2.2.4.tar.gz
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ssd_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_wheels/mamba_ssm-*.whl || exit 1
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  .gpu_wheels/pytest-*.whl .gpu_wheels/pluggy-*.whl .gpu_wheels/iniconfig-*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu --format=csv,noheader
start=$(date +%s)
run_tests() {
  parallel=""; python3 -c "import xdist" 2>/dev/null && parallel="-n 4"   # compile in 4 processes
  # TEST_TIMEOUT: seconds the grid may take (a slow grid must not cost the lease's table)
  # TEST_FILTER: a pytest -k expression (e.g. "gluon") to run part of the grid
  timeout "${TEST_TIMEOUT:-400}" python3 -m pytest -q -rP $parallel -p no:cacheprovider ${TEST_FILTER:+-k "$TEST_FILTER"} \
    tests/gpu/test_ssd_kernel_gpu.py \
    > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$? in $(( $(date +%s) - start )) s"
  grep -E "^shape|^gluon|^no-grad|passed|failed|Error|error" "$OUT/gpu_tests.log" | cut -c1-400 | head -40
}
# TESTS_LAST=1: the benchmark first (its log and JSON reach $OUT before the tests start)
if [ "${SKIP_TESTS:-0}" != "1" ] && [ "${TESTS_LAST:-0}" != "1" ]; then run_tests; fi
# SKIP_BENCH=1: the GPU grid only
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  python3 bench/ssd.py "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^ *$" | grep -v "^  [0-9 .]*  " | tail -75
  cp -n bench/results/ssd_h200.json "$OUT/" 2>/dev/null   # -n: never over a JSON the bench wrote there (--out $OUT/ssd_h200.json)
  echo "bench done at $(( $(date +%s) - start )) s"
fi
if [ "${SKIP_TESTS:-0}" != "1" ] && [ "${TESTS_LAST:-0}" = "1" ]; then run_tests; fi
# SWEEP_AFTER=1: then bench/ssd.py's SWEEP at L = 4k for the notes only ($OUT/sweep.json; the table above stays)
if [ "${SWEEP_AFTER:-0}" = "1" ]; then
  python3 bench/ssd.py --lengths 4096 --skip-reference --profile-length 0 --out "$OUT/sweep.json" 2>&1 \
    | tee "$OUT/sweep.log" | grep -E "^  v|picks|^precompiled|failed" | cut -c1-330
  echo "sweep done at $(( $(date +%s) - start )) s"
fi
echo "total $(( $(date +%s) - start )) s"
