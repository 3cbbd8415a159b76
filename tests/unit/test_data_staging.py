"""data_tools.staging: what a killed run left behind is removed by the next run that writes the same output,
and nothing that may still be in use is touched (another host's files, a live process's, old-style names)."""
import logging
import os
import subprocess
import sys

import numpy
import pytest

from data_tools import indexed, staging


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has exited (as a SIGKILLed writer's would be)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def touch(path, size=1000):
    with open(path, "wb") as stream:
        stream.write(b"\0" * size)
    return str(path)


def test_a_shard_write_removes_a_killed_writers_files_and_nothing_else(tmp_path, dead_pid, caplog):
    prefix = str(tmp_path / "out")
    host = staging.HOST
    orphans = [touch(f"{prefix}.bin.tmp-{host}-{dead_pid}", 1 << 20), touch(f"{prefix}.idx.tmp-{host}-{dead_pid}")]
    kept = [touch(f"{prefix}.bin.tmp-another-host-{dead_pid}"),        # a shared filesystem: not ours to judge
            touch(f"{prefix}.bin.tmp-{host}-{os.getppid()}"),          # a live process (a concurrent run)
            touch(f"{prefix}.bin.tmp-{dead_pid}"),                     # an earlier version's name: no host
            touch(f"{prefix}.bin.tmp-{host}-{dead_pid}x")]             # not a staging name
    documents = [numpy.arange(n, dtype=numpy.uint16) for n in (3, 0, 5)]
    with caplog.at_level(logging.WARNING, logger="data_tools.staging"):
        with indexed.ShardWriter(prefix, numpy.uint16) as shard:
            for document in documents:
                shard.add_tokens(document)
                shard.end_document()
            shard.commit()
    assert not any(os.path.exists(path) for path in orphans)
    assert all(os.path.exists(path) for path in kept)
    index = indexed.read_index(prefix)
    assert index.sequence_lengths.tolist() == [3, 0, 5]
    removed = [record.getMessage() for record in caplog.records if record.getMessage().startswith("removed")]
    assert len(removed) == 2 and all(f"process {dead_pid}" in message for message in removed)
    assert any("earlier version" in record.getMessage() and f"{prefix}.bin.tmp-{dead_pid}" in record.getMessage()
               for record in caplog.records)


def test_suffixed_files_and_directories_and_hosts_with_dashes(tmp_path, dead_pid, monkeypatch):
    monkeypatch.setattr(staging, "HOST", "node-12")
    model = str(tmp_path / "tok")
    tokenizer_orphans = [touch(f"{model}.tmp-node-12-{dead_pid}{suffix}") for suffix in (".model", ".vocab", ".json")]
    other_node = touch(f"{model}.tmp-node-{dead_pid}.model")             # host "node", not "node-12"
    assert sorted(staging.remove_orphans(model)) == sorted(tokenizer_orphans)
    assert os.path.exists(other_node)

    parts = tmp_path / f"out.parts-node-12-{dead_pid}"
    parts.mkdir()
    touch(parts / "unit-000001.bin")
    assert staging.remove_orphans(str(tmp_path / "out"), "parts") == [str(parts)]
    assert not parts.exists()


def test_the_staging_name_carries_host_and_pid(tmp_path):
    name = staging.staging_path(str(tmp_path / "x.bin"))
    assert name == f"{tmp_path / 'x.bin'}.tmp-{staging.HOST}-{os.getpid()}"
    touch(name)
    assert staging.remove_orphans(str(tmp_path / "x.bin")) == []       # this process's own file stays
    assert os.path.exists(name)
