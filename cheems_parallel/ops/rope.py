"""Rotary position embedding (rotate-half convention), shared by attention (q, k) and SSD (C, B).

Shapes: positions (b, l) or (l,) integer; tables cos/sin (b, l, dim) or (l, dim), float32.
`apply_rope` takes x (..., l, dim) with cos/sin broadcastable to it (caller arranges the head axis).
"""
import torch


def rope_tables(positions: torch.Tensor, dim: int, theta: float = 1e4):
    """cos, sin of shape positions.shape + (dim,), float32. dim must be even."""
    if dim % 2:
        raise ValueError(f"rotary dim must be even, got {dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim))
    # float64 angles: positions up to ~1e6 keep full precision before the cast.
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, computed in x's dtype (cos/sin cast to it)."""
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
