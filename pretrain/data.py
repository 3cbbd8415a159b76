"""Glue between the trainer and `data_tools.dataset`: datasets sized for the run, loaders per rank.

Every micro-batch is a dict of (b, l) tensors: tokens (int64), labels (int64, tokens shifted by
one), loss_mask (float), position_ids (int64), and segment_ids (int64) with document masking.
Tensor-parallel ranks of one data-parallel group read identical batches (same data-parallel rank).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import BatchLayout, PretrainConfig


@dataclass
class RunData:
    train_dataset: object
    valid_dataset: object | None
    eod_id: int | None
    vocab_size: int


def build_run_data(config: PretrainConfig, batch: BatchLayout) -> RunData:
    from data_tools.dataset import build_pretraining_datasets
    from data_tools.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.data.tokenizer_model)
    train_samples = config.train.steps * batch.global_batch_size
    # Every evaluation reads the same first samples of the validation split (comparable numbers).
    valid_samples = max(1, config.eval.iterations * batch.micro_batch_size * batch.data_parallel_size)
    train, valid, _ = build_pretraining_datasets(
        config.data.blend, config.data.tokenizer_model, config.data.seq_length,
        num_samples=(train_samples, valid_samples, 0), split=config.data.split, seed=config.train.seed,
        cache_dir=config.data.cache_dir, document_masking=config.model.document_masking)
    return RunData(train, valid, getattr(tokenizer, "eod", None), tokenizer.vocab_size)


def build_loader(dataset, consumed_samples: int, batch: BatchLayout, data_parallel_rank: int, num_workers: int,
                 vocab_size: int | None = None):
    """The rank's micro-batches; with `vocab_size`, every one is checked to hold only ids below it."""
    from data_tools.dataset import build_data_loader

    loader = build_data_loader(dataset, consumed_samples, batch.micro_batch_size, data_parallel_rank,
                               batch.data_parallel_size, num_workers=num_workers)
    return loader if vocab_size is None else _VocabularyChecked(loader, vocab_size)


class _VocabularyChecked:
    """A token id outside the embedding (shards made with a larger tokenizer than the model's, e.g. ones
    without a .meta.json) would fail deep inside torch's embedding; stop with one line naming it instead."""

    def __init__(self, loader, vocab_size: int):
        self.loader, self.vocab_size = loader, vocab_size

    def __iter__(self):
        from data_tools.errors import DataError

        for micro_batch in self.loader:
            tokens = micro_batch["tokens"]
            low, high = int(tokens.min()), int(max(tokens.max(), micro_batch["labels"].max()))
            if low < 0 or high >= self.vocab_size:
                raise DataError(f"data.blend: a sample holds token id {low if low < 0 else high}, outside "
                                f"model.vocab_size={self.vocab_size}; the shards were tokenized with another "
                                "tokenizer (see their .meta.json) or are corrupt")
            yield micro_batch


def to_model_inputs(micro_batch: dict, device: torch.device) -> dict:
    inputs = {
        "input_ids": micro_batch["tokens"].to(device, non_blocking=True),
        "labels": micro_batch["labels"].to(device, non_blocking=True),
        "loss_mask": micro_batch["loss_mask"].to(device, non_blocking=True),
        "position_ids": micro_batch["position_ids"].to(device, non_blocking=True),
    }
    if "segment_ids" in micro_batch:
        inputs["segment_ids"] = micro_batch["segment_ids"].to(device, non_blocking=True)
    return inputs
