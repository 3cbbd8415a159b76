"""RMSNorm in float32 (spec §1): g * x / sqrt(mean(x^2) + eps). Works on any (..., dim)."""
import torch
import torch.nn.functional as F


class RMSNorm(torch.nn.Module):
    def __init__(self, dim, eps=1e-6, tp_context=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.tp_context = tp_context

    def forward(self, x):
        weight = self.tp_context.sequence_param(self.weight) if self.tp_context else self.weight
        # torch's rms_norm computes in float32 for bf16/fp16 inputs and rounds once at the end, as the
        # spec asks; one op (a fused kernel on CUDA) instead of nine small ones each way.
        if weight.dtype != x.dtype:  # e.g. float32 weights on bf16 activations: keep the weight unrounded
            return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), self.eps).to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
