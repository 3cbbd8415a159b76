"""The Cheems pretraining program: `python -m pretrain` (see pretrain/__main__.py).

Components, one job each: config (typed tree + DeepSpeed JSON merge + validation), schedule (LR),
optimizer (AdamW groups, skippable step), data (datasets and loaders), checkpoint (atomic saves,
resume), metrics (TensorBoard, metrics.jsonl, console), trainer (composes them), smoke (the
`make pretrain-smoke` demo), generate (sampling from a saved checkpoint).
"""
