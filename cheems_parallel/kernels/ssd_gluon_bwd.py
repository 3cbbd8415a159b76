"""SSD chunk backward for shared B/C groups in Gluon: dx, dB, dC and dg in one warp-specialised launch (Hopper).

Computes what three Triton launches of `ssd._backward` compute for groups < heads (`_chunk_bwd_dx_group_kernel`
and `_chunk_bwd_dqk_group_kernel` for the C side and the B side), given the state gradients from `_state_bwd`.
Those launches read each head's x, dy and state / state gradient tiles two or three times; here they are read
once (bench/ssd_notes.md v16: the byte model behind it).

One program per (chunk of T tokens, batch·group), looping over the group's heads:
- producer partition, 1 warp: TMA loads of q = C~ and k = B~ (T x n) once, then per head x and dy (T x p),
  the state entering the chunk S and d loss / d(state leaving the chunk) G (p x n) into a STAGES-deep ring.
- C-side partition (the default, one warp group): scores = q k^T once; per head dyv = (dy x^T) * Gam * dt
  (Gam[t,u] = exp(g_t - g_u), t >= u), W += dyv, M = scores * dyv, and the carried-state product
  acc_C += (exp(g) * dy) S accumulated in place by wgmma. The carried term of dg, rowsum(q * exp(g) dy S),
  is the change of rowsum(q * acc_C) over the head (float32: exact to ~1e-6 relative, no (T, n) temporary).
  dg's share rowsum(M) - colsum(M) + carried; dD per token, dy x^T's diagonal. After the loop dC = acc_C + W k,
  and W^T q (dB's share).
- B-side/dx partition (one warp group): scores^T once; per head dv = w * (k G^T) + (scores^T * Gam^T) dy
  (w_u = exp(g_last - g_u)), dx = dv dt + D dy, d dt = rowsum(dv * x), and
  acc_B += (w dt x) G in place; dg's share -c + [t = T-1] sum(c), c = w dt rowsum(x * (k G^T)).
dB = acc_B + W^T q is summed by the launcher (two float32 buffers), as are the two dg shares.

Scope (`supported`): bf16/fp16, T = 64, p and n in {64, 128}, l a multiple of T, no document mask, B~ and C~
given unrotated or pre-rotated (the forward's saved B~, C~) with RoPE handled by the caller; contiguous tensors.
"""
import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from cheems_parallel.kernels.device import is_hopper

CHUNK = 64
STAGES = 2
PRODUCER_REGISTERS = 24
CONSUMER_REGISTERS = 240
# a barrier across the warps of a program (or, inside warp_specialize, of a partition): Triton 3.6 (the GPU's)
# names it thread_barrier, 3.7 barrier
sync_warps = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
LAUNCHES = 0  # how often fused_group_backward ran (the GPU tests check that their cases took this path)


def hopper_tiles_fit(x, B, T, *others):
    """What the Gluon SSD kernels need: a Hopper GPU, 16-bit x and B, T = CHUNK, l a multiple of T, p in {64, 128},
    x, B and `others` contiguous (TMA descriptors over flat rows)."""
    return (x.is_cuda and is_hopper(x.device)
            and x.dtype in (torch.bfloat16, torch.float16) and B.dtype == x.dtype and T == CHUNK
            and x.shape[1] % T == 0 and x.shape[-1] in (64, 128)
            and all(t.is_contiguous() for t in (x, B, *others)))


def documents_fit(seq):
    """Document ids the forward walk and the head backward read: none, or int32 (b, lpad) rows as `ssd_fused`
    pads them."""
    return seq is None or (seq.dtype == torch.int32 and seq.is_contiguous())


def supported(x, B, dy, states, T, seq):
    """True when this kernel can run the backward of these inputs (else the Triton kernels run): no documents.
    RoPE is the caller's to rule out (dB~, dC~ would need un-rotating)."""
    return (B.shape[2] < x.shape[2] and B.shape[-1] in (64, 128) and seq is None
            and hopper_tiles_fit(x, B, T, dy, states))


@gluon.jit
def chunk_document_ids(seq_ptr, bi, c, LPAD, T: gl.constexpr):
    """Where chunk c of row bi reads its document ids (`ssd_fused`'s padded (b, lpad) int32 rows): (the chunk's row
    offset, the id of its last token, the id of the token before it; the first token's own for chunk 0), the
    operands of `ssd._chunk_masks`."""
    seq_row = bi.to(gl.int64) * LPAD + c * T
    seq_prev = gl.load(seq_ptr + bi.to(gl.int64) * LPAD + gl.maximum(c * T - 1, 0))
    return seq_row, gl.load(seq_ptr + seq_row + T - 1), seq_prev


