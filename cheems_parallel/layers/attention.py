"""DMAttn (spec §3): causal attention with an inner-function value and a learned dynamic mask.

In: u (l, b, D). q (b, h, l, d), k/v (b, h_kv, l, d) with h, h_kv the heads local to this TP rank.
Value: `linear` (u W_v) or `inner` (u W_v gated product-key retrieval of value-table rows).
Dynamic mask m (b, h, l) = exp(A' * softplus(W_dm v)): one additive bias per key and head; A' = 0 at
init, so the layer starts as plain causal attention.
"""
import math

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import scatter_to_tensor_model_parallel_region

from ..ops.dmattn import dmattn_decode_ref, dmattn_ref
from ..ops.rope import apply_rope
from .retrieval import ProductKeyRetrieval
from .tp import linear_out, normal_init, sharded_parameter, tp_size


class DMAttention(torch.nn.Module):
    def __init__(self, cfg, tp, layer_index, use_kernels):
        super().__init__()
        self.tp = tp
        self.use_kernels = use_kernels
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads // tp_size()
        self.num_kv_heads = cfg.kv_heads // tp_size()
        self.keep_window = cfg.keep_window
        kv_width = cfg.kv_heads * cfg.head_dim
        self.q_proj = tp.column(cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.init_std)
        self.k_proj = tp.column(cfg.hidden_size, kv_width, cfg.init_std)
        self.v_proj = tp.column(cfg.hidden_size, kv_width, cfg.init_std)
        self.value_function = cfg.value_function
        if cfg.value_function == "inner":
            self.value_retrieval = ProductKeyRetrieval(cfg.hidden_size, cfg.value_num_experts, cfg.value_retrieval_heads,
                                                       cfg.value_topk, cfg.value_retrieval_dim, cfg.init_std, tp)
            # value table E_v (N_v, h_kv * d), split by key/value heads (columns) over TP
            self.value_table = sharded_parameter((cfg.value_num_experts, kv_width), 1, normal_init(cfg.init_std))
        # W_dm: all key/value heads -> one mask logit per query head; its input is head-split, so it is a
        # row-parallel linear whose output (all heads) is all-reduced, then each rank keeps its heads.
        self.mask_proj = tp.row(kv_width, cfg.num_heads, cfg.init_std, sequence_parallel=False)
        self.mask_scale = sharded_parameter((cfg.num_heads,), 0, torch.nn.init.zeros_)  # A', 0 at init
        self.o_proj = tp.row(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.init_std / math.sqrt(2 * cfg.num_layers))

    def _qkvm(self, u_full, cos, sin):
        l, b, _ = u_full.shape
        q = linear_out(self.q_proj, u_full).view(l, b, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        k = linear_out(self.k_proj, u_full).view(l, b, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        v_flat = linear_out(self.v_proj, u_full)
        if self.value_function == "inner":
            # fix (spec §3): the retrieved rows are weighted by the softmax of their scores.
            weights, ids = self.value_retrieval(self.tp.replicated_param(u_full))     # (l, b, H_r, k)
            rows = F.embedding(ids, self.value_table)                                # (l, b, H_r, k, kv_local)
            v_flat = v_flat * torch.einsum("lbhk,lbhkc->lbc", weights, rows)
        v = v_flat.view(l, b, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        mask_logits = linear_out(self.mask_proj, v_flat)                              # (l, b, H) all heads
        if tp_size() > 1:  # keep this rank's heads; the backward all-gathers every head's gradient
            mask_logits = scatter_to_tensor_model_parallel_region(mask_logits)
        mask = torch.exp(self.mask_scale.float() * F.softplus(mask_logits.float())).permute(1, 2, 0)  # (b, h, l)
        cos_h, sin_h = cos[:, None], sin[:, None]
        return apply_rope(q, cos_h, sin_h), apply_rope(k, cos_h, sin_h), v, mask

    def forward(self, u, cos, sin, segment_ids=None, return_cache=False):
        q, k, v, mask = self._qkvm(self.tp.enter_tp(u), cos, sin)
        if self.use_kernels and q.is_cuda:
            from ..kernels.dmattn import dmattn_fused
            out = dmattn_fused(q, k, v, mask, self.keep_window, segment_ids)
        else:
            out = dmattn_ref(q, k, v, mask, self.keep_window, segment_ids)
        result = self._output(out)
        return (result, {"k": k, "v": v, "mask": mask}) if return_cache else result

    def _output(self, out):
        b, h, l, d = out.shape
        return linear_out(self.o_proj, out.permute(2, 0, 1, 3).reshape(l, b, h * d))

    def step(self, u, cos, sin, cache):
        """One decode step: u (1, b, D), cos/sin (b, 1, d); cache of k, v (b, h_kv, t, d), mask (b, h, t)."""
        q, k, v, mask = self._qkvm(u, cos, sin)
        cache = {"k": torch.cat([cache["k"], k], 2), "v": torch.cat([cache["v"], v], 2),
                 "mask": torch.cat([cache["mask"], mask], 2)}
        out = dmattn_decode_ref(q, cache["k"], cache["v"], cache["mask"], self.keep_window)
        return self._output(out), cache
