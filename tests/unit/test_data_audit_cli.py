"""Hostile inputs through the data_tools CLIs (in process, through `run_cli`): each must end in one
`error:` line and exit status 2 (or 128 + signal when interrupted), and leave no output behind.
Found by an audit; each test failed before its fix.
"""
import json
import os
import signal
import time

import numpy
import pytest

from data_tools import inspect, merge, preprocess, train_tokenizer, verify
from data_tools._cli import run_cli
from data_tools.errors import DataError
from data_tools.indexed import ShardWriter
from data_tools.inputs import ReadStats, WorkUnit, iter_documents
from data_tools.tokenizer import load_tokenizer, train_sentencepiece

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="shared data not present")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    with open(SHAKESPEARE) as stream:
        lines = stream.read().split("\n")[:3000]
    return train_sentencepiece(lines, str(tmp_path_factory.mktemp("tok") / "tok"), 400)


def one_error(capsys) -> str:
    """The single `error:` line of stderr (asserting there is exactly one and no traceback)."""
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in error, error
    return lines[0]


def listing(directory):
    return sorted(os.listdir(directory))


def shard(prefix, tokens, lengths, metadata=None):
    with ShardWriter(str(prefix), numpy.uint16) as writer:
        writer.add_documents(numpy.array(tokens), numpy.array(lengths))
        writer.commit()
    if metadata is not None:
        with open(f"{prefix}.meta.json", "w") as stream:
            json.dump(metadata, stream)


def test_input_without_documents_is_an_error_and_writes_nothing(tokenizer, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b'{"text": ""}\n{"text": "  \\n "}\n')
    before = listing(tmp_path)
    code = run_cli(preprocess.main, ["--input", str(tmp_path / "empty.jsonl"), str(tmp_path / "blank.jsonl"),
                                     "--output-prefix", str(tmp_path / "out"), "--tokenizer",
                                     tokenizer.model_path, "--workers", "1", "--no-progress"])
    assert code == 2
    error = one_error(capsys)
    assert "no documents in" in error and "(2 empty documents, 0 bad lines skipped); nothing written" in error
    assert listing(tmp_path) == before


def test_zero_documents_message_counts_what_was_skipped(tokenizer, tmp_path):
    (tmp_path / "blank.jsonl").write_bytes(b'{"text": ""}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"no documents in .*blank\.jsonl \(1 empty documents, 1 bad lines "
                                        r"skipped\); nothing written"):
        preprocess.preprocess([str(tmp_path / "blank.jsonl")], str(tmp_path / "out"), tokenizer.model_path,
                              skip_bad_lines=True)
    assert listing(tmp_path) == ["blank.jsonl"]


def test_output_prefix_naming_a_directory_is_refused(tokenizer, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "out").mkdir()
    shard(tmp_path / "s", [5, 3], [2])
    for module, arguments in (
        (preprocess, ["--input", str(tmp_path / "a.txt"), "--tokenizer", tokenizer.model_path,
                      "--output-prefix", str(tmp_path / "out") + "/"]),
        (preprocess, ["--input", str(tmp_path / "a.txt"), "--tokenizer", tokenizer.model_path,
                      "--output-prefix", str(tmp_path / "out")]),
        (merge, ["--inputs", str(tmp_path / "s"), "--output-prefix", str(tmp_path / "out") + "/"]),
        (train_tokenizer, ["--input", SHAKESPEARE, "--vocab-size", "400", "--model-prefix",
                           str(tmp_path / "out") + "/"]),
    ):
        assert run_cli(module.main, arguments) == 2
        assert "is a directory; give a path prefix inside it" in one_error(capsys)
        assert listing(tmp_path / "out") == []


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs sysfs (where nobody, root included, "
                                                             "can create files)")
