"""Offline data tools for Cheems pretraining: tokenizer training, text -> megatron-core .bin/.idx
shards, shard inspection/verification/merging, and the runtime datasets the trainer reads.

Import-light on purpose: `python -m data_tools.preprocess` must start in well under a second, so
this package imports neither torch nor megatron. The runtime datasets live in
`data_tools.dataset` (which does import both) and are imported only where they are used.
"""
from data_tools.errors import DataError

__all__ = ["DataError"]
