#!/usr/bin/env bash
# Builds smoke/gpu_data, the tokenizer and shards the GPU pretraining scripts carry to the lent machine
# (bench/gpu_pretrain.sh, gpu_profile_pretrain.sh, gpu_multi.sh): the standard library's docstrings (the smoke
# corpus: up to CORPUS_MB megabytes, all of it (~5 MB) by default), a 32k sentencepiece tokenizer (cheems-320m's
# vocabulary) and megatron shards.
# Run here, not on the GPU machine:  bash bench/make_gpu_data.sh   (then carry smoke/gpu_data)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=smoke/gpu_data
CORPUS_MB=${CORPUS_MB:-24}
mkdir -p "$OUT"
$PY -c "from data_tools.corpus import write_stdlib_corpus as w; print(w('$OUT/corpus.jsonl', int($CORPUS_MB * 1e6)))"
$PY -m data_tools.train_tokenizer --input "$OUT/corpus.jsonl" --vocab-size 32768 --model-prefix "$OUT/tok32k"
$PY -m data_tools.preprocess --input "$OUT/corpus.jsonl" --output-prefix "$OUT/stdlib" \
    --tokenizer "$OUT/tok32k.model" --workers 4 --append-eod --no-progress
rm "$OUT/corpus.jsonl"   # the shards are what is carried (64 MiB in all with .gpu_wheels)
du -sh "$OUT"
