"""data_tools.dataset: blends, splits, determinism, document masking and resumption.

Runs megatron-core's GPTDataset/BlendedMegatronDatasetBuilder for real over shards made from
../shared/data; the references are written here (Python loops over the tokens, Counter checks
against the shard's own tokens).
"""
import collections
import os

import numpy
import pytest
import torch

from data_tools import train_tokenizer
from data_tools.dataset import (ResumableSampler, build_data_loader, build_pretraining_datasets,
                                parse_blend)
from data_tools.errors import DataError
from data_tools.indexed import read_index
from data_tools.preprocess import preprocess

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
GRIMM = "/work/shared/data/grimm_tales.txt"
pytestmark = pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="shared data not present")
SEQ = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    prefix = str(directory / "tok")
    train_tokenizer.main(["--input", SHAKESPEARE, GRIMM, "--vocab-size", "800", "--model-prefix", prefix])
    for name, path in (("shakespeare", SHAKESPEARE), ("grimm", GRIMM)):
        preprocess([path], str(directory / name), prefix + ".model", append_eod=True)
    return {"dir": directory, "tokenizer": prefix + ".model",
            "shakespeare": str(directory / "shakespeare"), "grimm": str(directory / "grimm")}


def shard_tokens(prefix):
    index = read_index(prefix)
    return numpy.fromfile(prefix + ".bin", dtype=index.dtype)


def test_parse_blend_forms(tmp_path):
    assert parse_blend("data/a") == (["data/a"], None)
    assert parse_blend("data/a data/b.bin") == (["data/a", "data/b"], None)
    assert parse_blend("0.7 data/a 0.3 data/b") == (["data/a", "data/b"], [0.7, 0.3])
    assert parse_blend(["0.7", "data/a", "0.3", "data/b"]) == (["data/a", "data/b"], [0.7, 0.3])
    assert parse_blend([[2, "data/a"], [1, "data/b"]]) == (["data/a", "data/b"], [2.0, 1.0])
    assert parse_blend([{"weight": 0.7, "prefix": "data/a"}, {"weight": 0.3, "prefix": "data/b"}]) == (
        ["data/a", "data/b"], [0.7, 0.3])
    listing = tmp_path / "blend.yaml"
    listing.write_text("- {weight: 0.6, prefix: data/a}\n- {weight: 0.4, prefix: data/b}\n")
    assert parse_blend(str(listing)) == (["data/a", "data/b"], [0.6, 0.4])


@pytest.mark.parametrize("blend, message", [
    ("0.7 data/a 0.3", "alternates weight and prefix"),
    ("-1 data/a", "must be a positive finite number"),
    ([{"weight": 1, "file": "x"}], "unknown keys"),
    ("", "blend is empty"),
])
def test_parse_blend_errors(blend, message):
    with pytest.raises(DataError, match=message):
        parse_blend(blend)


def test_items_match_the_contract_and_the_shard(shards):
    train, valid, test = build_pretraining_datasets(
        shards["shakespeare"], shards["tokenizer"], SEQ, (50, 10, 0), split="90,10,0",
        cache_dir=str(shards["dir"] / "cache-a"))
    assert test is None and len(valid) >= 10 and len(train) >= 50
    pool = collections.Counter(shard_tokens(shards["shakespeare"]).tolist())
    drawn = collections.Counter()
    checked = min(len(train), 300)
    for index in range(checked):
        item = train[index]
        assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert item["tokens"].shape == (SEQ,) and item["tokens"].dtype == torch.int64
        assert item["labels"].dtype == torch.int64 and item["loss_mask"].dtype == torch.float32
        assert torch.equal(item["labels"][:-1], item["tokens"][1:])
        assert torch.equal(item["position_ids"], torch.arange(SEQ))
        assert bool((item["loss_mask"] == 1).all())
        drawn.update(item["tokens"].tolist())
    # Samples are windows over the documents of the training split: never a token the shard lacks.
    assert all(drawn[token] <= pool[token] for token in drawn)
    assert sum(drawn.values()) == checked * SEQ


def test_deterministic_for_a_seed_and_cached(shards):
    def first_items(seed, cache):
        train, _, _ = build_pretraining_datasets(shards["shakespeare"], shards["tokenizer"], SEQ, (40, 0, 0),
                                                 split="1,0,0", seed=seed, cache_dir=str(shards["dir"] / cache))
        return torch.stack([train[index]["tokens"] for index in range(40)])

    reference = first_items(1, "cache-b")
    assert os.listdir(shards["dir"] / "cache-b")   # the indices were cached
    assert torch.equal(first_items(1, "cache-b"), reference)    # loaded from the cache
    assert torch.equal(first_items(1, "cache-c"), reference)    # rebuilt from scratch
    assert not torch.equal(first_items(2, "cache-b"), reference)


