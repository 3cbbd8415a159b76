"""pretrain.config: loading, batch derivation, DeepSpeed JSON merge, validation messages."""
import json
from pathlib import Path

import pytest

from cheems_parallel.config import ConfigError
from pretrain.config import (config_problems, deepspeed_config_dict, derive_batch, load_config, validate,
                             world_size_from_environment)

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
TINY = REPOSITORY_ROOT / "configs" / "cheems-tiny.yaml"


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    """A real (small) sentencepiece model: validation loads it to compare its vocabulary with the model's."""
    from data_tools.corpus import iter_stdlib_documents
    from data_tools.tokenizer import train_sentencepiece

    directory = tmp_path_factory.mktemp("tokenizer")
    documents = [document["text"] for _, document in zip(range(600), iter_stdlib_documents())]
    train_sentencepiece(documents, str(directory / "tok"), vocab_size=400)
    return directory / "tok.model"


def write_shard(prefix, documents, length=20, vocab_size=None):
    """A real shard of `documents` documents (validation reads its index; token contents are read later)."""
    import numpy
    from data_tools.indexed import ShardWriter

    with ShardWriter(str(prefix), numpy.uint16) as writer:
        for _ in range(documents):
            writer.add_tokens(numpy.arange(4, 4 + length))
            writer.end_document()
        writer.commit()
    if vocab_size is not None:
        Path(f"{prefix}.meta.json").write_text(json.dumps({"vocab_size": vocab_size, "eod": 3}))


@pytest.fixture
def data_files(tmp_path, tokenizer_model):
    """The shard validation checks: files present, an index whose every split holds documents."""
    write_shard(tmp_path / "shard", 1000)
    return [f"data.blend={tmp_path / 'shard'}", f"data.tokenizer_model={tokenizer_model}"]


def test_tiny_config_loads_with_every_section(data_files):
    config = load_config(TINY, data_files)
    assert config.model.hidden_size == 128 and config.train.zero_stage == 1 and config.schedule.kind == "wsd"
    batch = validate(config, world_size=1)
    assert batch.global_batch_size == config.train.global_batch_size


@pytest.mark.parametrize("world, tensor_parallel, micro, global_batch, accumulation, data_parallel", [
    (1, 1, 4, 8, 2, 1), (2, 1, 4, 8, 1, 2), (4, 2, 2, 16, 4, 2), (8, 2, 1, 4, 1, 4)])
def test_batch_derivation(world, tensor_parallel, micro, global_batch, accumulation, data_parallel, data_files):
    config = load_config(TINY, data_files + [f"parallel.tensor_parallel_size={tensor_parallel}",
                                             f"train.micro_batch_size={micro}", f"train.global_batch_size={global_batch}"])
    batch = derive_batch(config, world)
    assert (batch.data_parallel_size, batch.gradient_accumulation_steps) == (data_parallel, accumulation)
    assert batch.micro_batch_size * batch.data_parallel_size * batch.gradient_accumulation_steps == global_batch


def test_global_batch_from_accumulation_when_unset(data_files):
    config = load_config(TINY, data_files + ["train.global_batch_size=null", "train.gradient_accumulation_steps=3",
                                             "train.micro_batch_size=2"])
    assert derive_batch(config, 2).global_batch_size == 2 * 2 * 3


@pytest.mark.parametrize("overrides, world, message", [
    (["train.global_batch_size=10", "train.micro_batch_size=4"], 1, "not divisible by train.micro_batch_size"),
    (["train.global_batch_size=8", "train.micro_batch_size=4"], 4, "x 4 = 16"),
    (["train.global_batch_size=16", "train.micro_batch_size=4", "train.gradient_accumulation_steps=3"], 1, "disagrees"),
    (["parallel.tensor_parallel_size=2"], 3, "world size 3 is not divisible"),
])
def test_batch_errors(overrides, world, message, data_files):
    config = load_config(TINY, data_files + overrides)
    with pytest.raises(ConfigError, match=message):
        derive_batch(config, world)


