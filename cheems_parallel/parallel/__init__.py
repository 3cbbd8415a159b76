"""Everything about distribution: process groups, the DeepSpeed mpu adapter, CPU compatibility."""
from .state import destroy_parallel, initialize_parallel, model_parallel_config
from .mpu import DeepSpeedMPU

__all__ = ["DeepSpeedMPU", "destroy_parallel", "initialize_parallel", "model_parallel_config"]
