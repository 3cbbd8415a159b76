"""Turn a training checkpoint into DeepSpeed's universal format, so a run can resume on another layout.

    python -m pretrain.reshard runs/x/checkpoints/step_00004000 runs/x/universal
    python -m pretrain --config ... --set checkpoint.resume=runs/x/universal/step_00004000

A ZeRO-1/2 checkpoint holds one optimizer partition per data-parallel rank and one model file per
tensor-parallel rank, so it only loads into the layout that wrote it. DeepSpeed's converter
(deepspeed.checkpoint.ds_to_universal) joins every parameter's fp32 weights and Adam moments into whole
tensors; the trainer then loads them (`checkpoint.load_universal`) into any tensor x data-parallel layout
with ZeRO-1/2, slicing each parameter as that layout needs. Pipeline stages are not resharded.

The output is written under `<name>.tmp` and renamed when complete, with the same meta.json (step, data
position, the layout it came from, every file's size) as the trainer's checkpoints; the source is only read.
"""
import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from .checkpoint import CheckpointError, checkpoint_problem, publish, read_meta

logger = logging.getLogger("pretrain.reshard")


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.reshard", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("checkpoint", type=Path, help="a completed checkpoint folder (step_XXXXXXXX) of a ZeRO-1/2 run")
    parser.add_argument("output_dir", type=Path, help="where the universal checkpoint goes (output_dir/step_XXXXXXXX)")
    parser.add_argument("--workers", type=int, default=4, help="processes reading the optimizer partitions")
    return parser.parse_args(argv)


def _staging_copy(source: Path, staging: Path) -> None:
    """What DeepSpeed's converter reads: the source, with megatron-core linears' `_extra_state` entries
    (None, not tensors) dropped from the model-state files, which the converter would try to cast.
    Optimizer partitions (the bulk) are linked, not copied."""
    import torch

    staging.mkdir(parents=True)
    for file in source.iterdir():
        if file.name.endswith("_model_states.pt"):
            state = torch.load(file, map_location="cpu", weights_only=False)
            if isinstance(state.get("module"), dict):
                state["module"] = {name: value for name, value in state["module"].items() if value is not None}
            torch.save(state, staging / file.name)
        elif file.is_file():
            os.symlink(file.resolve(), staging / file.name)


def convert(source: Path, output_dir: Path, workers: int = 4) -> Path:
    problem = checkpoint_problem(source)
    if problem:
        raise CheckpointError(problem)
    meta = read_meta(source)
    if meta.get("universal"):
        raise CheckpointError(f"{source} is already a universal checkpoint")
    layout = meta.get("layout") or {}
    if layout.get("pipeline_parallel", 1) != 1:
        raise CheckpointError(f"{source}: saved with pipeline_parallel={layout['pipeline_parallel']}; "
                              "pipeline checkpoints cannot be resharded")
    if layout.get("zero_stage") not in (1, 2):
        raise CheckpointError(f"{source}: saved with zero_stage={layout.get('zero_stage')}; only ZeRO-1/2 checkpoints "
                              "are converted (a ZeRO-0 checkpoint already loads at any data-parallel size)")
    final = output_dir / source.name
    if final.exists():
        raise CheckpointError(f"{final}: already exists; choose another output directory")
    if workers < 1:
        raise CheckpointError(f"--workers {workers} must be >= 1")
    if output_dir.exists() and not output_dir.is_dir():
        raise CheckpointError(f"{output_dir}: exists and is not a directory; choose another output directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"{output_dir}: cannot create it ({error.strerror})") from None
    staging, temporary = output_dir / (source.name + ".staging"), output_dir / (source.name + ".tmp")
    for leftover in (staging, temporary):  # from a conversion killed earlier
        shutil.rmtree(leftover, ignore_errors=True)

    from deepspeed.checkpoint import ds_to_universal

    started = time.perf_counter()
    try:
        _staging_copy(source, staging)
        # Checkpoints saved before the trainer recorded the tensor-parallel split lack
        # universal_checkpoint_info; with one TP rank nothing needs splitting, so the converter may add it.
        inject = layout.get("tensor_parallel", 1) == 1
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(staging), output_folder=str(temporary), num_extract_workers=workers,
            num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True, inject_missing_state=inject))
    except (AssertionError, KeyError, ValueError, RuntimeError) as error:
        shutil.rmtree(temporary, ignore_errors=True)
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{source}: DeepSpeed's universal converter failed: {detail}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    publish(temporary, final, {"step": meta.get("step"), "consumed_samples": meta.get("consumed_samples"),
                               "layout": layout, "model": meta.get("model"), "universal": True,
                               "converted_from": str(source.resolve())})
    logger.info("wrote universal checkpoint %s (step %s, from layout %s) in %.1f s", final, meta.get("step"),
                layout, time.perf_counter() - started)
    return final


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        final = convert(arguments.checkpoint, arguments.output_dir, arguments.workers)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"resume any tensor x data-parallel layout (ZeRO-1/2) with: --set checkpoint.resume={final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
