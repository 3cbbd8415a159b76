"""The SSD forward in one Triton kernel ("scan forward"): each program walks the chunks of one (batch, head,
p-block) in order with the state carried in registers, and writes y of every chunk as it goes.

It computes exactly what `cheems_parallel.kernels.ssd._forward` computes with two kernels (`_state_fwd_kernel`
stores the state entering every chunk, `_chunk_fwd_kernel` reads it back), without sending the chunk states
through HBM when no backward follows, and writing them once (never reading them back) when one does. With RoPE
an elementwise launch rotates C (optionally B) first (see "scan_fwd_rope_prepass" below).

Entry point:
    scan_forward(x, B, C, cos, sin, dt, g, seq, D, initial_state, T, config, save_for_backward=True)
        -> (y, final, states, rotated_B, rotated_C)
with the arguments and outputs of `ssd._forward` (so `ssd._backward` runs unchanged on them):
    x (b, l, h, p); B, C (b, l, g, n) not rotated, head i reads group i // (h / g); cos, sin (b, l, n) or None;
    dt, g (b, h, lpad) float32 from `ssd_fused`'s prologue (lpad = l padded to a multiple of T, dt = 0 there;
    g the within-chunk inclusive cumsum of dt*A); seq (b, lpad) int32 or None; D (h,) or None;
    initial_state (b, h, p, n) or None. y in x's dtype; final (b, h, p, n) float32;
    states (b, l/T + 1, h, p, n) in x's dtype (slot c: the state entering chunk c, last: final), or None when
    save_for_backward is False; rotated_B / rotated_C: B~ = rope(B), C~ = rope(C) as the products used them,
    only with RoPE on, save_for_backward and config["save_rotated"] (else None).

Per chunk c (T tokens, g_t within the chunk, S the (p, n) state entering the chunk):
    y_c = (C~_c B~_c^T * decay mask * dt) x_c + exp(g_t) C~_c S^T + D x_c
    S  <- exp(g_last) S + sum_t exp(g_last - g_t) dt_t x_t B~_t^T
with document masks (`ssd._chunk_masks`). Products take bf16 operands for bf16 inputs (the state is rounded
to x's dtype as an operand, as `_chunk_fwd_kernel` reads it from the stored bf16 states) with float32
accumulation; the carried state stays float32. The reference is `ssd_fused_reference` (pure PyTorch).
"""
import torch
import triton
import triton.language as tl

from cheems_parallel.kernels.ssd import (_chunk_masks, _dot_dtypes, _dot_precision, _load_halves, _load_rope,
                                         _load_rotated, _load_rotated_operands, _next_pow2, _op, _rope_args)

# Tile sizes and launch settings ("scan_fwd_*" keys of the config passed in override these). Defaults: 4-warp
# programs that fit two per SM by registers, without spills on the mamba problem (Cheems: 64 B of stack when
# saving), by the offline sm_90 compile; not yet measured on the GPU.
#   block_p: the p-block a program owns (its state is block_p x n float32 in registers; the C~B~^T scores are
#     computed once per p-block); save_block_p / save_warps: the same when the states are stored for a backward.
#   step: tokens per step of the walk (divides the kernel chunk T): smaller tiles, so fewer registers, but more
#     sequential steps.
#   rope_prepass (RoPE only; rotating both B and C inside the walk spills at every tile size):
#     "C": C~ comes from an elementwise launch (`_rotate_kernel`), B is still rotated in the walk (so the
#          weighted operand exp(g_last - g) dt B~ is rounded once from float32, as in `_state_fwd_kernel`);
#          costs a write and a read of C~ (the backward wants C~ anyway when "save_rotated").
#     True: B~ too; B~ is then rounded to x's dtype before the walk weights it and rounds it again (about
#          twice the final state's error against float64 for bf16), the walk has no RoPE at all.
#     False: both rotated in the walk.
#   rotate_block_l: the pre-pass launch's tile (tokens).
SCAN_FWD_CONFIG = {
    "scan_fwd_block_p": 64, "scan_fwd_warps": 4, "scan_fwd_stages": 2, "scan_fwd_maxnreg": None, "scan_fwd_step": 16,
    "scan_fwd_save_block_p": None, "scan_fwd_save_warps": None, "scan_fwd_rope_prepass": "C",
    "scan_fwd_rotate_block_l": 32,
}


