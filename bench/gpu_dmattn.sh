#!/usr/bin/env bash
# The one call on the lent H200 for the fused DMAttn kernel: GPU correctness tests (float64 oracle), then
# the benchmark with tile tuning; logs and the JSON go to $OUT (the device tool returns that folder).
# Usage, through the device tool from the repository root:  bash bench/gpu_dmattn.sh [extra bench/dmattn.py flags]
set -uo pipefail
OUT=${OUT:-/tmp/dmattn_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q -n 12 -p no:cacheprovider tests/gpu/test_dmattn_kernel_gpu.py >"$OUT/tests.log" 2>&1
tests_rc=$?
echo "gpu tests rc=$tests_rc after $(( $(date +%s) - start )) s"; tail -n 25 "$OUT/tests.log"
python3 bench/dmattn.py --tune --output "$OUT/dmattn_h200.json" "$@" >"$OUT/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - start )) s"
grep -v "^TFLOP\|^ *l  *b |\|^ *[0-9]* *[0-9]* |" "$OUT/bench.log" | tail -n 70
grep "^TFLOP\|^ *l  *b |\|^ *[0-9]* *[0-9]* |" "$OUT/bench.log"
