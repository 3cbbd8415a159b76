"""Tensor-parallel Cheems layers: SSD mixer, DMAttn, CDMoE, SwiGLU, RMSNorm, the block."""
from .attention import DMAttention
from .block import CheemsBlock
from .ffn import CDMoE, SwiGLU
from .norms import RMSNorm
from .ssd import SSDMixer

__all__ = ["CDMoE", "CheemsBlock", "DMAttention", "RMSNorm", "SSDMixer", "SwiGLU"]
