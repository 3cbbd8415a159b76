"""Product-key retrieval (spec §4): exact top-k over n*n expert pairs through k*k candidates.

Shapes: query (..., H_x, r); keys (H_x, n, 2, r/2). The first r/2 query dims score against
keys[:, :, 0], the last r/2 against keys[:, :, 1]. Returns scores and expert ids i0 * n + i1,
each (..., H_x, k), sorted by descending score.
"""
import torch


def product_key_topk(query: torch.Tensor, keys: torch.Tensor, k: int):
    num_keys = keys.shape[1]
    half = query.shape[-1] // 2
    # sigma_p[..., h, i] = q_p[h] . K[h, i, p]
    scores0 = torch.einsum("...hr,hir->...hi", query[..., :half], keys[:, :, 0])
    scores1 = torch.einsum("...hr,hir->...hi", query[..., half:], keys[:, :, 1])
    top0, idx0 = scores0.topk(k, dim=-1)
    top1, idx1 = scores1.topk(k, dim=-1)
    # The best pair sums only ever combine a top-k row with a top-k column, so k*k candidates suffice.
    pair_scores = (top0[..., :, None] + top1[..., None, :]).flatten(-2)
    pair_ids = (idx0[..., :, None] * num_keys + idx1[..., None, :]).flatten(-2)
    scores, pick = pair_scores.topk(k, dim=-1)
    return scores, pair_ids.gather(-1, pick)
