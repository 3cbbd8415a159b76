"""One Cheems layer (spec §1): h = w1*h + Mixer(RMSNorm(h)); h = w2*h + FFN(RMSNorm(h)).

w1, w2 are learnable per-channel residual scales initialised to 1. Mixer is SSD ("S") or DMAttn ("A");
FFN is CDMoE or SwiGLU. h is (l, b, D), sequence-split under SP.
"""
import torch

from .attention import DMAttention
from .ffn import CDMoE, SwiGLU
from .norms import RMSNorm
from .ssd import SSDMixer


class CheemsBlock(torch.nn.Module):
    def __init__(self, cfg, tp, layer_index, use_kernels):
        super().__init__()
        self.tp = tp
        self.mixer_kind = cfg.mixers[layer_index]
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, tp)
        mixer_cls = SSDMixer if self.mixer_kind == "S" else DMAttention
        self.mixer = mixer_cls(cfg, tp, layer_index, use_kernels)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, tp)
        self.ffn = CDMoE(cfg, tp) if cfg.ffn == "cdmoe" else SwiGLU(cfg, tp)
        self.mixer_residual_scale = torch.nn.Parameter(torch.ones(cfg.hidden_size))
        self.ffn_residual_scale = torch.nn.Parameter(torch.ones(cfg.hidden_size))

    def _scaled(self, scale, h):
        return self.tp.sequence_param(scale).to(h.dtype) * h

    def _feed_forward(self, h):
        """The second residual half. Returns (h, ffn_stats); ffn_stats is (ids, weights) for CDMoE, else None."""
        ffn_out, stats = self.ffn(self.ffn_norm(h)), None
        if isinstance(ffn_out, tuple):
            ffn_out, stats = ffn_out
        return self._scaled(self.ffn_residual_scale, h) + ffn_out, stats

    def forward(self, h, cos, sin, segment_ids=None):
        """h (l, b, D); segment_ids (b, l) document ids (document masking) or None. Returns (h, ffn_stats)."""
        # SSD resets its state where the document id changes; attention masks other documents.
        mixed = self.mixer(self.mixer_norm(h), cos, sin, segment_ids)
        return self._feed_forward(self._scaled(self.mixer_residual_scale, h) + mixed)

    def prefill(self, h, cos, sin):
        """Full forward that also returns the decode cache (SSD state or KV cache)."""
        mixed, cache = self.mixer(self.mixer_norm(h), cos, sin, None, True)
        return self._feed_forward(self._scaled(self.mixer_residual_scale, h) + mixed)[0], cache

    def step(self, h, cos, sin, cache):
        mixed, cache = self.mixer.step(self.mixer_norm(h), cos, sin, cache)
        return self._feed_forward(self._scaled(self.mixer_residual_scale, h) + mixed)[0], cache