@triton.jit
def _load_rotated_weighted(base_ptr, stride_t, stride_n, cos_ptr, sin_ptr, stride_ct, stride_cn, weight,
                           offs_t, offs_nh, mask_t, mask_nh, NH, ROPE: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """rope(v) of a (T, n) tile as two product operands, and the same with row t scaled by weight[t] (rounded
    once from float32). The tables are loaded one half at a time, as `ssd._load_rotated_operands` does: fewer
    float32 tiles live at once."""
    first, second = _load_halves(base_ptr, stride_t, stride_n, offs_t, offs_nh, mask_t, mask_nh, NH)
    if ROPE:
        mask = mask_t[:, None] & mask_nh[None, :]
        table = offs_t[:, None] * stride_ct + offs_nh[None, :] * stride_cn
        cos1 = tl.load(cos_ptr + table, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table, mask=mask, other=0.0).to(tl.float32)
        rotated_first = first * cos1 - second * sin1
        cos2 = tl.load(cos_ptr + table + NH * stride_cn, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table + NH * stride_cn, mask=mask, other=0.0).to(tl.float32)
        rotated_second = second * cos2 + first * sin2
    else:
        rotated_first = first
        rotated_second = second
    return (_op(rotated_first, DOT_DTYPE, ROUND_BF16), _op(rotated_second, DOT_DTYPE, ROUND_BF16),
            _op(rotated_first * weight[:, None], DOT_DTYPE, ROUND_BF16),
            _op(rotated_second * weight[:, None], DOT_DTYPE, ROUND_BF16))


@triton.jit
def _scan_fwd_kernel(
    x_ptr, b_ptr, c_ptr, cos_ptr, sin_ptr, dt_ptr, g_ptr, seq_ptr, init_ptr, d_ptr,
    y_ptr, final_ptr, states_ptr, rot_b_ptr, rot_c_ptr,
    L, H, HPG, P, NH, NCHUNK, LPAD,
    sx_b, sx_l, sx_h, sx_p,
    sb_b, sb_l, sb_h, sb_n,
    scc_b, scc_l, scc_h, scc_n,
    sc_b, sc_l, sc_n,
    sy_b, sy_l, sy_h, sy_p,
    T: tl.constexpr, STEP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_NH: tl.constexpr,
    ROPE_B: tl.constexpr, ROPE_C: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, HAS_D: tl.constexpr,
    SAVE_STATES: tl.constexpr, SAVE_ROTATED_B: tl.constexpr, SAVE_ROTATED_C: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """y of every chunk of one (batch, head, p-block), the state carried chunk to chunk in two float32
    (BLOCK_P, n/2) halves (rotate-half: every n-product is the sum of two half products).

    The walk advances STEP tokens at a time (STEP divides T): the same recurrence on shorter steps, so the
    (STEP, n) and (STEP, p) tiles a step holds are smaller (registers); g is the within-T-chunk cumsum, so a
    step that starts inside a chunk measures its decays from the chunk's g just before it."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    hi = pid_bh % H
    gi = hi // HPG   # the B/C group this head reads
    N = 2 * NH
    offs_t = tl.arange(0, STEP)
    STEPS_PER_CHUNK: tl.constexpr = T // STEP
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_nh = tl.arange(0, BLOCK_NH)
    mask_p = offs_p < P
    mask_nh = offs_nh < NH
    mask_pn = mask_p[:, None] & mask_nh[None, :]

    pn_offs = offs_p[:, None] * N + offs_nh[None, :]
    head_pn = (bi * H + hi).to(tl.int64) * P * N
    if HAS_INIT:
        state_first = tl.load(init_ptr + head_pn + pn_offs, mask=mask_pn, other=0.0).to(tl.float32)
        state_second = tl.load(init_ptr + head_pn + pn_offs + NH, mask=mask_pn, other=0.0).to(tl.float32)
    else:
        state_first = tl.zeros((BLOCK_P, BLOCK_NH), dtype=tl.float32)
        state_second = tl.zeros((BLOCK_P, BLOCK_NH), dtype=tl.float32)
    if HAS_D:
        skip = tl.load(d_ptr + hi).to(tl.float32)

    x_base = x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h
    y_base = y_ptr + bi.to(tl.int64) * sy_b + hi * sy_h
    b_base = b_ptr + bi.to(tl.int64) * sb_b + gi * sb_h
    c_base = c_ptr + bi.to(tl.int64) * scc_b + gi * scc_h
    cos_base = cos_ptr + bi.to(tl.int64) * sc_b
    sin_base = sin_ptr + bi.to(tl.int64) * sc_b
    gdt_row = (bi * H + hi).to(tl.int64) * LPAD
    seq_row = bi.to(tl.int64) * LPAD
    # B~, C~ are stored once per group and chunk: by the group's first head, first p-block
    stores_rotated = (pid_p == 0) & (hi % HPG == 0)
    causal = offs_t[:, None] >= offs_t[None, :]
    for step in range(NCHUNK * STEPS_PER_CHUNK):
        chunk_start = step * STEP   # the start of this step (of a chunk when STEP = T)
        if SAVE_STATES:   # the state entering each chunk, for the backward kernels
            if step % STEPS_PER_CHUNK == 0:
                slot = (states_ptr + ((bi * (NCHUNK + 1) + step // STEPS_PER_CHUNK) * H + hi).to(tl.int64) * P * N
                        + pn_offs)
                tl.store(slot, state_first.to(states_ptr.dtype.element_ty), mask=mask_pn)
                tl.store(slot + NH, state_second.to(states_ptr.dtype.element_ty), mask=mask_pn)

        offs_l = chunk_start + offs_t
        mask_t = offs_l < L
        g = tl.load(g_ptr + gdt_row + offs_l)
        dt = tl.load(dt_ptr + gdt_row + offs_l)
        g_last = tl.load(g_ptr + gdt_row + chunk_start + STEP - 1)
        if STEPS_PER_CHUNK > 1:   # g from just before the step (0 at a chunk's start)
            g_before = tl.load(g_ptr + gdt_row + tl.maximum(chunk_start - 1, 0))
            g_before = tl.where(step % STEPS_PER_CHUNK == 0, 0.0, g_before)
            g = g - g_before
            g_last = g_last - g_before
        same_doc, sees_carried, reaches_end, crosses = _chunk_masks(seq_ptr, seq_row, chunk_start, offs_t, STEP,
                                                                    HAS_SEQ)

        cos_chunk = cos_base + chunk_start * sc_l
        sin_chunk = sin_base + chunk_start * sc_l
        c_first, c_second = _load_rotated_operands(c_base + chunk_start * scc_l, scc_l, scc_n, cos_chunk, sin_chunk,
                                                   sc_l, sc_n, offs_t, offs_nh, mask_t, mask_nh, NH, ROPE_C,
                                                   DOT_DTYPE, ROUND_BF16)
        # the state update's weights ride on B~ (rounded once from float32, as `_state_fwd_kernel` does)
        weight = tl.where(reaches_end, tl.exp(g_last - g) * dt, 0.0)
        b_first, b_second, b_first_weighted, b_second_weighted = _load_rotated_weighted(
            b_base + chunk_start * sb_l, sb_l, sb_n, cos_chunk, sin_chunk, sc_l, sc_n, weight,
            offs_t, offs_nh, mask_t, mask_nh, NH, ROPE_B, DOT_DTYPE, ROUND_BF16)
        if SAVE_ROTATED_B:   # B~ (and with SAVE_ROTATED_C, C~), in B's strides (both are allocated like B)
            if stores_rotated:
                mask_tn = mask_t[:, None] & mask_nh[None, :]
                rot_offs = bi.to(tl.int64) * sb_b + gi * sb_h + offs_l[:, None] * sb_l + offs_nh[None, :] * sb_n
                tl.store(rot_b_ptr + rot_offs, b_first.to(rot_b_ptr.dtype.element_ty), mask=mask_tn)
                tl.store(rot_b_ptr + rot_offs + NH * sb_n, b_second.to(rot_b_ptr.dtype.element_ty), mask=mask_tn)
                if SAVE_ROTATED_C:
                    tl.store(rot_c_ptr + rot_offs, c_first.to(rot_c_ptr.dtype.element_ty), mask=mask_tn)
                    tl.store(rot_c_ptr + rot_offs + NH * sb_n, c_second.to(rot_c_ptr.dtype.element_ty),
                             mask=mask_tn)

        x = tl.load(x_base + offs_l[:, None] * sx_l + offs_p[None, :] * sx_p,
                    mask=mask_t[:, None] & mask_p[None, :], other=0.0)
        x_operand = _op(x, DOT_DTYPE, ROUND_BF16)
        # the carried state first, rounded to an operand as `_chunk_fwd_kernel` reads it from the stored
        # states; then the state is stepped in place, so only one float32 copy of it is ever live
        carried = tl.dot(c_first, tl.trans(_op(state_first.to(x_ptr.dtype.element_ty), DOT_DTYPE, ROUND_BF16)),
                         input_precision=DOT_PREC)
        carried = tl.dot(c_second, tl.trans(_op(state_second.to(x_ptr.dtype.element_ty), DOT_DTYPE, ROUND_BF16)),
                         carried, input_precision=DOT_PREC)
        y = carried * tl.where(sees_carried, tl.exp(g), 0.0)[:, None]
        chunk_decay = tl.where(crosses, tl.exp(g_last), 0.0)
        x_transposed = tl.trans(x_operand)
        state_first = tl.dot(x_transposed, b_first_weighted, state_first * chunk_decay, input_precision=DOT_PREC)
        state_second = tl.dot(x_transposed, b_second_weighted, state_second * chunk_decay, input_precision=DOT_PREC)

        # intra-chunk: (C~B~^T * decay * dt_u) x, dt on the columns so that x enters the product as stored
        scores = tl.dot(c_first, tl.trans(b_first), input_precision=DOT_PREC)
        scores = tl.dot(c_second, tl.trans(b_second), scores, input_precision=DOT_PREC)
        decay = tl.exp(tl.where(causal & same_doc, g[:, None] - g[None, :], float("-inf")))
        scores = _op(scores * decay * dt[None, :], DOT_DTYPE, ROUND_BF16)
        y = tl.dot(scores, x_operand, y, input_precision=DOT_PREC)
        if HAS_D:
            y += skip * x.to(tl.float32)
        tl.store(y_base + offs_l[:, None] * sy_l + offs_p[None, :] * sy_p, y.to(y_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_p[None, :])

    if SAVE_STATES:   # the final state also in the last slot (the backward reads the state leaving every chunk)
        slot = states_ptr + ((bi * (NCHUNK + 1) + NCHUNK) * H + hi).to(tl.int64) * P * N + pn_offs
        tl.store(slot, state_first.to(states_ptr.dtype.element_ty), mask=mask_pn)
        tl.store(slot + NH, state_second.to(states_ptr.dtype.element_ty), mask=mask_pn)
    tl.store(final_ptr + head_pn + pn_offs, state_first, mask=mask_pn)
    tl.store(final_ptr + head_pn + pn_offs + NH, state_second, mask=mask_pn)


@triton.jit
def _rotate_kernel(b_ptr, c_ptr, cos_ptr, sin_ptr, rot_b_ptr, rot_c_ptr, L, G, NH,
                   sb_b, sb_l, sb_h, sb_n, scc_b, scc_l, scc_h, scc_n, sc_b, sc_l, sc_n,
                   BLOCK_L: tl.constexpr, BLOCK_NH: tl.constexpr, ROTATE_B: tl.constexpr):
    """B~ = rope(B), C~ = rope(C) of a (BLOCK_L, n) tile of one batch row and group, in float32 from the
    tables and stored in B's dtype: the numbers `_chunk_fwd_kernel` stores with "save_rotated". The outputs
    have B's / C's strides."""
    pid_l = tl.program_id(0)
    pid_bg = tl.program_id(1)
    bi = pid_bg // G
    gi = pid_bg % G
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_nh = tl.arange(0, BLOCK_NH)
    mask_t = offs_t < L
    mask_nh = offs_nh < NH
    mask = mask_t[:, None] & mask_nh[None, :]
    cos1, cos2, sin1, sin2 = _load_rope(cos_ptr + bi.to(tl.int64) * sc_b, sin_ptr + bi.to(tl.int64) * sc_b,
                                        sc_l, sc_n, offs_t, offs_nh, mask_t, mask_nh, NH)
    if ROTATE_B:
        b_offs = bi.to(tl.int64) * sb_b + gi * sb_h + offs_t[:, None] * sb_l + offs_nh[None, :] * sb_n
        b_first, b_second = _load_rotated(b_ptr + bi.to(tl.int64) * sb_b + gi * sb_h, sb_l, sb_n,
                                          cos1, cos2, sin1, sin2, offs_t, offs_nh, mask_t, mask_nh, NH, True)
        tl.store(rot_b_ptr + b_offs, b_first.to(rot_b_ptr.dtype.element_ty), mask=mask)
        tl.store(rot_b_ptr + b_offs + NH * sb_n, b_second.to(rot_b_ptr.dtype.element_ty), mask=mask)
    c_offs = bi.to(tl.int64) * scc_b + gi * scc_h + offs_t[:, None] * scc_l + offs_nh[None, :] * scc_n
    c_first, c_second = _load_rotated(c_ptr + bi.to(tl.int64) * scc_b + gi * scc_h, scc_l, scc_n,
                                      cos1, cos2, sin1, sin2, offs_t, offs_nh, mask_t, mask_nh, NH, True)
    tl.store(rot_c_ptr + c_offs, c_first.to(rot_c_ptr.dtype.element_ty), mask=mask)
    tl.store(rot_c_ptr + c_offs + NH * scc_n, c_second.to(rot_c_ptr.dtype.element_ty), mask=mask)


def scan_fwd_settings(config, save_for_backward):
    """(block_p, warps, stages, maxnreg, step, rope_prepass, rotate_block_l) from the "scan_fwd_*" keys of
    `config` over SCAN_FWD_CONFIG; with save_for_backward, "scan_fwd_save_block_p" / "scan_fwd_save_warps" win
    where set."""
    merged = dict(SCAN_FWD_CONFIG, **{key: value for key, value in config.items() if key.startswith("scan_fwd_")})
    block_p, warps = merged["scan_fwd_block_p"], merged["scan_fwd_warps"]
    if save_for_backward:
        block_p = merged["scan_fwd_save_block_p"] or block_p
        warps = merged["scan_fwd_save_warps"] or warps
    return (block_p, warps, merged["scan_fwd_stages"], merged["scan_fwd_maxnreg"], merged["scan_fwd_step"],
            merged["scan_fwd_rope_prepass"], merged["scan_fwd_rotate_block_l"])


def scan_forward(x, B, C, cos, sin, dt, g, seq, D, initial_state, T, config, save_for_backward=True):
    """The SSD forward in one launch; arguments and outputs as `ssd._forward` (see the module docstring).
    Grid: (p-blocks, b * h), each program sequential over the l / T chunks."""
    batch, length, heads, head_dim = x.shape
    heads_per_group = heads // B.shape[2]
    half = B.shape[-1] // 2
    n_chunks = dt.shape[-1] // T
    y = torch.empty_like(x)
    final = torch.empty(batch, heads, head_dim, 2 * half, device=x.device, dtype=torch.float32)
    states = (torch.empty(batch, n_chunks + 1, heads, head_dim, 2 * half, device=x.device, dtype=x.dtype)
              if save_for_backward else None)
    cos_arg, sin_arg, cos_strides, rope = _rope_args(cos, sin, dt)
    save_rotated = rope and save_for_backward and config.get("save_rotated", False)
    rotated_B = torch.empty_like(B) if save_rotated else None
    rotated_C = torch.empty_like(C) if save_rotated else None
    dot_dtype, round_bf16 = _dot_dtypes(x.dtype)

    block_p, warps, stages, maxnreg, step, rope_prepass, rotate_block_l = scan_fwd_settings(config,
                                                                                            save_for_backward)
    step = min(step, T)
    if T % step:
        raise ValueError(f"scan_forward: scan_fwd_step {step} must divide the kernel chunk {T}")
    if rope_prepass not in (False, True, "C"):
        raise ValueError(f"scan_forward: scan_fwd_rope_prepass must be False, True or 'C', got {rope_prepass!r}")
    B_in, C_in, rope_b, rope_c, save_b, save_c = B, C, rope, rope, save_rotated, save_rotated
    if rope and rope_prepass:
        # C~ (True: and B~) rotated once by an elementwise launch; the walk reads them as plain B, C. "C": the
        # walk still rotates B (and stores B~ when saving), so that its weighted operand exp(g_last - g) dt B~
        # is rounded once from float32, as in `_state_fwd_kernel` (True rounds it twice)
        rotate_b = rope_prepass is True
        C_in = rotated_C if save_rotated else torch.empty_like(C)
        if rotate_b:
            B_in = rotated_B if save_rotated else torch.empty_like(B)
        rotate_block_l = min(rotate_block_l, triton.next_power_of_2(length))
        _rotate_kernel[(triton.cdiv(length, rotate_block_l), batch * B.shape[2])](
            B, C, cos, sin, B_in if rotate_b else C_in, C_in, length, B.shape[2], half,
            *B.stride(), *C.stride(), *cos_strides,
            BLOCK_L=rotate_block_l, BLOCK_NH=_next_pow2(half), ROTATE_B=rotate_b, num_warps=4)
        rope_b, rope_c, save_b, save_c = not rotate_b, False, save_rotated and not rotate_b, False
    block_p = min(block_p, _next_pow2(head_dim))
    grid = (triton.cdiv(head_dim, block_p), batch * heads)
    _scan_fwd_kernel[grid](
        x, B_in, C_in, cos_arg, sin_arg, dt, g, seq if seq is not None else dt,
        initial_state if initial_state is not None else dt, D if D is not None else dt,
        y, final, states if save_for_backward else y, rotated_B if save_rotated else y,
        rotated_C if save_rotated else y,
        length, heads, heads_per_group, head_dim, half, n_chunks, dt.shape[-1],
        *x.stride(), *B_in.stride(), *C_in.stride(), *cos_strides, *y.stride(),
        T=T, STEP=step, BLOCK_P=block_p, BLOCK_NH=_next_pow2(half), ROPE_B=rope_b, ROPE_C=rope_c,
        HAS_SEQ=seq is not None, HAS_INIT=initial_state is not None, HAS_D=D is not None,
        SAVE_STATES=save_for_backward, SAVE_ROTATED_B=save_b, SAVE_ROTATED_C=save_c,
        DOT_PREC=_dot_precision(x.dtype), DOT_DTYPE=dot_dtype, ROUND_BF16=round_bf16,
        num_warps=warps, num_stages=stages, maxnreg=maxnreg)
    return y, final, states, rotated_B, rotated_C