@gluon.jit
def clock():
    """The SM's cycle counter (the forward walk's and the head backward's PROFILE builds only)."""
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def profile_counters():
    """Eight zeroed int64 cycle counters (PROFILE builds)."""
    zero = clock() * 0
    return zero, zero, zero, zero, zero, zero, zero, zero


@gluon.jit
def store_profile_row(row, p0, p1, p2, p3, p4, p5, p6, p7):
    """Eight cycle counters into row[0:8] of an int64 profile tensor (PROFILE builds)."""
    gl.store(row, p0)
    gl.store(row + 1, p1)
    gl.store(row + 2, p2)
    gl.store(row + 3, p3)
    gl.store(row + 4, p4)
    gl.store(row + 5, p5)
    gl.store(row + 6, p6)
    gl.store(row + 7, p7)


@gluon.jit
def barrier_ring(STAGES: gl.constexpr):
    """One mbarrier per slot of a STAGES-deep TMA ring, each expecting one arrival (the walks' `ready`)."""
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(bars.index(s), count=1)
    return bars


@gluon.jit
def invalidate_ring(bars, STAGES: gl.constexpr):
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(s))


@gluon.constexpr_function
def wgmma_layout(columns):
    """Accumulator layout of a 64-row wgmma by one warp group, `columns` wide (both Gluon SSD backwards)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, columns, 16])


# ----------------------------------------------------------------------------------------------
# Producer partition (1 warp).
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _producer(x_desc, dy_desc, s_desc, ds_desc, q_desc, k_desc, x_smem, dy_smem, s_smem, ds_smem, q_smem, k_smem,
              qk_bar, ready, empty, token_row, group_col, state_row0, first_head, HPG,
              P: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(qk_bar, q_desc.block_type.nbytes + k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [token_row, group_col], qk_bar, q_smem)
    tma.async_copy_global_to_shared(k_desc, [token_row, group_col], qk_bar, k_smem)
    for j in range(HPG):
        slot = j % STAGES
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, 2 * x_desc.block_type.nbytes + 2 * s_desc.block_type.nbytes)
        head = first_head + j
        tma.async_copy_global_to_shared(x_desc, [token_row, head * P], bar, x_smem.index(slot))
        tma.async_copy_global_to_shared(dy_desc, [token_row, head * P], bar, dy_smem.index(slot))
        tma.async_copy_global_to_shared(s_desc, [state_row0 + head * P, 0], bar, s_smem.index(slot))
        tma.async_copy_global_to_shared(ds_desc, [state_row0 + head * P, 0], bar, ds_smem.index(slot))


@gluon.jit
def _tile_dot(a_smem, b_smem, FIRST: gl.constexpr, LAST: gl.constexpr, N: gl.constexpr):
    """sum(a * b) over rows [FIRST, LAST) of two (P, N) shared-memory tiles, 32 rows at a time (float32)."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    total = gl.zeros([32, N], gl.float32, layout)
    for r in gl.static_range(FIRST, LAST, 32):
        total += (a_smem.slice(r, 32, dim=0).load(layout).to(gl.float32)
                  * b_smem.slice(r, 32, dim=0).load(layout).to(gl.float32))
    return gl.sum(gl.sum(total, axis=1), axis=0)


