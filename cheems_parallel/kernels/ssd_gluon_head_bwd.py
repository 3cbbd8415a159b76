"""SSD chunk backward for groups = heads (the Cheems shape) in Gluon: dx, dB, dC, dg, ddt and dD in one persistent,
warp-specialised launch (Hopper), with RoPE's un-rotation of dB~, dC~ in the epilogue.

Computes what `_chunk_bwd_dx_kernel` and the merged `_chunk_bwd_dbc_kernel` of `ssd._backward` compute, given the
state gradients from `_state_bwd`. Those two launches read q = C~, k = B~, x, dy and the state tiles twice; here
each (chunk, head) tile is read once (bench/ssd_notes.md v18). Same math as `ssd_gluon_bwd.py` with one head per
group, except that nothing is summed over heads, so each side finishes its own gradient:

- producer (1 warp): per tile, TMA loads of q, k, x, dy (T x n, T x p) into a 2-stage ring, and of the state
  entering the chunk S and d loss / d(state leaving it) G (p x n) into one buffer that both consumers release
  early (their products with S and G come first), so the next tile's S and G load under the rest of the work.
  Two stages of all six tiles (128 KB each) would not fit in shared memory.
- C side (default partition): acc_C = (exp(g) dy) S, the carried term rowsum(q * acc_C), scores = q k^T,
  W = (dy x^T) * Gam * dt, dg's share rowsum(M) - colsum(M) with M = scores * W, dD per token (dy x^T's
  diagonal), then dC~ = acc_C + W k. It hands scores * Gam and W (T x T, 16-bit) to the B side through shared memory.
- B side + dx (worker partition): end = k G^T, acc_B = (w dt x) G, exp(g_last) <S, G> (after those products),
  dv = (scores * Gam)^T dy + w * end, dx, d dt, then dB~ = acc_B + W^T q
  (both (T, T) operands are the C side's tiles, transposed as shared-memory views: the B side was the longer
  partition while it formed them itself, bench/ssd_notes.md v18b).
The (T, n) accumulators are kept as their two rotate-half halves (products against column halves of the
shared-memory operands), so that RoPE's transpose pairs registers of the same thread; the tables are read as their
first halves only (`rope_tables`' rows repeat them), stored in the order the threads hold them
(`fragment_tables`).
Outputs leave by TMA stores staged in the slot's consumed tiles (v21; plain stores from the wgmma layout cost
~3 000 cycles a tile): dC~ in k once the B side's k G^T is done (sg_empty), dx and dB~ in x and q once the C side
has read its last of the slot (c_read); a consumer releases a slot after those stores have read it.

Documents (seq_idx, HAS_SEQ): the Triton kernels' masks (`ssd._chunk_masks`) on the same terms: Gam within a
document, exp(g) on dy only for tokens that see the carried state, w only for tokens that reach the chunk's end
state, and exp(g_last) <S, G> only when the state crosses the chunk (the reverse state pass applies the same masks
to G).

Scope (`supported`): bf16/fp16, T = 64, p in {64, 128}, n = 128, l a multiple of T, B~ and C~ given rotated (the
forward's saved copies) or RoPE off; contiguous tensors; document ids, if any, int32 (b, lpad) contiguous.
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from cheems_parallel.kernels.device import sm_count
from cheems_parallel.kernels.ssd_gluon_bwd import (
    CHUNK,
    PRODUCER_REGISTERS,
    _tile_dot,
    chunk_document_ids,
    clock,
    descriptors,
    documents_fit,
    hopper_tiles_fit,
    profile_counters,
    store_profile_row,
    sync_warps,
    tma_descriptor,
    wgmma_layout,
)

STAGES = 2
# the B side's (worker partition's) registers; the C side (default partition) gets the rest of the pool, 480 - this
# (the producer's 24 are charged for a whole warp group). 240 / 240 left 17 spill loads and stores in the B side's
# loop, 256 / 224 leaves 6 and 2 in the C side's: head kernel 1.93 -> 1.83-1.86 ms at 4k (bench/ssd_notes.md v26)
B_SIDE_REGISTERS = 256
LAUNCHES = 0  # how often fused_head_backward ran (the GPU tests check that their cases took this path)


def supported(x, B, dy, states, T, seq):
    """True when this kernel can run the backward of these inputs (else the Triton kernels run)."""
    return (B.shape[2] == x.shape[2] and B.shape[-1] == 128 and hopper_tiles_fit(x, B, T, dy, states)
            and documents_fit(seq))


@gluon.jit
def _tile_coords(tile, BH, H):
    """(chunk, batch, head) of a tile; consecutive tiles are the heads of one chunk."""
    c = tile // BH
    bh = tile % BH
    return c, bh // H, bh % H


@gluon.jit
def _consumer_tile(tile, i, BH, H, L, LPAD, T: gl.constexpr, STAGES: gl.constexpr):
    """A consumer's view of its i-th tile: (chunk, batch, head, ring slot, row of g / dt, first token row)."""
    c, bi, hi = _tile_coords(tile, BH, H)
    gdt_row = (bi * H + hi).to(gl.int64) * LPAD + c * T
    return c, bi, hi, i % STAGES, gdt_row, bi * L + c * T


