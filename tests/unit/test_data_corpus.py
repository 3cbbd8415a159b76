"""data_tools.corpus: the stdlib docstring/comment corpus used by the smoke run."""
import json
import os

import pytest

from data_tools.corpus import write_stdlib_corpus
from data_tools.errors import DataError


def test_stdlib_corpus_is_deterministic_prose_within_the_budget(tmp_path):
    first = write_stdlib_corpus(str(tmp_path / "a.jsonl"), max_bytes=300_000)
    second = write_stdlib_corpus(str(tmp_path / "b.jsonl"), max_bytes=300_000)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert 250_000 < first["bytes"] == os.path.getsize(tmp_path / "a.jsonl") <= 300_000
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(records) == first["documents"] == second["documents"] > 100
    assert all(len(record["text"]) >= 64 and record["source"] for record in records)
    # Real prose: mostly letters and spaces, docstrings and comments both present.
    letters = sum(character.isalpha() or character == " " for record in records for character in record["text"])
    assert letters / sum(len(record["text"]) for record in records) > 0.8
    assert any(":" in record["source"] and record["source"].split(":")[-1].isdigit() for record in records)
    assert any("." in record["source"].split(":")[-1] for record in records)


def test_stdlib_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        write_stdlib_corpus(str(tmp_path / "missing" / "c.jsonl"), 1000)
    with pytest.raises(DataError, match="must be positive"):
        write_stdlib_corpus(str(tmp_path / "c.jsonl"), 0)
