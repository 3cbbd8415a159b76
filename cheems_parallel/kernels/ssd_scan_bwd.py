"""A fused reverse-walk SSD backward ("scan backward"): a drop-in for `cheems_parallel.kernels.ssd._backward`.

    scan_backward(dy, dfinal, x, B, C, cos, sin, dt, g, seq, D, states, T, config, rotated_B=None, rotated_C=None)
        -> (dx, dB, dC, ddt, dg, dD, dinit)

Same arguments, outputs, dtypes and shapes as `ssd._backward` (see there and the module docstring of
cheems_parallel/kernels/ssd.py): dx (b, l, h, p) in x's dtype; dB, dC (b, l, g, n) in B's / C's dtype; ddt, dg
(b, h, l padded to T) float32; dD (h,) float32 or None; dinit (b, h, p, n) float32.

Why: `ssd._backward` writes dS, the gradient w.r.t. the state leaving every chunk, (b, chunks + 1, h, p, n) to
HBM in its reverse state kernel, then reads it back (and the forward's states) in the parallel dx and dB/dC
kernels. Here one program per (batch, head, block of p) walks the chunks in reverse and keeps dS in float32
registers; per chunk it does all of that chunk's backward, then passes dS on to the chunk before.

Per chunk c, with q = C~, k = B~ (T, n), v = dt x, Gam[t, u] = exp(g_t - g_u) (u <= t, same document),
e_t = exp(g_t) (masked: sees the carried state), w_u = exp(g_last - g_u) (masked: reaches the chunk's end),
a = exp(g_last) (masked: the state crosses the chunk), S = the state entering chunk c (the forward's
`states[:, c]`), G = d loss / d(state leaving chunk c) (registers), M[t, u] = (q_t.k_u) Gam[t, u] (dy_t.v_u):
    dv  = ((q k^T) * Gam)^T dy + w * (k G^T)        dx = dt dv + D dy,   ddt = sum_p dv x,  dD = sum dy x
    dq  = ((dy v^T) * Gam) k + e * (dy S)            (summed over p: p-blocks add into float32 rows)
    dk  = ((dy v^T) * Gam)^T q + w * (v G)
    dg  = rowsum M - colsum M + q.(e dy S) - k.(w v G), and at the last token sum_u k_u.(w v G)_u + a <G, S>
        = rowsum M + q.(e dy S) - dt ddt,                   as colsum M + k.(w v G) = sum_p v dv = dt ddt
    G  <- a G + (e dy)^T q                            (the gradient w.r.t. the state leaving chunk c - 1)
All of dq, dk, dg, ddt are linear in the p-sums, so programs over different blocks of p add their shares. The
B side's share of dg comes from ddt (which dx's pass makes anyway): no column sums of M (a reduction of a (T, T)
tile across warps) and fewer spills (sm_90: 32-104 B less stack per thread; split_c: none). Order within a chunk:
M and its row sums, dx (needs G), <G, S>, then (transposed kernel) dq, dk, the update of G; (`_scan_bwd_kernel`)
dk, G, dq.
Two kernels do this: `_scan_bwd_transposed_kernel` (the default: whole-n tiles, dk and dq accumulated as (n, T))
and `_scan_bwd_kernel` (rotate-half halves, as `ssd`'s kernels). With float32 atomics (several blocks of p, or
several heads per B/C group, or RoPE at an n that is not a power of two) dB and dC are not bitwise reproducible.
"""
import torch
import triton
import triton.language as tl

from cheems_parallel.kernels.ssd import (_chunk_bwd_dqk_kernel, _chunk_masks, _dot_dtypes, _dot_precision,
                                         _load_rotated_operands, _next_pow2, _op, _rope_args, _store_unrotated)

# Tiles and variants of the scan backward (config keys "scan_bwd_*" override them). block_p: the rows of p one
# program owns (p = 128 at 64: two programs per (batch, head) that add their dB/dC/dg/ddt shares with float32
# atomics); warps / stages / maxnreg: as in ssd.CONFIG. transposed: `_scan_bwd_transposed_kernel` (whole-n tiles,
# dB/dC accumulated as (n, T)), else `_scan_bwd_kernel` (rotate-half halves, dB/dC as (T, n/2)); for the latter,
# carried_by_dot: the C side's share of dg as rowsum(dy * (q S^T)) (the transposed kernel always does so), and
# split_c: dC and the C side's dg from `ssd._chunk_bwd_dqk_kernel` (FOR_C, parallel over chunks; it reads the
# forward's states, never dS) in a second launch, c_* its tiles.
# Offline sm_90 compile (Triton 3.6, bf16, p = n = 128; registers / stack (spill) bytes per thread, mamba problem /
# Cheems problem; v8b, dg's B side from ddt); no configuration compiles without spills. Transposed kernel, 8 warps:
# block_p 64 with 2 stages 255/456, 255/560 (the default: the fewest atomics and products among the least
# spilling; 64 HGMMA, whole kernel 98 STL / 96 LDL on the mamba problem; v8 496/592), 1 stage 255/576, 255/664,
# 3 stages 255/520, 255/896; block_p 32 255/240, 255/296 (52 HGMMA, 52 STL / 49 LDL; v8 336/400: the fewest
# spills, but twice the programs, atomics and q k^T products); block_p 128 255/1248, 255/1280; 4 warps, block_p 32
# 255/912, 255/1088. Rotate-half kernel, 8 warps, 1 stage: block_p 64 255/728, 255/728 (100 HGMMA); block_p 32
# 255/416, 255/448; split_c, block_p 32 255/248, 255/288 (2 stages 255/376, 255/416; + the FOR_C launch, 4 warps:
# 238/0, 246/0). Not measured on a GPU.
SCAN_BWD_CONFIG = {
    "scan_bwd_block_p": 64, "scan_bwd_warps": 8, "scan_bwd_stages": 2, "scan_bwd_maxnreg": None,
    "scan_bwd_transposed": True, "scan_bwd_carried_by_dot": False, "scan_bwd_split_c": False,
    "scan_bwd_c_block_p": 64, "scan_bwd_c_warps": 4, "scan_bwd_c_stages": 2,
}


