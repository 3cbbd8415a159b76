"""data_tools.train_tokenizer / data_tools.tokenizer on real text from ../shared/data."""
import json
import os

import pytest

from data_tools import train_tokenizer
from data_tools.errors import DataError
from data_tools.tokenizer import load_tokenizer, sidecar_path

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="shared data not present")


@pytest.fixture(scope="module")
def tokenizer_prefix(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "tiny")
    assert train_tokenizer.main(["--input", SHAKESPEARE, "--vocab-size", "600",
                                 "--model-prefix", prefix, "--sample-docs", "2000"]) == 0
    return prefix


def test_sidecar_records_the_special_ids(tokenizer_prefix):
    with open(sidecar_path(tokenizer_prefix + ".model")) as stream:
        sidecar = json.load(stream)
    tokenizer = load_tokenizer(tokenizer_prefix + ".model")
    assert sidecar["vocab_size"] == tokenizer.vocab_size == 600
    assert (tokenizer.pad, tokenizer.unk, tokenizer.bos, tokenizer.eos, tokenizer.eod) == (0, 1, 2, 3, 3)
    assert {key: sidecar[key] for key in ("pad", "unk", "bos", "eos", "eod")} == {
        "pad": 0, "unk": 1, "bos": 2, "eos": 3, "eod": 3}


def test_byte_fallback_round_trips_unseen_characters(tokenizer_prefix):
    tokenizer = load_tokenizer(tokenizer_prefix + ".model")
    text = "KING RICHARD: Straße, 漢字 and émoji 🙂 never seen in training."
    ids = tokenizer.encode(text)
    assert tokenizer.unk not in ids
    assert tokenizer.decode(ids) == text
    assert all(0 <= token < tokenizer.vocab_size for token in ids)


def test_unigram_and_json_inputs(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    with open(SHAKESPEARE) as source, open(corpus, "w") as stream:
        for block in source.read().split("\n\n")[:1500]:
            stream.write(json.dumps({"body": block}) + "\n")
    prefix = str(tmp_path / "uni")
    assert train_tokenizer.main(["--input", str(corpus), "--vocab-size", "500", "--model-prefix", prefix,
                                 "--model-type", "unigram", "--json-key", "body"]) == 0
    tokenizer = load_tokenizer(prefix + ".model")
    assert tokenizer.vocab_size == 500
    assert tokenizer.decode(tokenizer.encode("To be, or not to be")) == "To be, or not to be"


def test_sample_is_deterministic(tmp_path):
    first = train_tokenizer.read_documents([SHAKESPEARE], sample_documents=50, seed=7)
    again = train_tokenizer.read_documents([SHAKESPEARE], sample_documents=50, seed=7)
    other = train_tokenizer.read_documents([SHAKESPEARE], sample_documents=50, seed=8)
    assert first == again and first != other and len(first) == 50


def test_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist; create it first"):
        train_tokenizer.main(["--input", SHAKESPEARE, "--vocab-size", "600",
                              "--model-prefix", str(tmp_path / "missing" / "tok")])
    with pytest.raises(DataError, match="tokenizer model .* does not exist"):
        load_tokenizer(str(tmp_path / "none.model"))
    (tmp_path / "garbage.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        load_tokenizer(str(tmp_path / "garbage.model"))
