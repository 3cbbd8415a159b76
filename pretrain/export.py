"""Export a pretrain checkpoint as consolidated safetensors + a JSON model config (TP = PP = 1 checkpoints,
or any TP through its universal form from `python -m pretrain.reshard`).

    python -m pretrain.export --checkpoint runs/tiny/checkpoints/step_00000100 --output exported/tiny

Writes OUTPUT/model.safetensors (every parameter, float32, names as in CheemsForCausalLM) and
OUTPUT/config.json (the `model` section). The folder is written under a temporary name and renamed
when complete, so a half-written export never looks valid. Weights are read the way
`pretrain.generate` reads them (the saved module state; ZeRO-3 consolidated by zero_to_fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from . import quiet_library_notices
from .checkpoint import CheckpointError


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from .generate import load_model_from_checkpoint

    output = Path(output)
    if output.exists():
        raise CheckpointError(f"{output}: already exists; choose a new output directory")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"{output.parent}: cannot create the directory ({error.strerror})") from None
    model, config = load_model_from_checkpoint(checkpoint)
    tensors = {name: tensor.detach().to(torch.float32).contiguous() for name, tensor in model.state_dict().items()
               if torch.is_tensor(tensor)}
    temporary = output.with_name(output.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file(tensors, str(temporary / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary / "model.safetensors", 0o666 & ~umask)   # save_file leaves its temporary file's 0600
    (temporary / "config.json").write_text(json.dumps(config["model"], indent=2) + "\n")
    temporary.rename(output)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.export",
        description="Export a checkpoint as model.safetensors + config.json.",
        epilog="example: python -m pretrain.export --checkpoint smoke/run/checkpoints/step_00000300 "
               "--output exported/cheems-tiny")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (step_NNNNNNNN): TP = PP = 1, or a universal one (pretrain.reshard)")
    parser.add_argument("--output", required=True, help="new directory to create for the exported files (missing parents are created)")
    arguments = parser.parse_args(argv)
    quiet_library_notices()
    try:
        path = export_checkpoint(arguments.checkpoint, arguments.output)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {arguments.checkpoint} -> {path}/model.safetensors, {path}/config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
