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


@pytest.fixture
def data_files(tmp_path, tokenizer_model):
    """The shard files validation checks exist (their contents are read later, by the datasets)."""
    for name in ("shard.bin", "shard.idx"):
        (tmp_path / name).write_bytes(b"x")
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
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert world_size_from_environment() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert world_size_from_environment() == 4
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert world_size_from_environment() == 8
