"""The preprocess CLI as a whole program (subprocesses, worker pools): round trip through
megatron-core's own IndexedDataset, worker-count invariance, the megatron writer, bad inputs
(exit status 2, one line naming file:line, no half-written output), a 100 MB document, and the
CLIs' --help and start-up imports.
"""
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import unicodedata

import numpy
import pytest

from data_tools.tokenizer import train_sentencepiece

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
GRIMM = "/work/shared/data/grimm_tales.txt"
pytestmark = pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="shared data not present")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(module, *arguments, check=True):
    result = subprocess.run([sys.executable, "-m", f"data_tools.{module}", *map(str, arguments)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def blocks(path):
    with open(path, encoding="utf-8") as stream:
        return [block.strip("\n") for block in re.split(r"\n\s*\n", stream.read()) if block.strip()]


def normalised(text):
    """What sentencepiece's nmt_nfkc normaliser keeps: NFKC, whitespace runs as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    tokenizer = str(directory / "tok")
    run("train_tokenizer", "--input", SHAKESPEARE, GRIMM, "--vocab-size", "2000", "--model-prefix", tokenizer)
    documents = blocks(SHAKESPEARE)[:3000] + blocks(GRIMM)[:1000]
    with open(directory / "a.jsonl", "w") as stream:
        for document in documents[:2000]:
            stream.write(json.dumps({"text": document}) + "\n")
    with gzip.open(directory / "b.jsonl.gz", "wt") as stream:
        for document in documents[2000:3000]:
            stream.write(json.dumps({"text": document}) + "\n")
    with open(directory / "c.txt", "w") as stream:
        stream.write("\n\n".join(documents[3000:]) + "\n")
    inputs = [str(directory / name) for name in ("a.jsonl", "b.jsonl.gz", "c.txt")]
    return {"dir": directory, "tokenizer": tokenizer + ".model", "inputs": inputs, "documents": documents}


def test_round_trip_through_megatron_indexed_dataset(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from data_tools.tokenizer import load_tokenizer

    prefix = corpus["dir"] / "round"
    result = run("preprocess", "--input", *corpus["inputs"], "--output-prefix", prefix,
                 "--tokenizer", corpus["tokenizer"], "--workers", 2, "--chunk-mb", 0.05, "--append-eod")
    assert re.search(r"4,000 docs, [\d,]+ tokens, [\d,]+ bytes in [\d.]+ s = [\d.]+M tokens/s", result.stdout)
    tokenizer = load_tokenizer(corpus["tokenizer"])
    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == len(corpus["documents"])
    for position, document in enumerate(corpus["documents"]):
        ids = dataset[position]
        assert ids[-1] == tokenizer.eod
        assert normalised(tokenizer.decode(ids[:-1].tolist())) == normalised(document), position
    assert run("verify", prefix).returncode == 0


def read_bytes(prefix):
    return [open(f"{prefix}{suffix}", "rb").read() for suffix in (".bin", ".idx")]


def test_worker_count_chunking_and_writer_do_not_change_the_output(corpus):
    outputs = []
    for name, options in (("one", ["--workers", 1]),
                          ("two", ["--workers", 2, "--chunk-mb", 0.02]),
                          ("megatron", ["--workers", 2, "--writer", "megatron"])):
        prefix = corpus["dir"] / name
        run("preprocess", "--input", *corpus["inputs"], "--output-prefix", prefix,
            "--tokenizer", corpus["tokenizer"], *options)
        outputs.append(read_bytes(prefix))
    assert outputs[0] == outputs[1] == outputs[2]


def leftovers(directory, stem):
    return sorted(name for name in os.listdir(directory) if name.startswith(stem))


@pytest.mark.parametrize("content, arguments, message", [
    (b'{"text": "fine"}\n{"text": oops}\n', [], r"bad\.jsonl:2: malformed JSON"),
    (b'{"text": "fine"}\n{"body": "x"}\n', [], r"bad\.jsonl:2: no key 'text'"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', [], r"bad\.jsonl:2: not UTF-8"),
])
def test_bad_input_stops_with_one_line_and_no_output(corpus, tmp_path, content, arguments, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    result = run("preprocess", "--input", tmp_path / "bad.jsonl", "--output-prefix", tmp_path / "out",
                 "--tokenizer", corpus["tokenizer"], "--workers", 2, *arguments, check=False)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and re.search(message, error_lines[0]), result.stderr
    assert "Traceback" not in result.stderr
    assert leftovers(tmp_path, "out") == []


def test_skip_bad_lines_counts_and_reports(corpus, tmp_path):
    (tmp_path / "mixed.jsonl").write_bytes(
        b'{"text": "one"}\n{"text": oops}\n{"text": ""}\n{"body": "x"}\n{"text": "caf\xe9"}\n{"text": "two"}\n')
    result = run("preprocess", "--input", tmp_path / "mixed.jsonl", "--output-prefix", tmp_path / "out",
                 "--tokenizer", corpus["tokenizer"], "--skip-bad-lines")
    assert "2 docs" in result.stdout and "skipped 1 empty documents, 3 bad lines" in result.stdout
    assert "mixed.jsonl:2: malformed JSON" in result.stderr and "mixed.jsonl:5: not UTF-8" in result.stderr
    metadata = json.loads((tmp_path / "out.meta.json").read_text())
    assert (metadata["documents"], metadata["bad_lines_skipped"], metadata["empty_documents_skipped"]) == (2, 3, 1)


def test_missing_output_directory_and_tokenizer(corpus, tmp_path):
    result = run("preprocess", "--input", corpus["inputs"][0], "--output-prefix", tmp_path / "no" / "out",
                 "--tokenizer", corpus["tokenizer"], check=False)
    assert result.returncode == 2 and "does not exist; create it first" in result.stderr
    result = run("preprocess", "--input", corpus["inputs"][0], "--output-prefix", tmp_path / "out",
                 "--tokenizer", tmp_path / "none.model", check=False)
    assert result.returncode == 2 and "none.model does not exist" in result.stderr


def test_vocab_that_does_not_fit_the_dtype(corpus, tmp_path):
    symbols = [f"<extra{number}>" for number in range(70_000)]
    with open(SHAKESPEARE) as stream:
        lines = stream.read().split("\n")[:3000]
    big = train_sentencepiece(lines, str(tmp_path / "big"), 70_400,
                              extra_options={"user_defined_symbols": symbols, "hard_vocab_limit": False})
    assert big.vocab_size > 65_535
    result = run("preprocess", "--input", corpus["inputs"][0], "--output-prefix", tmp_path / "out",
                 "--tokenizer", big.model_path, "--dtype", "uint16", check=False)
    assert result.returncode == 2 and "--dtype uint16 holds ids up to 65535" in result.stderr
    assert leftovers(tmp_path, "out") == []
    run("preprocess", "--input", corpus["inputs"][0], "--output-prefix", tmp_path / "out",
        "--tokenizer", big.model_path)
    assert "int32" in run("inspect", tmp_path / "out", "--samples", 0).stdout


def test_verify_and_inspect_report_corruption(corpus, tmp_path):
    prefix = tmp_path / "shard"
    run("preprocess", "--input", corpus["inputs"][0], "--output-prefix", prefix,
        "--tokenizer", corpus["tokenizer"], "--append-eod")
    description = run("inspect", prefix, "--samples", 2).stdout
    assert "documents    2,000" in description and "--- document" in description
    size = os.path.getsize(f"{prefix}.bin")
    with open(f"{prefix}.bin", "r+b") as stream:
        stream.truncate(size - 10)
    for module in ("verify", "inspect"):
        result = run(module, prefix, check=False)
        assert result.returncode == 2
        assert f"shard.bin: {size - 10} bytes" in result.stderr and "(truncated)" in result.stderr


def test_merge(corpus, tmp_path):
    for name, source in (("x", corpus["inputs"][0]), ("y", corpus["inputs"][2])):
        run("preprocess", "--input", source, "--output-prefix", tmp_path / name,
            "--tokenizer", corpus["tokenizer"], "--append-eod")
    run("preprocess", "--input", corpus["inputs"][0], corpus["inputs"][2], "--output-prefix",
        tmp_path / "both", "--tokenizer", corpus["tokenizer"], "--append-eod")
    run("merge", "--inputs", tmp_path / "x", tmp_path / "y", "--output-prefix", tmp_path / "merged")
    assert read_bytes(tmp_path / "merged") == read_bytes(tmp_path / "both")
    assert run("verify", tmp_path / "merged").returncode == 0


def test_preprocess_imports_neither_torch_nor_megatron():
    code = ("import sys, data_tools.preprocess, data_tools.verify, data_tools.inspect; "
            "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'megatron')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("module", ["train_tokenizer", "preprocess", "inspect", "verify", "merge"])
def test_help_explains_every_flag(module):
    result = run(module, "--help")
    assert "example:" in result.stdout
    parser = __import__(f"data_tools.{module}", fromlist=["build_parser"]).build_parser()
    for action in parser._actions:
        assert action.help, f"{module}: {action.option_strings or action.dest} has no help"
        for flag in action.option_strings:
            assert flag in result.stdout


@pytest.mark.slow
def test_huge_document_streams_in_bounded_memory(tmp_path):
    """A 100 MB JSONL line: the ids are written in segments, never held as one Python list."""
    symbols = [(f"spell{number:02d}") * 8 for number in range(20)]
    with open(SHAKESPEARE) as stream:
        lines = stream.read().split("\n")[:3000]
    tokenizer = train_sentencepiece(lines, str(tmp_path / "tok"), 600,
                                    extra_options={"user_defined_symbols": symbols})
    words = [symbols[number % 20] + (" " if number % 3 else ". The") for number in range(1_800_000)]
    text = " ".join(words)
    assert len(text) > 100_000_000
    with open(tmp_path / "huge.jsonl", "w") as stream:
        stream.write(json.dumps({"text": "a small one"}) + "\n")
        stream.write(json.dumps({"text": text}) + "\n")
    code = ("from data_tools.preprocess import main; "
            f"main(['--input', {str(tmp_path / 'huge.jsonl')!r}, '--output-prefix', {str(tmp_path / 'huge')!r}, "
            f"'--tokenizer', {tokenizer.model_path!r}, '--workers', '1', '--append-eod', '--no-progress']); "
            # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) parent across exec.
            "print('peak', [int(line.split()[1]) * 1024 for line in open('/proc/self/status') "
            "if line.startswith('VmHWM')][0])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.split("peak")[-1])
    # Reading and parsing the line needs ~2-3 copies of it (measured: 346 MB in all for this
    # 107 MB line); encoding it in one sentencepiece call, or holding its 4.8M ids as a Python
    # list, would add more than one further copy (measured: ~600 MB).
    assert peak < 3 * len(text) + 100e6, f"peak RSS {peak / 1e6:.0f} MB"
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    dataset = IndexedDataset(str(tmp_path / "huge"))
    assert len(dataset) == 2
    ids = dataset[1]
    assert ids[-1] == tokenizer.eod
    decoded = tokenizer.decode(numpy.asarray(ids[:-1]).tolist())
    assert decoded == " ".join(text.split())   # sentencepiece collapses whitespace runs


def die_like_an_oom_kill(task):
    """Stands in for encode_unit in a worker that the OS kills mid-unit."""
    os._exit(137)


@pytest.mark.timeout(120)
def test_dead_worker_stops_the_run_instead_of_hanging(corpus, tmp_path, monkeypatch):
    from data_tools import preprocess as preprocess_module
    from data_tools.errors import DataError

    monkeypatch.setattr(preprocess_module, "encode_unit", die_like_an_oom_kill)
    with pytest.raises(DataError, match=r"a worker process died while encoding"):
        preprocess_module.preprocess([corpus["inputs"][0]], str(tmp_path / "out"), corpus["tokenizer"], workers=2)
    assert leftovers(tmp_path, "out") == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum, whole_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_signal_mid_run_leaves_nothing_and_no_traceback(corpus, tmp_path, signum, whole_group):
    """`kill` (SIGTERM, to the main process) or Ctrl-C (SIGINT, to the whole process group) while
    the workers encode: exit 128 + signal, one line, no temporary files, no worker left over."""
    source = open(corpus["inputs"][0], "rb").read()
    with open(tmp_path / "big.jsonl", "wb") as stream:
        for _ in range(20_000_000 // len(source) + 1):
            stream.write(source)
    prefix = tmp_path / "sig"
    process = subprocess.Popen(
        [sys.executable, "-m", "data_tools.preprocess", "--input", tmp_path / "big.jsonl", "--output-prefix",
         prefix, "--tokenizer", corpus["tokenizer"], "--workers", "2", "--append-eod"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not any(name.startswith("sig.parts-") for name in os.listdir(tmp_path)):
        assert process.poll() is None and time.monotonic() < deadline, "preprocess did not start encoding"
        time.sleep(0.02)
    time.sleep(0.3)
    assert process.poll() is None, "finished before the signal: make the input larger"
    if whole_group:
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == \
        f"interrupted ({signal.Signals(signum).name})", stderr[-2000:]
    assert leftovers(tmp_path, "sig") == []
    with pytest.raises(ProcessLookupError):     # the workers are gone with the main process
        os.killpg(process.pid, 0)


def start_big_preprocess(corpus, tmp_path, prefix):
    """preprocess of a ~20 MB input with 2 workers, returned once it is encoding (its parts directory exists)."""
    source = open(corpus["inputs"][0], "rb").read()
    big = tmp_path / "big.jsonl"
    if not big.exists():
        with open(big, "wb") as stream:
            for _ in range(20_000_000 // len(source) + 1):
                stream.write(source)
    command = [sys.executable, "-m", "data_tools.preprocess", "--input", big, "--output-prefix", prefix,
               "--tokenizer", corpus["tokenizer"], "--workers", "2", "--append-eod"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 60
    while not any(name.startswith(f"{prefix.name}.parts-") for name in os.listdir(tmp_path)):
        assert process.poll() is None and time.monotonic() < deadline, "preprocess did not start encoding"
        time.sleep(0.02)
    return process, command


@pytest.mark.timeout(180)
def test_a_rerun_removes_what_a_sigkilled_run_left(corpus, tmp_path):
    """SIGKILL (the OS out of memory, a scheduler's limit) gives no chance to clean up: the staged .bin / .idx
    and the parts directory stay. The next run writing the same output removes them and says so."""
    prefix = tmp_path / "killed"
    process, command = start_big_preprocess(corpus, tmp_path, prefix)
    time.sleep(0.3)
    assert process.poll() is None, "finished before the kill: make the input larger"
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    left = leftovers(tmp_path, "killed")
    assert any(".parts-" in name for name in left) and any(".bin.tmp-" in name for name in left), left
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert leftovers(tmp_path, "killed") == ["killed.bin", "killed.idx", "killed.meta.json"]
    removed = [line for line in rerun.stderr.splitlines() if "removed" in line and "no longer runs" in line]
    assert len(removed) == len([name for name in left if ".tmp-" in name or ".parts-" in name]), rerun.stderr[-2000:]
