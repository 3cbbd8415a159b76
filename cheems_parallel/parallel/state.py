"""Process groups for tensor / pipeline / data parallel, from megatron-core's parallel_state.

world = data_parallel x tensor_parallel x pipeline_parallel. Private experts are split over the
tensor-parallel group (expert_parallel_size is 1 or equal to tensor_parallel_size), so no extra
expert groups are created. torch.distributed must already be initialised (by the launcher glue).
"""
import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, parallel_state

from ..config import ConfigError, ParallelConfig
from .cpu_compat import apply_cpu_compat


def initialize_parallel(parallel: ParallelConfig) -> None:
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before initialize_parallel()")
    world = dist.get_world_size()
    model_parallel = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    if world % model_parallel:
        raise ConfigError(
            f"world size {world} is not divisible by parallel.tensor_parallel_size x "
            f"parallel.pipeline_parallel_size = {model_parallel}")
    apply_cpu_compat()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        create_gloo_process_groups=False,
    )


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def model_parallel_config(parallel: ParallelConfig, params_dtype=torch.float32) -> ModelParallelConfig:
    """The megatron-core config our parallel linears are built with.

    Weights are always initialised on the CPU from the master weight, so every layout starts from
    the same numbers as one process with the same seed (the parity tests rely on this).
    """
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        sequence_parallel=parallel.use_sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,  # megatron insists; DeepSpeed's pipeline engine does the sending
        gradient_accumulation_fusion=False,
    )
