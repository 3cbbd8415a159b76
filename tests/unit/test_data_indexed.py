"""data_tools.indexed against megatron-core's own IndexedDatasetBuilder / IndexedDataset.

The reference is megatron-core itself: the same documents written through
`IndexedDatasetBuilder` must give byte-identical .bin/.idx files, and megatron's `IndexedDataset`
must read ours back. Corruptions (truncated .bin, other index version, ...) must give one-line
DataErrors that name the fault.
"""
import os
import struct

import numpy
import pytest

from data_tools import indexed
from data_tools.errors import DataError


def random_documents(seed: int, count: int, vocab_size: int):
    generator = numpy.random.default_rng(seed)
    lengths = generator.integers(0, 50, size=count)
    lengths[3] = 0   # an empty document must survive too
    return [generator.integers(0, vocab_size, size=length) for length in lengths]


def write_with_megatron(prefix: str, documents, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for document in documents:
        builder.add_document(numpy.asarray(document, dtype=numpy.int64), [len(document)])
    builder.finalize(prefix + ".idx")


def write_with_shard_writer(prefix: str, documents, dtype, streaming: bool):
    with indexed.ShardWriter(prefix, dtype) as shard:
        if streaming:
            for document in documents:
                for piece in numpy.array_split(document, 3):
                    shard.add_tokens(piece)
                shard.end_document()
        else:
            lengths = numpy.array([len(document) for document in documents])
            shard.add_documents(numpy.concatenate(documents), lengths)
        shard.commit()


@pytest.mark.parametrize("dtype, vocab_size", [(numpy.uint16, 32000), (numpy.int32, 100_000)])
@pytest.mark.parametrize("streaming", [False, True])
def test_bytes_identical_to_megatron_builder(tmp_path, dtype, vocab_size, streaming):
    documents = random_documents(0, 40, vocab_size)
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    write_with_shard_writer(ours, documents, dtype, streaming)
    write_with_megatron(theirs, documents, dtype)
    for suffix in (".bin", ".idx"):
        with open(ours + suffix, "rb") as mine, open(theirs + suffix, "rb") as reference:
            assert mine.read() == reference.read(), suffix


def test_megatron_indexed_dataset_reads_our_shard(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    documents = random_documents(1, 25, 32000)
    prefix = str(tmp_path / "shard")
    write_with_shard_writer(prefix, documents, numpy.uint16, streaming=False)
    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(documents)
    assert dataset.index.dtype == numpy.uint16
    for position, document in enumerate(documents):
        numpy.testing.assert_array_equal(dataset[position], document)
    numpy.testing.assert_array_equal(dataset.document_indices, numpy.arange(len(documents) + 1))


def test_no_output_visible_until_commit_and_none_after_failure(tmp_path):
    prefix = str(tmp_path / "shard")
    with pytest.raises(RuntimeError):
        with indexed.ShardWriter(prefix, numpy.uint16) as shard:
            shard.add_documents(numpy.arange(10), numpy.array([4, 6]))
            assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
            raise RuntimeError("simulated crash")
    assert os.listdir(tmp_path) == []


def test_dtype_choice_and_vocab_that_does_not_fit():
    assert indexed.token_dtype_for_vocab(32000) == numpy.uint16
    assert indexed.token_dtype_for_vocab(65500) == numpy.int32
    assert indexed.parse_token_dtype("auto", 70000) == numpy.int32
    assert indexed.parse_token_dtype("uint16", 65536) == numpy.uint16
    with pytest.raises(DataError, match="70000 ids but --dtype uint16"):
        indexed.parse_token_dtype("uint16", 70000)


def test_missing_output_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        indexed.ShardWriter(str(tmp_path / "nowhere" / "shard"), numpy.uint16)


@pytest.fixture
def good_shard(tmp_path):
    prefix = str(tmp_path / "good")
    documents = [numpy.array([5, 6, 7, 3]), numpy.array([8, 3]), numpy.array([9, 9, 9, 3])]
    write_with_shard_writer(prefix, documents, numpy.uint16, streaming=False)
    return prefix


def test_good_shard_passes_every_check(good_shard):
    index = indexed.check_shard(good_shard, eod_id=3, vocab_size=10)
    assert (index.num_documents, index.num_tokens) == (3, 10)


def test_truncated_bin(good_shard):
    with open(good_shard + ".bin", "r+b") as stream:
        stream.truncate(15)
    with pytest.raises(DataError, match=r"good\.bin: 15 bytes, but .* 20 bytes \(truncated\)"):
        indexed.check_shard(good_shard)


def test_index_of_another_format_version(good_shard):
    with open(good_shard + ".idx", "r+b") as stream:
        stream.seek(9)
        stream.write(struct.pack("<Q", 2))
    with pytest.raises(DataError, match="index format version 2"):
        indexed.check_shard(good_shard)


def test_not_an_index(good_shard):
    with open(good_shard + ".idx", "r+b") as stream:
        stream.write(b"NOTANIDX!")
    with pytest.raises(DataError, match="bad magic"):
        indexed.check_shard(good_shard)


def test_truncated_index(good_shard):
    size = os.path.getsize(good_shard + ".idx")
    with open(good_shard + ".idx", "r+b") as stream:
        stream.truncate(size - 8)
    with pytest.raises(DataError, match="truncated or corrupt index"):
        indexed.check_shard(good_shard)


def test_corrupt_pointer(good_shard):
    pointers_offset = indexed.HEADER_BYTES + 4 * 3
    with open(good_shard + ".idx", "r+b") as stream:
        stream.seek(pointers_offset + 8)
        stream.write(struct.pack("<q", 6))
    with pytest.raises(DataError, match="sequence 1 points at byte 6, but the lengths before it put it at 8"):
        indexed.check_shard(good_shard)


def test_missing_eod_and_out_of_vocabulary_ids(good_shard):
    with pytest.raises(DataError, match="do not end with EOD id 2"):
        indexed.check_shard(good_shard, eod_id=2)
    with pytest.raises(DataError, match="token id 9 .* outside the tokenizer's vocabulary of 9"):
        indexed.check_shard(good_shard, vocab_size=9)