@pytest.mark.parametrize("overrides, message", [
    (["train.zero_stage=2", "parallel.pipeline_parallel_size=2"], "cannot combine with parallel.pipeline_parallel_size=2"),
    (["model.load_balance_coef=0.01", "parallel.pipeline_parallel_size=2"], "cannot combine with parallel.pipeline_parallel_size=2 (only the hidden state"),
    (["train.zero_stage=4"], "must be 0, 1, 2 or 3"),
    (["train.precision=fp16"], "must be 'bf16' or 'fp32'"),
    (["schedule.kind=linear"], "must be 'wsd' or 'cosine'"),
    (["optimizer.min_lr=1.0"], "optimizer.min_lr=1.0 must be in"),
    (["optimizer.lr=.nan"], "optimizer.lr=nan must be positive"),
    (["checkpoint.keep_last=0"], "keep_last=0 must be >= 1"),
    (["checkpoint.resume=/no/such/checkpoint"], "no such checkpoint directory"),
    (["data.tokenizer_model=/no/tok.model"], "/no/tok.model: file not found"),
    (["data.blend=0.5 /no/a 0.5 /no/b"], "/no/a.bin does not exist"),
    (["data.split=1,2"], "must be three non-negative numbers"),
    (["model.vocab_size=256"], "has 400 tokens but model.vocab_size=256"),
    (["model.num_heads=3"], "not divisible by model.num_heads=3"),
])
def test_validation_names_the_field(overrides, message, data_files):
    problems = config_problems(load_config(TINY, data_files + overrides), world_size=1)
    assert any(message in problem for problem in problems), problems


def test_validate_raises_one_line_with_the_file_and_a_count(data_files):
    config = load_config(TINY, data_files + ["train.zero_stage=9", "logging.interval=0"])
    with pytest.raises(ConfigError) as error:
        validate(config, 1)
    text = str(error.value)
    assert "\n" not in text and text.startswith(str(TINY)) and "(and 1 more problem)" in text


@pytest.mark.parametrize("overrides, message", [
    (["train.learning_rate=1"], "unknown key 'train.learning_rate'"),
    (["nonsense.key=1"], "unknown key 'nonsense'"),
    (["train.steps=many"], "train.steps: expected an integer"),
])
def test_unknown_keys_and_types(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_the_bookkeeping_field_source_is_neither_a_key_nor_listed_as_one():
    with pytest.raises(ConfigError, match="unknown key 'source'") as error:
        load_config(TINY, ["source=elsewhere.yaml"])
    known = str(error.value).split("known keys of config: ")[1]
    assert "source" not in known and "train" in known
    assert load_config(TINY).source == str(TINY)


def test_deepspeed_json_gets_the_derived_values(data_files):
    config = load_config(TINY, data_files + ["train.zero_stage=2", "train.precision=bf16", "train.micro_batch_size=2",
                                             "train.global_batch_size=8", "train.gradient_clipping=0.5"])
    batch = validate(config, 2)
    merged = deepspeed_config_dict(config, batch, clip_in_engine=True)
    assert merged["train_batch_size"] == 8 and merged["train_micro_batch_size_per_gpu"] == 2
    assert merged["gradient_accumulation_steps"] == 2 and merged["gradient_clipping"] == 0.5
    assert merged["zero_optimization"]["stage"] == 2 and merged["bf16"]["enabled"] is True
    file_values = json.loads((REPOSITORY_ROOT / "ds_config.json").read_text())
    assert merged["zero_optimization"]["reduce_bucket_size"] == file_values["zero_optimization"]["reduce_bucket_size"]
    # ZeRO-0 fp32: our optimizer clips, the engine must not clip a second time
    assert deepspeed_config_dict(config, batch, clip_in_engine=False)["gradient_clipping"] == 0.0



@pytest.mark.parametrize("overrides, expected", [
    (["train.precision=bf16", "train.zero_stage=1"], False),     # the guard reads DeepSpeed's grad norm
    (["train.precision=bf16", "train.zero_stage=2"], False),
    (["train.precision=bf16", "train.zero_stage=3"], None),      # stage 3: DeepSpeed's own check stays
    (["train.precision=bf16", "train.zero_stage=0"], None),
    (["train.precision=fp32", "train.zero_stage=1"], None),
])
def test_deepspeed_per_tensor_overflow_check_is_off_only_where_the_norm_guard_runs(overrides, expected, data_files):
    config = load_config(TINY, data_files + overrides)
    merged = deepspeed_config_dict(config, validate(config, 1), clip_in_engine=True)
    assert merged["bf16"].get("check_grad_overflow") is expected


def test_an_explicit_deepspeed_overflow_check_is_kept(data_files, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"check_grad_overflow": True}}))
    config = load_config(TINY, data_files + [f"train.deepspeed_config={path}", "train.precision=bf16",
                                             "train.zero_stage=1"])
    merged = deepspeed_config_dict(config, validate(config, 1), clip_in_engine=True)
    assert merged["bf16"]["check_grad_overflow"] is True


