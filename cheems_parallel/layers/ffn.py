"""Feed-forward layers: the SwiGLU MLP and CDMoE (spec §4), tensor parallel.

In/out: u (l, b, D) residual-stream layout. SwiGLU: W_down(silu(W_gate u) * W_up u), width split over TP.
CDMoE = the shared SwiGLU + private one-neuron experts found by product keys. The expert tables
(E, D) are split by rows over the TP group (expert parallel = TP): each rank adds the experts it owns,
and their partial outputs are summed together with the shared MLP's, in one all-reduce (or reduce-scatter
under SP) per layer.
"""
import math

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

from .retrieval import ProductKeyRetrieval, gather_local_rows
from .tp import linear_out, normal_init, sharded_parameter, tp_rank, tp_size


class SwiGLU(torch.nn.Module):
    def __init__(self, cfg, tp):
        super().__init__()
        self.tp = tp
        self.gate_proj = tp.column(cfg.hidden_size, cfg.intermediate_size, cfg.init_std)
        self.up_proj = tp.column(cfg.hidden_size, cfg.intermediate_size, cfg.init_std)
        self.down_proj = tp.row(cfg.intermediate_size, cfg.hidden_size, cfg.init_std / math.sqrt(2 * cfg.num_layers))

    def forward(self, u):
        u_full = self.tp.enter_tp(u)
        return linear_out(self.down_proj, self._hidden(u_full))

    def partial_output(self, u_full):
        """This rank's share of the output before the TP reduction, for a caller that adds its own
        partial sums and reduces once (CDMoE)."""
        return F.linear(self._hidden(u_full), self.down_proj.weight)

    def _hidden(self, u_full):
        return F.silu(linear_out(self.gate_proj, u_full)) * linear_out(self.up_proj, u_full)


class CDMoE(torch.nn.Module):
    def __init__(self, cfg, tp):
        super().__init__()
        self.tp = tp
        self.num_experts = cfg.num_experts
        self.load_balance_coef = cfg.load_balance_coef
        self.shared = SwiGLU(cfg, tp)
        self.retrieval = ProductKeyRetrieval(cfg.hidden_size, cfg.num_experts, cfg.expert_retrieval_heads,
                                             cfg.experts_per_head, cfg.expert_retrieval_dim, cfg.init_std, tp)
        self.down_embed = sharded_parameter((cfg.num_experts, cfg.hidden_size), 0, normal_init(cfg.init_std))
        self.up_embed = sharded_parameter((cfg.num_experts, cfg.hidden_size), 0, normal_init(cfg.init_std))
        self.row_start = tp_rank() * (cfg.num_experts // tp_size())

    def forward(self, u):
        """Returns (output (l, b, D), stats) with stats = expert ids and weights for metrics/aux loss."""
        u_full = self.tp.enter_tp(u)
        u_private = self.tp.replicated_param(u_full)
        weights, ids = self.retrieval(u_private)                                    # (l, b, H_x, k)
        down = gather_local_rows(self.down_embed, ids, self.row_start)              # (l, b, H_x, k, D)
        up = gather_local_rows(self.up_embed, ids, self.row_start)
        activation = F.silu(torch.einsum("lbd,lbhkd->lbhk", u_private, down)) * weights
        private = torch.einsum("lbhk,lbhkd->lbd", activation, up)
        # The shared MLP's and the experts' partial sums go through one reduction, not two.
        return self.tp.exit_tp(self.shared.partial_output(u_full) + private), (ids, weights)

    def load_balance_loss(self, ids, weights):
        """E * sum_e usage_e^2, usage_e = share of the softmax weight routed to expert e: 1 when uniform.

        Each TP rank sums over the experts it owns and the partial sums are all-reduced, so the gradient
        each rank sends back through the (replicated) retrieval is its own part, as for the output.
        """
        local = ids - self.row_start
        owned = (local >= 0) & (local < self.down_embed.shape[0])
        usage = torch.zeros(self.down_embed.shape[0], dtype=torch.float32, device=weights.device)
        usage = usage.index_add(0, local.clamp(0, self.down_embed.shape[0] - 1).flatten(),
                                (weights.float() * owned).flatten())
        usage = usage / ids[..., 0].numel()          # each token-head's weights sum to 1
        partial = self.num_experts * (usage * usage).sum()
        return reduce_from_tensor_model_parallel_region(partial) if tp_size() > 1 else partial


@torch.no_grad()
def expert_usage(ids, num_experts):
    """Fraction of experts hit in this batch and the usage entropy normalised by log(E) (1 = uniform)."""
    counts = torch.bincount(ids.flatten(), minlength=num_experts).float()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum() / math.log(num_experts)
    return (counts > 0).float().mean(), entropy
