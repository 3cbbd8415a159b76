#!/usr/bin/env bash
# The whole GPU check: all GPU tests (bench/gpu_tests.sh), SSD kernels (tests + bench), DMAttn kernel (tests + bench),
# the pretrain run (cheems-320m / llama-320m), then one short table of the ratios that matter.
# Run from the repository root on the lent H200 with `.gpu_wheels` (and smoke/gpu_data for pretrain) carried:
#   bash bench/gpu_check.sh            # everything (about 15 min: more than one device call allows)
#   PARTS="ssd dmattn" bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
PARTS=${PARTS:-"tests ssd dmattn pretrain"}
for part in $PARTS; do
  mkdir -p "$OUT/$part"
  echo "=== $part"
  OUT="$OUT/$part" bash "bench/gpu_$part.sh" > "$OUT/$part/log.txt" 2>&1
  echo "rc=$? (log: $OUT/$part/log.txt)"
done
python3 bench/gpu_summary.py
