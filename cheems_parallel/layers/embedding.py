"""Token embedding and LM head, vocab-parallel (rows of the (V, D) tables split over TP).

embed: ids (b, l) -> h (l, b, D), or (l / tp, b, D) under sequence parallel.
lm_logits: normed h (l_local, b, D) -> vocab-parallel logits (b, l, V / tp).
causal_lm_loss: vocab-parallel cross-entropy, mean over the loss mask.
"""
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)

from .tp import normal_init, tp_size


class TokenEmbedding(torch.nn.Module):
    def __init__(self, cfg, tp):
        super().__init__()
        self.tp = tp
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std),
                                                reduce_scatter_embeddings=tp.sequence_parallel, config=tp.config)

    @property
    def weight(self):
        return self.embedding.weight

    def forward(self, input_ids):
        h = self.embedding(input_ids)
        # VocabParallelEmbedding returns (l/tp, b, D) under SP (it transposes itself), else (b, l, D)
        return h if self.tp.sequence_parallel else h.transpose(0, 1).contiguous()


def lm_logits(h, weight, tp):
    """h (l_local, b, D) already normed; weight (V / tp, D) -> logits (b, l, V / tp)."""
    if tp.sequence_parallel:
        h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True)
    elif tp_size() > 1:
        h = copy_to_tensor_model_parallel_region(h)
    return F.linear(h, weight).transpose(0, 1)


def causal_lm_loss(logits, labels, loss_mask=None):
    """Mean next-token cross-entropy over loss_mask; logits (b, l, V / tp) vocab-parallel, labels (b, l)."""
    token_loss = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                              labels.transpose(0, 1).contiguous()).transpose(0, 1)
    if loss_mask is None:
        return token_loss.mean()
    loss_mask = loss_mask.float()
    return (token_loss * loss_mask).sum() / loss_mask.sum().clamp_min(1.0)
