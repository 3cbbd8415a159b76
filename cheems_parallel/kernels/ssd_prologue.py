"""The SSD kernels' prologue as two Triton launches: dt = softplus(dt_raw + dt_bias) and g = the within-chunk
inclusive cumsum of dt * A, both (b, h, l padded to T) float32, and its backward (tested against float64 autograd of
the written-out contract, `tests.kernel_oracles.ssd_prologue_float64`).

Why: in torch the prologue and its autograd backward are ~10 small kernels (add, softplus, transpose-copy, pad, mul,
cumsum; flip, cumsum, flip, sigmoid, two reductions over b and l) and as many autograd nodes. At cheems-320m's size
the SSD layer is host-bound (bench/ssd_host_profile.py), and on the 4k benchmark shape those kernels were ~0.2 ms
of 4.4 (bench/ssd_notes.md, v22).

    prologue_forward(dt_raw, dt_bias, A, T) -> dt, g
    prologue_backward(ddt_parts, dg_parts, dt_raw, dt_bias, A, T) -> d dt_raw, d dt_bias, dA

The backward takes the main kernels' gradients as they come: ddt_parts (k, b, h, lpad) partial sums (summed here),
dg_parts one or two (b, h, lpad) tensors (summed here). Padding (t >= l) has dt = 0 and no gradient.
"""
import torch
import triton
import triton.language as tl

# torch's F.softplus default threshold: above it softplus(z) = z and its derivative is 1
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)


@triton.jit
def _softplus(z):
    """torch's softplus(z) (threshold 20) in float32: max(z, 0) + log1p(exp(-|z|)), log1p by the classic
    correction log(1 + u) * u / ((1 + u) - 1), exact to rounding for small u (plain log(1 + u) loses it)."""
    u = tl.exp(-tl.abs(z))
    one_plus = 1.0 + u
    exact = one_plus == 1.0
    log1p = tl.where(exact, u, tl.log(one_plus) * (u / tl.where(exact, 1.0, one_plus - 1.0)))
    return tl.where(z > SOFTPLUS_THRESHOLD, z, tl.maximum(z, 0.0) + log1p)


