#!/usr/bin/env bash
# One call on the lent H200: install the carried wheels (deepspeed, megatron-core and their pure-Python
# needs; see ../shared/docs/environment.md), then bench/pretrain_gpu.py on the carried tokenizer + shards.
#   carry: .gpu_wheels (copies of shared/wheels/gpu-py312/*.whl) and smoke/gpu_data (tokenizer/stdlib.model,
#   data/stdlib_text_document.bin/.idx, made here by bench/make_gpu_data.sh from the standard library's docstrings).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
# The image's TORCH_CUDA_ARCH_LIST=9.0a breaks DeepSpeed's op builder parsing (environment.md).
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
python3 bench/pretrain_gpu.py --data-prefix smoke/gpu_data/data/stdlib_text_document \
    --tokenizer smoke/gpu_data/tokenizer/stdlib.model \
    --log-dir "$OUT" "$@"
