#!/usr/bin/env bash
# One call on a lent 2-GPU machine (device kind nvidia-h200-x2): the trainer over NCCL in four layouts
# (one GPU, DP 2, TP 2, PP 2) on the same data and global batch, through torchrun; bench/multi_gpu.py
# prints tokens/s and each layout's loss against the one-GPU run's.
#   carry: .gpu_wheels and smoke/gpu_data (as bench/gpu_pretrain.sh)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu_wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
# The image's TORCH_CUDA_ARCH_LIST=9.0a breaks DeepSpeed's op builder parsing (environment.md).
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
# NVLink multicast stays off on these shared hosts (KINDS.md): keep the machine's settings, and set them if absent.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} \
       NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
OUT=${OUT:-/tmp/multi_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -4
python3 bench/multi_gpu.py --data-prefix smoke/gpu_data/data/stdlib_text_document \
    --tokenizer smoke/gpu_data/tokenizer/stdlib.model \
    --log-dir "$OUT" "$@"
