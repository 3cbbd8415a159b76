"""Sample text from a saved checkpoint (one process, tensor parallel 1), with the model's generate().

    python -m pretrain.generate --checkpoint smoke/run/checkpoints/step_00000200 \
        --prompt "Return the number of" --max-new-tokens 48

The model config comes from the checkpoint itself (the trainer stores the whole config in its client
state); the tokenizer from that config unless --tokenizer is given. Weights: ZeRO 0-2 checkpoints
hold the full module state in mp_rank_00_model_states.pt; ZeRO-3 ones are consolidated from the
optimizer partitions with DeepSpeed's zero_to_fp32 utilities.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from . import quiet_library_notices
from .checkpoint import CheckpointError, checkpoint_problem, read_meta

logger = logging.getLogger(__name__)


def _ensure_process_group() -> None:
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def load_model_from_checkpoint(path: str | Path):
    """(model in eval mode on CPU, the PretrainConfig dict it was trained with)."""
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(problem)
    meta = read_meta(path)
    universal = bool(meta.get("universal"))
    if not universal and (meta["layout"]["tensor_parallel"] != 1 or meta["layout"]["pipeline_parallel"] != 1):
        raise CheckpointError(f"{path}: saved with tensor/pipeline parallel > 1; sampling here needs a TP=1 checkpoint "
                              f"or its universal form (python -m pretrain.reshard {path} NEW_DIR)")
    # After the checks above: megatron-core's import (~7 s on 2 cores) is not paid to report a wrong path.
    from cheems_parallel.config import ModelConfig, ParallelConfig, from_dict
    from cheems_parallel.model import CheemsForCausalLM
    from cheems_parallel.parallel import initialize_parallel

    # ZeRO-3 names it zero_pp_rank_0_mp_rank_00_model_states.pt, the other stages mp_rank_00_model_states.pt.
    states_file = sorted(path.glob("*mp_rank_00_model_states.pt"))[0]
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    config = states["config"]
    if universal:  # pretrain.reshard's output: every parameter whole (fp32), whatever layout trained it
        weights = {folder.name: torch.load(folder / "fp32.pt", map_location="cpu", weights_only=False)["param"]
                   for folder in sorted((path / "zero").iterdir()) if (folder / "fp32.pt").is_file()}
        weights.update({name: None for name, value in states["module"].items() if value is None})  # _extra_state
    elif meta["layout"]["zero_stage"] == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        weights = states["module"]
    model_config = from_dict(ModelConfig, config["model"], "model")
    model_config.kernels = "reference"
    _ensure_process_group()
    initialize_parallel(ParallelConfig())
    model = CheemsForCausalLM(model_config, ParallelConfig())
    # megatron-core linears keep an `_extra_state` entry (None here); pass it through unchanged.
    model.load_state_dict({name: value.float() if torch.is_tensor(value) and value.is_floating_point() else value
                           for name, value in weights.items()})
    return model.eval(), config


def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int | None,
           seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long)
        out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k,
                             eod_id=tokenizer.eod, generator=generator)
        # Decode prompt and continuation together: sentencepiece drops a word-initial space from a
        # decoded slice that starts mid-text.
        texts.append(tokenizer.decode(out[0].tolist()))
    return texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.generate", description="Sample continuations from a pretrain checkpoint.",
        epilog="example: python -m pretrain.generate --checkpoint smoke/run/checkpoints/step_00000200 "
               "--prompt 'Return the' --max-new-tokens 48")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (step_NNNNNNNN)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the one the run used)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens to sample per prompt")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    arguments = parser.parse_args(argv)
    if arguments.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {arguments.max_new_tokens}: must be >= 1")
    if arguments.temperature < 0:
        parser.error(f"--temperature {arguments.temperature}: must be >= 0 (0 = greedy)")
    if arguments.top_k < 0:
        parser.error(f"--top-k {arguments.top_k}: must be >= 0 (0 = no top-k cut)")
    if any(prompt == "" for prompt in arguments.prompt):
        parser.error("--prompt '': a prompt needs at least one character")
    arguments.top_k = arguments.top_k or None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_library_notices()
    from data_tools.errors import DataError
    from data_tools.tokenizer import load_tokenizer
    try:
        model, config = load_model_from_checkpoint(arguments.checkpoint)
        tokenizer_path = arguments.tokenizer or config["data"]["tokenizer_model"]
        tokenizer = load_tokenizer(tokenizer_path)
        if tokenizer.vocab_size > config["model"]["vocab_size"]:
            raise CheckpointError(f"tokenizer {tokenizer_path}: {tokenizer.vocab_size} tokens, but the checkpoint's "
                                  f"model.vocab_size is {config['model']['vocab_size']}; use the run's tokenizer")
        prompts = arguments.prompt or ["The "]
        for prompt, text in zip(prompts, sample(model, tokenizer, prompts, arguments.max_new_tokens,
                                                arguments.temperature, arguments.top_k, arguments.seed)):
            print(f"{prompt!r} -> {text!r}")
    except (CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
