#!/usr/bin/env bash
# One device call for the Gluon forward (cheems_parallel/kernels/dmattn_gluon.py): a per-case probe (each case in
# its own process, so a crash cannot hide the others), its GPU tests (float64 oracle, gradients through the Triton
# backward, agreement with the Triton forward, run-twice bitwise) while the bench's forward candidates compile, then
# the forward sweep (Triton vs Gluon vs cuDNN) at $LENGTHS.
# Usage, through the device tool from the repository root:  bash bench/gpu_dmattn_gluon.sh
set -uo pipefail
OUT=${OUT:-/tmp/dmattn_gluon_out}
LENGTHS=${LENGTHS:-"4096 16384"}
MATCH=${MATCH:-"fwd gluon"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 70 python3 bench/dmattn.py --tune --tune-phases forward --tune-match $MATCH --precompile-only \
    --precompile-workers 4 >"$OUT/precompile.log" 2>&1 &
precompile_pid=$!
probe() {  # head_dim length batch heads kv_heads pad_bias
    timeout 40 python3 - "$@" <<'PY' 2>&1 | tail -n 1
import sys, torch
import cheems_parallel.kernels.dmattn as kernels
import cheems_parallel.kernels.dmattn_gluon as gluon
head_dim, length, batch, heads, kv_heads, pad = map(int, sys.argv[1:])
gluon.PAD_BIAS_ROWS = bool(pad)
name = f"d={head_dim} l={length} b={batch} h={heads} hkv={kv_heads} pad={pad}"
try:
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(batch, heads, length, head_dim, generator=g, device="cuda").bfloat16()
    k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=g, device="cuda").bfloat16() for _ in range(2))
    bias = torch.randn(batch, heads, length, generator=g, device="cuda")
    masks = kernels._Masks(bias, None, None, batch, heads, length)
    out_t, lse_t = kernels._forward(q, k, v, bias, masks)
    out_g, lse_g = gluon.forward(q, k, v, bias)
    torch.cuda.synchronize()
    err = ((out_g.float() - out_t.float()).norm() / out_t.float().norm()).item()
    print(f"probe {name}: ran, out rel diff {err:.2e}, lse max diff {(lse_g - lse_t).abs().max().item():.2e}")
except Exception as error:
    print(f"probe {name}: FAILED {str(error).splitlines()[0][:120]}")
PY
}
probe 128 777 2 4 2 0 & probe 128 777 2 4 2 1 & probe 64 1024 2 4 2 1 & probe 64 777 2 4 2 1 & probe 128 4096 2 16 16 1 &
wait $(jobs -p | grep -v "^$precompile_pid$")
echo "probes done after $(( $(date +%s) - start )) s"
timeout ${TEST_TIMEOUT:-60} python3 -m pytest -v -n 8 -p no:cacheprovider tests/gpu/test_dmattn_kernel_gpu.py -k gluon \
    >"$OUT/tests.log" 2>&1
echo "gpu tests rc=$? after $(( $(date +%s) - start )) s"
grep -E "FAILED|passed|failed" "$OUT/tests.log" | sed -E 's/^\[gw[0-9]+\] *\[ *[0-9]+%\] *//' | sort -u | tail -n 30
grep -E "^E  " "$OUT/tests.log" | sort | uniq -c | sort -rn | head -n 5
wait $precompile_pid; echo "precompile rc=$? after $(( $(date +%s) - start )) s"
timeout ${BENCH_TIMEOUT:-75} python3 bench/dmattn.py --tune --tune-only --tune-phases forward --tune-match $MATCH \
    --tune-length $LENGTHS --baselines cudnn --precompile-workers 0 --warmup-ms 20 --rep-ms 80 \
    --output "$OUT/gluon_tune.json" >"$OUT/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - start )) s"
grep -E "failed|Error" "$OUT/bench.log" | head -n 10
python3 - "$OUT/bench.log" <<'PY'
import re, sys
rows = []
for line in open(sys.argv[1]):
    m = re.search(r"tune l=(\d+) cuDNN causal fwd ([\d.]+), fwd\+bwd ([\d.]+)", line)
    if m:
        rows.append((m.group(1), "cuDNN causal", m.group(2), m.group(3), "", ""))
    m = re.search(r"tune l=(\d+) forward +(.+?) +[\d.]+ ms \(fwd ([\d.]+), fwd\+bwd ([\d.]+)\)(?: ratio vs cuDNN fwd ([\d.]+) f\+b ([\d.]+))?", line)
    if m:
        rows.append((m.group(1), m.group(2), m.group(3), m.group(4), m.group(5) or "", m.group(6) or ""))
print(f"{'l':>6} | {'method':<40} | {'fwd ms':>7} | {'f+b ms':>7} | {'fwd x':>6} | {'f+b x':>6}")
for row in rows:
    print(f"{row[0]:>6} | {row[1]:<40} | {row[2]:>7} | {row[3]:>7} | {row[4]:>6} | {row[5]:>6}")
PY
