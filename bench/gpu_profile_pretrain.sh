#!/usr/bin/env bash
# One call on the lent H200: where a cheems-320m training step's time goes (bench/profile_pretrain.py),
# with ZeRO-1 (the benchmark's setting) and ZeRO-0. carry: .gpu_wheels and smoke/gpu_data (see gpu_pretrain.sh).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .gpu_wheels/*.whl | grep -v -e mamba_ssm) || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/profile_out}
mkdir -p "$OUT"
for stage in 1 0; do
  python3 bench/profile_pretrain.py --data-prefix smoke/gpu_data/data/stdlib_text_document \
    --tokenizer smoke/gpu_data/tokenizer/stdlib.model \
    --zero-stage $stage --out "$OUT/profile_pretrain_zero$stage.json" "$@" > "$OUT/profile_zero$stage.log" 2>&1
  echo "zero-$stage rc=$?"; sed -n '/profiled steps/,$p' "$OUT/profile_zero$stage.log"
done
