#!/usr/bin/env bash
# One device call for a Gluon DMAttn kernel (cheems_parallel/kernels/dmattn_gluon.py forward, dmattn_gluon_bwd.py
# backward): its GPU tests (float64 oracle, agreement with the Triton kernels, repeat runs), then the sweep of that
# phase's candidates (Triton vs Gluon variants vs cuDNN causal, each candidate first checked against the default
# settings' results) at $LENGTHS, and a short table.
# Usage, through the device tool from the repository root:
#   bash bench/gpu_dmattn_gluon.sh forward      # tests -k gluon_forward, forward sweep
#   bash bench/gpu_dmattn_gluon.sh backward     # tests -k gluon_backward, backward sweep
#   bash bench/gpu_dmattn_gluon.sh sparse       # tests -k gluon_sparse (forward and backward), bench/dmattn_sparse.py
#                                               # (keep-window/documents: causal vs Triton vs Gluon sparse)
set -uo pipefail
PHASE=${1:-forward}
case "$PHASE" in
  forward) TESTS=${TESTS:-"gluon and not gluon_backward and not gluon_sparse"}; MATCH=${MATCH:-"fwd gluon"}; LENGTHS=${LENGTHS:-"1024 4096 16384"} ;;
  backward) TESTS=${TESTS:-"gluon_backward"}; MATCH=${MATCH:-"fused gluon-bwd"}; LENGTHS=${LENGTHS:-"4096 16384 8192 1024"} ;;
  sparse) TESTS=${TESTS:-"gluon_sparse"}; MATCH=""; LENGTHS=${LENGTHS:-"1024 4096 16384 2048 8192"}
          TEST_TIMEOUT=${TEST_TIMEOUT:-200}; BENCH_TIMEOUT=${BENCH_TIMEOUT:-330} ;;
  *) echo "error: phase must be 'forward', 'backward' or 'sparse', got '$PHASE'" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/dmattn_gluon_$PHASE}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout ${TEST_TIMEOUT:-75} python3 -m pytest -v -n 8 -p no:cacheprovider tests/gpu/test_dmattn_kernel_gpu.py \
    -k "$TESTS" >"$OUT/tests.log" 2>&1
echo "gpu tests rc=$? after $(( $(date +%s) - start )) s"
grep -E "FAILED|passed|failed|crashed" "$OUT/tests.log" | sed -E 's/^\[gw[0-9]+\] *\[ *[0-9]+%\] *//' | sort -u | tail -n 30
grep -E "^E  " "$OUT/tests.log" | sort | uniq -c | sort -rn | head -n 8
if [ "$PHASE" = sparse ]; then
  timeout ${BENCH_TIMEOUT} python3 bench/dmattn_sparse.py --lengths $LENGTHS --output "$OUT/gluon_sparse.json" \
      >"$OUT/bench.log" 2>&1
  echo "bench rc=$? after $(( $(date +%s) - start )) s"
  grep -E "failed|Error" "$OUT/bench.log" | head -n 10
  grep -E "sparse l=" "$OUT/bench.log" | sed -E 's/^[0-9:]+ //' | tail -n 60
  exit 0
fi
timeout ${BENCH_TIMEOUT:-85} python3 bench/dmattn.py --tune --tune-only --tune-phases "$PHASE" --tune-match $MATCH \
    --tune-length $LENGTHS --baselines cudnn --precompile-workers 0 --warmup-ms 10 --rep-ms 50 \
    --output "$OUT/gluon_${PHASE}_tune.json" >"$OUT/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - start )) s"
grep -E "failed|Error" "$OUT/bench.log" | head -n 10
python3 - "$OUT/bench.log" <<'PY'
import re, sys
rows = []
for line in open(sys.argv[1]):
    m = re.search(r"tune l=(\d+) cuDNN causal fwd ([\d.]+), fwd\+bwd ([\d.]+)", line)
    if m:
        rows.append((m.group(1), "cuDNN causal", m.group(2), m.group(3), "", ""))
    m = re.search(r"tune l=(\d+) (?:forward|backward) +(.+?) +[\d.]+ ms \(fwd ([\d.]+), fwd\+bwd ([\d.]+)\)(?: ratio vs cuDNN fwd ([\d.]+) f\+b ([\d.]+))?", line)
    if m:
        rows.append((m.group(1), m.group(2), m.group(3), m.group(4), m.group(5) or "", m.group(6) or ""))
print(f"{'l':>6} | {'method':<40} | {'fwd ms':>7} | {'f+b ms':>7} | {'fwd x':>6} | {'f+b x':>6}")
for row in rows:
    print(f"{row[0]:>6} | {row[1]:<40} | {row[2]:>7} | {row[3]:>7} | {row[4]:>6} | {row[5]:>6}")
PY
