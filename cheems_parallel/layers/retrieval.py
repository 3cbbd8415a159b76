"""Product-key retrieval (spec §4): a query projection and product keys, replicated over TP.

In: u (..., D). Out: softmax weights and expert ids, each (..., heads, k). Both CDMoE's private experts
and DMAttn's inner value function use it. Under TP the retrieved rows are split over ranks, so each
rank sees only part of the gradient of the scores: the query weight and keys all-reduce their grads.
"""
import math

import torch

from ..ops.product_keys import product_key_topk
from .tp import normal_init


class ProductKeyRetrieval(torch.nn.Module):
    def __init__(self, hidden_size, num_experts, num_heads, topk, retrieval_dim, init_std, tp):
        super().__init__()
        self.num_heads = num_heads
        self.topk = topk
        self.retrieval_dim = retrieval_dim
        self.tp = tp
        num_keys = math.isqrt(num_experts)
        self.query = torch.nn.Parameter(torch.empty(num_heads * retrieval_dim, hidden_size))
        normal_init(init_std)(self.query)
        # fix (spec §4): keys ~ N(0, 0.02), not zeros (zeros tie every score at step 0).
        self.keys = torch.nn.Parameter(torch.empty(num_heads, num_keys, 2, retrieval_dim // 2))
        normal_init(init_std)(self.keys)

    def forward(self, u):
        query = torch.nn.functional.linear(u, self.tp.replicated_param(self.query))
        query = query.view(*u.shape[:-1], self.num_heads, self.retrieval_dim)
        scores, ids = product_key_topk(query, self.tp.replicated_param(self.keys), self.topk)
        # softmax in at least float32 (bf16 scores would round the weights)
        weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
        return weights.to(u.dtype), ids


def gather_local_rows(table, ids, row_start):
    """Rows `ids` (global) of a table holding rows [row_start, row_start + len(table)); others are zero."""
    local = ids - row_start
    owned = (local >= 0) & (local < table.shape[0])
    rows = torch.nn.functional.embedding(local.clamp(0, table.shape[0] - 1), table)
    return rows * owned.unsqueeze(-1).to(rows.dtype)
