"""The Cheems pretraining program: `python -m pretrain` (see pretrain/__main__.py).

Components, one job each: config (typed tree + DeepSpeed JSON merge + validation), schedule (LR),
optimizer (AdamW groups, skippable step), data (datasets and loaders), checkpoint (atomic saves,
resume), metrics (TensorBoard, metrics.jsonl, console), trainer (composes them), smoke (the
`make pretrain-smoke` demo), generate (sampling from a saved checkpoint).
"""

import logging
import warnings


def quiet_library_notices() -> None:
    """Keep the libraries' import-time and INFO chatter out of our one-line messages: megatron-core warns
    that optional CUDA libraries (Transformer Engine, Apex) are absent and falls back to torch, and it and
    DeepSpeed log at INFO."""
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
