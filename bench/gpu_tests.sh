#!/usr/bin/env bash
# Every GPU test in one device call (kernels vs float64 references; the model with kernels vs the
# reference ops). Carry .gpu_wheels (deepspeed, megatron-core and their pure-Python needs, pytest).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .gpu_wheels/*.whl | grep -v -e mamba_ssm) || exit 1
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python3 -m pytest -q -p no:cacheprovider tests/gpu/test_model_kernels_gpu.py "$@"; echo "model-with-kernels tests rc=$?"
python3 -m pytest -q -p no:cacheprovider -n 8 tests/gpu/test_dmattn_kernel_gpu.py tests/gpu/test_ssd_kernel_gpu.py "$@"