def test_blend_follows_weights(shards):
    train, _, _ = build_pretraining_datasets(
        f"0.8 {shards['shakespeare']} 0.2 {shards['grimm']}", shards["tokenizer"], SEQ, (2000, 0, 0),
        split="1,0,0", cache_dir=str(shards["dir"] / "cache-d"))
    assert len(train) == 2000
    dataset_index = numpy.asarray(train.megatron_dataset.dataset_index)
    assert abs((dataset_index == 0).mean() - 0.8) < 0.01


def test_document_masking_segments_and_positions(shards):
    train, _, _ = build_pretraining_datasets(
        shards["shakespeare"], shards["tokenizer"], SEQ, (30, 0, 0), split="1,0,0",
        cache_dir=str(shards["dir"] / "cache-e"), document_masking=True)
    eod = 3
    resets = 0
    for index in range(30):
        item = train[index]
        segment, position = 0, 0
        for offset, token in enumerate(item["tokens"].tolist()):
            assert item["segment_ids"][offset] == segment and item["position_ids"][offset] == position
            position += 1
            if token == eod:
                segment, position = segment + 1, 0
                resets += 1
    assert resets >= 10   # Shakespeare turns are short: many samples span several documents


def test_resumption_and_data_parallel_partition(shards):
    train, _, _ = build_pretraining_datasets(shards["grimm"], shards["tokenizer"], SEQ, (64, 0, 0),
                                             split="1,0,0", cache_dir=str(shards["dir"] / "cache-f"))
    micro, ranks = 2, 2
    full = [batch["tokens"] for batch in build_data_loader(train, 0, micro * ranks, 0, 1)]
    # Two ranks after 12 consumed samples: together they give exactly the rest of the full run.
    resumed = [list(build_data_loader(train, 12, micro, rank, ranks)) for rank in range(ranks)]
    for step, (rank0, rank1) in enumerate(zip(*resumed)):
        together = torch.cat([rank0["tokens"], rank1["tokens"]])
        assert torch.equal(together, full[step + 3])
    assert len(resumed[0]) == len(full) - 3
    indices = list(ResumableSampler(10, 4, 2, 1, 2))
    assert indices == [[6, 7]]


def test_errors_name_the_problem(shards, tmp_path):
    with pytest.raises(DataError, match="missing.idx does not exist"):
        build_pretraining_datasets(str(tmp_path / "missing"), shards["tokenizer"], SEQ, (10, 0, 0))
    with pytest.raises(DataError, match="split"):
        build_pretraining_datasets(shards["grimm"], shards["tokenizer"], SEQ, (10, 0, 0), split="a,b")
    with pytest.raises(DataError, match="consumed_samples 100"):
        ResumableSampler(50, 100, 1, 0, 1)


def test_empty_split_agrees_with_megatron_cores_split_bounds():
    """data_tools.splits.empty_split against megatron-core's own split matrix and rounding (the oracle)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                         parse_and_normalize_split)
    from data_tools.splits import empty_split

    for split in ("969,30,1", "98,2,0", "1,1,1", "0,1,0", "100,0,1"):
        weights = [float(part) for part in split.split(",")]
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        for documents in range(1, 400):
            counts = [None if bounds is None else int(round(bounds[1] * documents)) - int(round(bounds[0] * documents))
                      for bounds in matrix]
            expected = next((name for name, count in zip(("train", "valid", "test"), counts) if count == 0), None)
            assert empty_split(documents, weights) == expected, (split, documents, counts)


def test_a_split_without_documents_is_an_error_not_a_hang(shards, tmp_path):
    """megatron-core's GPTDataset loops forever on a wanted split that gets no documents: refused first."""
    text = tmp_path / "five.txt"
    text.write_text("\n\n".join(f"paragraph {i} of a very small corpus" for i in range(5)) + "\n")
    prefix = str(tmp_path / "five")
    preprocess([str(text)], prefix, shards["tokenizer"], append_eod=True)
    for wanted in ((10, 2, 0), (10, 0, 0)):  # megatron-core builds a split of positive weight even if unused
        with pytest.raises(DataError, match=r"five has 5 documents, so its valid split gets none"):
            build_pretraining_datasets(prefix, shards["tokenizer"], 8, wanted, cache_dir=str(tmp_path / "cache"))
    train, valid, test = build_pretraining_datasets(prefix, shards["tokenizer"], 8, (10, 0, 0), split="1,0,0",
                                                    cache_dir=str(tmp_path / "cache"))
    assert len(train) >= 10 and valid is None and test is None
