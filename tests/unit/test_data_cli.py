"""The CLI entry convention: a DataError becomes one line on stderr and exit status 2."""
import numpy

from data_tools import inspect, verify
from data_tools._cli import run_cli
from data_tools.indexed import ShardWriter


def test_data_error_is_one_line_and_exit_2(tmp_path, capsys):
    assert run_cli(verify.main, [str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert error.strip().splitlines() == [f"error: {tmp_path / 'nothing'}.idx does not exist "
                                          f"(expected a shard prefix without .bin/.idx)"]


def test_verify_and_inspect_in_process(tmp_path, capsys):
    prefix = str(tmp_path / "shard")
    with ShardWriter(prefix, numpy.uint16) as shard:
        shard.add_documents(numpy.array([7, 8, 3, 9, 3]), numpy.array([3, 2]))
        shard.commit()
    assert run_cli(verify.main, [prefix, "--check-eod", "no"]) == 0
    assert "OK (2 documents, 5 tokens" in capsys.readouterr().out
    # EOD requested but unknown (no tokenizer, no metadata): a clear error, not a guess.
    assert run_cli(verify.main, [prefix, "--check-eod", "yes"]) == 2
    assert "no EOD id to check; pass --tokenizer" in capsys.readouterr().err
    assert run_cli(inspect.main, [prefix, "--samples", "0"]) == 0
    output = capsys.readouterr().out
    assert "documents    2" in output and "tokens       5" in output and "max 3" in output
