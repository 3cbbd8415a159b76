"""Long documents are encoded in segments: the ids must equal those of encoding the whole text."""
import json
import os
import re

import numpy
import pytest

from data_tools import preprocess as preprocess_module
from data_tools.indexed import read_index
from data_tools.preprocess import SEGMENT_CHARACTERS, preprocess
from data_tools.tokenizer import load_tokenizer, train_sentencepiece

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="shared data not present")


def test_segmented_long_documents_match_whole_encoding(tmp_path):
    with open(SHAKESPEARE) as stream:
        text = stream.read()
    blocks = [block for block in re.split(r"\n\s*\n", text) if block.strip()]
    train_sentencepiece(text.splitlines()[:4000], str(tmp_path / "tok"), 1000)
    tokenizer = load_tokenizer(str(tmp_path / "tok.model"))
    # Three long documents (newlines, tabs and spaces at the cut points) around short ones.
    long_documents = ["\n\n".join(blocks[:2500]), "\t".join(blocks[2500:5000]), " ".join(blocks[5000:])]
    documents = ["short one", long_documents[0], "short two", long_documents[1], long_documents[2]]
    assert all(len(document) > 3 * SEGMENT_CHARACTERS for document in long_documents)
    with open(tmp_path / "in.jsonl", "w") as stream:
        for document in documents:
            stream.write(json.dumps({"text": document}) + "\n")
    preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), str(tmp_path / "tok.model"), append_eod=True)
    index = read_index(str(tmp_path / "out"))
    tokens = numpy.fromfile(str(tmp_path / "out.bin"), dtype=index.dtype)
    for position, document in enumerate(documents):
        start = int(index.sequence_pointers[position]) // index.dtype.itemsize
        ids = tokens[start:start + int(index.sequence_lengths[position])].tolist()
        assert ids == tokenizer.encode(document) + [tokenizer.eod], position


def test_segments_cover_the_text_exactly():
    text = ("word " * 40_000) + "x" * 100_000 + (" tail" * 10)
    pieces = list(preprocess_module._segments(text))
    assert "".join(pieces) == text
    assert all(len(piece) <= SEGMENT_CHARACTERS for piece in pieces)
    assert all(piece[0] in " \n\t" for piece in pieces[1:3])
