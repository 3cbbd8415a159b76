"""RMSNorm in float32 (spec §1): g * x / sqrt(mean(x^2) + eps). Works on any (..., dim)."""
import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, eps=1e-6, tp_context=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.tp_context = tp_context

    def forward(self, x):
        weight = self.tp_context.sequence_param(self.weight) if self.tp_context else self.weight
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * weight.float()).to(x.dtype)