def test_unwritable_output_directory_is_one_line(tokenizer, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n")
    shard(tmp_path / "s", [5, 3], [2])
    for module, arguments in (
        (preprocess, ["--input", str(tmp_path / "a.txt"), "--tokenizer", tokenizer.model_path,
                      "--output-prefix", "/sys/cheems-audit", "--workers", "1"]),
        (merge, ["--inputs", str(tmp_path / "s"), "--output-prefix", "/sys/cheems-audit"]),
    ):
        assert run_cli(module.main, arguments) == 2
        assert one_error(capsys).startswith("error: /sys/cheems-audit")


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_chunk_mb_must_be_positive_and_finite(tokenizer, tmp_path, capsys, value):
    (tmp_path / "a.txt").write_text("some text\n")
    assert run_cli(preprocess.main, ["--input", str(tmp_path / "a.txt"), "--tokenizer", tokenizer.model_path,
                                     "--output-prefix", str(tmp_path / "out"), "--chunk-mb", value]) == 2
    assert f"--chunk-mb {float(value)}: need a positive, finite number of MB" in one_error(capsys)
    assert listing(tmp_path) == ["a.txt"]


def test_lone_surrogate_is_a_bad_line_and_a_pair_is_not(tmp_path):
    path = tmp_path / "s.jsonl"
    # json.dumps writes non-ASCII as \u escapes: the emoji becomes a (valid) surrogate pair.
    path.write_text(json.dumps({"text": "smile \U0001F642"}) + "\n" + '{"text": "bad \\ud800 half"}\n'
                    + '{"text": "bad \\uDC00 too"}\n')
    unit = WorkUnit(0, str(path), "jsonl")
    with pytest.raises(DataError, match=r"s\.jsonl:2: key 'text' holds a lone UTF-16 surrogate \\ud800 "
                                        r"\(character 5\), not valid Unicode"):
        list(iter_documents(unit))
    stats = ReadStats()
    assert list(iter_documents(unit, skip_bad_lines=True, stats=stats)) == ["smile \U0001F642"]
    assert stats.bad_lines == 2


def test_preprocess_reports_a_lone_surrogate_with_its_line(tokenizer, tmp_path, capsys):
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n')
    assert run_cli(preprocess.main, ["--input", str(tmp_path / "s.jsonl"), "--tokenizer", tokenizer.model_path,
                                     "--output-prefix", str(tmp_path / "out"), "--workers", "2"]) == 2
    assert "s.jsonl:2: key 'text' holds a lone UTF-16 surrogate" in one_error(capsys)
    assert listing(tmp_path) == ["s.jsonl"]


@pytest.mark.parametrize("content, message", [
    (b"[1]", r"expected a JSON object, found list"),
    (b"\xff\xfe{}", r"not valid JSON"),
    (b'{"vocab_size": 400, "eod": "x"}', r"eod 'x' is not an id of .*tok\.model \(0 to 399, or -1 for none\)"),
    (b'{"vocab_size": 400, "eod": 5000}', r"eod 5000 is not an id of"),
    (b'{"vocab_size": 400, "pad": true}', r"pad True is not an id of"),
])
def test_bad_tokenizer_sidecar_is_named(tokenizer, tmp_path, content, message):
    model = tmp_path / "tok.model"
    model.write_bytes(open(tokenizer.model_path, "rb").read())
    (tmp_path / "tok.tokenizer.json").write_bytes(content)
    with pytest.raises(DataError, match=r"tok\.tokenizer\.json: " + message):
        load_tokenizer(str(model))


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "expected a JSON object, found list"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_bad_shard_metadata_is_named(tmp_path, capsys, content, message):
    shard(tmp_path / "s", [5, 3], [2])
    (tmp_path / "s.meta.json").write_bytes(content)
    for module in (verify, inspect):
        assert run_cli(module.main, [str(tmp_path / "s")]) == 2
        assert f"s.meta.json: {message}" in one_error(capsys)


def test_inspect_refuses_ids_outside_the_tokenizer_and_bad_counts(tokenizer, tmp_path, capsys):
    shard(tmp_path / "s", [5, 6, 3, 7, 999, 3], [3, 3])
    arguments = [str(tmp_path / "s"), "--tokenizer", tokenizer.model_path, "--samples", "2"]
    assert run_cli(inspect.main, arguments) == 2
    assert ("s.bin: document 1 holds token id 999, outside the 400 ids of" in one_error(capsys))
    assert run_cli(inspect.main, [str(tmp_path / "s"), "--samples", "-1"]) == 2
    assert "--samples -1: need 0 or more" in one_error(capsys)
    assert run_cli(inspect.main, [str(tmp_path / "s"), "--max-chars", "-5"]) == 2
    assert "--max-chars -5: need 0 or more" in one_error(capsys)


def test_verify_names_the_id_at_the_position_it_reports(tmp_path, capsys):
    shard(tmp_path / "s", [5, 450, 3, 7, 999, 3], [3, 3])
    assert run_cli(verify.main, [str(tmp_path / "s"), "--check-eod", "no"]) == 0
    capsys.readouterr()
    (tmp_path / "s.meta.json").write_text(json.dumps({"vocab_size": 400}))
    assert run_cli(verify.main, [str(tmp_path / "s"), "--check-eod", "no"]) == 2
    assert "token id 450 at token 1 is outside the tokenizer's vocabulary of 400 (largest id 999)" in \
        one_error(capsys)


def test_merge_refuses_shards_with_and_without_eod(tmp_path, capsys):
    shard(tmp_path / "with", [5, 3], [2], {"vocab_size": 400, "eod": 3, "append_eod": True})
    shard(tmp_path / "without", [5, 6], [2], {"vocab_size": 400, "eod": 3, "append_eod": False})
    before = listing(tmp_path)
    assert run_cli(merge.main, ["--inputs", str(tmp_path / "with"), str(tmp_path / "without"),
                                "--output-prefix", str(tmp_path / "merged")]) == 2
    assert "cannot merge shards with and without an EOD after each document" in one_error(capsys)
    assert listing(tmp_path) == before


def test_failed_tokenizer_training_keeps_the_previous_model(tmp_path, capsys):
    prefix = str(tmp_path / "tok")
    assert run_cli(train_tokenizer.main, ["--input", SHAKESPEARE, "--vocab-size", "400", "--model-prefix", prefix,
                                          "--sample-docs", "500"]) == 0
    capsys.readouterr()
    before = {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)}
    assert sorted(before) == ["tok.model", "tok.tokenizer.json", "tok.vocab"]
    assert run_cli(train_tokenizer.main, ["--input", SHAKESPEARE, "--vocab-size", "90000", "--model-prefix",
                                          prefix, "--sample-docs", "500"]) == 2
    assert "Vocabulary size too high" in one_error(capsys)
    assert {name: (tmp_path / name).read_bytes() for name in listing(tmp_path)} == before
    assert run_cli(train_tokenizer.main, ["--input", SHAKESPEARE, "--vocab-size", "400", "--model-prefix", prefix,
                                          "--threads", "0"]) == 2
    assert "--threads 0: sentencepiece takes 1 to 1024" in one_error(capsys)


