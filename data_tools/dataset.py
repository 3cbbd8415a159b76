"""The datasets the trainer reads: megatron-core GPTDataset + BlendedMegatronDatasetBuilder over
token shards, with a resumable sampler.

    train, valid, test = build_pretraining_datasets("0.7 data/web 0.3 data/books", "tok/cheems.model",
                                                    seq_length=2048, num_samples=(100_000, 1_000, 100))
    loader = build_data_loader(train, consumed_samples, micro_batch_size, dp_rank, dp_size)

Each item is a dict of tensors of shape (seq_length,): `tokens` int64 input ids, `labels` int64
(the next tokens), `loss_mask` float32, `position_ids` int64 and, with document_masking,
`segment_ids` int64 — the document number within the sample (0, 0, ..., 1, 1, ...), rising right
after each EOD; position_ids then restart at 0 at each new document.

What megatron-core does here: splits each shard's documents into train/valid/test by `split`,
shuffles documents and samples with `seed`, packs documents into samples of seq_length + 1 tokens,
blends datasets by weight, and caches these indices as .npy files in `cache_dir` (the first build
writes them; later builds with the same arguments load them). The order is a pure function of
(shards, split, seed, seq_length, num_samples). Resumption is by sample count: ResumableSampler
skips the first `consumed_samples` samples of that order, as Megatron's MegatronPretrainingSampler.

The builder needs a torch.distributed process group even for one process; when none exists, a
one-process gloo group is created for the build and destroyed after it.
"""
import logging
import os

import numpy
import torch

from data_tools.blend import parse_blend
from data_tools.errors import DataError
from data_tools.indexed import check_shard
from data_tools.splits import empty_split_problem
from data_tools.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["DataError", "parse_blend", "build_pretraining_datasets", "PretrainingDataset",
           "ResumableSampler", "build_data_loader"]


class _SpecialIds:
    """What GPTDatasetConfig reads from a tokenizer: vocab_size, eod and pad, and the
    `unique_identifiers` megatron-core hashes into its index cache names."""

    def __init__(self, vocab_size: int, eod: int, pad: int):
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = pad
        self.unique_identifiers = {"class": "SentencePieceTokenizer", "vocab_size": vocab_size,
                                   "eod": eod, "pad": pad}


def _segments_and_positions(tokens: torch.Tensor, eod: int):
    """segment_ids (document number, rising right after each EOD) and per-document position ids."""
    length = tokens.shape[0]
    is_eod = tokens == eod
    starts = torch.zeros(length, dtype=torch.bool)
    starts[0] = True
    starts[1:] = is_eod[:-1]
    segment_ids = torch.cumsum(starts.long(), dim=0) - 1
    arange = torch.arange(length, dtype=torch.long)
    segment_start = torch.cummax(torch.where(starts, arange, torch.zeros_like(arange)), dim=0).values
    return segment_ids, arange - segment_start


