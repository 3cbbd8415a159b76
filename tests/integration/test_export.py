"""pretrain.export: a trained checkpoint -> model.safetensors + config.json that rebuild the same model
(logits equal to the checkpoint's model), written atomically, and a refused existing output."""
import json
import subprocess
import sys

import pytest
import torch

from tests.integration.test_pretrain_program import REPOSITORY_ROOT, environment

pytestmark = pytest.mark.slow


def test_export_round_trip(reference_run, tmp_path, single_process_group):
    from safetensors.torch import load_file

    from cheems_parallel.config import ModelConfig, ParallelConfig, from_dict
    from cheems_parallel.model import CheemsForCausalLM
    from pretrain.checkpoint import newest_valid_checkpoint
    from pretrain.generate import load_model_from_checkpoint

    # The trained checkpoint: the one-process reference run's last (tests/integration/conftest.py), only read here.
    checkpoint = newest_valid_checkpoint(reference_run / "checkpoints")
    output = tmp_path / "exports" / "exported"   # a parent that does not exist yet: created, as mkdir -p would
    command = [sys.executable, "-m", "pretrain.export", "--checkpoint", str(checkpoint), "--output", str(output)]
    done = subprocess.run(command, cwd=REPOSITORY_ROOT, env=environment(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in output.parent.iterdir()) == ["exported"]            # no .tmp left behind
    # both files readable as the user's umask allows (safetensors alone came out 0600)
    assert (output / "model.safetensors").stat().st_mode & 0o777 == (output / "config.json").stat().st_mode & 0o777

    config = from_dict(ModelConfig, json.loads((output / "config.json").read_text()), "model")
    rebuilt = CheemsForCausalLM(config, ParallelConfig())
    missing, unexpected = rebuilt.load_state_dict(load_file(output / "model.safetensors"), strict=False)
    assert not unexpected and all(name.endswith("_extra_state") for name in missing)
    trained, _ = load_model_from_checkpoint(checkpoint)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    torch.testing.assert_close(rebuilt.eval()(ids).logits, trained(ids).logits, rtol=0, atol=0)

    again = subprocess.run(command, cwd=REPOSITORY_ROOT, env=environment(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr and again.stderr.count("\n") == 1
