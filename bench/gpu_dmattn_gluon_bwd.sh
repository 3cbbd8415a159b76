#!/usr/bin/env bash
# One device call for the Gluon backward (cheems_parallel/kernels/dmattn_gluon_bwd.py): its GPU tests (float64 oracle
# for the output and all four gradients, agreement with the Triton backward, run-twice within a tolerance), then the
# backward sweep (Triton fused vs Gluon variants vs cuDNN causal fwd+bwd, each candidate first checked against the
# default settings' results) at $LENGTHS.
# Usage, through the device tool from the repository root:  bash bench/gpu_dmattn_gluon_bwd.sh
set -uo pipefail
OUT=${OUT:-/tmp/dmattn_gluon_bwd_out}
LENGTHS=${LENGTHS:-"4096 16384 8192 1024"}
MATCH=${MATCH:-"fused gluon-bwd"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout ${TEST_TIMEOUT:-75} python3 -m pytest -v -n 8 -p no:cacheprovider tests/gpu/test_dmattn_kernel_gpu.py \
    -k gluon_backward >"$OUT/tests.log" 2>&1
echo "gpu tests rc=$? after $(( $(date +%s) - start )) s"
grep -E "FAILED|passed|failed|crashed" "$OUT/tests.log" | sed -E 's/^\[gw[0-9]+\] *\[ *[0-9]+%\] *//' | sort -u | tail -n 30
grep -E "^E  " "$OUT/tests.log" | sort | uniq -c | sort -rn | head -n 8
timeout ${BENCH_TIMEOUT:-85} python3 bench/dmattn.py --tune --tune-only --tune-phases backward --tune-match $MATCH \
    --tune-length $LENGTHS --baselines cudnn --precompile-workers 0 --warmup-ms 10 --rep-ms 50 \
    --output "$OUT/gluon_bwd_tune.json" >"$OUT/bench.log" 2>&1
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
print(f"{'l':>6} | {'method':<34} | {'fwd ms':>7} | {'f+b ms':>7} | {'fwd x':>6} | {'f+b x':>6}")
for row in rows:
    print(f"{row[0]:>6} | {row[1]:<34} | {row[2]:>7} | {row[3]:>7} | {row[4]:>6} | {row[5]:>6}")
PY