@triton.jit
def _add_unrotated_half(base_ptr, stride_t, stride_n, cos_ptr, sin_ptr, stride_ct, stride_cn, grad, offs_t, offs_nh,
                        mask_t, mask_nh, NH, SECOND: tl.constexpr, ROPE: tl.constexpr):
    """Float32 adds of one rotate-half half of a gradient of rope's output into the gradient of its input:
    out_1 = g_1 cos_1 + g_2 sin_2, out_2 = g_2 cos_2 - g_1 sin_1 (`_store_unrotated`), one half's terms at a time,
    so only one (T, n / 2) accumulator need be live."""
    mask = mask_t[:, None] & mask_nh[None, :]
    ptrs = base_ptr + offs_t[:, None] * stride_t + offs_nh[None, :] * stride_n
    table = offs_t[:, None] * stride_ct + offs_nh[None, :] * stride_cn
    if SECOND:
        own_ptrs = ptrs + NH * stride_n
        other_ptrs = ptrs
        table += NH * stride_cn
    else:
        own_ptrs = ptrs
        other_ptrs = ptrs + NH * stride_n
    if ROPE:
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(own_ptrs, grad * cos, mask=mask, sem="relaxed")
        if SECOND:
            tl.atomic_add(other_ptrs, grad * sin, mask=mask, sem="relaxed")
        else:
            tl.atomic_add(other_ptrs, -grad * sin, mask=mask, sem="relaxed")
    else:
        tl.atomic_add(own_ptrs, grad, mask=mask, sem="relaxed")


