"""Dynamic-mask attention reference (spec §3): causal softmax attention with an additive per-key mask.

Shapes: q (b, h, l, d); k, v (b, h_kv, l, d) with h % h_kv == 0 (GQA repeats k/v);
mask_bias (b, h, l): the dynamic mask value m_{h,j} of each key j, added to every query's score.
keep_window w: each query i keeps only the top-w keys of its prefix j <= i by m (ties to the nearest).
segment_ids (b, l): optional document ids; a query never attends to another document, and with
keep_window its prefix is its own document's (the window ranks only keys it may attend to).
Softmax in float32 (float64 for float64 inputs); returns (b, h, l, d) in q's dtype.
"""
import math

import torch


def keep_window_mask(mask_bias: torch.Tensor, keep_window: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(b, h, l) -> bool (b, h, l, l): [i, j] is True iff key j is among the top-w allowed keys of query i.
    `allowed` (broadcastable to (b, h, l, l)) is the causal (and same-document) mask; default causal."""
    l = mask_bias.shape[-1]
    if allowed is None:
        allowed = torch.ones(l, l, dtype=torch.bool, device=mask_bias.device).tril()
    rows = mask_bias.unsqueeze(-2).expand(*mask_bias.shape[:-1], l, l)
    rows = rows.masked_fill(~allowed, float("-inf"))
    # A stable descending sort over reversed key order puts the nearest key first among ties.
    order = torch.sort(rows.flip(-1), dim=-1, descending=True, stable=True).indices
    top = (l - 1) - order[..., : min(keep_window, l)]
    keep = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, top, True)
    return keep & allowed


def allowed_mask(mask_bias, keep_window=None, segment_ids=None):
    """Boolean (b or 1, h or 1, l, l) of the key positions each query may attend to."""
    l = mask_bias.shape[-1]
    allowed = torch.ones(l, l, dtype=torch.bool, device=mask_bias.device).tril()[None, None]
    if segment_ids is not None:
        same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
        allowed = allowed & same_doc[:, None]
    if keep_window is not None:
        allowed = keep_window_mask(mask_bias, keep_window, allowed)
    return allowed


def dmattn_ref(q, k, v, mask_bias, keep_window=None, segment_ids=None):
    b, h, l, d = q.shape
    h_kv = k.shape[1]
    if h % h_kv:
        raise ValueError(f"query heads {h} not divisible by key/value heads {h_kv}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = h // h_kv
    kf = k.to(dtype).repeat_interleave(rep, dim=1)
    vf = v.to(dtype).repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(dtype), kf) / math.sqrt(d)
    scores = scores + mask_bias.to(dtype)[:, :, None, :]
    scores = scores.masked_fill(~allowed_mask(mask_bias, keep_window, segment_ids), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bhjd->bhid", probs, vf).to(q.dtype)


def dmattn_decode_ref(q, k, v, mask_bias, keep_window=None):
    """The last query against all cached keys (cached decode). q (b, h, 1, d); k, v (b, h_kv, t, d);
    mask_bias (b, h, t). Equals the last row of dmattn_ref over the whole sequence."""
    d = q.shape[-1]
    rep = q.shape[1] // k.shape[1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = k.to(dtype).repeat_interleave(rep, dim=1)
    vf = v.to(dtype).repeat_interleave(rep, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(dtype), kf) / math.sqrt(d) + mask_bias.to(dtype)[:, :, None, :]
    t = mask_bias.shape[-1]
    if keep_window is not None and keep_window < t:
        order = torch.sort(mask_bias.flip(-1), dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(mask_bias, dtype=torch.bool).scatter_(-1, (t - 1) - order[..., :keep_window], True)
        scores = scores.masked_fill(~keep[:, :, None, :], float("-inf"))
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(scores, dim=-1), vf).to(q.dtype)
