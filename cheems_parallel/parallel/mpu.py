"""The `mpu` object DeepSpeed asks for, answered from megatron-core's parallel_state.

DeepSpeed calls "model parallel" what megatron-core calls tensor parallel (as Megatron-DeepSpeed's
own mpu did); megatron-core 0.16 has no get_model_parallel_world_size, hence this adapter.
"""
from megatron.core import parallel_state as ps


class DeepSpeedMPU:
    def get_model_parallel_rank(self):
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self):
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()
