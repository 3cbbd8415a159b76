#!/usr/bin/env bash
# Builds smoke/gpu_data, the tokenizer and shards the GPU pretraining scripts carry to the lent machine
# (bench/gpu_pretrain.sh, gpu_profile_pretrain.sh, gpu_multi.sh), by the smoke pretrain's own data step
# (pretrain.smoke.build_data: the standard library's docstrings, all of them (~5 MB) by default, a sentencepiece
# tokenizer, megatron shards) with cheems-320m's 32k vocabulary. Run here, not on the GPU machine, then carry
# smoke/gpu_data:  bash bench/make_gpu_data.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
CORPUS_MB=${CORPUS_MB:-24}
$PY -c "
import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')
from pathlib import Path
from pretrain.smoke import build_data
print(build_data(Path('smoke/gpu_data'), int($CORPUS_MB * 1e6), 32768, rebuild=True))"
rm -r smoke/gpu_data/corpus   # the tokenizer and shards are what is carried (64 MiB in all with .gpu_wheels)
du -sh smoke/gpu_data