@triton.jit
def _scan_bwd_kernel(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, states_ptr, d_ptr, dy_ptr, dfinal_ptr,
    dx_ptr, db_ptr, dc_ptr, ddt_ptr, dg_ptr, dd_ptr, dinit_ptr, zero_ptr,
    BATCH, L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p,
    sb_b, sb_l, sb_h, sb_n,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    sd_b, sd_l, sd_h, sd_p,
    sg_b, sg_l, sg_h, sg_n,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE: tl.constexpr, ROPE_IN: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr,
    HAS_DFINAL: tl.constexpr, ATOMIC_BC: tl.constexpr, ATOMIC_SCALARS: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr, CARRIED_BY_DOT: tl.constexpr,
    WITH_C: tl.constexpr,
):
    """The whole backward of one (batch, head, block of p), chunks in reverse. ATOMIC_BC: dB/dC go as float32
    adds into the head's group rows of db_ptr/dc_ptr (strides sg_*), else stored into per-head rows.
    ATOMIC_SCALARS: ddt and dg are float32 adds (several blocks of p), else stored."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # batch fastest: the programs running at once are mostly of different batch rows, so fewer of them add into
    # the same dB/dC rows (one B/C group: every head of a row would, in step, walk for walk)
    bi = pid_bh % BATCH
    hi = pid_bh // BATCH
    gi = hi // HPG   # the B/C group this head reads
    N = 2 * NH
    offs_t = tl.arange(0, T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_nh = tl.arange(0, BLOCK_NH)
    mask_p = offs_p < P
    mask_nh = offs_nh < NH
    mask_pn = mask_p[:, None] & mask_nh[None, :]
    pn_offs = offs_p[:, None] * N + offs_nh[None, :]
    head_pn = (bi * H + hi).to(tl.int64) * P * N
    # G: d loss / d(state leaving the current chunk), this block's rows, in its two rotate-half halves
    if HAS_DFINAL:
        grad_first = tl.load(dfinal_ptr + head_pn + pn_offs, mask=mask_pn, other=0.0).to(tl.float32)
        grad_second = tl.load(dfinal_ptr + head_pn + pn_offs + NH, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        grad_first = tl.zeros((BLOCK_P, BLOCK_NH), dtype=tl.float32)
        grad_second = tl.zeros((BLOCK_P, BLOCK_NH), dtype=tl.float32)
    if HAS_D:
        d_value = tl.load(d_ptr + hi).to(tl.float32)

    x_base = x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h
    dy_base = dy_ptr + bi.to(tl.int64) * sd_b + hi * sd_h
    b_base = b_ptr + bi.to(tl.int64) * sb_b + gi * sb_h
    c_base = c_ptr + bi.to(tl.int64) * scc_b + gi * scc_h
    out_head = gi if ATOMIC_BC else hi
    db_base = db_ptr + bi.to(tl.int64) * sg_b + out_head * sg_h
    dc_base = dc_ptr + bi.to(tl.int64) * sg_b + out_head * sg_h
    gdt_row = (bi * H + hi).to(tl.int64) * LPAD
    seq_row = bi.to(tl.int64) * LPAD
    for step in range(NCHUNK):
        c = NCHUNK - 1 - step
        chunk_start = c * T
        # a zero the compiler cannot see through: the tile offsets and masks below are rebuilt every chunk
        # instead of being hoisted out of the loop and held (spilled) across it (sm_90: -100 to -200 B of stack)
        zero = tl.multiple_of(tl.load(zero_ptr + c), 1024)
        offs_t_c = tl.arange(0, T) + zero
        offs_p_c = pid_p * BLOCK_P + tl.arange(0, BLOCK_P) + zero
        mask_p_c = offs_p_c < P
        offs_nh_c = tl.arange(0, BLOCK_NH) + zero
        mask_nh_c = offs_nh_c < NH
        mask_pn_c = mask_p_c[:, None] & mask_nh_c[None, :]
        pn_offs_c = offs_p_c[:, None] * N + offs_nh_c[None, :]
        offs_l = chunk_start + offs_t_c
        mask_t = offs_l < L
        mask_tp = mask_t[:, None] & mask_p_c[None, :]
        g = tl.load(g_ptr + gdt_row + offs_l)
        dt = tl.load(dt_ptr + gdt_row + offs_l)
        g_last = tl.load(g_ptr + gdt_row + chunk_start + T - 1)
        same_doc, sees_carried, reaches_end, crosses = _chunk_masks(seq_ptr, seq_row, chunk_start, offs_t_c, T,
                                                                    HAS_SEQ)
        into = tl.where(sees_carried, tl.exp(g), 0.0)
        to_end = tl.where(reaches_end, tl.exp(g_last - g), 0.0)
        chunk_decay = tl.where(crosses, tl.exp(g_last), 0.0)
        allowed = (offs_t_c[:, None] >= offs_t_c[None, :]) & same_doc
        decay = tl.exp(tl.where(allowed, g[:, None] - g[None, :], float("-inf")))
        cos_base = cos_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
        sin_base = sin_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
        # ROPE_IN: rotate B, C on load; else b_ptr/c_ptr hold the forward's B~, C~
        q_first, q_second = _load_rotated_operands(c_base + chunk_start * scc_l, scc_l, scc_n, cos_base, sin_base,
                                                   sc_l, sc_n, offs_t_c, offs_nh_c, mask_t, mask_nh_c, NH, ROPE_IN,
                                                   DOT_DTYPE, ROUND_BF16)
        k_first, k_second = _load_rotated_operands(b_base + chunk_start * sb_l, sb_l, sb_n, cos_base, sin_base,
                                                   sc_l, sc_n, offs_t_c, offs_nh_c, mask_t, mask_nh_c, NH, ROPE_IN,
                                                   DOT_DTYPE, ROUND_BF16)
        x = tl.load(x_base + offs_l[:, None] * sx_l + offs_p_c[None, :] * sx_p, mask=mask_tp, other=0.0)
        dy = tl.load(dy_base + offs_l[:, None] * sd_l + offs_p_c[None, :] * sd_p, mask=mask_tp, other=0.0)
        # x and dy enter the products as stored (exact in bf16); dt multiplies the float32 results
        x_op = _op(x, DOT_DTYPE, ROUND_BF16)
        dy_op = _op(dy, DOT_DTYPE, ROUND_BF16)
        grad_first_op = _op(grad_first, DOT_DTYPE, ROUND_BF16)
        grad_second_op = _op(grad_second, DOT_DTYPE, ROUND_BF16)

        # M = (q k^T) * Gam * (dy v^T): its row sums (the column sums come with ddt below)
        scores = tl.dot(q_first, tl.trans(k_first), input_precision=DOT_PREC)
        scores += tl.dot(q_second, tl.trans(k_second), input_precision=DOT_PREC)
        dy_v = tl.dot(dy_op, tl.trans(x_op), input_precision=DOT_PREC) * decay * dt[None, :]
        if WITH_C:
            dg = tl.sum(scores * dy_v, axis=1)
        else:   # the row sums are the C side's (`ssd._chunk_bwd_dqk_kernel` FOR_C adds them)
            dg = tl.zeros((T,), dtype=tl.float32)
        dy_v = _op(dy_v, DOT_DTYPE, ROUND_BF16)

        # dx: dv = ((q k^T) * Gam)^T dy + w * k G^T
        dv = tl.dot(tl.trans(_op(scores * decay, DOT_DTYPE, ROUND_BF16)), dy_op, input_precision=DOT_PREC)
        dv_end = tl.dot(k_first, tl.trans(grad_first_op), input_precision=DOT_PREC)
        dv_end += tl.dot(k_second, tl.trans(grad_second_op), input_precision=DOT_PREC)
        xf = x.to(tl.float32)
        # k_u.(w_u dt_u (x G)_u) = w_u dt_u sum_p x_up (k G^T)_up, summed for the last token
        end_terms = to_end * dt * tl.sum(xf * dv_end, axis=1)
        dv += dv_end * to_end[:, None]
        dx = dv * dt[:, None]
        if HAS_D:
            dyf = dy.to(tl.float32)
            dx += d_value * dyf
            tl.store(dd_ptr + ((pid_p * BATCH + bi) * NCHUNK + c) * H + hi, tl.sum(tl.sum(dyf * xf, axis=1), axis=0))
        tl.store(dx_ptr + bi.to(tl.int64) * sx_b + hi * sx_h + offs_l[:, None] * sx_l + offs_p_c[None, :] * sx_p,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_tp)
        ddt_share = tl.sum(dv * xf, axis=1)
        dg -= dt * ddt_share   # colsum M + k.(w v G): the B side's share
        if ATOMIC_SCALARS:
            tl.atomic_add(ddt_ptr + gdt_row + offs_l, ddt_share, sem="relaxed")
        else:
            tl.store(ddt_ptr + gdt_row + offs_l, ddt_share)

        # B side: dk = ((dy v^T) * Gam)^T q + w * v G
        weight = to_end * dt
        dy_v_t = tl.trans(dy_v)
        if ATOMIC_BC:   # one half at a time: half the (T, n) float32 accumulator live
            acc = tl.dot(x_op, grad_first_op, input_precision=DOT_PREC) * weight[:, None]
            acc += tl.dot(dy_v_t, q_first, input_precision=DOT_PREC)
            _add_unrotated_half(db_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n, acc,
                                offs_t_c, offs_nh_c, mask_t, mask_nh_c, NH, False, ROPE)
            acc = tl.dot(x_op, grad_second_op, input_precision=DOT_PREC) * weight[:, None]
            acc += tl.dot(dy_v_t, q_second, input_precision=DOT_PREC)
            _add_unrotated_half(db_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n, acc,
                                offs_t_c, offs_nh_c, mask_t, mask_nh_c, NH, True, ROPE)
        else:
            acc_first = tl.dot(x_op, grad_first_op, input_precision=DOT_PREC) * weight[:, None]
            acc_second = tl.dot(x_op, grad_second_op, input_precision=DOT_PREC) * weight[:, None]
            acc_first += tl.dot(dy_v_t, q_first, input_precision=DOT_PREC)
            acc_second += tl.dot(dy_v_t, q_second, input_precision=DOT_PREC)
            _store_unrotated(db_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n,
                             acc_first, acc_second, offs_t_c, offs_nh_c, mask_t, mask_nh_c, NH, ROPE, False)

        # S: the forward's state entering chunk c. <G, S> is the carried state's part of d loss / d g_last
        state_ptrs = states_ptr + ((bi * (NCHUNK + 1) + c) * H + hi).to(tl.int64) * P * N + pn_offs_c
        state_first = tl.load(state_ptrs, mask=mask_pn_c, other=0.0)
        state_second = tl.load(state_ptrs + NH, mask=mask_pn_c, other=0.0)
        overlap = tl.sum(tl.sum(state_first.to(tl.float32) * grad_first + state_second.to(tl.float32) * grad_second,
                                axis=1), axis=0)
        # the end terms again at the last token (the reverse cumsum that turns dg into d(dt A) cancels them with
        # their shares in dt ddt, to float32 rounding)
        dg += tl.where(offs_t_c == T - 1, tl.sum(end_terms, axis=0) + chunk_decay * overlap, 0.0)

        # G <- a G + (e dy)^T q: the gradient w.r.t. the state leaving chunk c - 1 (G's last use was above)
        dy_into = tl.trans(_op(dy.to(tl.float32) * into[:, None], DOT_DTYPE, ROUND_BF16))
        grad_first = grad_first * chunk_decay + tl.dot(dy_into, q_first, input_precision=DOT_PREC)
        grad_second = grad_second * chunk_decay + tl.dot(dy_into, q_second, input_precision=DOT_PREC)

        if WITH_C:
            # C side: dq = ((dy v^T) * Gam) k + e * dy S
            state_first = _op(state_first, DOT_DTYPE, ROUND_BF16)
            state_second = _op(state_second, DOT_DTYPE, ROUND_BF16)
            if CARRIED_BY_DOT:
                # q.(e dy S) = e sum_p dy (q S^T): the carried state's output, no float32 copy of q needed
                carried = tl.dot(q_first, tl.trans(state_first), input_precision=DOT_PREC)
                carried += tl.dot(q_second, tl.trans(state_second), input_precision=DOT_PREC)
                dg += into * tl.sum(dy.to(tl.float32) * carried, axis=1)
            if ATOMIC_BC:
                acc = tl.dot(dy_op, state_first, input_precision=DOT_PREC) * into[:, None]
                if not CARRIED_BY_DOT:
                    dg += tl.sum(q_first.to(tl.float32) * acc, axis=1)
                acc += tl.dot(dy_v, k_first, input_precision=DOT_PREC)
                _add_unrotated_half(dc_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n, acc,
                                    offs_t_c, offs_nh_c, mask_t, mask_nh_c, NH, False, ROPE)
                acc = tl.dot(dy_op, state_second, input_precision=DOT_PREC) * into[:, None]
                if not CARRIED_BY_DOT:
                    dg += tl.sum(q_second.to(tl.float32) * acc, axis=1)
                acc += tl.dot(dy_v, k_second, input_precision=DOT_PREC)
                _add_unrotated_half(dc_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n, acc,
                                    offs_t_c, offs_nh_c, mask_t, mask_nh_c, NH, True, ROPE)
            else:
                acc_first = tl.dot(dy_op, state_first, input_precision=DOT_PREC) * into[:, None]
                acc_second = tl.dot(dy_op, state_second, input_precision=DOT_PREC) * into[:, None]
                if not CARRIED_BY_DOT:
                    dg += tl.sum(q_first.to(tl.float32) * acc_first + q_second.to(tl.float32) * acc_second, axis=1)
                acc_first += tl.dot(dy_v, k_first, input_precision=DOT_PREC)
                acc_second += tl.dot(dy_v, k_second, input_precision=DOT_PREC)
                _store_unrotated(dc_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n,
                                 acc_first, acc_second, offs_t_c, offs_nh_c, mask_t, mask_nh_c, NH, ROPE, False)
        if ATOMIC_SCALARS:
            tl.atomic_add(dg_ptr + gdt_row + offs_l, dg, sem="relaxed")
        else:
            tl.store(dg_ptr + gdt_row + offs_l, dg)

    # offsets rebuilt (not the ones before the loop, which would then be held across it)
    zero = tl.multiple_of(tl.load(zero_ptr), 1024)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P) + zero
    offs_nh = tl.arange(0, BLOCK_NH) + zero
    pn_offs = offs_p[:, None] * N + offs_nh[None, :]
    mask_pn = (offs_p[:, None] < P) & (offs_nh[None, :] < NH)
    tl.store(dinit_ptr + head_pn + pn_offs, grad_first, mask=mask_pn)
    tl.store(dinit_ptr + head_pn + pn_offs + NH, grad_second, mask=mask_pn)


@triton.jit
def _load_rotated_full(base_ptr, stride_t, stride_n, cos_ptr, sin_ptr, stride_ct, stride_cn, offs_t, offs_n, mask_t,
                       mask_n, NH, ROPE_IN: tl.constexpr, DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """A (T, n) tile, all n columns, as a product operand; ROPE_IN: rope(v) = v cos + rotate_half(v) sin, with
    rotate_half(v)_j = -v_(j + n/2) (j < n/2), v_(j - n/2) (else) read from the partner columns."""
    mask = mask_t[:, None] & mask_n[None, :]
    rows = base_ptr + offs_t[:, None] * stride_t
    tile = tl.load(rows + offs_n[None, :] * stride_n, mask=mask, other=0.0).to(tl.float32)
    if ROPE_IN:
        first_half = offs_n < NH
        partner_n = tl.where(first_half, offs_n + NH, offs_n - NH)
        partner = tl.load(rows + partner_n[None, :] * stride_n, mask=mask, other=0.0).to(tl.float32)
        table = offs_t[:, None] * stride_ct + offs_n[None, :] * stride_cn
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        tile = tile * cos + tl.where(first_half, -1.0, 1.0)[None, :] * partner * sin
    return _op(tile, DOT_DTYPE, ROUND_BF16)


@triton.jit
def _add_unrotated_transposed(base_ptr, stride_t, stride_n, cos_ptr, sin_ptr, stride_ct, stride_cn, grad_t, offs_n,
                              offs_half, offs_t, mask_n, mask_t, NH, ROPE: tl.constexpr, FULL_N: tl.constexpr,
                              ATOMIC: tl.constexpr):
    """The gradient of rope's input from grad_t (n, T), the gradient of its output transposed: out_1 = g_1 cos_1 +
    g_2 sin_2, out_2 = g_2 cos_2 - g_1 sin_1 in rotate-half halves (`ssd._store_unrotated`), stored or added
    (ATOMIC). FULL_N (the tile is exactly n rows): the halves are split off in registers; else (n not a power of
    two) each row adds g cos into its own column and -+ g sin into its partner's (needs ATOMIC)."""
    cols = base_ptr + offs_t[None, :] * stride_t
    if ROPE and FULL_N:
        first, second = tl.split(tl.permute(tl.reshape(grad_t, (2, grad_t.shape[0] // 2, grad_t.shape[1])),
                                            (1, 2, 0)))
        mask = (offs_half < NH)[:, None] & mask_t[None, :]
        table = offs_half[:, None] * stride_cn + offs_t[None, :] * stride_ct
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table + NH * stride_cn, mask=mask, other=0.0).to(tl.float32)
        out = first * cos + second * sin
        ptrs = cols + offs_half[:, None] * stride_n
        if ATOMIC:
            tl.atomic_add(ptrs, out, mask=mask, sem="relaxed")
        else:
            tl.store(ptrs, out.to(base_ptr.dtype.element_ty), mask=mask)
        cos = tl.load(cos_ptr + table + NH * stride_cn, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        out = second * cos - first * sin
        if ATOMIC:
            tl.atomic_add(ptrs + NH * stride_n, out, mask=mask, sem="relaxed")
        else:
            tl.store(ptrs + NH * stride_n, out.to(base_ptr.dtype.element_ty), mask=mask)
    elif ROPE:
        mask = mask_n[:, None] & mask_t[None, :]
        table = offs_n[:, None] * stride_cn + offs_t[None, :] * stride_ct
        cos = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(cols + offs_n[:, None] * stride_n, grad_t * cos, mask=mask, sem="relaxed")
        sin = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        first_half = offs_n < NH
        partner_n = tl.where(first_half, offs_n + NH, offs_n - NH)
        tl.atomic_add(cols + partner_n[:, None] * stride_n, grad_t * sin * tl.where(first_half, -1.0, 1.0)[:, None],
                      mask=mask, sem="relaxed")
    elif ATOMIC:
        tl.atomic_add(cols + offs_n[:, None] * stride_n, grad_t, mask=(mask_n[:, None] & mask_t[None, :]),
                      sem="relaxed")
    else:
        tl.store(cols + offs_n[:, None] * stride_n, grad_t.to(base_ptr.dtype.element_ty),
                 mask=(mask_n[:, None] & mask_t[None, :]))


@triton.jit
def _scan_bwd_transposed_kernel(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, states_ptr, d_ptr, dy_ptr, dfinal_ptr,
    dx_ptr, db_ptr, dc_ptr, ddt_ptr, dg_ptr, dd_ptr, dinit_ptr, zero_ptr,
    BATCH, L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p,
    sb_b, sb_l, sb_h, sb_n,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    sd_b, sd_l, sd_h, sd_p,
    sg_b, sg_l, sg_h, sg_n,
    T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, FULL_N: tl.constexpr,
    ROPE: tl.constexpr, ROPE_IN: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_D: tl.constexpr,
    HAS_DFINAL: tl.constexpr, ATOMIC_BC: tl.constexpr, ATOMIC_SCALARS: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """`_scan_bwd_kernel`'s work with whole-n tiles and dB, dC accumulated transposed, (n, T): with 8 warps a
    product whose result feeds another product gets all warps along its rows (Triton's choice for chained
    products), so (T = 64)-row results are held twice; (n = 128)-row ones are not. The C side's share of dg is
    e rowsum(dy * (q S^T)). Without FULL_N, ROPE implies ATOMIC_BC (un-rotation by adds into partner columns)."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # batch fastest: the programs running at once are mostly of different batch rows, so fewer of them add into
    # the same dB/dC rows (one B/C group: every head of a row would, in step, walk for walk)
    bi = pid_bh % BATCH
    hi = pid_bh // BATCH
    gi = hi // HPG   # the B/C group this head reads
    N = 2 * NH
    offs_t = tl.arange(0, T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask_pn = mask_p[:, None] & mask_n[None, :]
    pn_offs = offs_p[:, None] * N + offs_n[None, :]
    head_pn = (bi * H + hi).to(tl.int64) * P * N
    # G: d loss / d(state leaving the current chunk), this block's rows
    if HAS_DFINAL:
        grad = tl.load(dfinal_ptr + head_pn + pn_offs, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        grad = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_D:
        d_value = tl.load(d_ptr + hi).to(tl.float32)

    x_base = x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h
    dy_base = dy_ptr + bi.to(tl.int64) * sd_b + hi * sd_h
    b_base = b_ptr + bi.to(tl.int64) * sb_b + gi * sb_h
    c_base = c_ptr + bi.to(tl.int64) * scc_b + gi * scc_h
    out_head = gi if ATOMIC_BC else hi
    db_base = db_ptr + bi.to(tl.int64) * sg_b + out_head * sg_h
    dc_base = dc_ptr + bi.to(tl.int64) * sg_b + out_head * sg_h
    gdt_row = (bi * H + hi).to(tl.int64) * LPAD
    seq_row = bi.to(tl.int64) * LPAD
    for step in range(NCHUNK):
        c = NCHUNK - 1 - step
        chunk_start = c * T
        # a zero the compiler cannot see through: the tile offsets and masks below are rebuilt every chunk
        # instead of being hoisted out of the loop and held (spilled) across it (sm_90: -100 to -200 B of stack)
        zero = tl.multiple_of(tl.load(zero_ptr + c), 1024)
        offs_t_c = tl.arange(0, T) + zero
        offs_p_c = pid_p * BLOCK_P + tl.arange(0, BLOCK_P) + zero
        mask_p_c = offs_p_c < P
        offs_n_c = tl.arange(0, BLOCK_N) + zero
        offs_half_c = tl.arange(0, BLOCK_N // 2) + zero
        mask_n_c = offs_n_c < N
        mask_pn_c = mask_p_c[:, None] & mask_n_c[None, :]
        pn_offs_c = offs_p_c[:, None] * N + offs_n_c[None, :]
        offs_l = chunk_start + offs_t_c
        mask_t = offs_l < L
        mask_tp = mask_t[:, None] & mask_p_c[None, :]
        g = tl.load(g_ptr + gdt_row + offs_l)
        dt = tl.load(dt_ptr + gdt_row + offs_l)
        g_last = tl.load(g_ptr + gdt_row + chunk_start + T - 1)
        same_doc, sees_carried, reaches_end, crosses = _chunk_masks(seq_ptr, seq_row, chunk_start, offs_t_c, T,
                                                                    HAS_SEQ)
        into = tl.where(sees_carried, tl.exp(g), 0.0)
        to_end = tl.where(reaches_end, tl.exp(g_last - g), 0.0)
        chunk_decay = tl.where(crosses, tl.exp(g_last), 0.0)
        allowed = (offs_t_c[:, None] >= offs_t_c[None, :]) & same_doc
        decay = tl.exp(tl.where(allowed, g[:, None] - g[None, :], float("-inf")))
        cos_base = cos_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
        sin_base = sin_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
        # ROPE_IN: rotate B, C on load; else b_ptr/c_ptr hold the forward's B~, C~
        q = _load_rotated_full(c_base + chunk_start * scc_l, scc_l, scc_n, cos_base, sin_base, sc_l, sc_n,
                               offs_t_c, offs_n_c, mask_t, mask_n_c, NH, ROPE_IN, DOT_DTYPE, ROUND_BF16)
        k = _load_rotated_full(b_base + chunk_start * sb_l, sb_l, sb_n, cos_base, sin_base, sc_l, sc_n,
                               offs_t_c, offs_n_c, mask_t, mask_n_c, NH, ROPE_IN, DOT_DTYPE, ROUND_BF16)
        x = tl.load(x_base + offs_l[:, None] * sx_l + offs_p_c[None, :] * sx_p, mask=mask_tp, other=0.0)
        dy = tl.load(dy_base + offs_l[:, None] * sd_l + offs_p_c[None, :] * sd_p, mask=mask_tp, other=0.0)
        # x and dy enter the products as stored (exact in bf16); dt multiplies the float32 results
        x_op = _op(x, DOT_DTYPE, ROUND_BF16)
        dy_op = _op(dy, DOT_DTYPE, ROUND_BF16)
        xf = x.to(tl.float32)
        dyf = dy.to(tl.float32)
        grad_op = _op(grad, DOT_DTYPE, ROUND_BF16)

        # M = (q k^T) * Gam * (dy v^T): its row sums (the column sums come with ddt below)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        dy_v = tl.dot(dy_op, tl.trans(x_op), input_precision=DOT_PREC) * decay * dt[None, :]
        dg = tl.sum(scores * dy_v, axis=1)
        dy_v = _op(dy_v, DOT_DTYPE, ROUND_BF16)

        # dx: dv = ((q k^T) * Gam)^T dy + w * k G^T (kept apart: a sum with a product's result would chain them)
        dv_intra = tl.dot(tl.trans(_op(scores * decay, DOT_DTYPE, ROUND_BF16)), dy_op, input_precision=DOT_PREC)
        dv_end = tl.dot(k, tl.trans(grad_op), input_precision=DOT_PREC)
        x_dv_end = tl.sum(xf * dv_end, axis=1)
        # k_u.(w_u dt_u (x G)_u) = w_u dt_u sum_p x_up (k G^T)_up, summed for the last token
        end_terms = to_end * dt * x_dv_end
        dx = dv_intra * dt[:, None] + dv_end * (to_end * dt)[:, None]
        if HAS_D:
            dx += d_value * dyf
            tl.store(dd_ptr + ((pid_p * BATCH + bi) * NCHUNK + c) * H + hi, tl.sum(tl.sum(dyf * xf, axis=1), axis=0))
        tl.store(dx_ptr + bi.to(tl.int64) * sx_b + hi * sx_h + offs_l[:, None] * sx_l + offs_p_c[None, :] * sx_p,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_tp)
        ddt_share = tl.sum(dv_intra * xf, axis=1) + x_dv_end * to_end
        dg -= dt * ddt_share   # colsum M + k.(w v G): the B side's share
        if ATOMIC_SCALARS:
            tl.atomic_add(ddt_ptr + gdt_row + offs_l, ddt_share, sem="relaxed")
        else:
            tl.store(ddt_ptr + gdt_row + offs_l, ddt_share)

        # S: the forward's state entering chunk c. <G, S> is the carried state's part of d loss / d g_last
        state = tl.load(states_ptr + ((bi * (NCHUNK + 1) + c) * H + hi).to(tl.int64) * P * N + pn_offs_c,
                        mask=mask_pn_c, other=0.0)
        overlap = tl.sum(tl.sum(state.to(tl.float32) * grad, axis=1), axis=0)
        # the end terms again at the last token (the reverse cumsum that turns dg into d(dt A) cancels them with
        # their shares in dt ddt, to float32 rounding)
        dg += tl.where(offs_t_c == T - 1, tl.sum(end_terms, axis=0) + chunk_decay * overlap, 0.0)

        # C side before the B side, so that G's last reads (dk) sit next to its update (sm_90, block_p 32: 24-40 B
        # less stack)
        # C side, transposed: dq^T = k^T ((dy v^T) * Gam)^T + S^T (e dy)^T; dg += e rowsum(dy * (q S^T))
        state = _op(state, DOT_DTYPE, ROUND_BF16)
        dy_into = _op(dyf * into[:, None], DOT_DTYPE, ROUND_BF16)
        carried = tl.dot(q, tl.trans(state), input_precision=DOT_PREC)
        dg += into * tl.sum(dyf * carried, axis=1)
        acc = tl.dot(tl.trans(state), tl.trans(dy_into), input_precision=DOT_PREC)
        acc = tl.dot(tl.trans(k), tl.trans(dy_v), acc, input_precision=DOT_PREC)
        _add_unrotated_transposed(dc_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n, acc,
                                  offs_n_c, offs_half_c, offs_t_c, mask_n_c, mask_t, NH, ROPE, FULL_N, ATOMIC_BC)
        if ATOMIC_SCALARS:
            tl.atomic_add(dg_ptr + gdt_row + offs_l, dg, sem="relaxed")
        else:
            tl.store(dg_ptr + gdt_row + offs_l, dg)

        # B side, transposed: dk^T = q^T ((dy v^T) * Gam) + (G^T x^T) w dt
        weight = to_end * dt
        acc = tl.dot(tl.trans(grad_op), tl.trans(x_op), input_precision=DOT_PREC) * weight[None, :]
        acc = tl.dot(tl.trans(q), dy_v, acc, input_precision=DOT_PREC)
        _add_unrotated_transposed(db_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n, acc,
                                  offs_n_c, offs_half_c, offs_t_c, mask_n_c, mask_t, NH, ROPE, FULL_N, ATOMIC_BC)

        # G <- a G + (e dy)^T q: the gradient w.r.t. the state leaving chunk c - 1 (G's last use was above)
        grad = grad * chunk_decay + tl.dot(tl.trans(dy_into), q, input_precision=DOT_PREC)

    # offsets rebuilt (not the ones before the loop, which would then be held across it)
    zero = tl.multiple_of(tl.load(zero_ptr), 1024)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P) + zero
    offs_n = tl.arange(0, BLOCK_N) + zero
    tl.store(dinit_ptr + head_pn + offs_p[:, None] * N + offs_n[None, :], grad,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


def scan_backward(dy, dfinal, x, B, C, cos, sin, dt, g, seq, D, states, T, config, rotated_B=None, rotated_C=None):
    """Kernel backward with dS kept on chip: dx, dB, dC, ddt, dg, dD (or None), d_initial_state (float32).
    A drop-in for `ssd._backward` (same arguments and results); tiles from config keys "scan_bwd_*".
    "scan_bwd_split_c": the reverse walk does everything but dC and the C side's dg, which the parallel
    `ssd._chunk_bwd_dqk_kernel` (FOR_C: reads the forward's states, never dS) computes in a second launch."""
    config = dict(SCAN_BWD_CONFIG, **{key: value for key, value in config.items() if key.startswith("scan_bwd_")})
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    heads_per_group = heads // groups
    half = B.shape[-1] // 2
    n_chunks = dt.shape[-1] // T
    cos_arg, sin_arg, cos_strides, rope = _rope_args(cos, sin, dt)
    seq_arg = seq if seq is not None else dt
    dot_dtype, round_bf16 = _dot_dtypes(x.dtype)
    precision = _dot_precision(x.dtype)
    # with the forward's rotated B~, C~ nothing is rotated on load (RoPE stays on for un-rotating dB, dC)
    rope_in = rope and rotated_B is None
    B_in = B if rotated_B is None else rotated_B
    C_in = C if rotated_C is None else rotated_C
    split_c = config["scan_bwd_split_c"]
    transposed = config["scan_bwd_transposed"] and not split_c
    full_n = 2 * half == _next_pow2(2 * half)   # the transposed kernel's (n, T) tiles hold exactly n rows

    block_p = min(config["scan_bwd_block_p"], _next_pow2(head_dim))
    p_blocks = triton.cdiv(head_dim, block_p)
    # dB/dC sum over p and over a group's heads: float32 adds unless one program owns each output row
    atomic_bc = p_blocks > 1 or groups < heads or (transposed and rope and not full_n)
    if atomic_bc:
        dB_out = torch.zeros(batch, length, groups, 2 * half, device=x.device, dtype=torch.float32)
        dC_out = torch.zeros_like(dB_out) if not split_c else None
    else:
        dB_out = torch.empty_like(B)
        dC_out = torch.empty_like(C) if not split_c else None
    atomic_scalars = p_blocks > 1
    ddt = (torch.zeros_like if atomic_scalars else torch.empty_like)(dt)
    dg = (torch.zeros_like if atomic_scalars else torch.empty_like)(g)
    dD_partial = (torch.empty(p_blocks, batch, n_chunks, heads, device=x.device, dtype=torch.float32)
                  if D is not None else None)
    dx = torch.empty_like(x)
    dinit = torch.empty(batch, heads, head_dim, 2 * half, device=x.device, dtype=torch.float32)
    args = (x, B_in, C_in, cos_arg, sin_arg, dt, g, seq_arg, states, D if D is not None else dt, dy,
            dfinal if dfinal is not None else dt,
            dx, dB_out, dC_out if dC_out is not None else dB_out, ddt, dg, dD_partial if D is not None else dt, dinit,
            torch.zeros(n_chunks, device=x.device, dtype=torch.int32),
            batch, length, heads, heads_per_group, head_dim, half, n_chunks, dt.shape[-1],
            *x.stride(), *B_in.stride(), *C_in.stride(), *cos_strides, *dy.stride(), *dB_out.stride())
    common = dict(T=T, BLOCK_P=block_p, ROPE=rope, ROPE_IN=rope_in, HAS_SEQ=seq is not None, HAS_D=D is not None,
                  HAS_DFINAL=dfinal is not None, ATOMIC_BC=atomic_bc, ATOMIC_SCALARS=atomic_scalars,
                  DOT_PREC=precision, DOT_DTYPE=dot_dtype, ROUND_BF16=round_bf16,
                  num_warps=config["scan_bwd_warps"], num_stages=config["scan_bwd_stages"],
                  maxnreg=config["scan_bwd_maxnreg"])
    if transposed:
        _scan_bwd_transposed_kernel[(p_blocks, batch * heads)](*args, BLOCK_N=_next_pow2(2 * half), FULL_N=full_n,
                                                               **common)
    else:
        _scan_bwd_kernel[(p_blocks, batch * heads)](
            *args, BLOCK_NH=_next_pow2(half), CARRIED_BY_DOT=config["scan_bwd_carried_by_dot"], WITH_C=not split_c,
            **common)
    dB = dB_out.to(B.dtype) if atomic_bc else dB_out
    if split_c:
        # per-head dC rows (summed over each group's heads in float32 below when groups < heads)
        dC_heads = torch.empty(batch, length, heads, 2 * half, device=x.device, dtype=x.dtype) if groups < heads \
            else torch.empty_like(C)
        dg_from_c = torch.empty_like(g)
        _chunk_bwd_dqk_kernel[(n_chunks, batch * heads)](
            x, B_in, C_in, cos_arg, sin_arg, dt, g, seq_arg, states, states, dy, dC_heads, dg_from_c,
            length, heads, heads_per_group, head_dim, half, n_chunks, dt.shape[-1],
            *x.stride(), *B_in.stride(), *C_in.stride(), *cos_strides, *dy.stride(), *dC_heads.stride(),
            T=T, BLOCK_P=min(config["scan_bwd_c_block_p"], _next_pow2(head_dim)), BLOCK_NH=_next_pow2(half),
            ROPE=rope, HAS_SEQ=seq is not None, FOR_C=True, DOT_PREC=precision, DOT_DTYPE=dot_dtype,
            ROUND_BF16=round_bf16, ROPE_IN=rope_in, num_warps=config["scan_bwd_c_warps"],
            num_stages=config["scan_bwd_c_stages"])
        dg += dg_from_c
        if groups < heads:
            dC_heads = dC_heads.view(batch, length, groups, heads_per_group, -1).sum(dim=3, dtype=torch.float32)
        dC = dC_heads.to(C.dtype)
    else:
        dC = dC_out.to(C.dtype) if atomic_bc else dC_out
    dD = dD_partial.sum(dim=(0, 1, 2)) if D is not None else None
    return dx, dB, dC, ddt, dg, dD, dinit
