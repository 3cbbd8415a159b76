#!/usr/bin/env bash
# The one call on the lent H200 for the fused DMAttn kernel: GPU correctness tests (float64 oracle) while
# the benchmark's Triton variants compile on the CPUs, then the benchmark with tuning; logs and the JSON
# go to $OUT (the device tool returns that folder).
# Usage, through the device tool from the repository root:  bash bench/gpu_dmattn.sh [extra bench/dmattn.py flags]
set -uo pipefail
OUT=${OUT:-/tmp/dmattn_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,memory.used --format=csv | tee "$OUT/gpu.txt"
python3 bench/dmattn.py --tune --precompile-only --precompile-workers 6 >"$OUT/precompile.log" 2>&1 &
precompile_pid=$!
DMATTN_ERRORS_LOG="$OUT/test_errors.jsonl" python3 -m pytest -q -n 10 -p no:cacheprovider \
    tests/gpu/test_dmattn_kernel_gpu.py >"$OUT/tests.log" 2>&1
tests_rc=$?
echo "gpu tests rc=$tests_rc after $(( $(date +%s) - start )) s"; tail -n 15 "$OUT/tests.log"
python3 - "$OUT/test_errors.jsonl" <<'PY'
import json, sys, collections
worst = collections.defaultdict(lambda: (0.0, None))
for line in open(sys.argv[1]):
    case = json.loads(line)
    fused = case["fused"]
    key = (case["dtype"], "fused" if fused else "two-kernel", "tma-reduce" if fused and case["dq_tma_reduce"] else "")
    for name, error in case["errors"].items():
        if error > worst[key][0]:
            worst[key] = (error, f"{name} {case['shape']} w={case['keep_window']} docs={case['documents']} {case['mask']}")
for key, (error, where) in sorted(worst.items()):
    print(f"worst {' '.join(k for k in key if k)}: {error:.2e} ({where})")
PY
wait $precompile_pid; echo "precompile rc=$? after $(( $(date +%s) - start )) s"; tail -n 3 "$OUT/precompile.log"
python3 bench/dmattn.py --tune --output "$OUT/dmattn_h200.json" "$@" >"$OUT/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - start )) s"
grep -v "^TFLOP\|^ *l  *b |\|^ *[0-9]* *[0-9]* |" "$OUT/bench.log" | tail -n 45
grep "^TFLOP\|^ *l  *b |\|^ *[0-9]* *[0-9]* |" "$OUT/bench.log"
