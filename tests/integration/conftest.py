"""Fixtures shared by the modules that run `python -m pretrain` on the shrunken cheems-tiny of
test_pretrain_program.py (its TINY overrides): that module and test_export.py. Session-scoped, so the shard,
the tokenizer and the one-process reference run are built once for both (a launch costs ~15 s of the suite)."""
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict:
    from data_tools.corpus import write_stdlib_corpus

    directory = tmp_path_factory.mktemp("pretrain_data")
    corpus = directory / "stdlib.jsonl"
    write_stdlib_corpus(str(corpus), max_bytes=400_000)
    subprocess.run([sys.executable, "-m", "data_tools.train_tokenizer", "--input", str(corpus), "--vocab-size",
                    "512", "--model-prefix", str(directory / "tok")], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "data_tools.preprocess", "--input", str(corpus), "--output-prefix",
                    str(directory / "stdlib"), "--tokenizer", str(directory / "tok.model"), "--workers", "1",
                    "--append-eod", "--no-progress"], check=True, capture_output=True)
    return {"prefix": str(directory / "stdlib"), "tokenizer": str(directory / "tok.model"), "dir": directory}


@pytest.fixture(scope="session")
def reference_run(data) -> Path:
    """The run directory of the one-process run: ZeRO-0, fp32, micro-batch 2 x accumulation 4 = global batch 8
    (checkpoints halfway, which the universal-checkpoint test compares with, and at exit; test_export.py exports
    the one at exit)."""
    from tests.integration.test_pretrain_program import STEPS, losses, run_pretrain

    run_dir = data["dir"] / "reference"
    run_pretrain(data, run_dir, extra=["checkpoint.save_at_exit=true", f"checkpoint.interval={STEPS // 2}"])
    values = losses(run_dir)
    assert len(values) == STEPS
    assert values[-1] < values[0] - 0.5, values  # it learns
    return run_dir


@pytest.fixture(scope="session")
def reference(reference_run) -> list[float]:
    """The one-process run's per-step losses, which every layout must match."""
    from tests.integration.test_pretrain_program import losses

    return losses(reference_run)
