"""Triton kernels for the chunked SSD (Mamba-2 state space duality) in the Cheems shape, forward and backward.

Public entry points:
    ssd_fused(x, dt_raw, dt_bias, A, B, C, cos=None, sin=None, chunk_size=256, D=None,
              initial_state=None, seq_idx=None) -> (y, final_state)
    ssd_fused_reference(...)  same signature, the pure-PyTorch composition it must equal.

Shapes: x (b, l, h, p); dt_raw (b, l, h) before softplus; dt_bias (h,); A (h,) negative;
B, C (b, l, g, n) NOT rotated, n even, g dividing h: head i reads group i // (h / g) (the Cheems layer
has g = h; g = 1 is mamba_ssm's benchmark shape, read shared by all heads, never copied per head); cos, sin (b, l, n) float32 rotate-half RoPE
tables as `ops.rope_tables` makes them (a row's two halves equal: the Gluon kernels read only the first halves) or
None (RoPE off); D (h,) or None; initial_state (b, h, p, n) or None; seq_idx (b, l)
non-decreasing document ids or None. y has x's dtype, final_state is float32 (b, h, p, n).

Semantics (spec §2): dt = softplus(dt_raw + dt_bias); B~ = rope(B), C~ = rope(C);
S_t = exp(dt_t A) S_{t-1} + (dt_t x_t) B~_t^T, reset to 0 where seq_idx changes; y_t = S_t C~_t + D x_t.

How it is split (T = the kernels' own chunk length, `KERNEL_CHUNK`; the function does not depend on the
chunk length, so the `chunk_size` argument only matters to the reference):
  prologue           dt = softplus(dt_raw + dt_bias), g = within-chunk inclusive cumsum of dt*A,
                     both (b, h, l padded to T) float32 (zero dt on the padding keeps g flat there): one Triton
                     launch each way (`ssd_prologue`).
  _state_fwd         sequential over chunks per (batch, head, p-block, n-block): the state entering each
                     chunk, stored (b, chunks + 1, h, p, n) in x's dtype (last slot: final), final in fp32.
  _chunk_fwd         parallel over (p-block, chunk, head): y = (C~B~^T * decay * dt) x + exp(g) C~ S^T + D x;
                     when gradients are wanted ("save_rotated") it also stores B~, C~ for the backward.
  _state_bwd         reverse sequential: dS for the state leaving each chunk, d(initial state), and the
                     carried state's share of the gradient w.r.t. g at each chunk's last token (on Hopper,
                     with enough sequences, one Gluon walk per (batch, head) instead: `ssd_gluon_state_bwd`).
  _chunk_bwd_dx      parallel over (p-block, chunk, head): dx, shares of d(dt) and dD (`_chunk_fwd` and this one
                     can loop over several consecutive chunks per program: "*_chunks_per_program").
  _chunk_bwd_dbc     parallel over (chunk, head): dC and dB and dg (the gradient w.r.t. g; torch turns it
                     into d dt_raw, d dt_bias, dA) from one pass ("dqk_merged"; else `_chunk_bwd_dqk`,
                     launched for C~ then for B~, each side's share). With g < h the per-head dB/dC are
                     summed over each group's heads (float32 sum in torch, or float32 atomics).
RoPE is applied on load (in the backward only without "save_rotated") and un-applied on the gradients
of B~ and C~ in-kernel; n is handled as its two
rotate-half halves throughout, so every C~.B~ product is the sum of two half products. Products take
bf16 operands for bf16 inputs (float32 "ieee" for float32 inputs) with float32 accumulation.
bench/ssd_notes.md has the measurements behind this split.
"""
import os
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cheems_parallel.kernels import ssd_prologue
from cheems_parallel.kernels.device import sm_count
from cheems_parallel.ops.rope import apply_rope
from cheems_parallel.ops.ssd import ssd_chunked

# The kernels' chunk length and tile sizes. Tunable (bench/ssd.py sweeps them); the math does not depend on them.
KERNEL_CHUNK = 64
# Defaults: the winners of v3's and v4's sweeps on the H200 (bench/ssd_notes.md); since v4b the dB/dC backward is
# the two-launch one at 4 warps (28% / 15% faster than the merged one on mamba's / the Cheems shape, and
# deterministic: no atomics); since v10, with groups < heads, the group dB/dC kernel (3 stages) and the forward
# reading shared C~B~^T (mamba's one-group shape: 6.12 -> 5.40 ms of kernels fwd+bwd at L = 4k). Per kernel:
# *_block_p, *_warps, *_stages, *_maxnreg (a register cap: 128 lets two 8-warp programs share an SM, at some
# spilling), and for the forward and dx kernels *_chunks_per_program (a loop over consecutive chunks, whose next
# tiles the compiler prefetches); fwd_save_* / fwd_nograd_*: the forward's tiles when it stores B~/C~ / when no
# backward follows (and it forms its own scores). The forward and the per-head dB/dC kernel take full-width n
# operands since v13 / v14 (`_chunk_fwd_one`'s docstring: the Cheems shape 8.55 -> 7.47 ms at L = 4k).
# save_rotated: the forward stores B~, C~ for the backward kernels (no RoPE on their loads: no register spills
# there); dqk_merged: one launch for dB, dC, dg instead of two (the default since v15 in full width: the Cheems
# shape's dB/dC 2.28 -> 2.05 ms at L = 4k; since v17 it also forms dg's exp(g_last) <S, G> term, so _state_bwd
# skips the states: Cheems fwd+bwd 7.24 -> 7.04 ms; with groups < heads dqk_group takes precedence);
# group_reduce ("sum" | "atomic"):
# how dB/dC are summed over a B/C group's heads when groups < heads (atomic: float32 adds in no fixed order, so
# not bitwise deterministic; groups = heads, the Cheems layer, stores directly; "atomic" is not used with
# dqk_group); rope_tables_fp32: float32 tables for bf16 inputs (default: the input's type, as apply_rope uses
# them). For groups < heads only: shared_scores (the forward reads C~B~^T computed once per group and chunk by
# `_scores_kernel` instead of each head recomputing it) and dqk_group (dB/dC by one program per group and chunk
# looping over its heads, `_chunk_bwd_dqk_group_kernel`, with dqk_group_warps / _stages / _maxnreg) and dx_group
# (dx the same way, `_chunk_bwd_dx_group_kernel`; since v11 the default at 4 warps, 2 stages: dx 1.25 -> 1.12 ms
# on mamba's shape at L = 4k, while 8 warps were slower than per-head dx); gluon_bwd (v16, the default): on a
# Hopper GPU, without RoPE or documents and with l a multiple of 64, dx, dB, dC and dg by one warp-specialised
# Gluon launch instead of dx_group + dqk_group (`ssd_gluon_bwd.py`; mamba's shape 5.25 -> ~4.2 ms fwd+bwd at 4k);
# gluon_head_bwd (v18, the default): the same for groups = heads, persistent over (chunk, head) tiles, from the
# forward's rotated B~, C~ (`ssd_gluon_head_bwd.py`: one launch instead of dx + the merged dB/dC, 3.63 -> ~2.6 ms
# on the Cheems shape at 4k); gluon_fwd (v19, the default): on Hopper with p = n = 128,
# l a multiple of 64, the forward as one Gluon walk per (batch, head) instead of _state_fwd +
# _chunk_fwd (`ssd_gluon_fwd.py`: x, B, C read once, the states only written; the Cheems shape's forward
# 2.47 -> ~1.3 ms at 4k), when there are at least gluon_fwd_min_sequences (b·h) walks (None: 3/8 of the SMs);
# with documents too (then the backward is the Gluon head kernel for groups = heads, the Triton kernels otherwise);
# gluon_state_bwd (v24, the default): the backward's reverse state pass as one Gluon walk per (batch, head) instead of
# _state_bwd (`ssd_gluon_state_bwd.py`: 0.68 -> 0.57 ms on the Cheems shape at 4k), when the <S, G> term is formed by
# the dx / dB / dC kernels, C comes rotated (or no RoPE) and there are at least gluon_state_bwd_min_sequences (b·h)
# walks (None: half the SMs).
# bench/ssd_notes.md v9-v16 has the measurements (v9's sub-tiled chunks of 128/256 were slower: removed).
CONFIG = {
    "state_block_p": 64, "state_block_nh": 32, "state_warps": 4, "state_stages": 2,
    "fwd_block_p": 64, "fwd_warps": 4, "fwd_stages": 2, "fwd_chunks_per_program": 1,
    "fwd_save_block_p": 128, "fwd_save_warps": 8, "fwd_save_chunks_per_program": 2,
    "fwd_nograd_block_p": 128, "fwd_nograd_warps": 8,
    "bwd_block_p": 64, "bwd_warps": 4, "bwd_stages": 2, "bwd_chunks_per_program": 4,
    "dqk_block_p": 64, "dqk_warps": 4, "dqk_stages": 2, "dqk_maxnreg": None,
    "save_rotated": True, "dqk_merged": True, "group_reduce": "sum", "rope_tables_fp32": False,
    "shared_scores": True, "dqk_group": True, "dqk_group_warps": 8, "dqk_group_stages": 3,
    "dx_group": True, "dx_group_block_p": 64, "dx_group_warps": 4, "dx_group_stages": 2,
    "gluon_bwd": True, "gluon_overlap_split": True, "gluon_head_bwd": True, "gluon_fwd": True,
    "gluon_state_bwd": True,
}


# --------------------------------------------------------------------------------------------------
# small jit helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _load_halves(base_ptr, stride_t, stride_n, offs_t, offs_nh, mask_t, mask_nh, NH):
    """Both rotate-half halves of a (T, n) tile, as float32: columns offs_nh and NH + offs_nh."""
    mask = mask_t[:, None] & mask_nh[None, :]
    ptrs = base_ptr + offs_t[:, None] * stride_t + offs_nh[None, :] * stride_n
    first = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(ptrs + NH * stride_n, mask=mask, other=0.0).to(tl.float32)
    return first, second


