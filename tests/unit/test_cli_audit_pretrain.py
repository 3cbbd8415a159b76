"""Hostile-user audit of the pretrain programs: inputs that used to end in a traceback, a hang or a
swallowed Ctrl-C. Real components only (torch tensors, signals, checkpoint folders written by publish)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_tools.errors import DataError
from pretrain.checkpoint import CheckpointError, publish, tag_for_step
from pretrain.trainer import StopSignal

REPOSITORY = Path(__file__).resolve().parents[2]


def _micro_batch(tokens):
    tokens = torch.tensor(tokens)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def test_token_ids_outside_the_model_vocabulary_stop_with_one_line():
    """A shard without .meta.json, tokenized with a larger vocabulary: an IndexError traceback from torch's
    embedding before; now a DataError naming the id and model.vocab_size."""
    from pretrain.data import _VocabularyChecked

    good = [_micro_batch([[1, 2, 3, 99]])]
    assert list(_VocabularyChecked(good, 100)) == good
    with pytest.raises(DataError, match=r"token id 29931, outside model.vocab_size=8192"):
        list(_VocabularyChecked([_micro_batch([[1, 2, 3, 29931]])], 8192))   # only in the labels
    with pytest.raises(DataError, match=r"token id -1, outside"):
        list(_VocabularyChecked([_micro_batch([[-1, 2, 3]])], 8192))


@pytest.fixture
def restore_signal_handlers():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_signal_during_setup_ends_the_process(restore_signal_handlers):
    """Ctrl-C / SIGTERM while the trainer was still building (process groups, model, dataset indices) only set
    a flag read at the end of a step that never came: the process had to be killed with -9."""
    stop = StopSignal()
    with pytest.raises(SystemExit) as raised:
        os.kill(os.getpid(), signal.SIGINT)
    assert raised.value.code == 130
    stop.armed = True   # the loop runs: remembered, acted on at the step boundary
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.received == signal.SIGTERM


def _fake_checkpoint(directory, zero_stage=1):
    temporary = directory / (tag_for_step(4) + ".tmp")
    temporary.mkdir(parents=True)
    (temporary / "mp_rank_00_model_states.pt").write_bytes(b"w")
    final = directory / tag_for_step(4)
    publish(temporary, final, {"step": 4, "layout": {"tensor_parallel": 1, "pipeline_parallel": 1,
                                                     "zero_stage": zero_stage, "data_parallel": 1}})
    return final


def test_reshard_output_that_is_a_file_is_one_line(tmp_path):
    """`python -m pretrain.reshard CKPT some/file` ended in FileExistsError from mkdir."""
    from pretrain.reshard import convert

    checkpoint = _fake_checkpoint(tmp_path / "checkpoints")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl: exists and is not a directory"):
        convert(checkpoint, tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("arguments, fragment", [
    (["--top-k", "-1"], "--top-k -1: must be >= 0"),
    (["--max-new-tokens", "-3"], "--max-new-tokens -3: must be >= 1"),    # printed nothing, exit 0
    (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),       # sampled from the inverted distribution
    (["--prompt", ""], "--prompt '': a prompt needs at least one character"),  # torch.stack traceback
])
def test_generate_refuses_impossible_sampling_arguments(arguments, fragment, tmp_path, capsys):
    from pretrain.generate import main

    with pytest.raises(SystemExit) as raised:
        main(["--checkpoint", str(tmp_path), *arguments])
    assert raised.value.code == 2 and fragment in capsys.readouterr().err


def test_generate_top_k_zero_and_a_larger_tokenizer(tmp_path, capsys):
    """--top-k 0 was passed to torch.topk as k=0: a RuntimeError traceback from inside generate(). A real
    (tiny, untrained) model saved the way the trainer's checkpoints hold it, sampled through main()."""
    from dataclasses import asdict

    from cheems_parallel.config import ModelConfig, ParallelConfig
    from cheems_parallel.model import CheemsForCausalLM
    from cheems_parallel.parallel import initialize_parallel
    from data_tools.corpus import iter_stdlib_documents
    from data_tools.tokenizer import train_sentencepiece
    from pretrain.generate import _ensure_process_group, main

    documents = [document["text"] for _, document in zip(range(600), iter_stdlib_documents())]
    train_sentencepiece(documents, str(tmp_path / "tok"), vocab_size=400)
    model_config = ModelConfig(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, layer_pattern="SA",
                               intermediate_size=64, ssd_chunk_size=16, num_experts=16, experts_per_head=2,
                               expert_retrieval_dim=8)
    _ensure_process_group()
    initialize_parallel(ParallelConfig())
    model = CheemsForCausalLM(model_config, ParallelConfig())
    temporary = tmp_path / "checkpoints" / (tag_for_step(1) + ".tmp")
    temporary.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "config": {"model": asdict(model_config),
                                                         "data": {"tokenizer_model": str(tmp_path / "tok.model")}}},
               temporary / "mp_rank_00_model_states.pt")
    checkpoint = tmp_path / "checkpoints" / tag_for_step(1)
    publish(temporary, checkpoint, {"step": 1, "layout": {"tensor_parallel": 1, "pipeline_parallel": 1,
                                                          "zero_stage": 1, "data_parallel": 1}})
    assert main(["--checkpoint", str(checkpoint), "--top-k", "0", "--max-new-tokens", "3", "--prompt", "Return"]) == 0
    assert capsys.readouterr().out.startswith("'Return' -> ")

    # A larger tokenizer than the model's vocabulary: an IndexError traceback from the embedding before.
    train_sentencepiece(documents, str(tmp_path / "big"), vocab_size=500)
    assert main(["--checkpoint", str(checkpoint), "--tokenizer", str(tmp_path / "big.model"), "--prompt", "Return"]) == 2
    assert capsys.readouterr().err.strip().endswith("big.model: 500 tokens, but the checkpoint's model.vocab_size is "
                                                    "400; use the run's tokenizer")


def test_export_of_a_run_directory_names_a_checkpoint_inside_in_one_line(tmp_path):
    """Through the real command line: stderr is exactly the error line (megatron-core's import warning about
    Transformer Engine used to add two lines before it)."""
    checkpoint = _fake_checkpoint(tmp_path / "run" / "checkpoints")
    result = subprocess.run([sys.executable, "-m", "pretrain.export", "--checkpoint", str(tmp_path / "run"),
                             "--output", str(tmp_path / "exported")], capture_output=True, text=True, timeout=120,
                            cwd=REPOSITORY)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and f"is not a checkpoint but holds some: name one, e.g. {checkpoint}" in lines[0]
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("environment, fragment", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"RANK": "5", "WORLD_SIZE": "2"}, "rank 5 of world size 2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
])
def test_check_reads_the_launch_environment_as_a_launch_does(environment, fragment):
    """`--check` under a launcher environment that a real run refuses fails the same way: one line, exit 2
    (it used to print "ok" for a RANK without WORLD_SIZE and end in a traceback for a non-integer RANK)."""
    launch_names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {name: value for name, value in os.environ.items()
           if name not in launch_names and not name.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(environment)
    result = subprocess.run([sys.executable, "-m", "pretrain", "--config", "configs/cheems-tiny.yaml", "--check"],
                            cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]
