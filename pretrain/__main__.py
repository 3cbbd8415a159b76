"""`python -m pretrain --config configs/X.yaml [--set key=value ...]`: the pretraining entry point.

Also started as `deepspeed [--hostfile H] --module pretrain ...` and `torchrun -m pretrain ...`; ranks
come from the launcher's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. The whole
configuration is validated before any process group starts; user mistakes print one line
(`error: <file>: <field>: <problem>`) and exit with status 2.

Exit status: 0 done (or train.exit_at_step reached), 2 a user error (config, data, checkpoint),
3 too many non-finite steps in a row, 128 + signal (143 SIGTERM, 130 SIGINT) after the preemption save.
"""
import argparse
import logging
import os
import sys

from cheems_parallel.config import ConfigError

from . import quiet_library_notices
from .config import default_paths, load_config, validate, world_size_from_environment

EXIT_USER_ERROR = 2


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Pretrain a Cheems model with DeepSpeed ZeRO on megatron-core process groups.",
        epilog="example: python -m pretrain --config configs/cheems-tiny.yaml --set train.steps=300 "
               "--set logging.run_dir=runs/tiny --resume auto\n"
               "         torchrun --nproc_per_node 2 -m pretrain --config configs/cheems-tiny.yaml "
               "--set train.zero_stage=2 --set train.micro_batch_size=4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (sections model, parallel, data, "
                        "train, optimizer, schedule, eval, checkpoint, logging)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.steps=100 (repeatable; values parse as YAML)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="resume from the newest valid checkpoint in checkpoint.dir ('auto') or from a "
                             "checkpoint directory (same as --set checkpoint.resume=...)")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration for this world size, print the batch layout, and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; ranks are read from the environment")
    return parser.parse_args(argv)


def setup_logging() -> None:
    raw_rank = os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")).strip()
    rank = int(raw_rank) if raw_rank.isdigit() else 0   # a bad RANK is reported by the launch check, not here
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s" if rank == 0 else f"%(asctime)s [rank {rank}] %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    quiet_library_notices()


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    setup_logging()
    from data_tools.errors import DataError

    from .checkpoint import CheckpointError
    try:
        overrides = list(arguments.overrides)
        if arguments.resume is not None:
            overrides.append(f"checkpoint.resume={arguments.resume}")
        config = load_config(arguments.config, overrides)
        default_paths(config)
        batch = validate(config, world_size_from_environment())
        if arguments.check:
            print(f"{config.source}: ok | world {batch.world_size} = data parallel {batch.data_parallel_size} x "
                  f"tensor {config.parallel.tensor_parallel_size} x pipeline {config.parallel.pipeline_parallel_size}"
                  f" | global batch {batch.global_batch_size} = micro {batch.micro_batch_size} x data parallel "
                  f"{batch.data_parallel_size} x accumulation {batch.gradient_accumulation_steps}")
            return 0
        from .trainer import run
        return run(config, batch)
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