@triton.jit
def _op(tile, DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """A tile as a tensor-core operand. ROUND_BF16 (interpreter only) rounds through bf16 but multiplies in
    float32, since the interpreter's bf16 dot is wrong: the CPU tests then see the GPU's operand rounding."""
    if ROUND_BF16:
        return tile.to(tl.bfloat16).to(tl.float32)
    else:
        return tile.to(DOT_DTYPE)


@triton.jit
def _load_rope(cos_ptr, sin_ptr, stride_ct, stride_cn, offs_t, offs_nh, mask_t, mask_nh, NH):
    """cos and sin of a (T, n) tile, each as its two halves (the tables need not repeat across halves)."""
    cos1, cos2 = _load_halves(cos_ptr, stride_ct, stride_cn, offs_t, offs_nh, mask_t, mask_nh, NH)
    sin1, sin2 = _load_halves(sin_ptr, stride_ct, stride_cn, offs_t, offs_nh, mask_t, mask_nh, NH)
    return cos1, cos2, sin1, sin2


@triton.jit
def _maybe_load_rope(cos_ptr, sin_ptr, stride_ct, stride_cn, offs_t, offs_nh, mask_t, mask_nh, NH,
                     ROPE: tl.constexpr):
    if ROPE:
        return _load_rope(cos_ptr, sin_ptr, stride_ct, stride_cn, offs_t, offs_nh, mask_t, mask_nh, NH)
    else:
        return 0.0, 0.0, 0.0, 0.0


@triton.jit
def _load_rotated(base_ptr, stride_t, stride_n, cos1, cos2, sin1, sin2,
                  offs_t, offs_nh, mask_t, mask_nh, NH, ROPE: tl.constexpr):
    """rope(v) = v*cos + rotate_half(v)*sin on a tile, split in halves: (v1 c1 - v2 s1, v2 c2 + v1 s2)."""
    first, second = _load_halves(base_ptr, stride_t, stride_n, offs_t, offs_nh, mask_t, mask_nh, NH)
    if ROPE:
        rotated_first = first * cos1 - second * sin1
        rotated_second = second * cos2 + first * sin2
        return rotated_first, rotated_second
    else:
        return first, second


@triton.jit
def _load_rotated_operands(base_ptr, stride_t, stride_n, cos_ptr, sin_ptr, stride_ct, stride_cn,
                           offs_t, offs_nh, mask_t, mask_nh, NH, ROPE: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """rope(v) of a (T, n) tile as two product operands, loading its own tables one half at a time (fewer
    float32 tiles live at once than `_load_rope` + `_load_rotated`: the backward kernels are register-bound)."""
    first, second = _load_halves(base_ptr, stride_t, stride_n, offs_t, offs_nh, mask_t, mask_nh, NH)
    if ROPE:
        mask = mask_t[:, None] & mask_nh[None, :]
        table = offs_t[:, None] * stride_ct + offs_nh[None, :] * stride_cn
        cos1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        rotated_first = _op(first * cos1 - second * sin1, DOT_DTYPE, ROUND_BF16)
        cos2 = tl.load(cos_ptr + table + NH * stride_cn, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + NH * stride_cn, mask=mask, other=0.0).to(tl.float32)
        rotated_second = _op(second * cos2 + first * sin2, DOT_DTYPE, ROUND_BF16)
        return rotated_first, rotated_second
    else:
        return _op(first, DOT_DTYPE, ROUND_BF16), _op(second, DOT_DTYPE, ROUND_BF16)


@triton.jit
def _load_group_qk(c_ptr, b_ptr, cos_base, sin_base, bi, gi, chunk_start, offs_t, offs_nh, mask_t, mask_nh, NH,
                   scc_b, scc_l, scc_h, scc_n, sb_b, sb_l, sb_h, sb_n, sc_l, sc_n, ROPE: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """q = rope(C) and k = rope(B) of one chunk of B/C group gi, each as its two halves' product operands."""
    q_first, q_second = _load_rotated_operands(
        c_ptr + bi.to(tl.int64) * scc_b + gi * scc_h + chunk_start * scc_l, scc_l, scc_n, cos_base, sin_base,
        sc_l, sc_n, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE, DOT_DTYPE, ROUND_BF16)
    k_first, k_second = _load_rotated_operands(
        b_ptr + bi.to(tl.int64) * sb_b + gi * sb_h + chunk_start * sb_l, sb_l, sb_n, cos_base, sin_base,
        sc_l, sc_n, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE, DOT_DTYPE, ROUND_BF16)
    return q_first, q_second, k_first, k_second


@triton.jit
def _full_columns(BLOCK_NH: tl.constexpr, NH):
    """Columns of a full-width (T, n) tile laid out as its two rotate-half halves, each padded to BLOCK_NH:
    tile column i holds state column (i // BLOCK_NH) * NH + i % BLOCK_NH, valid where i % BLOCK_NH < NH; the
    partner column rotate_half pairs it with, and that pairing's sign in rope (-1 on the first half)."""
    offs = tl.arange(0, 2 * BLOCK_NH)
    half = offs // BLOCK_NH
    within = offs % BLOCK_NH
    return half * NH + within, (1 - half) * NH + within, within < NH, tl.where(half == 0, -1.0, 1.0)


@triton.jit
def _load_full_operand(base_ptr, stride_t, stride_n, cos_base, sin_base, sc_l, sc_n, offs_t, mask_t, cols, partner,
                       mask_c, sign, ROPE: tl.constexpr, DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """rope(v) of a (T, n) tile as one full-width product operand (columns from `_full_columns`):
    rope(v)[i] = v[i] cos[i] + sign[i] v[partner[i]] sin[i]."""
    mask = mask_t[:, None] & mask_c[None, :]
    value = tl.load(base_ptr + offs_t[:, None] * stride_t + cols[None, :] * stride_n, mask=mask, other=0.0)
    if ROPE:
        value = value.to(tl.float32)
        other = tl.load(base_ptr + offs_t[:, None] * stride_t + partner[None, :] * stride_n, mask=mask,
                        other=0.0).to(tl.float32)
        table = offs_t[:, None] * sc_l + cols[None, :] * sc_n
        cos = tl.load(cos_base + table, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_base + table, mask=mask, other=0.0).to(tl.float32)
        value = value * cos + sign[None, :] * other * sin
    return _op(value, DOT_DTYPE, ROUND_BF16)


@triton.jit
def _load_group_qk_full(c_ptr, b_ptr, cos_base, sin_base, bi, gi, chunk_start, offs_t, mask_t, cols, partner, mask_c,
                        sign, scc_b, scc_l, scc_h, scc_n, sb_b, sb_l, sb_h, sb_n, sc_l, sc_n, ROPE: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """q = rope(C) and k = rope(B) of one chunk of B/C group gi as full-width product operands."""
    q = _load_full_operand(c_ptr + bi.to(tl.int64) * scc_b + gi * scc_h + chunk_start * scc_l, scc_l, scc_n,
                           cos_base, sin_base, sc_l, sc_n, offs_t, mask_t, cols, partner, mask_c, sign, ROPE,
                           DOT_DTYPE, ROUND_BF16)
    k = _load_full_operand(b_ptr + bi.to(tl.int64) * sb_b + gi * sb_h + chunk_start * sb_l, sb_l, sb_n,
                           cos_base, sin_base, sc_l, sc_n, offs_t, mask_t, cols, partner, mask_c, sign, ROPE,
                           DOT_DTYPE, ROUND_BF16)
    return q, k


@triton.jit
def _store_unrotated(base_ptr, stride_t, stride_n, cos_ptr, sin_ptr, stride_ct, stride_cn,
                     grad_first, grad_second, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE: tl.constexpr,
                     ATOMIC: tl.constexpr):
    """Gradient of rope's input from the gradient of its output: the transpose (inverse) rotation.
    ATOMIC: add into a float32 buffer that the heads of one B/C group share, instead of storing."""
    if ROPE:
        cos1, cos2, sin1, sin2 = _load_rope(cos_ptr, sin_ptr, stride_ct, stride_cn, offs_t, offs_nh, mask_t, mask_nh, NH)
        out_first = grad_first * cos1 + grad_second * sin2
        out_second = grad_second * cos2 - grad_first * sin1
    else:
        out_first = grad_first
        out_second = grad_second
    mask = mask_t[:, None] & mask_nh[None, :]
    ptrs = base_ptr + offs_t[:, None] * stride_t + offs_nh[None, :] * stride_n
    if ATOMIC:
        tl.atomic_add(ptrs, out_first, mask=mask, sem="relaxed")
        tl.atomic_add(ptrs + NH * stride_n, out_second, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, out_first.to(base_ptr.dtype.element_ty), mask=mask)
        tl.store(ptrs + NH * stride_n, out_second.to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_unrotated_full(base_ptr, stride_t, stride_n, cos_ptr, sin_ptr, stride_ct, stride_cn, grad, offs_t, mask_t,
                          NH, T: tl.constexpr, BLOCK_NH: tl.constexpr, ROPE: tl.constexpr, ATOMIC: tl.constexpr):
    """`_store_unrotated` of a full-width (T, 2 BLOCK_NH) gradient (columns from `_full_columns`)."""
    grad_first, grad_second = tl.split(tl.permute(tl.reshape(grad, (T, 2, BLOCK_NH)), (0, 2, 1)))
    offs_nh = tl.arange(0, BLOCK_NH)
    _store_unrotated(base_ptr, stride_t, stride_n, cos_ptr, sin_ptr, stride_ct, stride_cn, grad_first, grad_second,
                     offs_t, offs_nh, mask_t, offs_nh < NH, NH, ROPE, ATOMIC)


@triton.jit
def _chunk_masks(seq_ptr, seq_row, chunk_start, offs_t, T: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Document masks of one chunk (1 where allowed): token-to-token (T, T) same document,
    token sees the carried state (T,), token reaches the chunk's end state (T,), state crosses the chunk ()."""
    if HAS_SEQ:
        seq = tl.load(seq_ptr + seq_row + chunk_start + offs_t)
        seq_last = tl.load(seq_ptr + seq_row + chunk_start + T - 1)
        seq_prev = tl.load(seq_ptr + seq_row + tl.maximum(chunk_start - 1, 0))
        same_doc = seq[:, None] == seq[None, :]
        sees_carried = seq == seq_prev
        reaches_end = seq == seq_last
        crosses = seq_prev == seq_last
    else:
        same_doc = offs_t[:, None] >= 0
        sees_carried = offs_t >= 0
        reaches_end = offs_t >= 0
        crosses = chunk_start >= 0
    return same_doc, sees_carried, reaches_end, crosses


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _scores_kernel(
    b_ptr, c_ptr, cos_ptr, sin_ptr, cb_ptr,
    L, G, NH, NCHUNK,
    sb_b, sb_l, sb_h, sb_n,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    T: tl.constexpr, BLOCK_NH: tl.constexpr, ROPE: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """C~ B~^T of one chunk of one B/C group, float32, into cb (b, groups, chunks, T, T): the group's heads
    all read it in `_chunk_fwd_kernel` ("shared_scores") instead of each recomputing it."""
    c = tl.program_id(0)
    pid_bg = tl.program_id(1)
    bi = pid_bg // G
    gi = pid_bg % G
    chunk_start = c * T
    offs_t = tl.arange(0, T)
    offs_nh = tl.arange(0, BLOCK_NH)
    mask_nh = offs_nh < NH
    mask_t = chunk_start + offs_t < L
    cos_base = cos_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    sin_base = sin_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    q_first, q_second, k_first, k_second = _load_group_qk(
        c_ptr, b_ptr, cos_base, sin_base, bi, gi, chunk_start, offs_t, offs_nh, mask_t, mask_nh, NH,
        scc_b, scc_l, scc_h, scc_n, sb_b, sb_l, sb_h, sb_n, sc_l, sc_n, ROPE, DOT_DTYPE, ROUND_BF16)
    scores = tl.dot(q_first, tl.trans(k_first), input_precision=DOT_PREC)
    scores += tl.dot(q_second, tl.trans(k_second), input_precision=DOT_PREC)
    cb_chunk = ((bi * G + gi) * NCHUNK + c).to(tl.int64) * T * T
    tl.store(cb_ptr + cb_chunk + offs_t[:, None] * T + offs_t[None, :], scores)


@triton.jit
def _state_fwd_kernel(
    x_ptr, b_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, init_ptr, states_ptr, final_ptr,
    L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p,
    sb_b, sb_l, sb_h, sb_n,
    sc_b, sc_l, sc_n,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid_pn = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_blocks = (NH + BLOCK_NH - 1) // BLOCK_NH   # not tl.cdiv: a @jit helper the interpreter runs only if triton was imported under TRITON_INTERPRET=1
    pid_p = pid_pn // n_blocks
    pid_n = pid_pn % n_blocks
    bi = pid_bh // H
    hi = pid_bh % H
    gi = hi // HPG   # the B/C group this head reads
    N = 2 * NH
    offs_t = tl.arange(0, T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_nh = pid_n * BLOCK_NH + tl.arange(0, BLOCK_NH)
    mask_p = offs_p < P
    mask_nh = offs_nh < NH
    mask_pn = mask_p[:, None] & mask_nh[None, :]

    # state tile offsets inside one (p, n) matrix; the two halves sit NH columns apart
    pn_offs = offs_p[:, None] * N + offs_nh[None, :]
    head_pn = (bi * H + hi).to(tl.int64) * P * N
    if HAS_INIT:
        state_first = tl.load(init_ptr + head_pn + pn_offs, mask=mask_pn, other=0.0).to(tl.float32)
        state_second = tl.load(init_ptr + head_pn + pn_offs + NH, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state_first = tl.zeros((BLOCK_P, BLOCK_NH), dtype=tl.float32)
        state_second = tl.zeros((BLOCK_P, BLOCK_NH), dtype=tl.float32)

    x_base = x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h
    b_base = b_ptr + bi.to(tl.int64) * sb_b + gi * sb_h
    cos_base = cos_ptr + bi.to(tl.int64) * sc_b
    sin_base = sin_ptr + bi.to(tl.int64) * sc_b
    gdt_row = (bi * H + hi).to(tl.int64) * LPAD
    seq_row = bi.to(tl.int64) * LPAD
    for c in range(NCHUNK):
        chunk_start = c * T
        # the state entering chunk c, for the output and backward kernels
        out_ptrs = states_ptr + ((bi * (NCHUNK + 1) + c) * H + hi).to(tl.int64) * P * N + pn_offs
        tl.store(out_ptrs, state_first.to(states_ptr.dtype.element_ty), mask=mask_pn)
        tl.store(out_ptrs + NH, state_second.to(states_ptr.dtype.element_ty), mask=mask_pn)

        offs_l = chunk_start + offs_t
        mask_t = offs_l < L
        g = tl.load(g_ptr + gdt_row + offs_l)
        dt = tl.load(dt_ptr + gdt_row + offs_l)
        g_last = tl.load(g_ptr + gdt_row + chunk_start + T - 1)
        _, _, reaches_end, crosses = _chunk_masks(seq_ptr, seq_row, chunk_start, offs_t, T, HAS_SEQ)
        weight = tl.where(reaches_end, tl.exp(g_last - g) * dt, 0.0)
        chunk_decay = tl.where(crosses, tl.exp(g_last), 0.0)

        # x enters the product as stored (exact); the dt*decay weights ride on B~, which is rounded anyway
        x = _op(tl.load(x_base + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p,
                        mask=mask_t[:, None] & mask_p[None, :], other=0.0), DOT_DTYPE, ROUND_BF16)
        cos1, cos2, sin1, sin2 = _maybe_load_rope(cos_base + chunk_start * sc_l, sin_base + chunk_start * sc_l,
                                                  sc_l, sc_n, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE)
        b_first, b_second = _load_rotated(b_base + chunk_start * sb_l, sb_l, sb_n, cos1, cos2, sin1, sin2,
                                          offs_t, offs_nh, mask_t, mask_nh, NH, ROPE)
        b_first = _op(b_first * weight[:, None], DOT_DTYPE, ROUND_BF16)
        b_second = _op(b_second * weight[:, None], DOT_DTYPE, ROUND_BF16)
        state_first = state_first * chunk_decay + tl.dot(tl.trans(x), b_first, input_precision=DOT_PREC)
        state_second = state_second * chunk_decay + tl.dot(tl.trans(x), b_second, input_precision=DOT_PREC)

    # the final state also goes into the last slot (the backward reads the state leaving every chunk)
    out_ptrs = states_ptr + ((bi * (NCHUNK + 1) + NCHUNK) * H + hi).to(tl.int64) * P * N + pn_offs
    tl.store(out_ptrs, state_first.to(states_ptr.dtype.element_ty), mask=mask_pn)
    tl.store(out_ptrs + NH, state_second.to(states_ptr.dtype.element_ty), mask=mask_pn)
    tl.store(final_ptr + head_pn + pn_offs, state_first, mask=mask_pn)
    tl.store(final_ptr + head_pn + pn_offs + NH, state_second, mask=mask_pn)


@triton.jit
def _chunk_fwd_kernel(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, states_ptr, d_ptr, y_ptr,
    rot_b_ptr, rot_c_ptr, cb_ptr,
    L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p,
    sb_b, sb_l, sb_h, sb_n,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    sy_b, sy_l, sy_h, sy_p,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ROUND_BF16: tl.constexpr, SAVE_ROTATED: tl.constexpr, CPP: tl.constexpr, SCORES_IN: tl.constexpr,
):
    """y of one chunk, one head, one block of p. SAVE_ROTATED: also store B~ = rope(B) and C~ = rope(C) as
    the products used them (x's dtype, B's layout), once per group and chunk, for the backward kernels,
    which then load them as stored: rotating on load there costs register spills (bench/ssd_notes.md v3)."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    bi = pid_bh // H
    hi = pid_bh % H
    gi = hi // HPG   # the B/C group this head reads
    N = 2 * NH
    offs_t = tl.arange(0, T)
    # CPP consecutive chunks per program: the loop lets the compiler prefetch the next chunk's tiles (it also
    # keeps loop-invariant offsets live: more registers); CPP = 1: one chunk, no loop
    if CPP == 1:
        _chunk_fwd_one(x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, states_ptr, d_ptr, y_ptr,
                       rot_b_ptr, rot_c_ptr, cb_ptr, L, H, HPG, P, NH, NCHUNK, LPAD,
                       sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_h, sb_n, scc_b, scc_l, scc_h, scc_n,
                       sc_b, sc_l, sc_n, sy_b, sy_l, sy_h, sy_p, pid_p, pid_c, bi, hi, gi, N, offs_t,
                       T, BLOCK_P, BLOCK_NH, ROPE, HAS_SEQ, HAS_D, DOT_PREC, DOT_DTYPE, ROUND_BF16, SAVE_ROTATED,
                       SCORES_IN)
    else:
        for c in range(pid_c * CPP, tl.minimum(pid_c * CPP + CPP, NCHUNK)):
            _chunk_fwd_one(x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, states_ptr, d_ptr, y_ptr,
                           rot_b_ptr, rot_c_ptr, cb_ptr, L, H, HPG, P, NH, NCHUNK, LPAD,
                           sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_h, sb_n, scc_b, scc_l, scc_h, scc_n,
                           sc_b, sc_l, sc_n, sy_b, sy_l, sy_h, sy_p, pid_p, c, bi, hi, gi, N, offs_t,
                           T, BLOCK_P, BLOCK_NH, ROPE, HAS_SEQ, HAS_D, DOT_PREC, DOT_DTYPE, ROUND_BF16,
                           SAVE_ROTATED, SCORES_IN)


@triton.jit
def _chunk_fwd_one(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, states_ptr, d_ptr, y_ptr,
    rot_b_ptr, rot_c_ptr, cb_ptr, L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_h, sb_n, scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n, sy_b, sy_l, sy_h, sy_p, pid_p, c, bi, hi, gi, N, offs_t,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ROUND_BF16: tl.constexpr, SAVE_ROTATED: tl.constexpr, SCORES_IN: tl.constexpr,
):
    """`_chunk_fwd_kernel`'s work on chunk c. SCORES_IN: C~B~^T from `_scores_kernel` (shared by the group).
    C~, B~ and the state are full-width (., n) tiles (the rotate-half halves side by side, `_full_columns`), so
    C~S^T is one product, and y's two products do not feed each other (the intra-chunk one takes D x as its
    accumulator; the carried one is added after its row scale). Triton gives a product that feeds another all
    warps on the row axis, which on 8 warps holds and computes a 64-row tile twice (bench/ssd_notes.md v12,
    v13: the half-width version of this forward was 1.5x slower on the Cheems shape); only the scores product
    (when formed here) still feeds one."""
    chunk_start = c * T
    offs_l = chunk_start + offs_t
    mask_t = offs_l < L
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    cols, partner, mask_c, sign = _full_columns(BLOCK_NH, NH)

    gdt_row = (bi * H + hi).to(tl.int64) * LPAD
    g = tl.load(g_ptr + gdt_row + offs_l)
    dt = tl.load(dt_ptr + gdt_row + offs_l)
    same_doc, sees_carried, _, _ = _chunk_masks(seq_ptr, bi.to(tl.int64) * LPAD, chunk_start, offs_t, T, HAS_SEQ)
    cos_base = cos_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    sin_base = sin_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    q = _load_full_operand(c_ptr + bi.to(tl.int64) * scc_b + gi * scc_h + chunk_start * scc_l, scc_l, scc_n,
                           cos_base, sin_base, sc_l, sc_n, offs_t, mask_t, cols, partner, mask_c, sign, ROPE,
                           DOT_DTYPE, ROUND_BF16)
    if SCORES_IN:
        cb_chunk = ((bi * (H // HPG) + gi) * NCHUNK + c).to(tl.int64) * T * T
        scores = tl.load(cb_ptr + cb_chunk + offs_t[:, None] * T + offs_t[None, :])
    if SAVE_ROTATED or not SCORES_IN:
        k = _load_full_operand(b_ptr + bi.to(tl.int64) * sb_b + gi * sb_h + chunk_start * sb_l, sb_l, sb_n,
                               cos_base, sin_base, sc_l, sc_n, offs_t, mask_t, cols, partner, mask_c, sign, ROPE,
                               DOT_DTYPE, ROUND_BF16)
        if not SCORES_IN:
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if SAVE_ROTATED:
            if (pid_p == 0) & (hi % HPG == 0):
                mask_tc = mask_t[:, None] & mask_c[None, :]
                rot_offs = bi.to(tl.int64) * sb_b + gi * sb_h + offs_l[:, None] * sb_l + cols[None, :] * sb_n
                tl.store(rot_b_ptr + rot_offs, k.to(rot_b_ptr.dtype.element_ty), mask=mask_tc)
                tl.store(rot_c_ptr + rot_offs, q.to(rot_c_ptr.dtype.element_ty), mask=mask_tc)
    allowed = (offs_t[:, None] >= offs_t[None, :]) & same_doc
    decay = tl.exp(tl.where(allowed, g[:, None] - g[None, :], float("-inf")))
    scores = _op(scores * decay * dt[None, :], DOT_DTYPE, ROUND_BF16)   # dt_u on the columns: x stays exact

    mask_tp = mask_t[:, None] & mask_p[None, :]
    x = tl.load(x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p,
                mask=mask_tp, other=0.0)
    if HAS_D:
        y = tl.dot(scores, _op(x, DOT_DTYPE, ROUND_BF16), tl.load(d_ptr + hi).to(tl.float32) * x.to(tl.float32),
                   input_precision=DOT_PREC)
    else:
        y = tl.dot(scores, _op(x, DOT_DTYPE, ROUND_BF16), input_precision=DOT_PREC)
    state_t = _op(tl.load(states_ptr + ((bi * (NCHUNK + 1) + c) * H + hi).to(tl.int64) * P * N
                          + offs_p[None, :] * N + cols[:, None], mask=mask_c[:, None] & mask_p[None, :], other=0.0),
                  DOT_DTYPE, ROUND_BF16)                          # (n, p) view: transposed state
    into = tl.where(sees_carried, tl.exp(g), 0.0)
    y += tl.dot(q, state_t, input_precision=DOT_PREC) * into[:, None]
    tl.store(y_ptr + bi.to(tl.int64) * sy_b + hi * sy_h + offs_l[:, None] * sy_l + offs_p[None, :] * sy_p,
             y.to(y_ptr.dtype.element_ty), mask=mask_tp)


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _state_bwd_kernel(
    dy_ptr, c_ptr, cos_ptr, sin_ptr, g_ptr, seq_ptr, dfinal_ptr, states_ptr, dstates_ptr, dinit_ptr, overlap_ptr,
    BATCH, L, H, HPG, P, NH, NCHUNK, LPAD,
    sd_b, sd_l, sd_h, sd_p,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr, DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    ROUND_BF16: tl.constexpr, OVERLAP: tl.constexpr = True,
):
    """dstates[c] = d loss / d (state leaving chunk c), walking the chunks backwards; also (OVERLAP) this tile's
    share of exp(g_last) <dstates[c], state entering chunk c> (masked), the carried state's part of d loss /
    d g_last (the Gluon backward forms it itself from the tiles it loads anyway: no states read here then)."""
    pid_pn = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_blocks = (NH + BLOCK_NH - 1) // BLOCK_NH   # not tl.cdiv: a @jit helper the interpreter runs only if triton was imported under TRITON_INTERPRET=1
    pid_p = pid_pn // n_blocks
    pid_n = pid_pn % n_blocks
    bi = pid_bh // H
    hi = pid_bh % H
    gi = hi // HPG   # the B/C group this head reads
    N = 2 * NH
    offs_t = tl.arange(0, T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_nh = pid_n * BLOCK_NH + tl.arange(0, BLOCK_NH)
    mask_p = offs_p < P
    mask_nh = offs_nh < NH
    mask_pn = mask_p[:, None] & mask_nh[None, :]
    pn_offs = offs_p[:, None] * N + offs_nh[None, :]
    head_pn = (bi * H + hi).to(tl.int64) * P * N
    if HAS_DFINAL:
        grad_first = tl.load(dfinal_ptr + head_pn + pn_offs, mask=mask_pn, other=0.0).to(tl.float32)
        grad_second = tl.load(dfinal_ptr + head_pn + pn_offs + NH, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        grad_first = tl.zeros((BLOCK_P, BLOCK_NH), dtype=tl.float32)
        grad_second = tl.zeros((BLOCK_P, BLOCK_NH), dtype=tl.float32)

    dy_base = dy_ptr + bi.to(tl.int64) * sd_b + hi * sd_h
    c_base = c_ptr + bi.to(tl.int64) * scc_b + gi * scc_h
    cos_base = cos_ptr + bi.to(tl.int64) * sc_b
    sin_base = sin_ptr + bi.to(tl.int64) * sc_b
    g_row = (bi * H + hi).to(tl.int64) * LPAD
    seq_row = bi.to(tl.int64) * LPAD
    for step in range(NCHUNK):
        c = NCHUNK - 1 - step
        chunk_start = c * T
        slot = ((bi * (NCHUNK + 1) + c) * H + hi).to(tl.int64) * P * N + pn_offs
        tl.store(dstates_ptr + slot, grad_first.to(dstates_ptr.dtype.element_ty), mask=mask_pn)
        tl.store(dstates_ptr + slot + NH, grad_second.to(dstates_ptr.dtype.element_ty), mask=mask_pn)
        if OVERLAP:  # loaded first: its latency hides behind the loads below (0.36 ms at 4k when it came later)
            state_first = tl.load(states_ptr + slot, mask=mask_pn, other=0.0).to(tl.float32)
            state_second = tl.load(states_ptr + slot + NH, mask=mask_pn, other=0.0).to(tl.float32)
            overlap = tl.sum(tl.sum(state_first * grad_first + state_second * grad_second, axis=1), axis=0)

        offs_l = chunk_start + offs_t
        mask_t = offs_l < L
        g = tl.load(g_ptr + g_row + offs_l)
        g_last = tl.load(g_ptr + g_row + chunk_start + T - 1)
        _, sees_carried, _, crosses = _chunk_masks(seq_ptr, seq_row, chunk_start, offs_t, T, HAS_SEQ)
        into = tl.where(sees_carried, tl.exp(g), 0.0)
        chunk_decay = tl.where(crosses, tl.exp(g_last), 0.0)
        if OVERLAP:
            tl.store(overlap_ptr + ((pid_pn * BATCH + bi) * H + hi).to(tl.int64) * NCHUNK + c, overlap * chunk_decay)
        dy = tl.load(dy_base + offs_l[:, None] * sd_l + offs_p[None, :] * sd_p,
                     mask=mask_t[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        dy_into = _op(dy * into[:, None], DOT_DTYPE, ROUND_BF16)
        cos1, cos2, sin1, sin2 = _maybe_load_rope(cos_base + chunk_start * sc_l, sin_base + chunk_start * sc_l,
                                                  sc_l, sc_n, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE)
        c_first, c_second = _load_rotated(c_base + chunk_start * scc_l, scc_l, scc_n, cos1, cos2, sin1, sin2,
                                          offs_t, offs_nh, mask_t, mask_nh, NH, ROPE)
        grad_first = grad_first * chunk_decay + tl.dot(tl.trans(dy_into), _op(c_first, DOT_DTYPE, ROUND_BF16),
                                                       input_precision=DOT_PREC)
        grad_second = grad_second * chunk_decay + tl.dot(tl.trans(dy_into), _op(c_second, DOT_DTYPE, ROUND_BF16),
                                                         input_precision=DOT_PREC)

    tl.store(dinit_ptr + head_pn + pn_offs, grad_first, mask=mask_pn)
    tl.store(dinit_ptr + head_pn + pn_offs + NH, grad_second, mask=mask_pn)


@triton.jit
def _chunk_bwd_dx_kernel(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, dstates_ptr, d_ptr, dy_ptr,
    dx_ptr, ddt_ptr, dd_ptr,
    BATCH, L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p,
    sb_b, sb_l, sb_h, sb_n,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    sd_b, sd_l, sd_h, sd_p,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr, CPP: tl.constexpr,
):
    """dx (and the p-block's share of d(dt) and dD) for one chunk, one head, one block of p.

    With v = dt x, q = C~, k = B~, Gam[t,u] = exp(g_t - g_u) (u <= t, same document), G = d loss/d(state
    leaving the chunk), w_u = exp(g_last - g_u) (masked):  dv = (qk^T*Gam)^T dy + w * k G^T."""
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    bi = pid_bh // H
    hi = pid_bh % H
    gi = hi // HPG   # the B/C group this head reads
    offs_t = tl.arange(0, T)
    # CPP consecutive chunks per program, as in `_chunk_fwd_kernel`
    if CPP == 1:
        _chunk_bwd_dx_one(x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, dstates_ptr, d_ptr, dy_ptr,
                          dx_ptr, ddt_ptr, dd_ptr, BATCH, L, H, HPG, P, NH, NCHUNK, LPAD,
                          sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_h, sb_n, scc_b, scc_l, scc_h, scc_n,
                          sc_b, sc_l, sc_n, sd_b, sd_l, sd_h, sd_p, pid_p, pid_c, bi, hi, gi, offs_t,
                          T, BLOCK_P, BLOCK_NH, ROPE, HAS_SEQ, HAS_D, DOT_PREC, DOT_DTYPE, ROUND_BF16)
    else:
        for c in range(pid_c * CPP, tl.minimum(pid_c * CPP + CPP, NCHUNK)):
            _chunk_bwd_dx_one(x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, dstates_ptr, d_ptr,
                              dy_ptr, dx_ptr, ddt_ptr, dd_ptr, BATCH, L, H, HPG, P, NH, NCHUNK, LPAD,
                              sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_h, sb_n, scc_b, scc_l, scc_h, scc_n,
                              sc_b, sc_l, sc_n, sd_b, sd_l, sd_h, sd_p, pid_p, c, bi, hi, gi, offs_t,
                              T, BLOCK_P, BLOCK_NH, ROPE, HAS_SEQ, HAS_D, DOT_PREC, DOT_DTYPE, ROUND_BF16)


@triton.jit
def _chunk_bwd_dx_one(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, dstates_ptr, d_ptr, dy_ptr,
    dx_ptr, ddt_ptr, dd_ptr, BATCH, L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p, sb_b, sb_l, sb_h, sb_n, scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n, sd_b, sd_l, sd_h, sd_p, pid_p, c, bi, hi, gi, offs_t,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """`_chunk_bwd_dx_kernel`'s work on chunk c."""
    chunk_start = c * T
    offs_l = chunk_start + offs_t
    mask_t = offs_l < L
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_nh = tl.arange(0, BLOCK_NH)
    mask_nh = offs_nh < NH

    gdt_row = (bi * H + hi).to(tl.int64) * LPAD
    g = tl.load(g_ptr + gdt_row + offs_l)
    dt = tl.load(dt_ptr + gdt_row + offs_l)
    g_last = tl.load(g_ptr + gdt_row + chunk_start + T - 1)
    same_doc, _, reaches_end, _ = _chunk_masks(seq_ptr, bi.to(tl.int64) * LPAD, chunk_start, offs_t, T, HAS_SEQ)
    weight = tl.where(reaches_end, tl.exp(g_last - g), 0.0)

    cos_base = cos_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    sin_base = sin_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    cos1, cos2, sin1, sin2 = _maybe_load_rope(cos_base, sin_base, sc_l, sc_n, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE)
    q_first, q_second = _load_rotated(c_ptr + bi.to(tl.int64) * scc_b + gi * scc_h + chunk_start * scc_l,
                                      scc_l, scc_n, cos1, cos2, sin1, sin2, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE)
    k_first, k_second = _load_rotated(b_ptr + bi.to(tl.int64) * sb_b + gi * sb_h + chunk_start * sb_l,
                                      sb_l, sb_n, cos1, cos2, sin1, sin2, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE)
    k_first = _op(k_first, DOT_DTYPE, ROUND_BF16)
    k_second = _op(k_second, DOT_DTYPE, ROUND_BF16)
    # scores transposed directly: [u, t] = k_u . q_t
    scores_t = tl.dot(k_first, tl.trans(_op(q_first, DOT_DTYPE, ROUND_BF16)), input_precision=DOT_PREC)
    scores_t += tl.dot(k_second, tl.trans(_op(q_second, DOT_DTYPE, ROUND_BF16)), input_precision=DOT_PREC)
    allowed_t = (offs_t[None, :] >= offs_t[:, None]) & same_doc     # same_doc is symmetric
    _dx_of_head(x_ptr, dstates_ptr, d_ptr, dy_ptr, dx_ptr, ddt_ptr, dd_ptr,
                BATCH, H, P, NH, NCHUNK, LPAD, sx_b, sx_l, sx_h, sx_p, sd_b, sd_l, sd_h, sd_p,
                scores_t, k_first, k_second, allowed_t, g, dt, weight, pid_p, c, bi, hi, offs_t, mask_t, offs_p, mask_p,
                offs_nh, mask_nh, T, HAS_D, DOT_PREC, DOT_DTYPE, ROUND_BF16)


@triton.jit
def _dx_of_head(
    x_ptr, dstates_ptr, d_ptr, dy_ptr, dx_ptr, ddt_ptr, dd_ptr,
    BATCH, H, P, NH, NCHUNK, LPAD, sx_b, sx_l, sx_h, sx_p, sd_b, sd_l, sd_h, sd_p,
    scores_t, k_first, k_second, allowed_t, g, dt, weight, pid_p, c, bi, hi, offs_t, mask_t, offs_p, mask_p, offs_nh,
    mask_nh, T: tl.constexpr, HAS_D: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """dx of head hi on chunk c and one block of p from the undecayed scores [u, t] = k_u . q_t: with v = dt x,
    Gam[t,u] = exp(g_t - g_u) (u <= t, same document), G = d loss/d(state leaving the chunk), `weight` w_u =
    exp(g_last - g_u) (masked): dv = (qk^T*Gam)^T dy + w * k G^T; also the p-block's shares of d(dt), dD."""
    N = 2 * NH
    offs_l = c * T + offs_t
    decay_t = tl.exp(tl.where(allowed_t, g[None, :] - g[:, None], float("-inf")))
    scores_t = _op(scores_t * decay_t, DOT_DTYPE, ROUND_BF16)

    mask_tp = mask_t[:, None] & mask_p[None, :]
    dy = tl.load(dy_ptr + bi.to(tl.int64) * sd_b + hi * sd_h + offs_l[:, None] * sd_l + offs_p[None, :] * sd_p,
                 mask=mask_tp, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p,
                mask=mask_tp, other=0.0).to(tl.float32)
    # G^T tile (n, p) of the state leaving chunk c, both halves
    grad_ptrs = (dstates_ptr + ((bi * (NCHUNK + 1) + c) * H + hi).to(tl.int64) * P * N
                 + offs_p[None, :] * N + offs_nh[:, None])
    mask_np = mask_nh[:, None] & mask_p[None, :]
    grad_first_t = _op(tl.load(grad_ptrs, mask=mask_np, other=0.0), DOT_DTYPE, ROUND_BF16)
    grad_second_t = _op(tl.load(grad_ptrs + NH, mask=mask_np, other=0.0), DOT_DTYPE, ROUND_BF16)

    dv = tl.dot(scores_t, _op(dy, DOT_DTYPE, ROUND_BF16), input_precision=DOT_PREC)
    dv_end = tl.dot(k_first, grad_first_t, input_precision=DOT_PREC)
    dv_end += tl.dot(k_second, grad_second_t, input_precision=DOT_PREC)
    dv += dv_end * weight[:, None]
    dx = dv * dt[:, None]
    if HAS_D:
        dx += tl.load(d_ptr + hi).to(tl.float32) * dy
        partial_row = (pid_p * BATCH + bi) * NCHUNK + c
        tl.store(dd_ptr + partial_row * H + hi, tl.sum(tl.sum(dy * x, axis=1), axis=0))
    tl.store(dx_ptr + bi.to(tl.int64) * sx_b + hi * sx_h + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p,
             dx.to(dx_ptr.dtype.element_ty), mask=mask_tp)
    # this p-block's share of d(dt) = sum_p dv * x; the launcher sums the shares
    ddt_row = ((pid_p * BATCH + bi) * H + hi).to(tl.int64) * LPAD
    tl.store(ddt_ptr + ddt_row + offs_l, tl.sum(dv * x, axis=1))


@triton.jit
def _chunk_bwd_dx_group_kernel(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, dstates_ptr, d_ptr, dy_ptr,
    dx_ptr, ddt_ptr, dd_ptr,
    BATCH, L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p,
    sb_b, sb_l, sb_h, sb_n,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    sd_b, sd_l, sd_h, sd_p,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """`_chunk_bwd_dx_kernel`'s work for every head of one B/C group: one program per (p-block, chunk, group)
    loads k = B~ and q = C~ and forms the scores k q^T once, then loops over the group's heads (its loads
    of dy, x and the state gradient prefetched across heads), each head applying its own decay.
    ("dx_group"; groups < heads only.)"""
    pid_p = tl.program_id(0)
    c = tl.program_id(1)
    pid_bg = tl.program_id(2)
    G = H // HPG
    bi = pid_bg // G
    gi = pid_bg % G
    chunk_start = c * T
    offs_t = tl.arange(0, T)
    mask_t = chunk_start + offs_t < L
    offs_nh = tl.arange(0, BLOCK_NH)
    mask_nh = offs_nh < NH
    same_doc, _, reaches_end, _ = _chunk_masks(seq_ptr, bi.to(tl.int64) * LPAD, chunk_start, offs_t, T, HAS_SEQ)
    allowed_t = (offs_t[None, :] >= offs_t[:, None]) & same_doc     # [u, t]; same_doc is symmetric
    cos_base = cos_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    sin_base = sin_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    q_first, q_second, k_first, k_second = _load_group_qk(
        c_ptr, b_ptr, cos_base, sin_base, bi, gi, chunk_start, offs_t, offs_nh, mask_t, mask_nh, NH,
        scc_b, scc_l, scc_h, scc_n, sb_b, sb_l, sb_h, sb_n, sc_l, sc_n, ROPE, DOT_DTYPE, ROUND_BF16)
    # scores transposed directly: [u, t] = k_u . q_t, shared by the group's heads
    scores_t = tl.dot(k_first, tl.trans(q_first), input_precision=DOT_PREC)
    scores_t += tl.dot(k_second, tl.trans(q_second), input_precision=DOT_PREC)
    offs_l = chunk_start + offs_t
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    for hi in range(gi * HPG, gi * HPG + HPG):
        gdt_row = (bi * H + hi).to(tl.int64) * LPAD
        g = tl.load(g_ptr + gdt_row + offs_l)
        dt = tl.load(dt_ptr + gdt_row + offs_l)
        g_last = tl.load(g_ptr + gdt_row + chunk_start + T - 1)
        weight = tl.where(reaches_end, tl.exp(g_last - g), 0.0)
        _dx_of_head(x_ptr, dstates_ptr, d_ptr, dy_ptr, dx_ptr, ddt_ptr, dd_ptr,
                    BATCH, H, P, NH, NCHUNK, LPAD, sx_b, sx_l, sx_h, sx_p, sd_b, sd_l, sd_h, sd_p,
                    scores_t, k_first, k_second, allowed_t, g, dt, weight, pid_p, c, bi, hi, offs_t, mask_t, offs_p,
                    mask_p, offs_nh, mask_nh, T, HAS_D, DOT_PREC, DOT_DTYPE, ROUND_BF16)


@triton.jit
def _chunk_bwd_dqk_kernel(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, states_ptr, dstates_ptr, dy_ptr,
    dbc_ptr, dg_ptr,
    L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p,
    sb_b, sb_l, sb_h, sb_n,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    sd_b, sd_l, sd_h, sd_p,
    sg_b, sg_l, sg_h, sg_n,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, FOR_C: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr, ROPE_IN: tl.constexpr, ATOMIC: tl.constexpr,
):
    """dC (FOR_C) or dB of one chunk of one head, and that side's share of dg (the gradient w.r.t. the
    within-chunk cumsum g). With M[t,u] = (q_t.k_u) Gam[t,u] (dy_t.v_u), e_t = exp(g_t), S = state
    entering the chunk, G = d loss/d(state leaving it):
      FOR_C: dq = ((dy v^T)*Gam) k + e * dy S;   dg_t += sum_u M[t,u] + q_t.(e_t (dy S)_t)
      else:  dk = ((dy v^T)*Gam)^T q + w * v G;  dg_u += -sum_t M[t,u] - k_u.(w_u (v G)_u).
    The chunk's last token also gets sum_u k_u.(w_u (x G)_u) dt_u here and exp(g_last) <G, S> from the state
    kernel (added by the launcher): together d loss / d g_last through the state leaving the chunk.
    M is summed by rows and by columns of one matrix, so its diagonal cancels exactly; q.dq - k.dk
    would leave bf16 rounding of the large diagonal terms in dt's gradient.
    q, k, the state tiles and the accumulator are full-width (all n columns: the two rotate-half halves side by
    side, `_full_columns`), one product each, none feeding another (see `_chunk_fwd_one`; v14: 10% faster than
    the half-width version on the Cheems shape)."""
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    hi = pid_bh % H
    gi = hi // HPG   # the B/C group this head reads
    N = 2 * NH
    chunk_start = c * T
    offs_t = tl.arange(0, T)
    offs_l = chunk_start + offs_t
    mask_t = offs_l < L
    cols, partner, mask_c, sign = _full_columns(BLOCK_NH, NH)

    gdt_row = (bi * H + hi).to(tl.int64) * LPAD
    g = tl.load(g_ptr + gdt_row + offs_l)
    dt = tl.load(dt_ptr + gdt_row + offs_l)
    g_last = tl.load(g_ptr + gdt_row + chunk_start + T - 1)
    same_doc, sees_carried, reaches_end, _ = _chunk_masks(seq_ptr, bi.to(tl.int64) * LPAD, chunk_start, offs_t, T,
                                                          HAS_SEQ)
    cos_base = cos_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    sin_base = sin_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    # ROPE_IN: rotate B, C on load; else b_ptr/c_ptr hold B~, C~ already (the forward's SAVE_ROTATED)
    q, k = _load_group_qk_full(c_ptr, b_ptr, cos_base, sin_base, bi, gi, chunk_start, offs_t, mask_t, cols, partner,
                               mask_c, sign, scc_b, scc_l, scc_h, scc_n, sb_b, sb_l, sb_h, sb_n, sc_l, sc_n, ROPE_IN,
                               DOT_DTYPE, ROUND_BF16)

    dy_v = tl.zeros((T, T), dtype=tl.float32)              # [t, u] = dy_t . x_u (times dt_u after the loop)
    acc = tl.zeros((T, 2 * BLOCK_NH), dtype=tl.float32)    # dy S (FOR_C) or x G (else), unscaled
    # slot c of states is the state entering chunk c; slot c of dstates, d loss / d(state leaving it)
    if FOR_C:
        state_ptr = states_ptr
    else:
        state_ptr = dstates_ptr
    state_base = ((bi * (NCHUNK + 1) + c) * H + hi).to(tl.int64) * P * N
    x_base = x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h
    dy_base = dy_ptr + bi.to(tl.int64) * sd_b + hi * sd_h
    for p_start in range(0, P, BLOCK_P):
        offs_p = p_start + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        mask_tp = mask_t[:, None] & mask_p[None, :]
        # x and dy enter the products as stored (exact); dt is applied to the fp32 results after the loop
        x = _op(tl.load(x_base + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mask_tp, other=0.0),
                DOT_DTYPE, ROUND_BF16)
        dy = _op(tl.load(dy_base + offs_l[:, None] * sd_l + offs_p[None, :] * sd_p, mask=mask_tp, other=0.0),
                 DOT_DTYPE, ROUND_BF16)
        dy_v = tl.dot(dy, tl.trans(x), dy_v, input_precision=DOT_PREC)
        tile = _op(tl.load(state_ptr + state_base + offs_p[:, None] * N + cols[None, :],
                           mask=mask_p[:, None] & mask_c[None, :], other=0.0), DOT_DTYPE, ROUND_BF16)
        if FOR_C:
            acc = tl.dot(dy, tile, acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(x, tile, acc, input_precision=DOT_PREC)

    allowed = (offs_t[:, None] >= offs_t[None, :]) & same_doc
    decay = tl.exp(tl.where(allowed, g[:, None] - g[None, :], float("-inf")))
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    dy_v = dy_v * decay * dt[None, :]
    products = scores * dy_v                              # M[t, u]
    dy_v = _op(dy_v, DOT_DTYPE, ROUND_BF16)
    if FOR_C:
        into = tl.where(sees_carried, tl.exp(g), 0.0)
        acc = acc * into[:, None]
        dg = tl.sum(products, axis=1) + tl.sum(q.to(tl.float32) * acc, axis=1)
        grad = acc + tl.dot(dy_v, k, input_precision=DOT_PREC)
    else:
        weight = tl.where(reaches_end, tl.exp(g_last - g) * dt, 0.0)   # dt: acc holds x G, not v G
        acc = acc * weight[:, None]
        end_terms = tl.sum(k.to(tl.float32) * acc, axis=1)
        # the same terms again at the last token, from the same fp32 numbers: the reverse cumsum that turns
        # dg into d(dt A) then cancels them exactly (a bf16 <G, state leaving> here would not)
        dg = -tl.sum(products, axis=0) - end_terms + tl.where(offs_t == T - 1, tl.sum(end_terms, axis=0), 0.0)
        grad = acc + tl.dot(tl.trans(dy_v), q, input_precision=DOT_PREC)
    # ATOMIC: float32 adds into the group's rows (its heads' shares), else this head's own rows
    out_head = gi if ATOMIC else hi
    _store_unrotated_full(dbc_ptr + bi.to(tl.int64) * sg_b + out_head * sg_h + chunk_start * sg_l, sg_l, sg_n,
                          cos_base, sin_base, sc_l, sc_n, grad, offs_t, mask_t, NH, T, BLOCK_NH, ROPE, ATOMIC)
    tl.store(dg_ptr + gdt_row + offs_l, dg)


@triton.jit
def _chunk_bwd_dbc_kernel(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, states_ptr, dstates_ptr, dy_ptr,
    db_ptr, dc_ptr, dg_ptr,
    L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p,
    sb_b, sb_l, sb_h, sb_n,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    sd_b, sd_l, sd_h, sd_p,
    sg_b, sg_l, sg_h, sg_n,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, ATOMIC: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr, ROPE_IN: tl.constexpr,
):
    """dC and dB of one chunk of one head and the whole dg of that chunk, in one program: the same math as
    `_chunk_bwd_dqk_kernel` for both sides, sharing q, k, the RoPE tables, dy.x^T and M (one read of dy and
    of the inputs instead of two). Two passes over p keep only one side's (T, n) accumulator live at a
    time: pass 1 dy x^T and dy S (C side, finished and stored), pass 2 x G (B side; x re-read, from L2).
    Full-width n operands as in `_chunk_bwd_dqk_kernel` (session 9; not timed in this form: the half-width
    version was 28% / 15% slower than the two launches on mamba's / the Cheems shape, v4b).
    dB/dC go to per-head rows of db_ptr/dc_ptr (strides sg_*), or with ATOMIC are added into the
    float32 rows of the head's group. dg includes the carried state's exp(g_last) <S, G> term (which `_state_bwd`
    forms for the other dB/dC kernels, reading every state for it): pass 2 re-reads S beside G, from L2."""
    c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    hi = pid_bh % H
    gi = hi // HPG   # the B/C group this head reads
    N = 2 * NH
    chunk_start = c * T
    offs_t = tl.arange(0, T)
    offs_l = chunk_start + offs_t
    mask_t = offs_l < L
    cols, partner, mask_c, sign = _full_columns(BLOCK_NH, NH)

    gdt_row = (bi * H + hi).to(tl.int64) * LPAD
    g = tl.load(g_ptr + gdt_row + offs_l)
    dt = tl.load(dt_ptr + gdt_row + offs_l)
    g_last = tl.load(g_ptr + gdt_row + chunk_start + T - 1)
    same_doc, sees_carried, reaches_end, crosses = _chunk_masks(seq_ptr, bi.to(tl.int64) * LPAD, chunk_start,
                                                                offs_t, T, HAS_SEQ)
    cos_base = cos_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    sin_base = sin_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l

    state_base = ((bi * (NCHUNK + 1) + c) * H + hi).to(tl.int64) * P * N
    x_base = x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h
    dy_base = dy_ptr + bi.to(tl.int64) * sd_b + hi * sd_h
    # pass 1: dy x^T and dy S (S = the state entering the chunk, slot c of states)
    dy_v = tl.zeros((T, T), dtype=tl.float32)
    acc = tl.zeros((T, 2 * BLOCK_NH), dtype=tl.float32)
    for p_start in range(0, P, BLOCK_P):
        offs_p = p_start + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        mask_tp = mask_t[:, None] & mask_p[None, :]
        x = _op(tl.load(x_base + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mask_tp, other=0.0),
                DOT_DTYPE, ROUND_BF16)
        dy = _op(tl.load(dy_base + offs_l[:, None] * sd_l + offs_p[None, :] * sd_p, mask=mask_tp, other=0.0),
                 DOT_DTYPE, ROUND_BF16)
        dy_v = tl.dot(dy, tl.trans(x), dy_v, input_precision=DOT_PREC)
        tile = _op(tl.load(states_ptr + state_base + offs_p[:, None] * N + cols[None, :],
                           mask=mask_p[:, None] & mask_c[None, :], other=0.0), DOT_DTYPE, ROUND_BF16)
        acc = tl.dot(dy, tile, acc, input_precision=DOT_PREC)

    # q = C~, k = B~ only now: holding them through the loop costs registers the loop's accumulators need
    q, k = _load_group_qk_full(c_ptr, b_ptr, cos_base, sin_base, bi, gi, chunk_start, offs_t, mask_t, cols, partner,
                               mask_c, sign, scc_b, scc_l, scc_h, scc_n, sb_b, sb_l, sb_h, sb_n, sc_l, sc_n, ROPE_IN,
                               DOT_DTYPE, ROUND_BF16)
    allowed = (offs_t[:, None] >= offs_t[None, :]) & same_doc
    decay = tl.exp(tl.where(allowed, g[:, None] - g[None, :], float("-inf")))
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    dy_v = dy_v * decay * dt[None, :]
    products = scores * dy_v                              # M[t, u]; its diagonal cancels exactly in dg
    dg = tl.sum(products, axis=1) - tl.sum(products, axis=0)
    dy_v = _op(dy_v, DOT_DTYPE, ROUND_BF16)

    # C side: dq = ((dy v^T)*Gam) k + e * dy S
    into = tl.where(sees_carried, tl.exp(g), 0.0)
    acc = acc * into[:, None]
    dg += tl.sum(q.to(tl.float32) * acc, axis=1)
    grad = acc + tl.dot(dy_v, k, input_precision=DOT_PREC)
    out_head = gi if ATOMIC else hi
    _store_unrotated_full(dc_ptr + bi.to(tl.int64) * sg_b + out_head * sg_h + chunk_start * sg_l, sg_l, sg_n,
                          cos_base, sin_base, sc_l, sc_n, grad, offs_t, mask_t, NH, T, BLOCK_NH, ROPE, ATOMIC)

    # pass 2, B side: dk = ((dy v^T)*Gam)^T q + w * v G (G = d loss / d state leaving, slot c of dstates)
    acc = tl.zeros((T, 2 * BLOCK_NH), dtype=tl.float32)
    overlap = 0.0
    for p_start in range(0, P, BLOCK_P):
        offs_p = p_start + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        x = _op(tl.load(x_base + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p,
                        mask=mask_t[:, None] & mask_p[None, :], other=0.0), DOT_DTYPE, ROUND_BF16)
        mask_pc = mask_p[:, None] & mask_c[None, :]
        tile = tl.load(dstates_ptr + state_base + offs_p[:, None] * N + cols[None, :], mask=mask_pc, other=0.0)
        state = tl.load(states_ptr + state_base + offs_p[:, None] * N + cols[None, :], mask=mask_pc, other=0.0)
        overlap += tl.sum(tl.sum(state.to(tl.float32) * tile.to(tl.float32), axis=1), axis=0)
        acc = tl.dot(x, _op(tile, DOT_DTYPE, ROUND_BF16), acc, input_precision=DOT_PREC)
    weight = tl.where(reaches_end, tl.exp(g_last - g) * dt, 0.0)   # dt: acc holds x G, not v G
    acc = acc * weight[:, None]
    end_terms = tl.sum(k.to(tl.float32) * acc, axis=1)
    # the same terms again at the last token, from the same fp32 numbers (see `_chunk_bwd_dqk_kernel`)
    last_token = tl.sum(end_terms, axis=0) + overlap * tl.where(crosses, tl.exp(g_last), 0.0)
    dg += tl.where(offs_t == T - 1, last_token, 0.0) - end_terms
    grad = acc + tl.dot(tl.trans(dy_v), q, input_precision=DOT_PREC)
    _store_unrotated_full(db_ptr + bi.to(tl.int64) * sg_b + out_head * sg_h + chunk_start * sg_l, sg_l, sg_n,
                          cos_base, sin_base, sc_l, sc_n, grad, offs_t, mask_t, NH, T, BLOCK_NH, ROPE, ATOMIC)
    tl.store(dg_ptr + gdt_row + offs_l, dg)


@triton.jit
def _chunk_bwd_dqk_group_kernel(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, states_ptr, dstates_ptr, dy_ptr,
    dbc_ptr, dg_ptr,
    L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p,
    sb_b, sb_l, sb_h, sb_n,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    sd_b, sd_l, sd_h, sd_p,
    sg_b, sg_l, sg_h, sg_n,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, HAS_SEQ: tl.constexpr, FOR_C: tl.constexpr, DOT_PREC: tl.constexpr,
    DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr, ROPE_IN: tl.constexpr,
):
    """dC (FOR_C) or dB of one chunk of one B/C group, summed over the group's heads in the program, and each
    head's share of dg (the same math as `_chunk_bwd_dqk_kernel`, whose docstring has the formulas).
    The heads share q = C~ and k = B~, so with W = sum_h (dy_h v_h^T) * Gam_h (T x T) the head loop keeps
    only W and the carried-state accumulator (dy_h S_h, or x_h G_h, each head's rows scaled by its own
    decay), and the products with k (FOR_C: dq = W k + ...) or q (dk = W^T q + ...) happen once per group.
    No per-head dB/dC rows, no group sum afterwards, no atomics. One p-tile of BLOCK_P >= P per head."""
    c = tl.program_id(0)
    pid_bg = tl.program_id(1)
    G = H // HPG
    bi = pid_bg // G
    gi = pid_bg % G
    N = 2 * NH
    chunk_start = c * T
    offs_t = tl.arange(0, T)
    offs_l = chunk_start + offs_t
    mask_t = offs_l < L
    offs_nh = tl.arange(0, BLOCK_NH)
    mask_nh = offs_nh < NH
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    mask_tp = mask_t[:, None] & mask_p[None, :]
    mask_pn = mask_p[:, None] & mask_nh[None, :]

    seq_row = bi.to(tl.int64) * LPAD
    same_doc, sees_carried, reaches_end, _ = _chunk_masks(seq_ptr, seq_row, chunk_start, offs_t, T, HAS_SEQ)
    allowed = (offs_t[:, None] >= offs_t[None, :]) & same_doc
    cos_base = cos_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    sin_base = sin_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
    # ROPE_IN: rotate B, C on load; else b_ptr/c_ptr hold B~, C~ already (the forward's SAVE_ROTATED)
    q_first, q_second, k_first, k_second = _load_group_qk(
        c_ptr, b_ptr, cos_base, sin_base, bi, gi, chunk_start, offs_t, offs_nh, mask_t, mask_nh, NH,
        scc_b, scc_l, scc_h, scc_n, sb_b, sb_l, sb_h, sb_n, sc_l, sc_n, ROPE_IN, DOT_DTYPE, ROUND_BF16)
    scores = tl.dot(q_first, tl.trans(k_first), input_precision=DOT_PREC)
    scores += tl.dot(q_second, tl.trans(k_second), input_precision=DOT_PREC)
    if FOR_C:
        state_ptr = states_ptr   # slot c: the state entering chunk c
    else:
        state_ptr = dstates_ptr  # slot c: d loss / d(state leaving chunk c)

    weights = tl.zeros((T, T), dtype=tl.float32)            # W = sum_h (dy_h . x_h) * Gam_h * dt_h
    acc_first = tl.zeros((T, BLOCK_NH), dtype=tl.float32)   # sum_h e_h * dy_h S_h (FOR_C) or w_h dt_h x_h G_h
    acc_second = tl.zeros((T, BLOCK_NH), dtype=tl.float32)
    for hi in range(gi * HPG, gi * HPG + HPG):
        gdt_row = (bi * H + hi).to(tl.int64) * LPAD
        g = tl.load(g_ptr + gdt_row + offs_l)
        dt = tl.load(dt_ptr + gdt_row + offs_l)
        x = _op(tl.load(x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p,
                        mask=mask_tp, other=0.0), DOT_DTYPE, ROUND_BF16)
        dy = _op(tl.load(dy_ptr + bi.to(tl.int64) * sd_b + hi * sd_h + offs_l[:, None] * sd_l + offs_p[None, :] * sd_p,
                         mask=mask_tp, other=0.0), DOT_DTYPE, ROUND_BF16)
        pn_ptrs = (state_ptr + ((bi * (NCHUNK + 1) + c) * H + hi).to(tl.int64) * P * N
                   + offs_p[:, None] * N + offs_nh[None, :])
        tile_first = _op(tl.load(pn_ptrs, mask=mask_pn, other=0.0), DOT_DTYPE, ROUND_BF16)
        tile_second = _op(tl.load(pn_ptrs + NH, mask=mask_pn, other=0.0), DOT_DTYPE, ROUND_BF16)
        if FOR_C:
            head_first = tl.dot(dy, tile_first, input_precision=DOT_PREC)
            head_second = tl.dot(dy, tile_second, input_precision=DOT_PREC)
            scale = tl.where(sees_carried, tl.exp(g), 0.0)
        else:
            head_first = tl.dot(x, tile_first, input_precision=DOT_PREC)
            head_second = tl.dot(x, tile_second, input_precision=DOT_PREC)
            g_last = tl.load(g_ptr + gdt_row + chunk_start + T - 1)
            scale = tl.where(reaches_end, tl.exp(g_last - g) * dt, 0.0)   # dt: the product holds x G, not v G
        head_first = head_first * scale[:, None]
        head_second = head_second * scale[:, None]
        dy_v = tl.dot(dy, tl.trans(x), input_precision=DOT_PREC)
        dy_v = dy_v * tl.exp(tl.where(allowed, g[:, None] - g[None, :], float("-inf"))) * dt[None, :]
        products = scores * dy_v                              # M_h[t, u]
        if FOR_C:
            carried = tl.sum(q_first.to(tl.float32) * head_first + q_second.to(tl.float32) * head_second, axis=1)
            dg = tl.sum(products, axis=1) + carried
        else:
            carried = tl.sum(k_first.to(tl.float32) * head_first + k_second.to(tl.float32) * head_second, axis=1)
            # the end terms again at the last token, from the same fp32 numbers (see `_chunk_bwd_dqk_kernel`)
            dg = -tl.sum(products, axis=0) - carried + tl.where(offs_t == T - 1, tl.sum(carried, axis=0), 0.0)
        tl.store(dg_ptr + gdt_row + offs_l, dg)
        weights += dy_v
        acc_first += head_first
        acc_second += head_second

    weights = _op(weights, DOT_DTYPE, ROUND_BF16)
    if FOR_C:
        grad_first = acc_first + tl.dot(weights, k_first, input_precision=DOT_PREC)
        grad_second = acc_second + tl.dot(weights, k_second, input_precision=DOT_PREC)
    else:
        weights_t = tl.trans(weights)
        grad_first = acc_first + tl.dot(weights_t, q_first, input_precision=DOT_PREC)
        grad_second = acc_second + tl.dot(weights_t, q_second, input_precision=DOT_PREC)
    _store_unrotated(dbc_ptr + bi.to(tl.int64) * sg_b + gi * sg_h + chunk_start * sg_l, sg_l, sg_n,
                     cos_base, sin_base, sc_l, sc_n, grad_first, grad_second, offs_t, offs_nh, mask_t,
                     mask_nh, NH, ROPE, False)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def _next_pow2(value, minimum=16):
    return max(minimum, triton.next_power_of_2(int(value)))


def _dot_precision(dtype):
    # float32 inputs get full-precision products (tests ask < 1e-3); tf32 would land near 3e-4 per product.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_dtypes(dtype):
    """(operand type, round through bf16) of the tensor-core products: the input's type, except under
    TRITON_INTERPRET=1, whose bf16/fp16 dot is wrong (environment.md): there the operands are rounded
    to bf16 and multiplied in float32, which reproduces the GPU's operand rounding."""
    if dtype == torch.float32:
        return tl.float32, False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32, True
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype], False


def _rope_args(cos, sin, fallback):
    """Pointers and (b, l, n) strides of the tables; a dummy pointer with zero strides when RoPE is off."""
    if cos is None:
        return fallback, fallback, (0, 0, 0), False
    return cos, sin, cos.stride(), True


def _forward(x, B, C, cos, sin, dt, g, seq, D, initial_state, T, config, save_for_backward=True):
    """Kernel forward. dt, g (b, h, lpad) float32; seq (b, lpad) int32 or None.
    Returns y, final, states, and B~, C~ (rotated; None unless config "save_rotated" and RoPE on)."""
    batch, length, heads, head_dim = x.shape
    heads_per_group = heads // B.shape[2]
    half = B.shape[-1] // 2
    n_chunks = dt.shape[-1] // T
    # "gluon_fwd": on Hopper, one Gluon walk per (batch, head) does both launches' work (ssd_gluon_fwd.py)
    if config.get("gluon_fwd", False) and x.is_cuda:
        from cheems_parallel.kernels import ssd_gluon_fwd
        if ssd_gluon_fwd.supported(x, B, cos, T, seq) and ssd_gluon_fwd.enough_sequences(
                batch * heads, sm_count(x.device),
                config.get("gluon_fwd_min_sequences")):
            save = cos is not None and save_for_backward and config.get("save_rotated", False)
            return ssd_gluon_fwd.fused_forward(x, B, C, cos, sin, dt, g, D, initial_state, save,
                                               store_states=save_for_backward, seq=seq)
    # slot c holds the state entering chunk c; slot n_chunks the final state
    states = torch.empty(batch, n_chunks + 1, heads, head_dim, 2 * half, device=x.device, dtype=x.dtype)
    final = torch.empty(batch, heads, head_dim, 2 * half, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    cos_arg, sin_arg, cos_strides, rope = _rope_args(cos, sin, dt)
    seq_arg = seq if seq is not None else dt
    precision = _dot_precision(x.dtype)
    dot_dtype, round_bf16 = _dot_dtypes(x.dtype)

    block_p = min(config["state_block_p"], _next_pow2(head_dim))
    block_nh = min(config["state_block_nh"], _next_pow2(half))
    grid = (triton.cdiv(head_dim, block_p) * triton.cdiv(half, block_nh), batch * heads)
    _state_fwd_kernel[grid](
        x, B, cos_arg, sin_arg, dt, g, seq_arg,
        initial_state if initial_state is not None else dt, states, final,
        length, heads, heads_per_group, head_dim, half, n_chunks, dt.shape[-1],
        *x.stride(), *B.stride(), *cos_strides,
        T=T, BLOCK_P=block_p, BLOCK_NH=block_nh, ROPE=rope, HAS_SEQ=seq is not None,
        HAS_INIT=initial_state is not None, DOT_PREC=precision, DOT_DTYPE=dot_dtype, ROUND_BF16=round_bf16,
        num_warps=config["state_warps"], num_stages=config["state_stages"], maxnreg=config.get("state_maxnreg"))

    # one group's heads share C~B~^T: computed once per group and chunk, read by each head's forward
    scores = None
    if heads_per_group > 1 and config.get("shared_scores", False):
        groups = B.shape[2]
        scores = torch.empty(batch, groups, n_chunks, T, T, device=x.device, dtype=torch.float32)
        _scores_kernel[(n_chunks, batch * groups)](
            B, C, cos_arg, sin_arg, scores, length, groups, half, n_chunks,
            *B.stride(), *C.stride(), *cos_strides,
            T=T, BLOCK_NH=_next_pow2(half), ROPE=rope, DOT_PREC=precision, DOT_DTYPE=dot_dtype,
            ROUND_BF16=round_bf16, num_warps=4, num_stages=2)

    # the rotated B~, C~ for the backward (only when it will run: RoPE on and gradients wanted)
    save_rotated = rope and save_for_backward and config.get("save_rotated", False)
    # the forward's tiles: "fwd_*", overridden where set by "fwd_save_*" when it stores B~, C~ (RoPE and
    # gradients: the rotation and the extra stores want 8 warps) or by "fwd_nograd_*" when no backward follows
    # and the forward forms its own C~B~^T (groups = heads; with a group's shared scores each program is light
    # and the "fwd_*" tiles win, bench/ssd_notes.md v13)
    fwd = {key: config.get(key) for key in ("fwd_block_p", "fwd_warps", "fwd_stages", "fwd_maxnreg")}
    fwd["fwd_chunks_per_program"] = config.get("fwd_chunks_per_program", 1)
    mode = "fwd_save_" if save_rotated else ("fwd_nograd_" if not save_for_backward and scores is None else None)
    if mode:
        fwd = {key: config.get(key.replace("fwd_", mode, 1), value) for key, value in fwd.items()}
    block_p = min(fwd["fwd_block_p"], _next_pow2(head_dim))
    # float32 tiles are twice the bytes: the chunk loop's prefetch would overflow shared memory (312 KB for the
    # saving forward at n = 128), so float32 runs one chunk per program
    cpp = fwd["fwd_chunks_per_program"] if x.element_size() <= 2 else 1
    grid = (triton.cdiv(head_dim, block_p), triton.cdiv(n_chunks, cpp), batch * heads)
    rotated_B = torch.empty_like(B) if save_rotated else None
    rotated_C = torch.empty_like(C) if save_rotated else None
    _chunk_fwd_kernel[grid](
        x, B, C, cos_arg, sin_arg, dt, g, seq_arg, states, D if D is not None else dt, y,
        rotated_B if save_rotated else y, rotated_C if save_rotated else y, scores if scores is not None else dt,
        length, heads, heads_per_group, head_dim, half, n_chunks, dt.shape[-1],
        *x.stride(), *B.stride(), *C.stride(), *cos_strides, *y.stride(),
        T=T, BLOCK_P=block_p, BLOCK_NH=_next_pow2(half), ROPE=rope, HAS_SEQ=seq is not None,
        HAS_D=D is not None, DOT_PREC=precision, DOT_DTYPE=dot_dtype, ROUND_BF16=round_bf16,
        SAVE_ROTATED=save_rotated, CPP=cpp, SCORES_IN=scores is not None,
        num_warps=fwd["fwd_warps"],
        num_stages=fwd["fwd_stages"], maxnreg=fwd["fwd_maxnreg"])
    return y, final, states, rotated_B, rotated_C


def _gluon_state_walk(x, C_in, dy, states, dfinal, T, seq, config):
    """`ssd_gluon_state_bwd` when it takes these inputs ("gluon_state_bwd", Hopper, enough b·h walks), else None."""
    if not (config.get("gluon_state_bwd", False) and x.is_cuda):
        return None
    from cheems_parallel.kernels import ssd_gluon_state_bwd as walk
    sequences = x.shape[0] * x.shape[2]
    if walk.supported(x, C_in, dy, states, dfinal, T, seq) and walk.enough_sequences(
            sequences, sm_count(x.device), config.get("gluon_state_bwd_min_sequences")):
        return walk
    return None


def _backward(dy, dfinal, x, B, C, cos, sin, dt, g, seq, D, states, T, config, rotated_B=None, rotated_C=None):
    """Kernel backward: dx, dB, dC, ddt as (k, b, h, lpad) partial sums, dg as a tuple of (b, h, lpad) terms (both
    summed by the prologue's backward), dD (or None), d_initial_state (float32)."""
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    heads_per_group = heads // groups
    half = B.shape[-1] // 2
    n_chunks = dt.shape[-1] // T
    dstates = torch.empty_like(states)
    dinit = torch.empty(batch, heads, head_dim, 2 * half, device=x.device, dtype=torch.float32)
    cos_arg, sin_arg, cos_strides, rope = _rope_args(cos, sin, dt)
    seq_arg = seq if seq is not None else dt
    precision = _dot_precision(x.dtype)
    dot_dtype, round_bf16 = _dot_dtypes(x.dtype)
    # with the forward's rotated B~, C~ the kernels load those and rotate nothing on load (RoPE stays on
    # for un-rotating dB, dC)
    rope_in = rope and rotated_B is None
    B_in = B if rotated_B is None else rotated_B
    C_in = C if rotated_C is None else rotated_C

    # "gluon_bwd": dx, dB, dC and dg by one warp-specialised Gluon launch on Hopper: for groups < heads without
    # RoPE (ssd_gluon_bwd.py), for groups = heads from the forward's rotated B~, C~ or without RoPE
    # ("gluon_head_bwd", ssd_gluon_head_bwd.py)
    gluon = None
    if config.get("gluon_bwd", False) and x.is_cuda:
        if groups < heads and not rope:
            from cheems_parallel.kernels import ssd_gluon_bwd as module
        elif groups == heads and not rope_in and config.get("gluon_head_bwd", False):
            from cheems_parallel.kernels import ssd_gluon_head_bwd as module
        else:
            module = None
        gluon = module if module is not None and module.supported(x, B_in, dy, states, T, seq) else None

    # the dB/dC kernels: per group ("dqk_group", groups < heads), else merged ("dqk_merged") or two launches
    group_kernel = groups < heads and config.get("dqk_group", False)
    merged = config.get("dqk_merged", False) and not group_kernel
    # the carried state's exp(g_last) <S, G> term of dg: formed by the Gluon or the merged kernel from tiles they
    # load anyway, else by _state_bwd (which then reads every state for it)
    overlap_in_state_bwd = gluon is None and not merged

    # the reverse state pass: one Gluon walk per (batch, head) when the <S, G> term is formed elsewhere and C comes
    # rotated, else the Triton kernel
    state_walk = (_gluon_state_walk(x, C_in, dy, states, dfinal, T, seq, config)
                  if not overlap_in_state_bwd and not rope_in else None)
    if state_walk is not None:
        state_walk.state_backward(dy, C_in, g, seq, dfinal, dstates, dinit)
    else:
        block_p = min(config["state_block_p"], _next_pow2(head_dim))
        block_nh = min(config["state_block_nh"], _next_pow2(half))
        pn_blocks = triton.cdiv(head_dim, block_p) * triton.cdiv(half, block_nh)
        overlap = (torch.empty(pn_blocks, batch, heads, n_chunks, device=x.device, dtype=torch.float32)
                   if overlap_in_state_bwd else dt)
        _state_bwd_kernel[(pn_blocks, batch * heads)](
            dy, C_in, cos_arg, sin_arg, g, seq_arg, dfinal if dfinal is not None else dt, states, dstates, dinit,
            overlap, batch, length, heads, heads_per_group, head_dim, half, n_chunks, dt.shape[-1],
            *dy.stride(), *C.stride(), *cos_strides,
            T=T, BLOCK_P=block_p, BLOCK_NH=block_nh, ROPE=rope_in, HAS_SEQ=seq is not None,
            HAS_DFINAL=dfinal is not None, DOT_PREC=precision, DOT_DTYPE=dot_dtype, ROUND_BF16=round_bf16,
            OVERLAP=overlap_in_state_bwd,
            num_warps=config["state_warps"], num_stages=config["state_stages"], maxnreg=config.get("state_maxnreg"))
    if gluon is not None:
        if groups < heads:
            dx, dB, dC, ddt_partial, dg_parts, dD_partial = gluon.fused_group_backward(
                x, dy, B_in, C_in, dt, g, D, states, dstates, overlap_split=config.get("gluon_overlap_split", True))
        else:
            tables = _head_backward_tables(cos, sin) if cos is not None else None
            dx, dB, dC, ddt_partial, dg_parts, dD_partial = gluon.fused_head_backward(
                x, dy, B_in, C_in, tables, dt, g, D, states, dstates,
                seq=seq)
        dD = dD_partial.sum(dim=(0, 2)) if D is not None else None   # dD_partial per token, (b, h, lpad)
        return dx, dB, dC, ddt_partial, dg_parts, dD, dinit   # dB, dC in x's dtype, as B's and C's

    common = dict(T=T, BLOCK_NH=_next_pow2(half), ROPE=rope, HAS_SEQ=seq is not None, DOT_PREC=precision,
                  DOT_DTYPE=dot_dtype, ROUND_BF16=round_bf16)
    dx = torch.empty_like(x)
    # dx: per head, or with groups < heads and "dx_group" one program per group looping over its heads
    dx_group = groups < heads and config.get("dx_group", False)
    block_p = min(config["dx_group_block_p" if dx_group else "bwd_block_p"], _next_pow2(head_dim))
    p_blocks = triton.cdiv(head_dim, block_p)
    ddt_partial = torch.empty(p_blocks, *dt.shape, device=x.device, dtype=torch.float32)
    dD_partial = torch.empty(p_blocks, batch, n_chunks, heads, device=x.device, dtype=torch.float32) if D is not None else None
    dx_args = (x, B_in, C_in, cos_arg, sin_arg, dt, g, seq_arg, dstates, D if D is not None else dt, dy,
               dx, ddt_partial, dD_partial if D is not None else dt,
               batch, length, heads, heads_per_group, head_dim, half, n_chunks, dt.shape[-1],
               *x.stride(), *B.stride(), *C.stride(), *cos_strides, *dy.stride())
    if dx_group:
        _chunk_bwd_dx_group_kernel[(p_blocks, n_chunks, batch * groups)](
            *dx_args, BLOCK_P=block_p, HAS_D=D is not None, **dict(common, ROPE=rope_in),
            num_warps=config["dx_group_warps"], num_stages=config["dx_group_stages"],
            maxnreg=config.get("dx_group_maxnreg"))
    else:
        cpp = config.get("bwd_chunks_per_program", 1)
        _chunk_bwd_dx_kernel[(p_blocks, triton.cdiv(n_chunks, cpp), batch * heads)](
            *dx_args, BLOCK_P=block_p, HAS_D=D is not None, CPP=cpp, **dict(common, ROPE=rope_in),
            num_warps=config["bwd_warps"], num_stages=config["bwd_stages"], maxnreg=config.get("bwd_maxnreg"))

    # dB/dC with groups < heads: by one program per group ("dqk_group", ahead of "dqk_merged"), or written
    # per head, then summed over each group's heads in float32, or added atomically into float32 group rows
    # ("group_reduce": "atomic"); groups = heads: stored directly.
    atomic = groups < heads and config.get("group_reduce") == "atomic" and not group_kernel
    if atomic:
        dB_out = torch.zeros(batch, length, groups, 2 * half, device=x.device, dtype=torch.float32)
        dC_out = torch.zeros_like(dB_out)
    elif groups < heads and not group_kernel:
        dB_out = torch.empty(batch, length, heads, 2 * half, device=x.device, dtype=x.dtype)
        dC_out = torch.empty_like(dB_out)
    else:
        dB_out = torch.empty_like(B)
        dC_out = torch.empty_like(C)
    block_p = min(config["dqk_block_p"], _next_pow2(head_dim))
    shape_args = (length, heads, heads_per_group, head_dim, half, n_chunks, dt.shape[-1],
                  *x.stride(), *B.stride(), *C.stride(), *cos_strides, *dy.stride(), *dB_out.stride())
    if merged:
        dg = torch.empty_like(g)
        _chunk_bwd_dbc_kernel[(n_chunks, batch * heads)](
            x, B_in, C_in, cos_arg, sin_arg, dt, g, seq_arg, states, dstates, dy, dB_out, dC_out, dg,
            *shape_args, BLOCK_P=block_p, ATOMIC=atomic, ROPE_IN=rope_in, **common,
            num_warps=config["dqk_warps"], num_stages=config["dqk_stages"],
                maxnreg=config.get("dqk_maxnreg"))
    else:
        # two launches, C side then B side: per group (one program loops over the group's heads) or per head
        if group_kernel:
            kernel, grid = _chunk_bwd_dqk_group_kernel, (n_chunks, batch * groups)
            tiles = dict(BLOCK_P=_next_pow2(head_dim), num_warps=config["dqk_group_warps"],
                         num_stages=config["dqk_group_stages"], maxnreg=config.get("dqk_group_maxnreg"))
        else:
            kernel, grid = _chunk_bwd_dqk_kernel, (n_chunks, batch * heads)
            tiles = dict(BLOCK_P=block_p, ATOMIC=atomic, num_warps=config["dqk_warps"],
                         num_stages=config["dqk_stages"], maxnreg=config.get("dqk_maxnreg"))
        dg_from_c = torch.empty_like(g)
        dg = torch.empty_like(g)   # dg from the B side, then the sum
        for for_c, grad, dg_part in ((True, dC_out, dg_from_c), (False, dB_out, dg)):
            kernel[grid](x, B_in, C_in, cos_arg, sin_arg, dt, g, seq_arg, states, dstates, dy, grad, dg_part,
                         *shape_args, FOR_C=for_c, ROPE_IN=rope_in, **common, **tiles)
        dg += dg_from_c
    if groups < heads and not group_kernel:
        if not atomic:
            dB_out = dB_out.view(batch, length, groups, heads_per_group, -1).sum(dim=3, dtype=torch.float32)
            dC_out = dC_out.view(batch, length, groups, heads_per_group, -1).sum(dim=3, dtype=torch.float32)
        dB, dC = dB_out.to(B.dtype), dC_out.to(C.dtype)
    else:
        dB, dC = dB_out, dC_out
    # d loss / d g_last through the carried state: exp(g_last) <G_c, S_c-1>, at each chunk's last token
    if overlap_in_state_bwd:
        dg.view(batch, heads, n_chunks, T)[..., -1] += overlap.sum(dim=0)
    dD = dD_partial.sum(dim=(0, 1, 2)) if D is not None else None
    return dx, dB, dC, ddt_partial, (dg,), dD, dinit


class _SSDChunkedFunction(torch.autograd.Function):
    """y, final_state from (x, dt_raw, dt_bias, A, B, C, D, initial_state); cos/sin/seq/T/config are constants.

    dt and g come from the Triton prologue (`ssd_prologue`), whose backward turns the main kernels' ddt and dg into
    d dt_raw, d dt_bias and dA."""

    @staticmethod
    def forward(ctx, x, dt_raw, dt_bias, A, B, C, D, initial_state, cos, sin, seq, T, config):
        wants_grad = any(ctx.needs_input_grad[:8])
        # an unused output's gradient arrives as None, not as zeros to fill and read (the layer drops the final state)
        ctx.set_materialize_grads(False)
        dt, g = ssd_prologue.prologue_forward(dt_raw, dt_bias, A, T)
        y, final, states, rotated_B, rotated_C = _forward(x, B, C, cos, sin, dt, g, seq, D, initial_state, T,
                                                         config, save_for_backward=wants_grad)
        ctx.save_for_backward(x, dt_raw, dt_bias, A, dt, g, B, C, D, states, cos, sin, seq, rotated_B, rotated_C)
        ctx.T = T
        ctx.config = config
        ctx.init_dtype = initial_state.dtype if initial_state is not None else None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt_raw, dt_bias, A, dt, g, B, C, D, states, cos, sin, seq, rotated_B, rotated_C = ctx.saved_tensors
        dy = dy.contiguous() if dy is not None else torch.zeros_like(x)
        dfinal = dfinal.contiguous() if dfinal is not None else None
        dx, dB, dC, ddt_parts, dg_parts, dD, dinit = _backward(dy, dfinal, x, B, C, cos, sin, dt, g, seq, D, states,
                                                               ctx.T, ctx.config, rotated_B, rotated_C)
        d_raw, d_bias, dA = ssd_prologue.prologue_backward(ddt_parts, dg_parts, dt_raw, dt_bias, A, ctx.T)
        if D is not None:
            dD = dD.to(D.dtype)
        dinit = dinit.to(ctx.init_dtype) if ctx.init_dtype is not None else None
        return dx, d_raw, d_bias, dA, dB, dC, dD, dinit, None, None, None, None, None


def _check_shapes(x, dt_raw, dt_bias, A, B, C, cos, sin, D, initial_state, seq_idx):
    """One-line errors for shape mismatches a caller can make (the kernels would read out of bounds)."""
    if x.dim() != 4:
        raise ValueError(f"ssd_fused: x must be (b, l, h, p), got shape {tuple(x.shape)}")
    batch, length, heads, head_dim = x.shape
    state_dim = B.shape[-1]
    groups = B.shape[2] if B.dim() == 4 else -1
    if groups < 1 or heads % groups:
        raise ValueError(f"ssd_fused: B must be (b, l, groups, n) with groups dividing h = {heads}, "
                         f"got shape {tuple(B.shape)}")
    expected = {
        "dt_raw": (dt_raw, (batch, length, heads)), "dt_bias": (dt_bias, (heads,)), "A": (A, (heads,)),
        "B": (B, (batch, length, groups, state_dim)), "C": (C, (batch, length, groups, state_dim)),
    }
    if cos is not None or sin is not None:
        if cos is None or sin is None:
            raise ValueError("ssd_fused: cos and sin must both be given or both be None")
        expected["cos"] = (cos, (batch, length, state_dim))
        expected["sin"] = (sin, (batch, length, state_dim))
    if D is not None:
        expected["D"] = (D, (heads,))
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (batch, heads, head_dim, state_dim))
    if seq_idx is not None:
        expected["seq_idx"] = (seq_idx, (batch, length))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"ssd_fused: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if state_dim % 2:
        raise ValueError(f"ssd_fused: state size n must be even (RoPE halves), got {state_dim}")


_TABLE_CACHE = {}   # what -> (weak references to the caller's cos, sin, their versions, what was derived from them)


def _from_tables(cos, sin, what, derive):
    """derive(cos, sin) (a tuple of new tensors, or of cos / sin themselves), kept for as long as the caller's tensors
    live unchanged (same objects, same versions): every SSD layer of a model step gets the same two tables, so the
    layers share one derived copy instead of one each. `what` names the derivation (one entry per name)."""
    if cos.is_inference() or sin.is_inference():   # no version counters to check
        return derive(cos, sin)
    versions = (cos._version, sin._version)
    entry = _TABLE_CACHE.get(what)
    if entry is not None and entry[0]() is cos and entry[1]() is sin and entry[2] == versions:
        return entry[3]
    derived = derive(cos, sin)
    if all(tensor is not cos and tensor is not sin for tensor in derived):   # copies: worth keeping
        _TABLE_CACHE[what] = (weakref.ref(cos), weakref.ref(sin), versions, derived)
    return derived


def _kernel_tables(cos, sin, dtype):
    """cos / sin in `dtype`, contiguous, shared by the layers of a step (`_from_tables`)."""
    return _from_tables(cos, sin, ("kernel tables", dtype),
                        lambda cos, sin: (cos.to(dtype).contiguous(), sin.to(dtype).contiguous()))


def _head_backward_tables(cos, sin):
    """The Gluon head backward's un-rotation tables in its load order, derived once for all layers of a step."""
    from cheems_parallel.kernels.ssd_gluon_head_bwd import fragment_tables
    return _from_tables(cos, sin, "head backward", lambda cos, sin: (fragment_tables(cos, sin), ))[0]


def ssd_fused(x, dt_raw, dt_bias, A, B, C, cos=None, sin=None, chunk_size=256, D=None,
              initial_state=None, seq_idx=None, kernel_chunk=None, config=None):
    """Chunked SSD with softplus(dt + dt_bias) and RoPE on B/C, on Triton kernels. See the module docstring.

    `chunk_size` is accepted for the reference's signature; the kernels use their own chunk length
    `kernel_chunk` (default KERNEL_CHUNK), which changes rounding only, not the function."""
    _check_shapes(x, dt_raw, dt_bias, A, B, C, cos, sin, D, initial_state, seq_idx)
    T = kernel_chunk or KERNEL_CHUNK
    config = dict(CONFIG, **(config or {}))
    batch, length, heads, _ = x.shape
    pad = (-length) % T
    seq = None
    if seq_idx is not None:
        # padding continues the last document, so it never resets the final state
        seq = seq_idx.to(torch.int32)
        seq = torch.cat([seq, seq[:, -1:].expand(batch, pad)], dim=1).contiguous()
    dtype = x.dtype
    if cos is not None:
        # the tables in x's precision, as apply_rope uses them (half the bytes of float32 for bf16 inputs)
        table_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        if config.get("rope_tables_fp32", False):
            table_dtype = torch.float32
        cos, sin = _kernel_tables(cos, sin, table_dtype)
    x = x.contiguous()
    B = B.to(dtype).contiguous()
    C = C.to(dtype).contiguous()
    initial_state = initial_state.contiguous() if initial_state is not None else None
    return _SSDChunkedFunction.apply(x, dt_raw, dt_bias, A, B, C, D, initial_state, cos, sin, seq, T, config)


def ssd_fused_reference(x, dt_raw, dt_bias, A, B, C, cos=None, sin=None, chunk_size=256, D=None,
                        initial_state=None, seq_idx=None):
    """The contract `ssd_fused` implements, composed from the pure-PyTorch ops."""
    dt = F.softplus(dt_raw + dt_bias)
    heads_per_group = x.shape[2] // B.shape[2]
    if heads_per_group > 1:  # head i reads group i // heads_per_group (mamba_ssm's layout)
        B = B.repeat_interleave(heads_per_group, dim=2)
        C = C.repeat_interleave(heads_per_group, dim=2)
    if cos is not None:
        B = apply_rope(B, cos[:, :, None], sin[:, :, None])
        C = apply_rope(C, cos[:, :, None], sin[:, :, None])
    return ssd_chunked(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx)
