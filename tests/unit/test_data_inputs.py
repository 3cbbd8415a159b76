"""data_tools.inputs: documents from JSONL / text / .gz, work-unit splitting, bad-input errors.

The reference for splitting is the obvious whole-file read written here with `str.split` and
`json.loads`; reading the same file through many small work units must give the same documents
in the same order.
"""
import gzip
import json
import re

import pytest

from data_tools.errors import DataError
from data_tools.inputs import ReadStats, expand_inputs, iter_documents, plan_units

DOCUMENTS = [f"document {number}: " + "word " * (number % 7) + "end" for number in range(60)]


def read_all(paths, chunk_bytes, format_name="auto", text_mode="blocks", **options):
    stats = ReadStats()
    documents = []
    for unit in plan_units(paths, format_name, text_mode, chunk_bytes):
        documents.extend(iter_documents(unit, text_mode=text_mode, stats=stats, **options))
    return documents, stats


def write_jsonl(path, documents, key="text"):
    with open(path, "w") as stream:
        for document in documents:
            stream.write(json.dumps({key: document, "id": 1}) + "\n")


@pytest.mark.parametrize("chunk_bytes", [1, 97, 1000, 1 << 30])
def test_jsonl_units_cover_every_line_once_in_order(tmp_path, chunk_bytes):
    path = tmp_path / "corpus.jsonl"
    write_jsonl(path, DOCUMENTS)
    reference = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    documents, stats = read_all([str(path)], chunk_bytes)
    assert documents == reference
    assert stats.documents == len(reference) and stats.bytes_read == path.stat().st_size
    if chunk_bytes == 97:
        assert len(plan_units([str(path)], "auto", "blocks", chunk_bytes)) > 5


@pytest.mark.parametrize("chunk_bytes", [1, 50, 333, 1 << 30])
def test_text_blocks_units_cover_every_block_once_in_order(tmp_path, chunk_bytes):
    text = "\n\n".join(document.replace(" word", "\nword", 1) for document in DOCUMENTS)
    text = text.replace("\n\ndocument 5:", "\n   \n\n\ndocument 5:")   # a whitespace-only separator
    path = tmp_path / "corpus.txt"
    path.write_text(text + "\n")
    reference = [block.strip("\n") for block in re.split(r"\n\s*\n", text) if block.strip()]
    documents, _ = read_all([str(path)], chunk_bytes)
    assert documents == reference


def test_text_file_mode_and_gzip(tmp_path):
    (tmp_path / "a.txt").write_text("first file\n\nsecond paragraph\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as stream:
        stream.write(json.dumps({"text": "from gzip"}) + "\n")
    documents, _ = read_all([str(tmp_path / "a.txt")], 1 << 20, text_mode="file")
    assert documents == ["first file\n\nsecond paragraph"]
    documents, _ = read_all([str(tmp_path / "b.jsonl.gz")], 1)
    assert documents == ["from gzip"]


def test_malformed_json_names_file_and_line_even_inside_a_later_unit(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": document}) for document in DOCUMENTS]
    lines[41] = '{"text": "unterminated'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:42: malformed JSON"):
        read_all([str(path)], chunk_bytes=200)
    documents, stats = read_all([str(path)], chunk_bytes=200, skip_bad_lines=True)
    assert stats.bad_lines == 1 and len(documents) == len(DOCUMENTS) - 1
    assert "bad.jsonl:42" in stats.bad_line_examples[0]


def test_missing_key_and_non_string_value(tmp_path):
    path = tmp_path / "keys.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text key"}\n{"text": 5}\n')
    with pytest.raises(DataError, match=r"keys\.jsonl:2: no key 'text' \(keys: body\)"):
        read_all([str(path)], 1 << 20)
    documents, stats = read_all([str(path)], 1 << 20, skip_bad_lines=True)
    assert documents == ["fine"] and stats.bad_lines == 2
    documents, _ = read_all([str(path)], 1 << 20, json_key="body", skip_bad_lines=True)
    assert documents == ["no text key"]


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at column 14\)"):
        read_all([str(path)], 1 << 20)
    text_path = tmp_path / "latin1.txt"
    text_path.write_bytes(b"good block\n\nbad \xff block\n")
    with pytest.raises(DataError, match=r"latin1\.txt:3: not UTF-8"):
        read_all([str(text_path)], 1 << 20)


def test_empty_documents_are_skipped_and_counted(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n{"text": "   \\n  "}\n\n{"text": "real"}\n')
    documents, stats = read_all([str(path)], 1 << 20)
    assert documents == ["real"]
    assert (stats.documents, stats.empty_documents, stats.bad_lines) == (1, 2, 0)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    payload = gzip.compress(("\n".join(json.dumps({"text": d}) for d in DOCUMENTS * 20)).encode())
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: corrupt or truncated gzip"):
        read_all([str(path)], 1 << 20)


def test_expand_inputs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.jsonl", "a.jsonl", "sub/c.txt"):
        (tmp_path / name).write_text("x\n")
    assert expand_inputs([str(tmp_path / "*.jsonl")]) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert expand_inputs([str(tmp_path / "sub")]) == [str(tmp_path / "sub" / "c.txt")]
    with pytest.raises(DataError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
