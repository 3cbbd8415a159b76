"""Config loading and validation: each user mistake gives one clear message naming the field."""
import subprocess
import sys

import pytest

from cheems_parallel.config import ConfigError, ModelConfig, ParallelConfig, load_model_config, validate_model


@pytest.mark.parametrize("model,parallel,fragment", [
    (dict(num_experts=1000), {}, "model.num_experts=1000 must be a perfect square"),
    (dict(num_heads=6, hidden_size=192), dict(tensor_parallel_size=4), "model.num_heads=6 is not divisible by parallel.tensor_parallel_size=4"),
    (dict(num_heads=8, num_kv_heads=2), dict(tensor_parallel_size=4), "model.num_kv_heads=2 is not divisible"),
    (dict(ssd_state_size=16), {}, "model.ssd_state_size=16 must equal the head dim 32"),
    (dict(layer_pattern="SXA"), {}, "model.layer_pattern='SXA'"),
    (dict(num_layers=6), {}, "model.num_layers=6 is not a multiple of len(model.layer_pattern)=8"),
    (dict(ffn="moe"), {}, "model.ffn='moe'"),
    (dict(hidden_size=130), {}, "model.hidden_size=130 is not divisible by model.num_heads=4"),
    ({}, dict(tensor_parallel_size=2, expert_parallel_size=4), "parallel.expert_parallel_size=4 must equal"),
])
def test_validation_messages(model, parallel, fragment):
    with pytest.raises(ConfigError) as error:
        validate_model(ModelConfig(**model), ParallelConfig(**parallel))
    assert fragment in str(error.value)


def test_state_size_allowed_without_rope():
    validate_model(ModelConfig(ssd_state_size=16, ssd_rope=False), ParallelConfig())


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_and_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model.hiden_size'"):
        load_model_config(write(tmp_path, "model:\n  hiden_size: 64\n"))
    with pytest.raises(ConfigError, match=r"model.num_layers: expected an integer, got 'eight'"):
        load_model_config(write(tmp_path, "model:\n  num_layers: eight\n"))


def test_yaml_error_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:3: invalid YAML"):
        load_model_config(write(tmp_path, "model:\n  num_layers: 8\n  bad: c: d\n"))


def test_overrides_apply_and_validate(tmp_path):
    path = write(tmp_path, "model:\n  hidden_size: 64\n")
    model, _ = load_model_config(path, ["model.num_layers=16", "model.keep_window=32"])
    assert (model.hidden_size, model.num_layers, model.keep_window) == (64, 16, 32)
    with pytest.raises(ConfigError, match="num_experts=1023"):
        load_model_config(path, ["model.num_experts=1023"])


def test_every_shipped_config_loads():
    import glob
    for path in glob.glob("configs/*.yaml"):
        load_model_config(path)


def test_summary_cli():
    ok = subprocess.run([sys.executable, "-m", "cheems_parallel.summary", "configs/cheems-320m.yaml"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "total 369,493,696" in ok.stdout and "FLOPs per token" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "cheems_parallel.summary", "configs/cheems-tiny.yaml",
                          "--set", "model.num_experts=10"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "perfect square" in bad.stderr


def test_float_fields_accept_exponent_strings(tmp_path):
    # YAML 1.1 reads 3e-3 (no dot) as a string; a float field must still take it
    model, _ = load_model_config(write(tmp_path, "model:\n  init_std: 3e-3\n"), ["model.dt_min=2e-3"])
    assert model.init_std == 0.003 and model.dt_min == 0.002
    with pytest.raises(ConfigError, match="model.init_std: expected a number, got 'small'"):
        load_model_config(write(tmp_path, "model:\n  init_std: small\n"))


def test_duplicate_yaml_keys_are_refused_with_the_line(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `model:` section silently dropped the first one's keys."""
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  vocab_size: 512\nparallel:\n  tensor_parallel_size: 1\nmodel:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:5: invalid YAML \(duplicate key 'model'\)"):
        load_model_config(path)
