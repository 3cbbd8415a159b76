"""SSD mixer (spec §2): Mamba-2 state space duality with RoPE on B and C, heads split over TP.

In: u (l, b, D) residual-stream layout (sequence-split under SP). Internally x (b, l, h, p),
B/C (b, l, h, n), dt (b, l, h) with h the local heads. Decode keeps a state (b, h, p, n).
"""
import math

import torch
import torch.nn.functional as F

from ..ops.rope import apply_rope
from ..ops.ssd import ssd_chunked, ssd_scan_ref
from .tp import linear_out, sharded_parameter, tp_size


def _inverse_softplus_dt(num_heads, dt_min, dt_max):
    """Mamba-2's dt_bias init: inverse softplus of dt ~ log-uniform in [dt_min, dt_max]."""
    def init(tensor):
        with torch.no_grad():
            dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=1e-4)
            tensor.copy_(dt + torch.log(-torch.expm1(-dt)))
    return init


class SSDMixer(torch.nn.Module):
    def __init__(self, cfg, tp, layer_index, use_kernels):
        super().__init__()
        self.num_heads = cfg.num_heads // tp_size()
        self.head_dim = cfg.head_dim
        self.state_size = cfg.state_size
        self.chunk_size = cfg.ssd_chunk_size
        self.use_rope = cfg.ssd_rope
        self.use_kernels = use_kernels
        self.tp = tp
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        self.x_proj = tp.column(cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.init_std)
        self.B_proj = tp.column(cfg.hidden_size, cfg.num_heads * cfg.state_size, cfg.init_std)
        self.C_proj = tp.column(cfg.hidden_size, cfg.num_heads * cfg.state_size, cfg.init_std)
        self.dt_proj = tp.column(cfg.hidden_size, cfg.num_heads, cfg.init_std)
        self.dt_bias = sharded_parameter((cfg.num_heads,), 0, _inverse_softplus_dt(cfg.num_heads, cfg.dt_min, cfg.dt_max))
        # fix (spec §2): A = -exp(A_log) < 0, so the state decays instead of growing.
        self.A_log = sharded_parameter((cfg.num_heads,), 0,
                                       lambda t: t.copy_(torch.log(torch.arange(1, cfg.num_heads + 1, dtype=torch.float32))))
        self.D = sharded_parameter((cfg.num_heads,), 0, torch.nn.init.ones_) if cfg.ssd_d_skip else None
        self.out_proj = tp.row(cfg.num_heads * cfg.head_dim, cfg.hidden_size, out_std)

    def _projections(self, u_full):
        l, b, _ = u_full.shape
        x = linear_out(self.x_proj, u_full).view(l, b, self.num_heads, self.head_dim).transpose(0, 1)
        B = linear_out(self.B_proj, u_full).view(l, b, self.num_heads, self.state_size).transpose(0, 1)
        C = linear_out(self.C_proj, u_full).view(l, b, self.num_heads, self.state_size).transpose(0, 1)
        dt_raw = linear_out(self.dt_proj, u_full).transpose(0, 1)
        return x, dt_raw, B, C

    def _rope(self, t, cos, sin):
        return apply_rope(t, cos[:, :, None], sin[:, :, None]) if self.use_rope else t

    def forward(self, u, cos, sin, seq_idx=None, return_state=False):
        """u (l, b, D); cos/sin (b, l, n) float32; seq_idx (b, l) document ids or None."""
        x, dt_raw, B, C = self._projections(self.tp.enter_tp(u))
        A = -torch.exp(self.A_log.float())
        if self.use_kernels and x.is_cuda:
            from ..kernels.ssd import ssd_fused
            y, state = ssd_fused(x, dt_raw, self.dt_bias, A, B, C, cos if self.use_rope else None,
                                 sin if self.use_rope else None, self.chunk_size, self.D, None, seq_idx)
        else:
            dt = F.softplus(dt_raw.float() + self.dt_bias.float())
            y, state = ssd_chunked(x, dt, A, self._rope(B, cos, sin), self._rope(C, cos, sin),
                                   self.chunk_size, self.D, None, seq_idx)
        out = self._output(y)
        return (out, state) if return_state else out

    def _output(self, y):
        b, l = y.shape[:2]
        return linear_out(self.out_proj, y.reshape(b, l, -1).transpose(0, 1).contiguous())

    def step(self, u, cos, sin, state):
        """One decode step. u (1, b, D); cos/sin (b, 1, n); state (b, h, p, n) -> (out (1, b, D), state)."""
        x, dt_raw, B, C = self._projections(u)
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        y, state = ssd_scan_ref(x, dt, A, self._rope(B, cos, sin), self._rope(C, cos, sin), self.D, state)
        return self._output(y), state
