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
    G  <- a G + (e dy)^T q                            (the gradient w.r.t. the state leaving chunk c - 1)
All of dq, dk, dg, ddt are linear in the p-sums, so programs over different blocks of p add their shares.
"""
import torch
import triton
import triton.language as tl

from cheems_parallel.kernels.ssd import (_chunk_bwd_dqk_kernel, _chunk_masks, _dot_dtypes, _dot_precision,
                                         _load_rotated_operands, _next_pow2, _op, _rope_args, _store_unrotated)

# Tiles of the scan backward (config keys "scan_bwd_*" override them). block_p: the rows of p one program owns
# (p = 128 at 64: two programs per (batch, head) that add their dB/dC/dg/ddt shares with float32 atomics);
# warps / stages / maxnreg: as in ssd.CONFIG; carried_by_dot: the C side's share of dg as rowsum(dy * (q S^T))
# (one more product, no float32 copy of q); split_c: dC and the C side's dg from `ssd._chunk_bwd_dqk_kernel`
# (FOR_C, parallel over chunks, it reads the forward's states, never dS) in a second launch, c_* its tiles.
# Defaults: the fewest atomics among the configs whose offline sm_90 compile spills under 1 KB per thread
# (none compiles without spills; see the report in tests/gpu/test_ssd_scan_bwd_gpu.py). Not measured on a GPU.
SCAN_BWD_CONFIG = {
    "scan_bwd_block_p": 64, "scan_bwd_warps": 8, "scan_bwd_stages": 1, "scan_bwd_maxnreg": None,
    "scan_bwd_carried_by_dot": False, "scan_bwd_split_c": False,
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
    dx_ptr, db_ptr, dc_ptr, ddt_ptr, dg_ptr, dd_ptr, dinit_ptr,
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
    bi = pid_bh // H
    hi = pid_bh % H
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
        offs_l = chunk_start + offs_t
        mask_t = offs_l < L
        mask_tp = mask_t[:, None] & mask_p[None, :]
        g = tl.load(g_ptr + gdt_row + offs_l)
        dt = tl.load(dt_ptr + gdt_row + offs_l)
        g_last = tl.load(g_ptr + gdt_row + chunk_start + T - 1)
        same_doc, sees_carried, reaches_end, crosses = _chunk_masks(seq_ptr, seq_row, chunk_start, offs_t, T,
                                                                    HAS_SEQ)
        into = tl.where(sees_carried, tl.exp(g), 0.0)
        to_end = tl.where(reaches_end, tl.exp(g_last - g), 0.0)
        chunk_decay = tl.where(crosses, tl.exp(g_last), 0.0)
        allowed = (offs_t[:, None] >= offs_t[None, :]) & same_doc
        decay = tl.exp(tl.where(allowed, g[:, None] - g[None, :], float("-inf")))
        cos_base = cos_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
        sin_base = sin_ptr + bi.to(tl.int64) * sc_b + chunk_start * sc_l
        # ROPE_IN: rotate B, C on load; else b_ptr/c_ptr hold the forward's B~, C~
        q_first, q_second = _load_rotated_operands(c_base + chunk_start * scc_l, scc_l, scc_n, cos_base, sin_base,
                                                   sc_l, sc_n, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE_IN,
                                                   DOT_DTYPE, ROUND_BF16)
        k_first, k_second = _load_rotated_operands(b_base + chunk_start * sb_l, sb_l, sb_n, cos_base, sin_base,
                                                   sc_l, sc_n, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE_IN,
                                                   DOT_DTYPE, ROUND_BF16)
        x = tl.load(x_base + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p, mask=mask_tp, other=0.0)
        dy = tl.load(dy_base + offs_l[:, None] * sd_l + offs_p[None, :] * sd_p, mask=mask_tp, other=0.0)
        # x and dy enter the products as stored (exact in bf16); dt multiplies the float32 results
        x_op = _op(x, DOT_DTYPE, ROUND_BF16)
        dy_op = _op(dy, DOT_DTYPE, ROUND_BF16)
        grad_first_op = _op(grad_first, DOT_DTYPE, ROUND_BF16)
        grad_second_op = _op(grad_second, DOT_DTYPE, ROUND_BF16)

        # M = (q k^T) * Gam * (dy v^T): summed by rows and by columns of one matrix, so its diagonal cancels
        scores = tl.dot(q_first, tl.trans(k_first), input_precision=DOT_PREC)
        scores += tl.dot(q_second, tl.trans(k_second), input_precision=DOT_PREC)
        dy_v = tl.dot(dy_op, tl.trans(x_op), input_precision=DOT_PREC) * decay * dt[None, :]
        products = scores * dy_v
        if WITH_C:
            dg = tl.sum(products, axis=1) - tl.sum(products, axis=0)
        else:   # the row sums are the C side's (`ssd._chunk_bwd_dqk_kernel` FOR_C adds them)
            dg = -tl.sum(products, axis=0)
        dy_v = _op(dy_v, DOT_DTYPE, ROUND_BF16)

        # dx: dv = ((q k^T) * Gam)^T dy + w * k G^T
        dv = tl.dot(tl.trans(_op(scores * decay, DOT_DTYPE, ROUND_BF16)), dy_op, input_precision=DOT_PREC)
        dv_end = tl.dot(k_first, tl.trans(grad_first_op), input_precision=DOT_PREC)
        dv_end += tl.dot(k_second, tl.trans(grad_second_op), input_precision=DOT_PREC)
        xf = x.to(tl.float32)
        # k_u.(w_u dt_u (x G)_u) = w_u dt_u sum_p x_up (k G^T)_up: the B side's share of dg, from dv's own terms
        end_terms = to_end * dt * tl.sum(xf * dv_end, axis=1)
        dv += dv_end * to_end[:, None]
        dx = dv * dt[:, None]
        if HAS_D:
            dyf = dy.to(tl.float32)
            dx += d_value * dyf
            tl.store(dd_ptr + ((pid_p * BATCH + bi) * NCHUNK + c) * H + hi, tl.sum(tl.sum(dyf * xf, axis=1), axis=0))
        tl.store(dx_ptr + bi.to(tl.int64) * sx_b + hi * sx_h + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_tp)
        ddt_share = tl.sum(dv * xf, axis=1)
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
                                offs_t, offs_nh, mask_t, mask_nh, NH, False, ROPE)
            acc = tl.dot(x_op, grad_second_op, input_precision=DOT_PREC) * weight[:, None]
            acc += tl.dot(dy_v_t, q_second, input_precision=DOT_PREC)
            _add_unrotated_half(db_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n, acc,
                                offs_t, offs_nh, mask_t, mask_nh, NH, True, ROPE)
        else:
            acc_first = tl.dot(x_op, grad_first_op, input_precision=DOT_PREC) * weight[:, None]
            acc_second = tl.dot(x_op, grad_second_op, input_precision=DOT_PREC) * weight[:, None]
            acc_first += tl.dot(dy_v_t, q_first, input_precision=DOT_PREC)
            acc_second += tl.dot(dy_v_t, q_second, input_precision=DOT_PREC)
            _store_unrotated(db_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n,
                             acc_first, acc_second, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE, False)

        # S: the forward's state entering chunk c. <G, S> is the carried state's part of d loss / d g_last
        state_ptrs = states_ptr + ((bi * (NCHUNK + 1) + c) * H + hi).to(tl.int64) * P * N + pn_offs
        state_first = tl.load(state_ptrs, mask=mask_pn, other=0.0)
        state_second = tl.load(state_ptrs + NH, mask=mask_pn, other=0.0)
        overlap = tl.sum(tl.sum(state_first.to(tl.float32) * grad_first + state_second.to(tl.float32) * grad_second,
                                axis=1), axis=0)
        # the end terms again at the last token, from the same float32 numbers: the reverse cumsum that turns
        # dg into d(dt A) cancels them exactly (see ssd._chunk_bwd_dqk_kernel)
        dg += tl.where(offs_t == T - 1, tl.sum(end_terms, axis=0) + chunk_decay * overlap, 0.0) - end_terms

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
                                    offs_t, offs_nh, mask_t, mask_nh, NH, False, ROPE)
                acc = tl.dot(dy_op, state_second, input_precision=DOT_PREC) * into[:, None]
                if not CARRIED_BY_DOT:
                    dg += tl.sum(q_second.to(tl.float32) * acc, axis=1)
                acc += tl.dot(dy_v, k_second, input_precision=DOT_PREC)
                _add_unrotated_half(dc_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n, acc,
                                    offs_t, offs_nh, mask_t, mask_nh, NH, True, ROPE)
            else:
                acc_first = tl.dot(dy_op, state_first, input_precision=DOT_PREC) * into[:, None]
                acc_second = tl.dot(dy_op, state_second, input_precision=DOT_PREC) * into[:, None]
                if not CARRIED_BY_DOT:
                    dg += tl.sum(q_first.to(tl.float32) * acc_first + q_second.to(tl.float32) * acc_second, axis=1)
                acc_first += tl.dot(dy_v, k_first, input_precision=DOT_PREC)
                acc_second += tl.dot(dy_v, k_second, input_precision=DOT_PREC)
                _store_unrotated(dc_base + chunk_start * sg_l, sg_l, sg_n, cos_base, sin_base, sc_l, sc_n,
                                 acc_first, acc_second, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE, False)
        if ATOMIC_SCALARS:
            tl.atomic_add(dg_ptr + gdt_row + offs_l, dg, sem="relaxed")
        else:
            tl.store(dg_ptr + gdt_row + offs_l, dg)

    tl.store(dinit_ptr + head_pn + pn_offs, grad_first, mask=mask_pn)
    tl.store(dinit_ptr + head_pn + pn_offs + NH, grad_second, mask=mask_pn)


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

    block_p = min(config["scan_bwd_block_p"], _next_pow2(head_dim))
    p_blocks = triton.cdiv(head_dim, block_p)
    # dB/dC sum over p and over a group's heads: float32 adds unless one program owns each output row
    atomic_bc = p_blocks > 1 or groups < heads
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
    _scan_bwd_kernel[(p_blocks, batch * heads)](
        x, B_in, C_in, cos_arg, sin_arg, dt, g, seq_arg, states, D if D is not None else dt, dy,
        dfinal if dfinal is not None else dt,
        dx, dB_out, dC_out if dC_out is not None else dB_out, ddt, dg, dD_partial if D is not None else dt, dinit,
        batch, length, heads, heads_per_group, head_dim, half, n_chunks, dt.shape[-1],
        *x.stride(), *B_in.stride(), *C_in.stride(), *cos_strides, *dy.stride(), *dB_out.stride(),
        T=T, BLOCK_P=block_p, BLOCK_NH=_next_pow2(half), ROPE=rope, ROPE_IN=rope_in, HAS_SEQ=seq is not None,
        HAS_D=D is not None, HAS_DFINAL=dfinal is not None, ATOMIC_BC=atomic_bc, ATOMIC_SCALARS=atomic_scalars,
        DOT_PREC=precision, DOT_DTYPE=dot_dtype, ROUND_BF16=round_bf16,
        CARRIED_BY_DOT=config["scan_bwd_carried_by_dot"], WITH_C=not split_c,
        num_warps=config["scan_bwd_warps"], num_stages=config["scan_bwd_stages"],
        maxnreg=config["scan_bwd_maxnreg"])
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