def test_sigterm_is_handled_like_ctrl_c(capsys):
    def main(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        raise AssertionError("not interrupted")

    before = signal.getsignal(signal.SIGTERM)
    started = time.perf_counter()
    assert run_cli(main, []) == 128 + signal.SIGTERM
    assert time.perf_counter() - started < 5
    assert capsys.readouterr().err.strip() == "interrupted (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is before


def test_progress_shows_an_eta_then_the_elapsed_time(caplog):
    bar = preprocess.Progress(total_bytes=1000, enabled=True)
    bar.interactive = False
    bar.started -= 30.0            # 30 s spent, a quarter done: 90 s to go
    bar.last_drawn -= 60.0
    with caplog.at_level("INFO", logger="data_tools.preprocess"):
        bar.update(10, 100, 250)
        bar.update(40, 400, 1000, final=True)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].endswith("ETA 1:30") and " 25.0% " in lines[0]
    assert lines[1].endswith("in 0:30") and "ETA" not in lines[1]


def test_interrupted_tokenizer_training_leaves_no_model(tmp_path):
    """Ctrl-C while sentencepiece trains (in C++) takes effect when it returns: the model it has
    just written must not be left behind without its sidecar, looking finished."""
    with open(SHAKESPEARE) as stream:
        lines = stream.read().split("\n")   # trains for ~0.1 s after the last line (2 cores)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def sentences():
        yield from lines
        signal.setitimer(signal.ITIMER_REAL, 0.005)   # fires while the C++ trainer runs

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_sentencepiece(sentences(), str(tmp_path / "tok"), 2000)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert listing(tmp_path) == []


def test_ctrl_c_during_commit_never_pairs_a_new_bin_with_an_old_idx(tmp_path, monkeypatch):
    from data_tools import indexed

    prefix = str(tmp_path / "s")
    shard(prefix, [5, 3, 6, 3], [2, 2])
    rename = os.replace

    def rename_then_ctrl_c(source, destination):
        rename(source, destination)
        os.kill(os.getpid(), signal.SIGINT)   # as if Ctrl-C came during this rename

    monkeypatch.setattr(indexed.os, "replace", rename_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        shard(prefix, [7, 3, 8, 3, 9, 3], [2, 2, 2])
    monkeypatch.undo()
    assert indexed.check_shard(prefix).num_documents == 3
    assert listing(tmp_path) == ["s.bin", "s.idx"]


@pytest.mark.parametrize("field, reason", [
    ("[" * 100_000 + "]" * 100_000, "maximum recursion depth exceeded"),
    ("9" * 5000, r"Exceeds the limit \(4300 digits\) for integer string conversion"),
])
def test_json_that_python_cannot_load_is_a_bad_line(tmp_path, field, reason):
    path = tmp_path / "hostile.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "lost", "x": ' + field + "}\n")
    unit = WorkUnit(0, str(path), "jsonl")
    with pytest.raises(DataError, match=r"hostile\.jsonl:2: JSON that Python cannot load \(" + reason):
        list(iter_documents(unit))
    stats = ReadStats()
    assert list(iter_documents(unit, skip_bad_lines=True, stats=stats)) == ["fine"]
    assert stats.bad_lines == 1


def test_a_pipe_is_an_input(tokenizer, tmp_path):
    """`--input <(zcat corpus.gz)` names a pipe: it cannot seek, and needs no seek."""
    import threading

    text = "first document\n\nsecond one\n"
    (tmp_path / "file.txt").write_text(text)
    os.mkfifo(tmp_path / "pipe")
    writer = threading.Thread(target=(tmp_path / "pipe").write_text, args=(text,), daemon=True)
    writer.start()
    try:
        summary = preprocess.preprocess([str(tmp_path / "pipe")], str(tmp_path / "piped"), tokenizer.model_path)
    finally:
        writer.join(timeout=10)
    preprocess.preprocess([str(tmp_path / "file.txt")], str(tmp_path / "filed"), tokenizer.model_path)
    assert summary.documents == 2
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"piped{suffix}").read_bytes() == (tmp_path / f"filed{suffix}").read_bytes()