@triton.jit
def _tile(b, c, hb, L, H, LPAD, T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token positions and heads of program (chunk c, head block hb) of row b, their masks, and the offsets
    of its (T, BLOCK_H) tile in a (b, h, lpad) tensor."""
    t = c * T + tl.arange(0, T)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = h < H
    padded = b.to(tl.int64) * H * LPAD + h[None, :] * LPAD + t[:, None]
    return t, h, t < L, in_h, padded


@triton.jit
def _prologue_fwd_kernel(raw_ptr, bias_ptr, a_ptr, dt_ptr, g_ptr, L, H, LPAD, s_rb, s_rl, s_rh,
                         T: tl.constexpr, BLOCK_H: tl.constexpr):
    c, hb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, h, in_l, in_h, padded = _tile(b, c, hb, L, H, LPAD, T, BLOCK_H)
    inside = in_l[:, None] & in_h[None, :]
    raw = tl.load(raw_ptr + b.to(tl.int64) * s_rb + t[:, None] * s_rl + h[None, :] * s_rh, mask=inside, other=0.0)
    bias = tl.load(bias_ptr + h, mask=in_h, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + h, mask=in_h, other=0.0).to(tl.float32)
    dt = tl.where(inside, _softplus(raw.to(tl.float32) + bias[None, :]), 0.0)
    g = tl.cumsum(dt * a[None, :], axis=0)
    tl.store(dt_ptr + padded, dt, mask=in_h[None, :])
    tl.store(g_ptr + padded, g, mask=in_h[None, :])


@triton.jit
def _prologue_bwd_kernel(ddt_ptr, dg_ptr, dg2_ptr, raw_ptr, bias_ptr, a_ptr, draw_ptr, da_part_ptr, dbias_part_ptr,
                         L, H, LPAD, N_DDT, ddt_part_stride, s_rb, s_rl, s_rh, n_chunks,
                         T: tl.constexpr, BLOCK_H: tl.constexpr, TWO_DG: tl.constexpr):
    c, hb, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, h, in_l, in_h, padded = _tile(b, c, hb, L, H, LPAD, T, BLOCK_H)
    inside = in_l[:, None] & in_h[None, :]
    ddt = tl.zeros([T, BLOCK_H], dtype=tl.float32)
    for part in range(N_DDT):
        ddt += tl.load(ddt_ptr + part * ddt_part_stride + padded, mask=inside, other=0.0)
    # dg on the padding too: g there is the chunk's sum so far (dt = 0), which depends on the tokens before it
    dg = tl.load(dg_ptr + padded, mask=in_h[None, :], other=0.0)
    if TWO_DG:
        dg += tl.load(dg2_ptr + padded, mask=in_h[None, :], other=0.0)
    # g = cumsum(dt A) within the chunk, so d(dt A)_t = sum of dg over t..chunk end
    d_decay = tl.cumsum(dg, axis=0, reverse=True)
    raw_offsets = b.to(tl.int64) * s_rb + t[:, None] * s_rl + h[None, :] * s_rh
    raw = tl.load(raw_ptr + raw_offsets, mask=inside, other=0.0)
    bias = tl.load(bias_ptr + h, mask=in_h, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + h, mask=in_h, other=0.0).to(tl.float32)
    z = raw.to(tl.float32) + bias[None, :]
    dt = tl.where(inside, _softplus(z), 0.0)
    slope = tl.where(z > SOFTPLUS_THRESHOLD, 1.0, 1.0 / (1.0 + tl.exp(-z)))
    draw = tl.where(inside, (ddt + a[None, :] * d_decay) * slope, 0.0)
    tl.store(draw_ptr + b.to(tl.int64) * L * H + t[:, None] * H + h[None, :], draw.to(draw_ptr.dtype.element_ty),
             mask=inside)
    # per-program partial sums over the chunk's tokens; the host sums the (b * chunks) rows (deterministic)
    row = (b * n_chunks + c) * H + h
    tl.store(da_part_ptr + row, tl.sum(d_decay * dt, axis=0), mask=in_h)
    tl.store(dbias_part_ptr + row, tl.sum(draw, axis=0), mask=in_h)


def _grid(batch, heads, n_chunks):
    block_h = min(64, triton.next_power_of_2(heads))
    return block_h, (n_chunks, triton.cdiv(heads, block_h), batch)


def prologue_forward(dt_raw, dt_bias, A, T):
    """(dt, g), each (b, h, lpad) float32 with lpad = l rounded up to T (dt = 0 on the padding, g flat there).
    dt_raw (b, l, h) in any float dtype and any strides (the layer passes a transposed view)."""
    batch, length, heads = dt_raw.shape
    n_chunks = triton.cdiv(length, T)
    dt = torch.empty(batch, heads, n_chunks * T, device=dt_raw.device, dtype=torch.float32)
    g = torch.empty_like(dt)
    block_h, grid = _grid(batch, heads, n_chunks)
    _prologue_fwd_kernel[grid](dt_raw, dt_bias, A, dt, g, length, heads, n_chunks * T, *dt_raw.stride(),
                               T=T, BLOCK_H=block_h, num_warps=4)
    return dt, g


def prologue_backward(ddt_parts, dg_parts, dt_raw, dt_bias, A, T):
    """(d dt_raw (b, l, h) in dt_raw's dtype, d dt_bias, dA in their dtypes) from the main kernels' ddt partials
    (k, b, h, lpad) and one or two (b, h, lpad) dg tensors."""
    batch, length, heads = dt_raw.shape
    n_chunks = triton.cdiv(length, T)
    if len(dg_parts) not in (1, 2) or ddt_parts.dim() != 4:
        raise ValueError("prologue_backward: ddt_parts must be (k, b, h, lpad) and dg_parts one or two tensors")
    ddt_parts = ddt_parts.contiguous()
    dg_parts = [part.contiguous() for part in dg_parts]
    draw = torch.empty(batch, length, heads, device=dt_raw.device, dtype=dt_raw.dtype)
    da_part = torch.empty(batch * n_chunks, heads, device=dt_raw.device, dtype=torch.float32)
    dbias_part = torch.empty_like(da_part)
    block_h, grid = _grid(batch, heads, n_chunks)
    _prologue_bwd_kernel[grid](ddt_parts, dg_parts[0], dg_parts[-1], dt_raw, dt_bias, A, draw, da_part, dbias_part,
                               length, heads, n_chunks * T, ddt_parts.shape[0], ddt_parts.stride(0),
                               *dt_raw.stride(), n_chunks, T=T, BLOCK_H=block_h, TWO_DG=len(dg_parts) == 2,
                               num_warps=4)
    return draw, dbias_part.sum(dim=0).to(dt_bias.dtype), da_part.sum(dim=0).to(A.dtype)
