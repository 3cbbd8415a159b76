"""Pipeline parallel: CheemsForCausalLM as a DeepSpeed PipelineModule (LayerSpec / TiedLayerSpec).

Layer indices: 0 the embedding (tied with the LM head at L+2), 1..L the Cheems blocks, L+1 the final
norm, L+2 the LM head. Each is built with seed base_seed + index, exactly as CheemsForCausalLM does
with init_seed, so one process and every pipeline layout start from the same weights.

What flows between stages: (h, position_ids) or (h, position_ids, segment_ids) with h (l_local, b, D)
sequence-first (sequence-split under SP); only h carries a gradient. The first stage takes
(input_ids, position_ids[, segment_ids]); the loss takes labels (labels, loss_mask).
The pipeline's topology follows megatron-core's rank order (tensor fastest, then data, then pipe).
"""
import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from ..config import ConfigError, ModelConfig, ParallelConfig, validate_model
from ..layers.block import CheemsBlock
from ..layers.embedding import TokenEmbedding, causal_lm_loss, lm_logits
from ..layers.norms import RMSNorm
from ..layers.tp import TensorParallelContext, normal_init, sharded_parameter
from ..model import kernels_available
from ..ops.rope import rope_tables
from .state import model_parallel_config


class EmbeddingPipe(TokenEmbedding):
    def forward(self, inputs):
        input_ids, *passthrough = inputs
        return (super().forward(input_ids), *passthrough)


def tied_head_forward(module, h):
    return lm_logits(h, module.weight, module.tp)


class BlockPipe(torch.nn.Module):
    def __init__(self, cfg, tp, index, use_kernels):
        super().__init__()
        self.cfg = cfg
        self.block = CheemsBlock(cfg, tp, index, use_kernels)

    def forward(self, inputs):
        h, position_ids, *segments = inputs
        cos, sin = rope_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta)
        h, _ = self.block(h, cos, sin, segments[0] if segments else None)
        return (h, position_ids, *segments)


class FinalNormPipe(RMSNorm):
    def forward(self, inputs):
        return super().forward(inputs[0])


class UntiedHeadPipe(torch.nn.Module):
    def __init__(self, cfg, tp):
        super().__init__()
        self.tp = tp
        self.weight = sharded_parameter((cfg.vocab_size, cfg.hidden_size), 0, normal_init(cfg.init_std))

    def forward(self, h):
        return lm_logits(h, self.weight, self.tp)


def pipeline_loss(logits, labels):
    label_ids, loss_mask = labels
    return causal_lm_loss(logits, label_ids, loss_mask)


def build_pipeline_model(cfg: ModelConfig, parallel: ParallelConfig, init_seed: int,
                         activation_checkpoint_interval: int = 0) -> PipelineModule:
    validate_model(cfg, parallel)
    if cfg.ffn == "cdmoe" and cfg.load_balance_coef > 0:
        raise ConfigError("model.load_balance_coef > 0 is not supported with pipeline parallel "
                          "(the pipeline passes only the hidden state between stages)")
    tp = TensorParallelContext(model_parallel_config(parallel))
    use_kernels = cfg.kernels == "auto" and kernels_available()
    specs = [TiedLayerSpec("embedding", EmbeddingPipe, cfg, tp, tied_weight_attr="embedding.weight")
             if cfg.tie_embeddings else LayerSpec(EmbeddingPipe, cfg, tp)]
    specs += [LayerSpec(BlockPipe, cfg, tp, i, use_kernels) for i in range(cfg.num_layers)]
    specs.append(LayerSpec(FinalNormPipe, cfg.hidden_size, cfg.norm_eps, tp))
    specs.append(TiedLayerSpec("embedding", EmbeddingPipe, cfg, tp, forward_fn=tied_head_forward,
                               tied_weight_attr="embedding.weight")
                 if cfg.tie_embeddings else LayerSpec(UntiedHeadPipe, cfg, tp))
    topology = PipeModelDataParallelTopology(
        num_pp=parallel_state.get_pipeline_model_parallel_world_size(),
        num_mp=parallel_state.get_tensor_model_parallel_world_size(),
        num_dp=parallel_state.get_data_parallel_world_size())
    return PipelineModule(layers=specs, topology=topology, loss_fn=pipeline_loss, seed_layers=True,
                          seed_fn=torch.manual_seed, base_seed=init_seed, partition_method="type:BlockPipe",
                          activation_checkpoint_interval=activation_checkpoint_interval)