@gluon.jit
def _slot_tiles(slot, x_smem, dy_smem, q_smem, k_smem):
    return x_smem.index(slot), dy_smem.index(slot), q_smem.index(slot), k_smem.index(slot)


@gluon.jit
def _producer(x_desc, dy_desc, q_desc, k_desc, s_desc, ds_desc, x_smem, dy_smem, q_smem, k_smem, s_smem, ds_smem,
              ready, empty, sg_ready, sg_empty, L, H, BH, NCHUNK, N_TILES,
              T: gl.constexpr, P: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr):
    i = 0
    for tile in range(gl.program_id(0), N_TILES, gl.num_programs(0)):
        c, bi, hi = _tile_coords(tile, BH, H)
        token_row = bi * L + c * T
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, 2 * x_desc.block_type.nbytes + 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [token_row, hi * N], bar, q_smem.index(slot))
        tma.async_copy_global_to_shared(k_desc, [token_row, hi * N], bar, k_smem.index(slot))
        tma.async_copy_global_to_shared(x_desc, [token_row, hi * P], bar, x_smem.index(slot))
        tma.async_copy_global_to_shared(dy_desc, [token_row, hi * P], bar, dy_smem.index(slot))
        mbarrier.wait(sg_empty, (i & 1) ^ 1)
        mbarrier.expect(sg_ready, 2 * s_desc.block_type.nbytes)
        state_row = ((bi * (NCHUNK + 1) + c) * H + hi) * P
        tma.async_copy_global_to_shared(s_desc, [state_row, 0], sg_ready, s_smem)
        tma.async_copy_global_to_shared(ds_desc, [state_row, 0], sg_ready, ds_smem)
        i += 1


