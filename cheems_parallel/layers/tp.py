"""Tensor-parallel plumbing shared by the layers, on top of megatron-core's mappings.

Activations are sequence-first, (l, b, D), as in Megatron. With sequence parallel the residual
stream is split along l over the tensor-parallel (TP) group; without it, it is replicated.

- `enter_tp(u)`: the full-sequence input every TP rank needs (an all-gather under SP; backward is a
  split, because the parallel linears that consume it all-reduce their input grads themselves).
- `exit_tp(partial)`: sums per-rank partial outputs (all-reduce, or reduce-scatter under SP).
- `replicated_param(p)` / `replicated_input(u)`: identity forward; backward all-reduces the grad over TP.
  For weights and inputs whose gradient each TP rank only knows in part (e.g. retrieval queries that
  score experts split over ranks, or norm weights seeing only a sequence shard).
"""
from dataclasses import replace

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def normal_init(std):
    return lambda weight: torch.nn.init.normal_(weight, mean=0.0, std=std)


class TensorParallelContext:
    """What a layer needs to build its parallel pieces: the megatron config and two variants of it."""

    def __init__(self, mp_config):
        self.config = mp_config
        self.sequence_parallel = mp_config.sequence_parallel
        # Column linears see an input we already gathered once per layer (enter_tp), so they must not gather.
        self.column_config = replace(mp_config, sequence_parallel=False)

    def column(self, in_features, out_features, std):
        return ColumnParallelLinear(in_features, out_features, config=self.column_config,
                                    init_method=normal_init(std), bias=False, gather_output=False)

    def row(self, in_features, out_features, std, sequence_parallel=None):
        config = self.config if sequence_parallel is None else replace(self.config, sequence_parallel=sequence_parallel)
        return RowParallelLinear(in_features, out_features, config=config, init_method=normal_init(std),
                                 bias=False, input_is_parallel=True, skip_bias_add=True)

    def enter_tp(self, u):
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(u, tensor_parallel_output_grad=False)
        return u

    def exit_tp(self, partial):
        if tp_size() == 1:
            return partial
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial)
        return reduce_from_tensor_model_parallel_region(partial)

    def replicated_param(self, param):
        return copy_to_tensor_model_parallel_region(param) if tp_size() > 1 else param

    def sequence_param(self, param):
        """A replicated weight applied to the (possibly sequence-split) residual stream."""
        return copy_to_tensor_model_parallel_region(param) if self.sequence_parallel else param


def sharded_parameter(full_shape, partition_dim, init, dtype=torch.float32):
    """A parameter split over TP along partition_dim, initialised from the full master tensor.

    Every rank builds the same master tensor (same RNG draws as one process) and keeps its slice,
    so all layouts start from identical weights.
    """
    master = torch.empty(full_shape, dtype=torch.float32)
    init(master)
    shard = master.chunk(tp_size(), dim=partition_dim)[tp_rank()].to(dtype).contiguous()
    param = torch.nn.Parameter(shard)
    if tp_size() > 1:
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=partition_dim, stride=1)
    return param


def linear_out(layer, x):
    """Megatron linears return (output, bias); we use no biases."""
    return layer(x)[0]