class PretrainingDataset(torch.utils.data.Dataset):
    """A megatron-core dataset (GPTDataset or BlendedDataset) mapped to the trainer's item dict."""

    def __init__(self, megatron_dataset, eod: int, document_masking: bool):
        self.megatron_dataset = megatron_dataset
        self.eod = eod
        self.document_masking = document_masking

    def __len__(self) -> int:
        return len(self.megatron_dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.megatron_dataset[index]
        tokens = sample["tokens"].long()
        item = {
            "tokens": tokens,
            "labels": sample["labels"].long(),
            "loss_mask": sample["loss_mask"].float(),
            "position_ids": sample["position_ids"].long(),
        }
        if self.document_masking:
            item["segment_ids"], item["position_ids"] = _segments_and_positions(tokens, self.eod)
        return item


def _ensure_process_group() -> bool:
    """Create a one-process gloo group when none exists; True when this call created it."""
    if not torch.distributed.is_available():
        raise DataError("torch.distributed is unavailable; megatron-core's dataset builder needs it")
    if torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    return True


def build_pretraining_datasets(blend, tokenizer_model, seq_length: int, num_samples: tuple,
                               split: str = "969,30,1", seed: int = 1234, cache_dir: str | None = None,
                               document_masking: bool = False) -> tuple:
    """(train, valid, test) PretrainingDatasets; valid/test are None when their split or count is 0.

    blend: see parse_blend. tokenizer_model: the sentencepiece .model (EOD/pad ids and vocabulary).
    num_samples: (train, valid, test) sample counts wanted (the data is repeated in shuffled
    epochs when it holds fewer). cache_dir: where megatron-core caches its indices (default:
    `index-cache/` beside the first shard).
    """
    if not isinstance(seq_length, int) or seq_length < 1:
        raise DataError(f"seq_length {seq_length!r} must be a positive integer")
    if len(num_samples) != 3 or any(not isinstance(count, int) or count < 0 for count in num_samples):
        raise DataError(f"num_samples {num_samples!r} must be three non-negative integers (train, valid, test)")
    try:
        split_weights = [float(part) for part in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise DataError(f"split {split!r}: expected comma-separated weights like \"969,30,1\"") from None
    if len(split_weights) != 3 or any(weight < 0 for weight in split_weights) or sum(split_weights) <= 0:
        raise DataError(f"split {split!r}: expected three non-negative weights (train,valid,test) with a positive sum")

    prefixes, weights = parse_blend(blend)
    tokenizer = load_tokenizer(tokenizer_model)
    for prefix in prefixes:
        index = check_shard(prefix, check_tokens=False)
        if index.num_documents == 0:
            raise DataError(f"{prefix}: the shard holds no documents")
        empty = empty_split_problem(prefix, index.num_documents, split_weights)
        if empty:
            raise DataError(f"split {split!r}: {empty}")
        if index.dtype == numpy.dtype(numpy.uint16) and tokenizer.vocab_size > 65536:
            raise DataError(f"{prefix} is uint16 but {tokenizer_model} has {tokenizer.vocab_size} ids: "
                            f"the shard was made with another tokenizer")
    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
    os.makedirs(cache_dir, exist_ok=True)

    # megatron-core's datasets log every index they open at INFO; the trainer's logs should not
    # drown in it (only this logger: the trainer may want megatron's other INFO lines).
    logging.getLogger("megatron.core.datasets").setLevel(logging.WARNING)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=",".join(str(weight) for weight in split_weights),
        path_to_cache=cache_dir,
        tokenizer=_SpecialIds(tokenizer.vocab_size, tokenizer.eod, tokenizer.pad),
        # Position ids and segment ids for document masking are computed in PretrainingDataset;
        # megatron's own reset loop is per-EOD Python and makes masks uncacheable.
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # A split with weight 0 is not built at all. One with a positive weight is built even when no samples
    # are wanted from it (megatron-core then builds it from its documents), and is returned as None.
    sizes = [count if weight > 0 else 0 for count, weight in zip(num_samples, split_weights)]
    created_group = _ensure_process_group()
    try:
        built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    finally:
        if created_group:
            torch.distributed.destroy_process_group()
    return tuple(
        None if dataset is None or size == 0 else PretrainingDataset(dataset, tokenizer.eod, document_masking)
        for dataset, size in zip(built, sizes)
    )


class ResumableSampler:
    """Yields this data-parallel rank's micro-batches of sample indices, in order, starting after
    `consumed_samples` (a global count over all ranks), as Megatron's MegatronPretrainingSampler.

    The global batch step is micro_batch_size x data_parallel_size consecutive indices; rank r
    takes slice [r * micro_batch_size, (r + 1) * micro_batch_size) of each step. The last
    incomplete step is dropped. Saving consumed_samples in the checkpoint and passing it back
    here continues the exact sample sequence.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int):
        if total_samples <= 0:
            raise DataError(f"no samples to draw from (total_samples={total_samples})")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise DataError(f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                            f"({data_parallel_size}) must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})")
        if not 0 <= consumed_samples < total_samples:
            raise DataError(f"consumed_samples {consumed_samples} is outside the dataset's "
                            f"{total_samples} samples; build the dataset with more train samples")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size

    def __len__(self) -> int:
        step = self.micro_batch_size * self.data_parallel_size
        return (self.total_samples - self.consumed_samples) // step

    def __iter__(self):
        step = self.micro_batch_size * self.data_parallel_size
        first = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - step + 1, step):
            yield list(range(start + first, start + first + self.micro_batch_size))


def build_data_loader(dataset, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                      data_parallel_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` yielding this rank's micro-batches (dicts of (b, l) tensors)."""
    sampler = ResumableSampler(len(dataset), consumed_samples, micro_batch_size,
                               data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