@pytest.mark.parametrize("content, message", [
    ({"train_batch_size": 64}, 'remove "train_batch_size"'),
    ({"optimizer": {"type": "Adam"}}, 'remove "optimizer"'),
    ({"zero_optimization": {"stage": 3}}, "disagrees with train.zero_stage=1"),
    ({"bf16": {"enabled": True}}, "bf16.enabled disagrees"),
])
def test_deepspeed_json_conflicts_are_refused(content, message, data_files, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    config = load_config(TINY, data_files + [f"train.deepspeed_config={path}", "train.precision=fp32"])
    assert any(message in problem for problem in config_problems(config, 1))


def test_invalid_deepspeed_json_names_the_line(data_files, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {,\n}')
    config = load_config(TINY, data_files + [f"train.deepspeed_config={path}"])
    assert any(f"{path}:2: invalid JSON" in problem for problem in config_problems(config, 1))


def test_world_size_from_launcher_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                 "PMIX_RANK", "PMIX_SIZE", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert world_size_from_environment() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert world_size_from_environment() == 4
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert world_size_from_environment() == 8


def test_world_size_is_read_from_the_source_the_ranks_come_from(monkeypatch):
    """A stray WORLD_SIZE without RANK, or SLURM_NTASKS in a batch shell (no srun step), is a world of one to
    discover_ranks; validating for 2 ranks there ended in a RuntimeError traceback after the model was built."""
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                 "PMIX_RANK", "PMIX_SIZE", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert world_size_from_environment() == 1
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert world_size_from_environment() == 1
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert world_size_from_environment() == 2


def test_a_split_without_documents_is_refused_before_it_hangs(tmp_path, tokenizer_model):
    """megatron-core's GPTDataset loops forever on a split with a positive weight and no documents (300
    documents give the test split of '969,30,1' none): found by validation, one line naming shard and split."""
    write_shard(tmp_path / "small", 300)
    config = load_config(TINY, [f"data.blend={tmp_path / 'small'}", f"data.tokenizer_model={tokenizer_model}"])
    with pytest.raises(ConfigError, match=r"data.split='969,30,1': .*small has 300 documents, so its test split gets none"):
        validate(config, 1)
    config = load_config(TINY, [f"data.blend={tmp_path / 'small'}", f"data.tokenizer_model={tokenizer_model}",
                                "data.split=969,30,0"])
    validate(config, 1)


def test_a_corrupt_index_is_named_by_validation(tmp_path, tokenizer_model):
    for name in ("bad.bin", "bad.idx"):
        (tmp_path / name).write_bytes(b"x")
    config = load_config(TINY, [f"data.blend={tmp_path / 'bad'}", f"data.tokenizer_model={tokenizer_model}"])
    with pytest.raises(ConfigError, match=r"data.blend: .*bad.idx: 1 bytes, shorter than"):
        validate(config, 1)


def test_shard_vocabulary_from_its_meta_json_must_match(tmp_path, tokenizer_model):
    """A shard tokenized with a larger vocabulary than the model's used to fail inside torch's embedding
    (IndexError traceback); its .meta.json says so before anything starts."""
    write_shard(tmp_path / "big", 1000, vocab_size=32000)
    config = load_config(TINY, [f"data.blend={tmp_path / 'big'}", f"data.tokenizer_model={tokenizer_model}"])
    with pytest.raises(ConfigError, match=r"big was tokenized with a 32000-token vocabulary .* model.vocab_size=8192"):
        validate(config, 1)
    write_shard(tmp_path / "other", 1000, vocab_size=500)   # the tokenizer has 400
    config = load_config(TINY, [f"data.blend={tmp_path / 'other'}", f"data.tokenizer_model={tokenizer_model}"])
    with pytest.raises(ConfigError, match=r"other.meta.json records a 500-token tokenizer .* has 400: the shard was made"):
        validate(config, 1)


@pytest.mark.parametrize("field", ["logging.run_dir", "checkpoint.dir", "data.cache_dir"])
def test_output_directories_that_cannot_be_created_are_named(field, data_files, tmp_path):
    """A run or checkpoint directory under a file ended in NotADirectoryError/FileExistsError tracebacks after
    the process group and the model were built."""
    (tmp_path / "afile").write_text("x")
    config = load_config(TINY, data_files + [f"{field}={tmp_path / 'afile' / 'run'}"])
    with pytest.raises(ConfigError, match=rf"{field}=.*afile/run: .*afile is a file, not a directory"):
        validate(config, 1)