def fragment_tables(cos, sin):
    """The un-rotation's tables in the order the epilogues read them: (b, l, n), cos's dtype, cos's first half in
    columns [0, n/2) and sin's in [n/2, n), each permuted so that a thread's elements of a row are contiguous.
    A thread of the wgmma accumulator layout holds columns 8 j + 2 t + e (t = lane % 4, j < n/16, e < 2): that
    column is stored at 16 t + 2 j + e, so the thread reads 16 contiguous values (two 16-byte loads) instead of
    eight 4-byte pieces. `rope_tables`' rows repeat their first half, so the first halves are all there is."""
    half = cos.shape[-1] // 2

    def fragment_order(table):
        first = table[..., :half]
        return first.reshape(*first.shape[:-1], half // 8, 4, 2).transpose(-3, -2).reshape(first.shape)

    return torch.cat([fragment_order(cos), fragment_order(sin)], dim=-1).contiguous()


@gluon.jit
def _fragment_table(row_ptr, sc_l, T: gl.constexpr, NH: gl.constexpr, layout: gl.constexpr):
    """(T, NH) of a `fragment_tables` half in the wgmma accumulator layout `layout` (T = NH = 64, 4 warps): loaded
    with each thread's 16 values of a row contiguous, then reordered in registers only (the reshape / permute / layout
    conversion move no data between threads: offline SASS has no shared memory or shuffles for it)."""
    gl.static_assert(T == 64 and NH == 64, "the fragment order is written out for 64 x 64 tiles")
    # registers: 16 contiguous columns (16 t + 2 j + e), then row + 8; lanes: t, then rows; warps: 16-row blocks
    contiguous: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [8, 0]], lane_bases=[[0, 16], [0, 32], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[T, NH])
    rows = gl.arange(0, T, layout=gl.SliceLayout(1, contiguous))
    cols = gl.arange(0, NH, layout=gl.SliceLayout(0, contiguous))
    stored = gl.load(row_ptr + gl.expand_dims(rows, 1) * sc_l + gl.expand_dims(cols, 0))
    # stored column 16 t + 2 j + e is column 8 j + 2 t + e
    logical = gl.reshape(gl.permute(gl.reshape(stored, [T, 4, NH // 8, 2]), [0, 2, 1, 3]), [T, NH])
    return gl.convert_layout(logical, layout)


@gluon.jit
def _unrotated(first, second, tables_ptr, table_base, sc_l, T: gl.constexpr, NH: gl.constexpr,
               layout: gl.constexpr, ROPE: gl.constexpr):
    """A (T, n) gradient given as its rotate-half halves, through RoPE's transpose (with ROPE):
    (g1 cos + g2 sin, g2 cos - g1 sin), the tables from `fragment_tables` (their loads in the wgmma layout's 4-byte
    pieces were ~1.7 us of a 9.3 us tile, bench/ssd_notes.md v21; in fragment order 16-byte loads, v23)."""
    if ROPE:
        cos = _fragment_table(tables_ptr + table_base, sc_l, T, NH, layout).to(gl.float32)
        sin = _fragment_table(tables_ptr + table_base + NH, sc_l, T, NH, layout).to(gl.float32)
        out_first = first * cos + second * sin
        out_second = second * cos - first * sin
    else:
        out_first = first
        out_second = second
    return out_first, out_second


@gluon.jit
def _tma_store(desc, row, col, tile):
    """A shared-memory tile this warp group has just written, out by TMA (every warp's writes visible first)."""
    fence_async_shared()
    sync_warps()
    tma.async_copy_shared_to_global(desc, [row, col], tile)


@gluon.jit
def _tma_store_halves(desc, row, col, tile, first, second, NH: gl.constexpr):
    """The two halves of a (T, n) gradient staged in a consumed (T, n) shared-memory tile, then out by TMA."""
    tile.slice(0, NH, dim=1).store(first.to(tile.dtype))
    tile.slice(NH, NH, dim=1).store(second.to(tile.dtype))
    _tma_store(desc, row, col, tile)


@gluon.jit
def _release_previous(empty, i, STAGES: gl.constexpr):
    """A consumer releases its previous tile's ring slot once the TMA stores it staged there (dC; dx, dB~) have read
    it: after this tile's first products (or after its last tile), not when its products are done."""
    if i > 0:
        tma.store_wait(0)
        mbarrier.arrive(empty.index((i - 1) % STAGES))


# ----------------------------------------------------------------------------------------------
# C side (default partition, one warp group): dC and dg's C share.
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _c_side(x_smem, dy_smem, q_smem, k_smem, s_smem, ds_smem, sd_smem, w_smem, ready, empty, sg_ready, sg_empty,
            handoff, c_read, dc_desc, g_ptr, dt_ptr, tables_ptr, dgc_ptr, dd_ptr, seq_ptr, prof_ptr, L, H, BH,
            NCHUNK, LPAD, N_TILES, sc_b, sc_l, T: gl.constexpr, P: gl.constexpr, N: gl.constexpr,
            STAGES: gl.constexpr, HAS_D: gl.constexpr, ROPE: gl.constexpr,
            HAS_SEQ: gl.constexpr, PROFILE: gl.constexpr):
    NH: gl.constexpr = N // 2
    tt_layout: gl.constexpr = wgmma_layout(T)
    th_layout: gl.constexpr = wgmma_layout(NH)
    a_th: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=th_layout, k_width=2)
    dtype: gl.constexpr = x_smem.dtype
    rows = gl.arange(0, T, layout=gl.SliceLayout(1, tt_layout))
    cols = gl.arange(0, T, layout=gl.SliceLayout(0, tt_layout))
    rows_a = gl.arange(0, T, layout=gl.SliceLayout(1, a_th))
    causal = gl.expand_dims(rows, 1) >= gl.expand_dims(cols, 0)
    diagonal = gl.expand_dims(rows, 1) == gl.expand_dims(cols, 0)
    zero_tt = gl.zeros([T, T], gl.float32, tt_layout)
    zero_th = gl.zeros([T, NH], gl.float32, th_layout)
    if PROFILE:  # cycles per phase, summed over the program's tiles (bench/ssd_head_profile.py)
        p0, p1, p2, p3, p4, p5, p6, p7 = profile_counters()
    i = 0
    for tile in range(gl.program_id(0), N_TILES, gl.num_programs(0)):
        if PROFILE:
            t0 = clock()
        c, bi, hi, slot, gdt_row, token_row = _consumer_tile(tile, i, BH, H, L, LPAD, T, STAGES)
        scale_a = gl.exp(gl.load(g_ptr + gdt_row + rows_a))
        g_last = gl.load(g_ptr + gdt_row + T - 1)
        if HAS_SEQ:  # exp(g) dy only for the tokens that see the carried state
            seq_row, seq_last, seq_prev = chunk_document_ids(seq_ptr, bi, c, LPAD, T)
            scale_a = gl.where(gl.load(seq_ptr + seq_row + rows_a) == seq_prev, scale_a, 0.0)
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        if PROFILE:
            t1 = clock()
            p0 += t1 - t0
        x_tile, dy_tile, q_tile, k_tile = _slot_tiles(slot, x_smem, dy_smem, q_smem, k_smem)
        # the carried-state product first: S is released as soon as it is done
        dy_a = (dy_tile.load(a_th).to(gl.float32) * gl.expand_dims(scale_a, 1)).to(dtype)
        if PROFILE:
            t_s = clock()
        mbarrier.wait(sg_ready, i & 1)
        if PROFILE:
            p7 += clock() - t_s
        acc_1 = warpgroup_mma(dy_a, s_smem.slice(0, NH, dim=1), zero_th, use_acc=False, is_async=True)
        acc_2 = warpgroup_mma(dy_a, s_smem.slice(NH, NH, dim=1), zero_th, use_acc=False, is_async=True)
        acc_1, acc_2, dy_a = warpgroup_mma_wait(0, deps=(acc_1, acc_2, dy_a))
        mbarrier.arrive(sg_empty)
        _release_previous(empty, i, STAGES)
        if PROFILE:
            t2 = clock()
            p1 += t2 - t1
        scores = warpgroup_mma(q_tile, k_tile.permute((1, 0)), zero_tt, use_acc=False, is_async=True)
        dyv = warpgroup_mma(dy_tile, x_tile.permute((1, 0)), zero_tt, use_acc=False, is_async=True)
        scores, dyv = warpgroup_mma_wait(0, deps=(scores, dyv))
        if HAS_D:  # dD's share, per token: dy_t . x_t is dy x^T's diagonal
            gl.store(dd_ptr + gdt_row + rows, gl.sum(gl.where(diagonal, dyv, 0.0), axis=1))
        if PROFILE:
            t3 = clock()
            p2 += t3 - t2
        g_rows = gl.load(g_ptr + gdt_row + rows)
        g_cols = gl.load(g_ptr + gdt_row + cols)
        dt_cols = gl.load(dt_ptr + gdt_row + cols)
        allowed = causal
        if HAS_SEQ:
            allowed = allowed & (gl.expand_dims(gl.load(seq_ptr + seq_row + rows), 1)
                                 == gl.expand_dims(gl.load(seq_ptr + seq_row + cols), 0))
        decay = gl.exp(gl.where(allowed, gl.expand_dims(g_rows, 1) - gl.expand_dims(g_cols, 0), float("-inf")))
        # the B side's two (T, T) operands, transposed there by a shared-memory view: scores * Gam for dv and W
        # for W^T q (it is the longer partition: these were its own products)
        sd_tile = sd_smem.index(slot)
        w_tile = w_smem.index(slot)
        sd_tile.store((scores * decay).to(dtype))
        dyv = dyv * decay * gl.expand_dims(dt_cols, 0)
        w_tile.store(dyv.to(dtype))
        fence_async_shared()
        mbarrier.arrive(handoff.index(slot))
        if PROFILE:
            t4 = clock()
            p3 += t4 - t3
        products = scores * dyv
        share = gl.sum(products, axis=1) - gl.convert_layout(gl.sum(products, axis=0), gl.SliceLayout(1, tt_layout))
        carried = (gl.sum(q_tile.slice(0, NH, dim=1).load(th_layout).to(gl.float32) * acc_1, axis=1)
                   + gl.sum(q_tile.slice(NH, NH, dim=1).load(th_layout).to(gl.float32) * acc_2, axis=1))
        if PROFILE:
            t5 = clock()
            p4 += t5 - t4
        acc_1 = warpgroup_mma(w_tile, k_tile.slice(0, NH, dim=1), acc_1, is_async=True)
        acc_2 = warpgroup_mma(w_tile, k_tile.slice(NH, NH, dim=1), acc_2, is_async=True)
        acc_1, acc_2 = warpgroup_mma_wait(0, deps=(acc_1, acc_2))
        mbarrier.arrive(c_read.index(slot))  # this side reads no more of the slot: the B side may stage dx, dB~ there
        if PROFILE:
            t6 = clock()
            p5 += t6 - t5
        gl.store(dgc_ptr + gdt_row + rows, share + gl.convert_layout(carried, gl.SliceLayout(1, tt_layout)))
        first, second = _unrotated(acc_1, acc_2, tables_ptr, bi.to(gl.int64) * sc_b + (c * T) * sc_l, sc_l, T, NH,
                                   th_layout, ROPE)
        # dC leaves by TMA from the slot's k tile, once the B side's k G^T (its only product with k) is done:
        # plain stores from the wgmma layout cost ~3 000 cycles a tile (bench/ssd_notes.md v21)
        mbarrier.wait(sg_empty, i & 1)
        _tma_store_halves(dc_desc, token_row, hi * N, k_tile, first, second, NH)
        if PROFILE:
            p6 += clock() - t6
        i += 1
    _release_previous(empty, i, STAGES)
    if PROFILE:
        # row (program, side) of the (programs, 2, 8) profile; the last counter, the S / G wait, is part of phase 1
        store_profile_row(prof_ptr + (gl.program_id(0) * 2 + 0) * 8, p0, p1, p2, p3, p4, p5, p6, p7)


# ----------------------------------------------------------------------------------------------
# B side and dx (worker partition, one warp group): dx, d dt, dD, dB and dg's B share.
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _b_side(x_smem, dy_smem, q_smem, k_smem, s_smem, ds_smem, sd_smem, w_smem, ready, empty, sg_ready, sg_empty,
            handoff, c_read, dx_desc, db_desc, g_ptr, dt_ptr, d_ptr, tables_ptr, dgb_ptr, ddt_ptr, dd_ptr,
            seq_ptr, prof_ptr, L, H, BH, NCHUNK, LPAD, N_TILES, sc_b, sc_l,
            T: gl.constexpr, P: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr, HAS_D: gl.constexpr,
            ROPE: gl.constexpr, HAS_SEQ: gl.constexpr, PROFILE: gl.constexpr):
    NH: gl.constexpr = N // 2
    tp_layout: gl.constexpr = wgmma_layout(P)
    th_layout: gl.constexpr = wgmma_layout(NH)
    a_th: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=th_layout, k_width=2)
    dtype: gl.constexpr = x_smem.dtype
    rows_p = gl.arange(0, T, layout=gl.SliceLayout(1, tp_layout))
    rows_a = gl.arange(0, T, layout=gl.SliceLayout(1, a_th))
    zero_tp = gl.zeros([T, P], gl.float32, tp_layout)
    zero_th = gl.zeros([T, NH], gl.float32, th_layout)
    if PROFILE:  # cycles per phase, summed over the program's tiles (bench/ssd_head_profile.py)
        p0, p1, p2, p3, p4, p5, p6, p7 = profile_counters()
    i = 0
    for tile in range(gl.program_id(0), N_TILES, gl.num_programs(0)):
        if PROFILE:
            t0 = clock()
        c, bi, hi, slot, gdt_row, token_row = _consumer_tile(tile, i, BH, H, L, LPAD, T, STAGES)
        g_last = gl.load(g_ptr + gdt_row + T - 1)
        scale_a = gl.exp(g_last - gl.load(g_ptr + gdt_row + rows_a)) * gl.load(dt_ptr + gdt_row + rows_a)
        if HAS_SEQ:  # w only for the tokens that reach the chunk's end state
            seq_row, seq_last, seq_prev = chunk_document_ids(seq_ptr, bi, c, LPAD, T)
            scale_a = gl.where(gl.load(seq_ptr + seq_row + rows_a) == seq_last, scale_a, 0.0)
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        if PROFILE:
            t1 = clock()
            p0 += t1 - t0
        x_tile, dy_tile, q_tile, k_tile = _slot_tiles(slot, x_smem, dy_smem, q_smem, k_smem)
        # the products with G first (G is released as soon as they are done): k G^T and (w dt x) G
        x_a = (x_tile.load(a_th).to(gl.float32) * gl.expand_dims(scale_a, 1)).to(dtype)
        if PROFILE:
            t_s = clock()
        mbarrier.wait(sg_ready, i & 1)
        if PROFILE:
            p7 += clock() - t_s
        end = warpgroup_mma(k_tile, ds_smem.permute((1, 0)), zero_tp, use_acc=False, is_async=True)
        acc_1 = warpgroup_mma(x_a, ds_smem.slice(0, NH, dim=1), zero_th, use_acc=False, is_async=True)
        acc_2 = warpgroup_mma(x_a, ds_smem.slice(NH, NH, dim=1), zero_th, use_acc=False, is_async=True)
        end, acc_1, acc_2, x_a = warpgroup_mma_wait(0, deps=(end, acc_1, acc_2, x_a))
        # exp(g_last) <S, G>, the carried state's part of d loss / d g_last: summed from shared memory after the
        # products, not under them (their accumulators and this sum's registers spilled: 2.05 -> 1.88 ms, v23)
        overlap = _tile_dot(s_smem, ds_smem, 0, P, N)
        mbarrier.arrive(sg_empty)
        _release_previous(empty, i, STAGES)
        if PROFILE:
            t2 = clock()
            p1 += t2 - t1
        g_p = gl.load(g_ptr + gdt_row + rows_p)
        dt_p = gl.load(dt_ptr + gdt_row + rows_p)
        weight_p = gl.exp(g_last - g_p)
        if HAS_SEQ:
            weight_p = gl.where(gl.load(seq_ptr + seq_row + rows_p) == seq_last, weight_p, 0.0)
        # c / (w dt) = rowsum(x * k G^T)
        carried = gl.sum(x_tile.load(tp_layout).to(gl.float32) * end, axis=1) * weight_p * dt_p
        # dv = (scores^T * Gam^T) dy + w * end and dB~'s W^T q, from the C side's (T, T) tiles
        if PROFILE:
            t3 = clock()
            p2 += t3 - t2
        mbarrier.wait(handoff.index(slot), (i // STAGES) & 1)
        if PROFILE:
            t4 = clock()
            p3 += t4 - t3
        dv = warpgroup_mma(sd_smem.index(slot).permute((1, 0)), dy_tile, end * gl.expand_dims(weight_p, 1),
                           is_async=True)
        wt_tile = w_smem.index(slot).permute((1, 0))
        acc_1 = warpgroup_mma(wt_tile, q_tile.slice(0, NH, dim=1), acc_1, is_async=True)
        acc_2 = warpgroup_mma(wt_tile, q_tile.slice(NH, NH, dim=1), acc_2, is_async=True)
        dv, acc_1, acc_2 = warpgroup_mma_wait(0, deps=(dv, acc_1, acc_2))
        if PROFILE:
            t5 = clock()
            p4 += t5 - t4
        # d dt first, then dx in dv's registers (acc_B is live: a second (T, p) tile here spilled)
        gl.store(ddt_ptr + gdt_row + rows_p, gl.sum(dv * x_tile.load(tp_layout).to(gl.float32), axis=1))
        dv = dv * gl.expand_dims(dt_p, 1)
        if HAS_D:
            dv += gl.load(d_ptr + hi).to(gl.float32) * dy_tile.load(tp_layout).to(gl.float32)
        # dx by TMA from the slot's x tile, once the C side reads no more of it
        mbarrier.wait(c_read.index(slot), (i // STAGES) & 1)
        x_tile.store(dv.to(dtype))
        _tma_store(dx_desc, token_row, hi * P, x_tile)
        if PROFILE:
            t6 = clock()
            p5 += t6 - t5
        carry = gl.exp(g_last)
        if HAS_SEQ:   # the carried state's term only when the state crosses the chunk
            carry = gl.where(seq_prev == seq_last, carry, 0.0)
        total = gl.sum(carried, axis=0) + overlap * carry
        gl.store(dgb_ptr + gdt_row + rows_p, gl.where(rows_p == T - 1, total, 0.0) - carried)
        first, second = _unrotated(acc_1, acc_2, tables_ptr, bi.to(gl.int64) * sc_b + (c * T) * sc_l, sc_l, T, NH,
                                   th_layout, ROPE)
        # dB by TMA from the slot's q tile (the C side's reads of q are done: waited above)
        _tma_store_halves(db_desc, token_row, hi * N, q_tile, first, second, NH)
        if PROFILE:
            p6 += clock() - t6
        i += 1
    _release_previous(empty, i, STAGES)
    if PROFILE:
        # row (program, side) of the (programs, 2, 8) profile; the last counter, the S / G wait, is part of phase 1
        store_profile_row(prof_ptr + (gl.program_id(0) * 2 + 1) * 8, p0, p1, p2, p3, p4, p5, p6, p7)


@gluon.jit
def _fused_head_bwd_kernel(x_desc, dy_desc, s_desc, ds_desc, q_desc, k_desc, dx_desc, db_desc, dc_desc, g_ptr, dt_ptr,
                           d_ptr, tables_ptr, dgc_ptr, dgb_ptr, ddt_ptr, dd_ptr, seq_ptr, prof_ptr,
                           L, H, BH, NCHUNK, LPAD, N_TILES, sc_b, sc_l,
                           T: gl.constexpr, P: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr,
                           HAS_D: gl.constexpr, ROPE: gl.constexpr,
                           HAS_SEQ: gl.constexpr, PROFILE: gl.constexpr,
                           PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Persistent: program i takes tiles i, i + grid, ... of the (chunks · batch · heads) tiles. Descriptors as in
    `ssd_gluon_bwd.descriptors` with groups = heads, then dx, dB, dC's (x's and B's shapes)."""
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    dy_smem = gl.allocate_shared_memory(dy_desc.dtype, [STAGES] + dy_desc.block_type.shape, dy_desc.layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    s_smem = gl.allocate_shared_memory(s_desc.dtype, s_desc.block_type.shape, s_desc.layout)
    ds_smem = gl.allocate_shared_memory(ds_desc.dtype, ds_desc.block_type.shape, ds_desc.layout)
    tt_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([T, T], x_desc.dtype)
    sd_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, T, T], tt_shared)   # scores * Gam (C side -> B side)
    w_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES, T, T], tt_shared)    # W (C side -> B side)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    sg_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    sg_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    handoff = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    c_read = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())  # C side done with a slot
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
        mbarrier.init(handoff.index(s), count=1)
        mbarrier.init(c_read.index(s), count=1)
    mbarrier.init(sg_ready, count=1)
    mbarrier.init(sg_empty, count=2)

    gl.warp_specialize([
        (_c_side, (x_smem, dy_smem, q_smem, k_smem, s_smem, ds_smem, sd_smem, w_smem, ready, empty, sg_ready,
                   sg_empty, handoff, c_read, dc_desc, g_ptr, dt_ptr, tables_ptr, dgc_ptr, dd_ptr, seq_ptr,
                   prof_ptr, L, H, BH, NCHUNK, LPAD, N_TILES, sc_b, sc_l, T, P, N, STAGES, HAS_D,
                   ROPE, HAS_SEQ, PROFILE)),
        (_b_side, (x_smem, dy_smem, q_smem, k_smem, s_smem, ds_smem, sd_smem, w_smem, ready, empty, sg_ready,
                   sg_empty, handoff, c_read, dx_desc, db_desc, g_ptr, dt_ptr, d_ptr, tables_ptr, dgb_ptr,
                   ddt_ptr, dd_ptr, seq_ptr, prof_ptr, L, H, BH, NCHUNK, LPAD, N_TILES, sc_b, sc_l, T, P, N, STAGES, HAS_D,
                   ROPE, HAS_SEQ, PROFILE)),
        (_producer, (x_desc, dy_desc, q_desc, k_desc, s_desc, ds_desc, x_smem, dy_smem, q_smem, k_smem, s_smem,
                     ds_smem, ready, empty, sg_ready, sg_empty, L, H, BH, NCHUNK, N_TILES, T, P, N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def fused_head_backward(x, dy, B_in, C_in, tables, dt, g, D, states, dstates, seq=None, profile=None,
                        b_side_registers=None):
    """(dx, dB, dC, ddt (1, b, h, lpad), dg as its C and B sides' (b, h, lpad) terms, dD per token (b, h, lpad)
    or None) of the chunk terms, as `ssd._backward`'s dx and merged dB/dC launches produce them. B_in / C_in are
    B~ / C~ (the forward's rotated copies when RoPE's tables are given: dB~, dC~ are un-rotated here); dB, dC come
    out in x's dtype.
    seq: document ids (b, lpad) int32 or None; profile: an int64 (programs, 2, 8) tensor to receive each
    consumer's per-phase cycle sums (bench/ssd_head_profile.py).
    tables: `fragment_tables(cos, sin)` of `rope_tables`' cos / sin, or None without RoPE.
    b_side_registers: the B side's register count (default B_SIDE_REGISTERS; bench/ssd_head_profile.py's variants).
    Persistent grid: one program per SM."""
    batch, length, heads, head_dim = x.shape
    state_dim = B_in.shape[-1]
    lpad = dt.shape[-1]
    n_chunks = lpad // CHUNK
    dx = torch.empty_like(x)
    dB = torch.empty(batch, length, heads, state_dim, device=x.device, dtype=x.dtype)
    dC = torch.empty_like(dB)
    dg_c = torch.empty_like(g)
    dg_b = torch.empty_like(g)
    ddt = torch.empty(1, *dt.shape, device=x.device, dtype=torch.float32)
    dD = torch.empty_like(g) if D is not None else None   # (b, h, lpad): dy_t . x_t
    rope = tables is not None
    table_strides = tables.stride()[:2] if rope else (0, 0)
    n_tiles = n_chunks * batch * heads
    programs = sm_count(x.device)
    global LAUNCHES
    LAUNCHES += 1
    tokens = batch * length
    out_descriptors = (tma_descriptor(dx, tokens, heads * head_dim, [CHUNK, head_dim]),
                       tma_descriptor(dB, tokens, heads * state_dim, [CHUNK, state_dim]),
                       tma_descriptor(dC, tokens, heads * state_dim, [CHUNK, state_dim]))
    _fused_head_bwd_kernel[(min(programs, n_tiles), )](
        *descriptors(x, dy, states, dstates, B_in, C_in), *out_descriptors, g, dt, D if D is not None else dt,
        tables if rope else dt, dg_c, dg_b, ddt, dD if D is not None else dt,
        seq if seq is not None else dt, profile if profile is not None else dt, length, heads, batch * heads,
        n_chunks, lpad, n_tiles, *table_strides,
        T=CHUNK, P=head_dim, N=state_dim, STAGES=STAGES, HAS_D=D is not None,
        ROPE=rope, HAS_SEQ=seq is not None,
        PROFILE=profile is not None, PRODUCER_REGS=PRODUCER_REGISTERS,
        CONSUMER_REGS=b_side_registers or B_SIDE_REGISTERS, num_warps=4)
    return dx, dB, dC, ddt, (dg_c, dg_b), dD
