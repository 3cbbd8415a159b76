"""SSD reverse state pass in Gluon (Hopper): every chunk's state gradient G and d(initial state), one walk per
(batch, head) sequence (bench/ssd_notes.md v24).

Computes what `ssd._state_bwd_kernel` computes (without its OVERLAP term, which the Gluon backwards form
themselves): walking the chunks backwards from G = d loss / d(final state),

    dstates[c] = G;   G <- exp(g_last) G + dy_c^T (exp(g) * C~_c)

and d(initial state) = G after chunk 0. This is the forward walk's state update transposed (x -> dy,
w B~ -> exp(g) C~), and it is built the same way: one program per SM, persistent over the sequences, G (p x n,
float32) in the registers of two warp groups that split its rows, dy and C~ tiles by a TMA ring a chunk or two ahead,
and G leaving for HBM (16-bit) by TMA from a double-buffered shared tile. Each chunk's step (one rescale of C~'s rows,
one 128 x 128 x 64 wgmma, G's copy into shared memory) is short against the chunk's 64 KB of traffic, so the walk
is bound by HBM, which the Triton kernel (four programs per sequence, each re-reading half of dy and C~) was not.

Documents (seq_idx): the masks of `ssd._chunk_masks` it needs: C~'s row t enters G only when token t sees the carried
state, and G crosses the chunk only when one document spans it.

Scope (`supported`): C~ already rotated or no RoPE (the caller passes the forward's saved B~ / C~), 16-bit, T = 64,
p, n in {64, 128}, l a multiple of T, contiguous tensors, and (`enough_sequences`) at least half the SMs' worth of
b·h walks.
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
from cheems_parallel.kernels.ssd_gluon_bwd import CHUNK, barrier_ring, chunk_document_ids, documents_fit, \
    hopper_tiles_fit, invalidate_ring, sync_warps, tma_descriptor
from cheems_parallel.kernels.ssd_gluon_fwd import walk_coords

STAGES = 3       # TMA ring depth: dy and C~ tiles two chunks ahead (176 KB of shared memory at p = n = 128)
LAUNCHES = 0     # how often state_backward ran (the GPU tests check that their cases took this path)


def supported(x, C, dy, states, dfinal, T, seq):
    """True when this kernel can run the reverse state pass of these inputs (else `ssd._state_bwd_kernel` runs)."""
    return (C.shape[-1] in (64, 128) and states.dtype == x.dtype and documents_fit(seq)
            and (dfinal is None or dfinal.is_contiguous())
            and hopper_tiles_fit(x, C, T, dy, states))


def enough_sequences(sequences, sms, minimum=None):
    """Whether b·h walks (one program each) keep the GPU busy: at least `minimum`, by default half the SMs.
    State pass on the H200 (132 SMs), Triton kernel / walk, bench/ssd_state_bwd.py: 64 sequences 0.97-1.02x,
    128: 1.07-1.13x, 256: 1.09-1.17x, 512: 1.13-1.18x; the default sits above the break-even."""
    return sequences >= (sms // 2 if minimum is None else minimum)


@gluon.jit
def _issue_loads(item, dy_desc, c_desc, dy_smem, c_smem, ready, NCHUNK, H, HPG, L,
                 T: gl.constexpr, P: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr):
    _, _, hi, gi, token_row = walk_coords(item, NCHUNK, H, HPG, L, T, REVERSE=True)
    slot = item % STAGES
    bar = ready.index(slot)
    mbarrier.expect(bar, dy_desc.block_type.nbytes + c_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(dy_desc, [token_row, hi * P], bar, dy_smem.index(slot))
    tma.async_copy_global_to_shared(c_desc, [token_row, gi * N], bar, c_smem.index(slot))


@gluon.jit
def _state_bwd_walk_kernel(dy_desc, c_desc, ds_desc, g_ptr, seq_ptr, dfinal_ptr, dinit_ptr, L, H, HPG, NCHUNK, LPAD,
                           N_SEQ, T: gl.constexpr, P: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr,
                           HAS_SEQ: gl.constexpr, HAS_DFINAL: gl.constexpr, num_warps: gl.constexpr):
    """Descriptors: dy as (b·l, h·p) rows, blocks (T, p); C~ as (b·l, g·n), blocks (T, n); dstates
    (b, chunks + 1, h, p, n) as (rows, n), blocks (p, n). num_warps = p / 16 (a warp per 16 rows of G)."""
    dtype: gl.constexpr = dy_desc.dtype
    grad_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                          instr_shape=[16, N, 16])
    # C~'s (T, n) tile, 16 bytes a thread along n
    tile_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // N, N // 8], [num_warps, 1], [1, 0])
    tn_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([T, N], dtype)

    dy_smem = gl.allocate_shared_memory(dtype, [STAGES, T, P], dy_desc.layout)
    c_smem = gl.allocate_shared_memory(dtype, [STAGES, T, N], c_desc.layout)
    cw_smem = gl.allocate_shared_memory(dtype, [T, N], tn_shared)          # exp(g) * C~, the update's operand
    ds_smem = gl.allocate_shared_memory(dtype, [2, P, N], ds_desc.layout)  # G on its way out, double-buffered
    ready = barrier_ring(STAGES)
    fence_async_shared()

    rows_t = gl.arange(0, T, layout=gl.SliceLayout(1, tile_layout))
    rows_g = gl.arange(0, P, layout=gl.SliceLayout(1, grad_layout))
    cols_g = gl.arange(0, N, layout=gl.SliceLayout(0, grad_layout))
    grad_offsets = gl.expand_dims(rows_g, 1) * N + gl.expand_dims(cols_g, 0)
    grad = gl.zeros([P, N], gl.float32, grad_layout)

    n_items = ((N_SEQ - gl.program_id(0) + gl.num_programs(0) - 1) // gl.num_programs(0)) * NCHUNK
    for j in gl.static_range(STAGES - 1):
        if j < n_items:
            _issue_loads(j, dy_desc, c_desc, dy_smem, c_smem, ready, NCHUNK, H, HPG, L, T, P, N, STAGES)
    for item in range(n_items):
        c, bi, hi, _, _ = walk_coords(item, NCHUNK, H, HPG, L, T, REVERSE=True)
        head_pn = (bi * H + hi).to(gl.int64) * P * N
        if c == NCHUNK - 1:  # a new sequence: G starts at d loss / d(final state)
            if HAS_DFINAL:
                grad = gl.load(dfinal_ptr + head_pn + grad_offsets).to(gl.float32)
            else:
                grad = gl.zeros([P, N], gl.float32, grad_layout)
        # this chunk's vectors, loaded before the waits below
        gdt_row = (bi * H + hi).to(gl.int64) * LPAD + c * T
        into = gl.exp(gl.load(g_ptr + gdt_row + rows_t))
        carry = gl.exp(gl.load(g_ptr + gdt_row + T - 1))
        if HAS_SEQ:
            seq_row, seq_last, seq_prev = chunk_document_ids(seq_ptr, bi, c, LPAD, T)
            into = gl.where(gl.load(seq_ptr + seq_row + rows_t) == seq_prev, into, 0.0)
            carry = gl.where(seq_prev == seq_last, carry, 0.0)

        # past this barrier both warp groups are done with the previous step's slot and cw tile, and the store
        # from two chunks ago has left the buffer G goes out through now
        tma.store_wait(1)
        sync_warps()
        if item + STAGES - 1 < n_items:
            _issue_loads(item + STAGES - 1, dy_desc, c_desc, dy_smem, c_smem, ready, NCHUNK, H, HPG, L, T, P, N,
                         STAGES)
        # dstates[c] = G
        out = ds_smem.index(item % 2)
        out.store(grad.to(dtype))
        fence_async_shared()
        sync_warps()
        tma.async_copy_shared_to_global(ds_desc, [((bi * (NCHUNK + 1) + c) * H + hi) * P, 0], out)

        slot = item % STAGES
        mbarrier.wait(ready.index(slot), (item // STAGES) & 1)
        c_tile = c_smem.index(slot).load(tile_layout).to(gl.float32)
        cw_smem.store((c_tile * gl.expand_dims(into, 1)).to(dtype))
        fence_async_shared()
        sync_warps()
        grad = warpgroup_mma(dy_smem.index(slot).permute((1, 0)), cw_smem, grad * carry, is_async=True)
        grad = warpgroup_mma_wait(0, deps=(grad, ))
        if c == 0:
            gl.store(dinit_ptr + head_pn + grad_offsets, grad)
    tma.store_wait(0)
    invalidate_ring(ready, STAGES)


def state_backward(dy, C, g, seq, dfinal, dstates, dinit):
    """Fill dstates[:, c] (c < chunks) with G for every chunk and dinit (float32) with d(initial state), as
    `ssd._state_bwd_kernel` does with OVERLAP off. dy (b, l, h, p), C (b, l, g, n) (rotated if RoPE is on),
    g (b, h, lpad) float32, seq (b, lpad) int32 or None, dfinal (b, h, p, n) or None. Persistent grid: one program
    per SM."""
    batch, length, heads, head_dim = dy.shape
    groups, state_dim = C.shape[2], C.shape[3]
    lpad = g.shape[-1]
    n_chunks = lpad // CHUNK
    tokens = batch * length
    dy_desc = tma_descriptor(dy, tokens, heads * head_dim, [CHUNK, head_dim])
    c_desc = tma_descriptor(C, tokens, groups * state_dim, [CHUNK, state_dim])
    ds_desc = tma_descriptor(dstates, dstates.numel() // state_dim, state_dim, [head_dim, state_dim])
    n_seq = batch * heads
    global LAUNCHES
    LAUNCHES += 1
    _state_bwd_walk_kernel[(min(sm_count(dy.device), n_seq), )](
        dy_desc, c_desc, ds_desc, g, seq if seq is not None else g, dfinal if dfinal is not None else g, dinit,
        length, heads, heads // groups, n_chunks, lpad, n_seq,
        T=CHUNK, P=head_dim, N=state_dim, STAGES=STAGES, HAS_SEQ=seq is not None, HAS_DFINAL=dfinal is not None,
        num_warps=head_dim // 16)