# ----------------------------------------------------------------------------------------------
# C-side partition (default, one warp group): W, M, dg's C share, acc_C; dC and W^T q at the end.
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _c_side(x_smem, dy_smem, s_smem, ds_smem, q_smem, k_smem, qk_bar, ready, empty, g_ptr, dt_ptr, dc_ptr, dbw_ptr, dgc_ptr,
            dd_ptr, gdt_row0, token_row, group_col, GN, HPG, LPAD,
            T: gl.constexpr, P: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr, HAS_D: gl.constexpr,
            P_C: gl.constexpr):
    tt_layout: gl.constexpr = wgmma_layout(T)
    tn_layout: gl.constexpr = wgmma_layout(N)
    a_tn: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=tn_layout, k_width=2)
    dtype: gl.constexpr = x_smem.dtype
    rows = gl.arange(0, T, layout=gl.SliceLayout(1, tt_layout))
    cols = gl.arange(0, T, layout=gl.SliceLayout(0, tt_layout))
    rows_a = gl.arange(0, T, layout=gl.SliceLayout(1, a_tn))
    causal = gl.expand_dims(rows, 1) >= gl.expand_dims(cols, 0)
    diagonal = gl.expand_dims(rows, 1) == gl.expand_dims(cols, 0)
    zero_tt = gl.zeros([T, T], gl.float32, tt_layout)
    mbarrier.wait(qk_bar, 0)
    scores = warpgroup_mma(q_smem, k_smem.permute((1, 0)), zero_tt, use_acc=False)   # [t, u] = q_t . k_u
    acc_c = gl.zeros([T, N], gl.float32, tn_layout)
    weights = gl.zeros([T, T], gl.float32, tt_layout)
    previous = gl.zeros([T], gl.float32, gl.SliceLayout(1, tn_layout))
    for j in range(HPG):
        slot = j % STAGES
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        x_tile = x_smem.index(slot)
        dy_tile = dy_smem.index(slot)
        gdt_row = gdt_row0 + j * LPAD
        dyv = warpgroup_mma(dy_tile, x_tile.permute((1, 0)), zero_tt, use_acc=False, is_async=True)
        dyv = warpgroup_mma_wait(0, deps=(dyv, ))
        if HAS_D:  # dD's share, per token: dy_t . x_t is dy x^T's diagonal
            gl.store(dd_ptr + gdt_row + rows, gl.sum(gl.where(diagonal, dyv, 0.0), axis=1))
        g_rows = gl.load(g_ptr + gdt_row + rows)
        g_cols = gl.load(g_ptr + gdt_row + cols)
        dt_cols = gl.load(dt_ptr + gdt_row + cols)
        decay = gl.exp(gl.where(causal, gl.expand_dims(g_rows, 1) - gl.expand_dims(g_cols, 0), float("-inf")))
        dyv = dyv * decay * gl.expand_dims(dt_cols, 0)
        weights += dyv
        products = scores * dyv
        share = gl.sum(products, axis=1) - gl.convert_layout(gl.sum(products, axis=0), gl.SliceLayout(1, tt_layout))
        # the carried-state product, rows scaled by exp(g) before the product so that wgmma accumulates in place
        scale_a = gl.exp(gl.load(g_ptr + gdt_row + rows_a))
        dy_a = (dy_tile.load(a_tn).to(gl.float32) * gl.expand_dims(scale_a, 1)).to(dtype)
        acc_c = warpgroup_mma(dy_a, s_smem.index(slot), acc_c, is_async=True)
        acc_c, dy_a = warpgroup_mma_wait(0, deps=(acc_c, dy_a))
        # exp(g_last) <S, G>: the carried state's part of d loss / d g_last (the B side's G tile is in this slot)
        overlap = _tile_dot(s_smem.index(slot), ds_smem.index(slot), 0, P_C, N)
        mbarrier.arrive(empty.index(slot))
        current = gl.sum(q_smem.load(tn_layout).to(gl.float32) * acc_c, axis=1)
        carried = gl.convert_layout(current - previous, gl.SliceLayout(1, tt_layout))
        previous = current
        end_term = gl.where(rows == T - 1, overlap * gl.exp(gl.load(g_ptr + gdt_row + T - 1)), 0.0)
        gl.store(dgc_ptr + gdt_row + rows, share + carried + end_term)

    # dC = acc_C + W k; W^T q is dB's share (the other partition adds acc_B). W^T as an operand goes through
    # shared memory: the x buffer of the last head's slot, once the other partition has released it (a
    # register transpose would need 8 KB of scratch that the ring leaves no room for).
    weights_low = weights.to(dtype)
    acc_c = warpgroup_mma(gl.convert_layout(weights_low, a_tn), k_smem, acc_c, is_async=True)
    last = (HPG - 1) % STAGES
    mbarrier.wait(empty.index(last), ((HPG - 1) // STAGES) & 1)
    w_smem = x_smem.index(last)._reinterpret(dtype, [T, T], gl.NVMMASharedLayout.get_default_for([T, T], dtype))
    w_smem.store(weights_low)
    fence_async_shared()
    zero_tn = gl.zeros([T, N], gl.float32, tn_layout)
    dbw = warpgroup_mma(w_smem.permute((1, 0)), q_smem, zero_tn, use_acc=False, is_async=True)
    acc_c, dbw = warpgroup_mma_wait(0, deps=(acc_c, dbw))
    _store_rows(dc_ptr, acc_c, token_row, group_col, GN, T, N, tn_layout)
    _store_rows(dbw_ptr, dbw, token_row, group_col, GN, T, N, tn_layout)


@gluon.jit
def _store_rows(out_ptr, tile, token_row, group_col, GN, T: gl.constexpr, N: gl.constexpr, layout: gl.constexpr):
    """A (T, n) gradient tile into the (b·l, g·n) float32 rows of dB, dC or W^T q."""
    out_rows = gl.arange(0, T, layout=gl.SliceLayout(1, layout))
    out_cols = gl.arange(0, N, layout=gl.SliceLayout(0, layout))
    offsets = (token_row + gl.expand_dims(out_rows, 1)).to(gl.int64) * GN + group_col + gl.expand_dims(out_cols, 0)
    gl.store(out_ptr + offsets, tile)


# ----------------------------------------------------------------------------------------------
# B-side and dx partition (one warp group).
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _b_side(x_smem, dy_smem, s_smem, ds_smem, q_smem, k_smem, qk_bar, ready, empty, g_ptr, dt_ptr, d_ptr, dx_ptr, db_ptr,
            dgb_ptr, ddt_ptr, gdt_row0, token_row, group_col, GN, HPG, LPAD, first_head, HP,
            T: gl.constexpr, P: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr, HAS_D: gl.constexpr,
            P_C: gl.constexpr):
    tt_layout: gl.constexpr = wgmma_layout(T)
    tp_layout: gl.constexpr = wgmma_layout(P)
    tn_layout: gl.constexpr = wgmma_layout(N)
    a_tp: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=tp_layout, k_width=2)
    a_tn: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=tn_layout, k_width=2)
    dtype: gl.constexpr = x_smem.dtype
    rows = gl.arange(0, T, layout=gl.SliceLayout(1, tt_layout))   # u
    cols = gl.arange(0, T, layout=gl.SliceLayout(0, tt_layout))   # t
    rows_p = gl.arange(0, T, layout=gl.SliceLayout(1, tp_layout))
    cols_p = gl.arange(0, P, layout=gl.SliceLayout(0, tp_layout))
    rows_a = gl.arange(0, T, layout=gl.SliceLayout(1, a_tn))
    causal_t = gl.expand_dims(cols, 0) >= gl.expand_dims(rows, 1)  # [u, t]: t >= u
    zero_tt = gl.zeros([T, T], gl.float32, tt_layout)
    zero_tp = gl.zeros([T, P], gl.float32, tp_layout)
    mbarrier.wait(qk_bar, 0)
    # [u, t] = k_u . q_t, kept in 16-bit (it is rounded to an operand after the decay anyway)
    scores_t = warpgroup_mma(k_smem, q_smem.permute((1, 0)), zero_tt, use_acc=False).to(dtype)
    acc_b = gl.zeros([T, N], gl.float32, tn_layout)
    for j in range(HPG):
        slot = j % STAGES
        mbarrier.wait(ready.index(slot), (j // STAGES) & 1)
        x_tile = x_smem.index(slot)
        dy_tile = dy_smem.index(slot)
        ds_tile = ds_smem.index(slot)
        gdt_row = gdt_row0 + j * LPAD
        head = first_head + j
        end = warpgroup_mma(k_smem, ds_tile.permute((1, 0)), zero_tp, use_acc=False, is_async=True)  # k G^T
        g_rows = gl.load(g_ptr + gdt_row + rows)
        g_cols = gl.load(g_ptr + gdt_row + cols)
        g_last = gl.load(g_ptr + gdt_row + T - 1)
        decay_t = gl.exp(gl.where(causal_t, gl.expand_dims(g_cols, 0) - gl.expand_dims(g_rows, 1), float("-inf")))
        st_a = gl.convert_layout((scores_t.to(gl.float32) * decay_t).to(dtype), a_tp)
        g_p = gl.load(g_ptr + gdt_row + rows_p)
        dt_p = gl.load(dt_ptr + gdt_row + rows_p)
        weight_p = gl.exp(g_last - g_p)
        end = warpgroup_mma_wait(0, deps=(end, ))
        # x is re-read from shared memory at each use (here, d dt): kept live it cost in-loop spills
        # c / (w dt) = rowsum(x * k G^T) = rowsum(k * x G)
        carried = gl.sum(x_tile.load(tp_layout).to(gl.float32) * end, axis=1) * weight_p * dt_p
        dv = warpgroup_mma(st_a, dy_tile, end * gl.expand_dims(weight_p, 1), is_async=True)
        dv, st_a = warpgroup_mma_wait(0, deps=(dv, st_a))
        dx = dv * gl.expand_dims(dt_p, 1)
        if HAS_D:
            dy_f = dy_tile.load(tp_layout).to(gl.float32)
            dx += gl.load(d_ptr + head).to(gl.float32) * dy_f
        dx_base = dx_ptr + token_row.to(gl.int64) * HP + head * P
        gl.store(dx_base + gl.expand_dims(rows_p, 1) * HP + gl.expand_dims(cols_p, 0), dx.to(dx_ptr.dtype.element_ty))
        gl.store(ddt_ptr + gdt_row + rows_p, gl.sum(dv * x_tile.load(tp_layout).to(gl.float32), axis=1))
        # the B side's carried product, rows scaled by w dt before it (in-place accumulation)
        scale_a = gl.exp(g_last - gl.load(g_ptr + gdt_row + rows_a)) * gl.load(dt_ptr + gdt_row + rows_a)
        x_a = (x_tile.load(a_tn).to(gl.float32) * gl.expand_dims(scale_a, 1)).to(dtype)
        acc_b = warpgroup_mma(x_a, ds_tile, acc_b, is_async=True)
        total = gl.sum(carried, axis=0)
        if P_C < P:  # this partition's rows of exp(g_last) <S, G> (the C side has the first P_C)
            total += _tile_dot(s_smem.index(slot), ds_tile, P_C, P, N) * gl.exp(g_last)
        gl.store(dgb_ptr + gdt_row + rows_p, gl.where(rows_p == T - 1, total, 0.0) - carried)
        acc_b, x_a = warpgroup_mma_wait(0, deps=(acc_b, x_a))
        mbarrier.arrive(empty.index(slot))
    _store_rows(db_ptr, acc_b, token_row, group_col, GN, T, N, tn_layout)


@gluon.jit
def _fused_group_bwd_kernel(x_desc, dy_desc, s_desc, ds_desc, q_desc, k_desc, g_ptr, dt_ptr, d_ptr,
                            dx_ptr, dc_ptr, db_ptr, dbw_ptr, dgc_ptr, dgb_ptr, ddt_ptr, dd_ptr,
                            L, H, HPG, NCHUNK, LPAD,
                            T: gl.constexpr, P: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr,
                            HAS_D: gl.constexpr, P_C: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                            CONSUMER_REGS: gl.constexpr,
                            num_warps: gl.constexpr):
    """Grid (chunks, batch·groups). Descriptors: x, dy over (b·l, h·p) rows in blocks of (T, p); S, G over the
    (b·(chunks+1)·h·p, n) rows of the states in blocks of (p, n); C~, B~ over (b·l, g·n) in blocks of (T, n)."""
    c = gl.program_id(0)
    pid_bg = gl.program_id(1)
    G = H // HPG
    bi = pid_bg // G
    gi = pid_bg % G
    first_head = gi * HPG
    token_row = bi * L + c * T
    group_col = gi * N
    state_row0 = ((bi * (NCHUNK + 1) + c) * H) * P
    gdt_row0 = (bi * H + first_head).to(gl.int64) * LPAD + c * T

    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    dy_smem = gl.allocate_shared_memory(dy_desc.dtype, [STAGES] + dy_desc.block_type.shape, dy_desc.layout)
    s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES] + s_desc.block_type.shape, s_desc.layout)
    ds_smem = gl.allocate_shared_memory(ds_desc.dtype, [STAGES] + ds_desc.block_type.shape, ds_desc.layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    qk_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(qk_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)

    gl.warp_specialize([
        (_c_side, (x_smem, dy_smem, s_smem, ds_smem, q_smem, k_smem, qk_bar, ready, empty, g_ptr, dt_ptr, dc_ptr, dbw_ptr,
                   dgc_ptr, dd_ptr, gdt_row0, token_row, group_col, G * N, HPG, LPAD, T, P, N, STAGES, HAS_D, P_C)),
        (_b_side, (x_smem, dy_smem, s_smem, ds_smem, q_smem, k_smem, qk_bar, ready, empty, g_ptr, dt_ptr, d_ptr, dx_ptr,
                   db_ptr, dgb_ptr, ddt_ptr, gdt_row0, token_row, group_col, G * N, HPG, LPAD, first_head,
                   H * P, T, P, N, STAGES, HAS_D, P_C)),
        (_producer, (x_desc, dy_desc, s_desc, ds_desc, q_desc, k_desc, x_smem, dy_smem, s_smem, ds_smem, q_smem,
                     k_smem, qk_bar, ready, empty, token_row, group_col, state_row0, first_head, HPG, P, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def tma_descriptor(tensor, rows, cols, block):
    """A host TMA descriptor over a contiguous 16-bit tensor viewed as (rows, cols), with `block` tiles (the
    Gluon SSD kernels' shared-memory layout: NVMMA's default for the block)."""
    return TensorDescriptor(tensor.view(rows, cols), [rows, cols], [cols, 1], block,
                            _block_layout(tuple(block), tensor.dtype == torch.bfloat16))


@functools.lru_cache(maxsize=None)
def _block_layout(block, bf16):
    """NVMMA's default shared layout for a 16-bit block (built once: the layout objects cost the host
    tens of microseconds per descriptor, bench/ssd_host_profile.py)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.bfloat16 if bf16 else gl.float16)


def descriptors(x, dy, states, dstates, B_in, C_in):
    """Host TMA descriptors: x, dy as (b·l, h·p) rows, blocks (T, p); states, dstates as (rows, n), blocks (p, n);
    C~ (q), B~ (k) as (b·l, g·n), blocks (T, n)."""
    batch, length, heads, head_dim = x.shape
    state_dim = B_in.shape[-1]
    make = tma_descriptor
    tokens = batch * length
    state_rows = states.numel() // state_dim
    groups = B_in.shape[2]
    return (make(x, tokens, heads * head_dim, [CHUNK, head_dim]), make(dy, tokens, heads * head_dim, [CHUNK, head_dim]),
            make(states, state_rows, state_dim, [head_dim, state_dim]),
            make(dstates, state_rows, state_dim, [head_dim, state_dim]),
            make(C_in, tokens, groups * state_dim, [CHUNK, state_dim]),
            make(B_in, tokens, groups * state_dim, [CHUNK, state_dim]))


def fused_group_backward(x, dy, B_in, C_in, dt, g, D, states, dstates, overlap_split=True):
    """(dx, dB, dC, ddt (1, b, h, lpad), dg as its C and B sides' (b, h, lpad) terms, dD per token (b, h, lpad)
    or None) of the chunk terms, as `ssd._backward`'s dx and dB/dC launches produce them; B_in / C_in are B~ / C~
    (RoPE, if any, left to the caller). dB and dC come out in x's dtype."""
    batch, length, heads, head_dim = x.shape
    groups, state_dim = B_in.shape[2], B_in.shape[3]
    lpad = dt.shape[-1]
    n_chunks = lpad // CHUNK
    dx = torch.empty_like(x)
    dC = torch.empty(batch, length, groups, state_dim, device=x.device, dtype=torch.float32)
    dB = torch.empty_like(dC)
    dB_w = torch.empty_like(dC)
    dg_c = torch.empty_like(g)
    dg_b = torch.empty_like(g)
    ddt = torch.empty(1, *dt.shape, device=x.device, dtype=torch.float32)
    dD = torch.empty_like(g) if D is not None else None   # (b, h, lpad): dy_t . x_t
    descs = descriptors(x, dy, states, dstates, B_in, C_in)
    global LAUNCHES
    LAUNCHES += 1
    _fused_group_bwd_kernel[(n_chunks, batch * groups)](
        *descs, g, dt, D if D is not None else dt, dx, dC, dB, dB_w, dg_c, dg_b, ddt, dD if D is not None else dt,
        length, heads, heads // groups, n_chunks, lpad,
        T=CHUNK, P=head_dim, N=state_dim, STAGES=STAGES, HAS_D=D is not None,
        P_C=head_dim // 2 if overlap_split else head_dim, PRODUCER_REGS=PRODUCER_REGISTERS,
        CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    # the two partitions' dB shares summed straight into x's dtype (one launch, no float32 sum written)
    dB = torch.add(dB, dB_w, out=torch.empty(dB.shape, device=x.device, dtype=x.dtype))
    return dx, dB, dC.to(x.dtype), ddt, (dg_c, dg_b), dD
