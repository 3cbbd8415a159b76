"""SSD forward in Gluon (Hopper): y, every chunk's entering state, the final state and the rotated B~, C~ of one
(batch, head) sequence in one walk over its chunks (bench/ssd_notes.md v19).

Computes what `ssd._forward`'s two launches compute (`_state_fwd_kernel`, which walks the chunks for the states,
and `_chunk_fwd_kernel`, which reads them back for y). Those read x and B twice and the states once more; here
x, B and C are read once and the states only written (for the backward).

Why a walk can work here (the Triton walks of v7 were latency-bound, bench/ssd_notes.md v7/v8): the state chain from
one chunk to the next is S_{c+1} = exp(g_last) S_c + dS_c, with dS_c = (x^T)(w B~) a product that needs only chunk
c's tiles; y's products (the scores, (scores * Gam * dt) x and C~ S_c^T) need S_c only as a shared-memory operand.
So per chunk only one elementwise rescale and one bf16 copy of S sit on the chain; the rest are wgmma's issued
together, and the TMA ring loads a later chunk's x, B, C meanwhile. The step is still what sets the pace (3.4-4.9 us
per chunk; `bench/ssd_walk_profile.py` times its phases), not the bytes.

One program per SM (persistent over the b·h sequences), 8 warps, no warp specialisation (the TMA loads are
issued a chunk or two ahead by the same warps): two warp groups, each owning half of y's columns (p) and half of
the state's rows (p). Per chunk:
  rotate B, C (RoPE; the cos / sin tables' first halves were copied into shared memory a chunk earlier) into B~, C~
  and w B~ (w_t = exp(g_last - g_t) dt_t; g, dt also loaded a chunk earlier) in shared memory; store B~, C~ (TMA)
  when the backward wants them; scores = C~ B~^T, y_c = C~ S^T, S <- exp(g_last) S + x^T (w B~) (three async wgmma's);
  P = scores * Gam * dt (causal) -> shared memory; y = exp(g) y_c + D x + P x; y (staged in w B~'s tile) and S
  (bf16) -> shared memory -> TMA stores into y and the states (the states only when a backward follows).

Documents (seq_idx): the Triton kernels' four masks (`ssd._chunk_masks`), from each chunk's document ids loaded at
the top of its step: scores only within a document, y's carried-state term only for tokens of the document the state
comes from, the state update only from tokens of the chunk's last document, and the state carried across the chunk
only when one document spans it.

Scope (`supported`): bf16, T = 64, p = n = 128, l a multiple of T, cos / sin in bf16; contiguous tensors; and
(`enough_sequences`) at least 3/8 of the SMs' worth of b·h sequences.
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
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
    barrier_ring,
    chunk_document_ids,
    clock,
    documents_fit,
    hopper_tiles_fit,
    invalidate_ring,
    profile_counters,
    store_profile_row,
    sync_warps,
    tma_descriptor,
)


# TMA ring depth with RoPE (the tables' and B~, C~'s tiles leave room for 2); without RoPE one more (v19c)
STAGES = 2
LAUNCHES = 0  # how often fused_forward ran (the GPU tests check that their cases took this path)


def supported(x, B, cos, T, seq):
    """True when this kernel can run the forward of these inputs (else the Triton kernels run): bf16 (the only dtype
    run on the GPU so far; fp16 would compile the same), p = n = 128, contiguous cos / sin tables in x's dtype
    in `rope_tables`' form, a row's two halves equal (only the first halves are read; float32 tables,
    `rope_tables_fp32`, are not taken: twice the table buffer, never run);
    document ids, if any, as `ssd_fused` pads them (int32, (b, lpad), contiguous)."""
    return (x.dtype == torch.bfloat16 and x.shape[-1] == 128 and B.shape[-1] == 128
            and hopper_tiles_fit(x, B, T) and documents_fit(seq)
            and (cos is None or (cos.is_contiguous() and cos.dtype == x.dtype)))


def enough_sequences(sequences, sms, minimum=None):
    """Whether b·h sequences keep enough SMs busy for the walk (one program per sequence and SM): at least
    `minimum`, by default 3/8 of the SMs. The chunk-parallel Triton kernels spread any shape over the whole GPU.
    Kernel time of the Cheems layer's forward+backward at cheems-320m's size (L = 2048, 8 heads) on the H200's 132
    SMs, walk / Triton forward: 32 sequences 1.04, 64: 0.91, 96: 0.83, 128+: 0.79-0.80
    (bench/ssd_walk_threshold.py, bench/ssd_notes.md "v19 threshold"); the default sits between 32 and 64."""
    return sequences >= (sms * 3 // 8 if minimum is None else minimum)


@gluon.jit
def walk_coords(item, NCHUNK, H, HPG, L, T: gl.constexpr, REVERSE: gl.constexpr = False):
    """A program's item-th chunk: (chunk, batch, head, group, first token row). Items walk each of the program's
    sequences (pid, pid + grid, ...) chunk by chunk, from the last chunk to the first when REVERSE (the state
    gradient's walk, `ssd_gluon_state_bwd`)."""
    seq = gl.program_id(0) + (item // NCHUNK) * gl.num_programs(0)
    c = item % NCHUNK
    if REVERSE:
        c = NCHUNK - 1 - c
    bi = seq // H
    hi = seq % H
    return c, bi, hi, hi // HPG, bi * L + c * T


@gluon.jit
def _chunk_vectors(g_ptr, dt_ptr, item, NCHUNK, H, HPG, L, LPAD, rows_t, cols_t, rows_h, T: gl.constexpr):
    """An item's g and dt as the step reads them: g by rows (also y's rows: the same distribution) and columns of
    the (T, T) scores, dt by its columns, g at the last token, g and dt by the rows of the rotation tiles (loads
    only: the step uses them a chunk later)."""
    c, bi, hi, _, _ = walk_coords(item, NCHUNK, H, HPG, L, T)
    row = (bi * H + hi).to(gl.int64) * LPAD + c * T
    return (gl.load(g_ptr + row + rows_t), gl.load(g_ptr + row + cols_t), gl.load(dt_ptr + row + cols_t),
            gl.load(g_ptr + row + T - 1), gl.load(g_ptr + row + rows_h), gl.load(dt_ptr + row + rows_h))


@gluon.jit
def _chunk_documents(seq_ptr, item, NCHUNK, H, HPG, L, LPAD, rows_t, cols_t, rows_h, rows_y, T: gl.constexpr):
    """An item's document ids (documents on), as `ssd._chunk_masks` reads them: by the scores' rows and columns,
    by the rotation tiles' rows (which tokens reach the chunk's end state) and by y's rows (which see the carried
    state); and whether the carried state crosses the chunk."""
    c, bi, _, _, _ = walk_coords(item, NCHUNK, H, HPG, L, T)
    row, seq_last, seq_prev = chunk_document_ids(seq_ptr, bi, c, LPAD, T)
    reaches_end = gl.load(seq_ptr + row + rows_h) == seq_last
    sees_carried = gl.load(seq_ptr + row + rows_y) == seq_prev
    return (gl.load(seq_ptr + row + rows_t), gl.load(seq_ptr + row + cols_t), reaches_end, sees_carried,
            seq_prev == seq_last)


@gluon.jit
def _fetch_tables(tables_smem, cos_ptr, sin_ptr, item, NCHUNK, H, HPG, L, rows_h, cols_h, T: gl.constexpr,
                  NH: gl.constexpr):
    """cp.async of an item's cos / sin first halves (contiguous (b, l, n) `rope_tables`: a row's two halves are
    equal) into tables_smem (one commit group)."""
    _, _, _, _, token_row = walk_coords(item, NCHUNK, H, HPG, L, T)
    table = (token_row + gl.expand_dims(rows_h, 1)).to(gl.int64) * (2 * NH) + gl.expand_dims(cols_h, 0)
    async_copy.async_copy_global_to_shared(tables_smem.index(0), cos_ptr + table)
    async_copy.async_copy_global_to_shared(tables_smem.index(1), sin_ptr + table)
    async_copy.commit_group()


@gluon.jit
def _issue_loads(item, x_desc, b_desc, c_desc, x_smem, b_smem, c_smem, ready, NCHUNK, H, HPG, L,
                 T: gl.constexpr, P: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr):
    c, bi, hi, gi, token_row = walk_coords(item, NCHUNK, H, HPG, L, T)
    slot = item % STAGES
    bar = ready.index(slot)
    mbarrier.expect(bar, x_desc.block_type.nbytes + 2 * b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(x_desc, [token_row, hi * P], bar, x_smem.index(slot))
    tma.async_copy_global_to_shared(b_desc, [token_row, gi * N], bar, b_smem.index(slot))
    tma.async_copy_global_to_shared(c_desc, [token_row, gi * N], bar, c_smem.index(slot))


@gluon.jit
def _rotate(tile, out_smem, cos, sin, NH: gl.constexpr, layout: gl.constexpr, ROPE: gl.constexpr):
    """rope(v) = (v1 cos - v2 sin, v2 cos + v1 sin) of a (T, n) shared-memory tile (cos, sin: the tables' first
    halves, equal to their second), in float32 (rounded once, as `ssd._load_full_operand` does); stored 16-bit into
    out_smem, and returned as its halves."""
    first = tile.slice(0, NH, dim=1).load(layout).to(gl.float32)
    second = tile.slice(NH, NH, dim=1).load(layout).to(gl.float32)
    if ROPE:
        rotated_first = first * cos - second * sin
        second = second * cos + first * sin
        first = rotated_first
        out_smem.slice(0, NH, dim=1).store(first.to(out_smem.dtype))
        out_smem.slice(NH, NH, dim=1).store(second.to(out_smem.dtype))
    return first, second


@gluon.jit
def _fused_fwd_kernel(x_desc, b_desc, c_desc, s_desc, rb_desc, rc_desc, y_desc, g_ptr, dt_ptr, d_ptr, cos_ptr,
                      sin_ptr, init_ptr, final_ptr, prof_ptr, seq_ptr, L, H, HPG, NCHUNK, LPAD, N_SEQ,
                      T: gl.constexpr, P: gl.constexpr, N: gl.constexpr, STAGES: gl.constexpr, HAS_D: gl.constexpr,
                      HAS_INIT: gl.constexpr, ROPE: gl.constexpr, HAS_SEQ: gl.constexpr, SAVE_ROTATED: gl.constexpr,
                      STORE_STATES: gl.constexpr, PROFILE: gl.constexpr, num_warps: gl.constexpr):
    """Descriptors: x and y as (b·l, h·p) rows, blocks (T, p); B, C and the rotated outputs as (b·l, g·n), blocks
    (T, n); the states (b, chunks + 1, h, p, n) as (rows, n), blocks (p, n). num_warps = 8. STORE_STATES: write every
    chunk's entering state (for the backward; without it only the final state). PROFILE: sum the
    cycles of each of the chunk step's 8 phases over the program's chunks into prof_ptr[program, 8] (the notes'
    per-phase breakdown; off in normal builds)."""
    NH: gl.constexpr = N // 2
    dtype: gl.constexpr = x_desc.dtype
    # (T, T) scores and (T, p) y: the two warp groups split the columns; the (p, n) state: they split the rows
    tt_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                        instr_shape=[16, T // 2, 16])
    ty_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                        instr_shape=[16, P // 2, 16])
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, N, 16])
    half_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])   # (T, n / 2) for the rotation
    tn_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([T, N], dtype)
    tt_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([T, T], dtype)

    x_smem = gl.allocate_shared_memory(dtype, [STAGES, T, P], x_desc.layout)
    b_smem = gl.allocate_shared_memory(dtype, [STAGES, T, N], b_desc.layout)
    c_smem = gl.allocate_shared_memory(dtype, [STAGES, T, N], c_desc.layout)
    kw_smem = gl.allocate_shared_memory(dtype, [T, N], tn_shared)     # w * B~ (the state update's operand), then y
    p_smem = gl.allocate_shared_memory(dtype, [T, T], tt_shared)      # scores * Gam * dt
    s_smem = gl.allocate_shared_memory(dtype, [P, N], s_desc.layout)  # the state entering the chunk, 16-bit
    if ROPE:
        k_smem = gl.allocate_shared_memory(dtype, [T, N], tn_shared)  # B~
        q_smem = gl.allocate_shared_memory(dtype, [T, N], tn_shared)  # C~
        # the next chunk's cos / sin first halves, copied asynchronously (cp.async) while this chunk works: each
        # thread copies the elements it reads back (no barrier)
        tables_smem = gl.allocate_shared_memory(cos_ptr.dtype.element_ty, [2, T, NH],
                                                gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    ready = barrier_ring(STAGES)
    fence_async_shared()

    rows_t = gl.arange(0, T, layout=gl.SliceLayout(1, tt_layout))
    cols_t = gl.arange(0, T, layout=gl.SliceLayout(0, tt_layout))
    causal = gl.expand_dims(rows_t, 1) >= gl.expand_dims(cols_t, 0)
    rows_s = gl.arange(0, P, layout=gl.SliceLayout(1, st_layout))
    cols_s = gl.arange(0, N, layout=gl.SliceLayout(0, st_layout))
    state_offsets = gl.expand_dims(rows_s, 1) * N + gl.expand_dims(cols_s, 0)
    rows_h = gl.arange(0, T, layout=gl.SliceLayout(1, half_layout))
    rows_y = gl.arange(0, T, layout=gl.SliceLayout(1, ty_layout))
    cols_h = gl.arange(0, NH, layout=gl.SliceLayout(0, half_layout))
    zero_tt = gl.zeros([T, T], gl.float32, tt_layout)
    zero_ty = gl.zeros([T, P], gl.float32, ty_layout)
    state = gl.zeros([P, N], gl.float32, st_layout)

    n_items = ((N_SEQ - gl.program_id(0) + gl.num_programs(0) - 1) // gl.num_programs(0)) * NCHUNK
    for j in gl.static_range(STAGES - 1):
        if j < n_items:
            _issue_loads(j, x_desc, b_desc, c_desc, x_smem, b_smem, c_smem, ready, NCHUNK, H, HPG, L, T, P, N, STAGES)
    # the first chunk's g, dt (registers) and tables (shared memory); later chunks' are fetched a chunk ahead:
    # waiting for them where they are used cost ~30 % of the step (bench/ssd_notes.md v19b)
    g_rows, g_cols, dt_cols, g_last, g_h, dt_h = _chunk_vectors(g_ptr, dt_ptr, 0, NCHUNK, H, HPG, L, LPAD, rows_t,
                                                                cols_t, rows_h, T)
    if ROPE:
        _fetch_tables(tables_smem, cos_ptr, sin_ptr, 0, NCHUNK, H, HPG, L, rows_h, cols_h, T, NH)
    if PROFILE:
        p0, p1, p2, p3, p4, p5, p6, p7 = profile_counters()
    for item in range(n_items):
        if PROFILE:
            t_a = clock()
        # the next chunk's tiles into the slot the previous chunk freed (every warp passed its last barrier)
        if item + STAGES - 1 < n_items:
            _issue_loads(item + STAGES - 1, x_desc, b_desc, c_desc, x_smem, b_smem, c_smem, ready, NCHUNK, H, HPG, L,
                         T, P, N, STAGES)
        c, bi, hi, gi, token_row = walk_coords(item, NCHUNK, H, HPG, L, T)
        slot = item % STAGES
        gdt_row = (bi * H + hi).to(gl.int64) * LPAD + c * T
        state_row = ((bi * (NCHUNK + 1) + c) * H + hi) * P
        head_pn = (bi * H + hi).to(gl.int64) * P * N
        if c == 0:  # a new sequence: its entering state into slot 0
            if HAS_INIT:
                state = gl.load(init_ptr + head_pn + state_offsets).to(gl.float32)
            else:
                state = gl.zeros([P, N], gl.float32, st_layout)
            tma.store_wait(0)
            sync_warps()
            s_smem.store(state.to(dtype))
            fence_async_shared()
            sync_warps()
            if STORE_STATES:
                tma.async_copy_shared_to_global(s_desc, [state_row, 0], s_smem)


        if HAS_SEQ:  # loaded before the wait, under it
            seq_rows, seq_cols, reaches_end, sees_carried, crosses = _chunk_documents(
                seq_ptr, item, NCHUNK, H, HPG, L, LPAD, rows_t, cols_t, rows_h, rows_y, T)
        mbarrier.wait(ready.index(slot), (item // STAGES) & 1)
        if PROFILE:
            t_b = clock()
            p0 += t_b - t_a
        tma.store_wait(0)      # the previous chunk's B~, C~ and state stores have left shared memory
        sync_warps()
        if PROFILE:
            t_c = clock()
            p1 += t_c - t_b
        x_tile = x_smem.index(slot)
        if ROPE:
            k_tile = k_smem
            q_tile = q_smem
        else:
            k_tile = b_smem.index(slot)
            q_tile = c_smem.index(slot)
        if ROPE:
            async_copy.wait_group(0)
            cos = tables_smem.index(0).load(half_layout).to(gl.float32)
            sin = tables_smem.index(1).load(half_layout).to(gl.float32)
        else:
            cos = 0.0
            sin = 0.0
        weight = gl.exp(g_last - g_h) * dt_h
        carry = gl.exp(g_last)
        if HAS_SEQ:
            weight = gl.where(reaches_end, weight, 0.0)
            carry = gl.where(crosses, carry, 0.0)
        k1, k2 = _rotate(b_smem.index(slot), k_tile, cos, sin, NH, half_layout, ROPE)
        kw_smem.slice(0, NH, dim=1).store((k1 * gl.expand_dims(weight, 1)).to(dtype))
        kw_smem.slice(NH, NH, dim=1).store((k2 * gl.expand_dims(weight, 1)).to(dtype))
        if ROPE:
            _rotate(c_smem.index(slot), q_tile, cos, sin, NH, half_layout, ROPE)
            if item + 1 < n_items:  # this thread has read its table elements: the next chunk's may land
                _fetch_tables(tables_smem, cos_ptr, sin_ptr, item + 1, NCHUNK, H, HPG, L, rows_h, cols_h, T, NH)
        fence_async_shared()
        sync_warps()
        if PROFILE:
            t_d = clock()
            p2 += t_d - t_c
        if SAVE_ROTATED:
            if hi % HPG == 0:
                tma.async_copy_shared_to_global(rb_desc, [token_row, gi * N], k_tile)
                tma.async_copy_shared_to_global(rc_desc, [token_row, gi * N], q_tile)

        scores = warpgroup_mma(q_tile, k_tile.permute((1, 0)), zero_tt, use_acc=False, is_async=True)
        y = warpgroup_mma(q_tile, s_smem.permute((1, 0)), zero_ty, use_acc=False, is_async=True)
        state = warpgroup_mma(x_tile.permute((1, 0)), kw_smem, state * carry, is_async=True)
        scores = warpgroup_mma_wait(2, deps=(scores, ))
        if PROFILE:
            t_e = clock()
            p3 += t_e - t_d
        allowed = causal
        if HAS_SEQ:
            allowed = allowed & (gl.expand_dims(seq_rows, 1) == gl.expand_dims(seq_cols, 0))
        decay = gl.exp(gl.where(allowed, gl.expand_dims(g_rows, 1) - gl.expand_dims(g_cols, 0), float("-inf")))
        p_smem.store((scores * decay * gl.expand_dims(dt_cols, 0)).to(dtype))
        fence_async_shared()
        sync_warps()
        if PROFILE:
            t_f = clock()
            p4 += t_f - t_e
        y = warpgroup_mma_wait(1, deps=(y, ))
        into = gl.exp(gl.convert_layout(g_rows, gl.SliceLayout(1, ty_layout)))
        if HAS_SEQ:
            into = gl.where(sees_carried, into, 0.0)
        y = y * gl.expand_dims(into, 1)
        if HAS_D:
            y += gl.load(d_ptr + hi).to(gl.float32) * x_tile.load(ty_layout).to(gl.float32)
        y = warpgroup_mma(p_smem, x_tile, y, is_async=True)
        # the next chunk's g and dt, into registers under the rest of this chunk (few registers are live here)
        (next_g_rows, next_g_cols, next_dt_cols, next_g_last, next_g_h,
         next_dt_h) = _chunk_vectors(g_ptr, dt_ptr, gl.minimum(item + 1, n_items - 1), NCHUNK, H, HPG, L, LPAD,
                                     rows_t, cols_t, rows_h, T)
        y, state = warpgroup_mma_wait(0, deps=(y, state))
        if PROFILE:
            t_g = clock()
            p5 += t_g - t_f
        # y (staged in w B~'s tile: the state update has consumed it) and the state leaving the chunk (slot c + 1)
        # out by TMA, once both warp groups' products are done (gl.store of y cost ~1 100 cycles a chunk, v19c)
        sync_warps()
        kw_smem.store(y.to(dtype))
        s_smem.store(state.to(dtype))
        if PROFILE:
            t_h = clock()
            p6 += t_h - t_g
        fence_async_shared()
        sync_warps()
        tma.async_copy_shared_to_global(y_desc, [token_row, hi * P], kw_smem)
        if STORE_STATES:
            tma.async_copy_shared_to_global(s_desc, [state_row + H * P, 0], s_smem)
        if c == NCHUNK - 1:
            gl.store(final_ptr + head_pn + state_offsets, state)
        g_rows, g_cols, dt_cols, g_last, g_h, dt_h = (next_g_rows, next_g_cols, next_dt_cols, next_g_last, next_g_h,
                                                      next_dt_h)
        if PROFILE:
            p7 += clock() - t_h
    if PROFILE:
        store_profile_row(prof_ptr + gl.program_id(0) * 8, p0, p1, p2, p3, p4, p5, p6, p7)
    tma.store_wait(0)
    invalidate_ring(ready, STAGES)


def fused_forward(x, B, C, cos, sin, dt, g, D, initial_state, save_rotated, store_states=True, profile=None, seq=None):
    """(y, final (float32), states (b, chunks + 1, h, p, n) in x's dtype, B~, C~ or None, None) as `ssd._forward`
    returns them (save_rotated: store B~, C~; only with RoPE; store_states: the chunk states, else None: no backward
    follows, and they are most of the walk's writes); seq: document ids (b, lpad) int32 or None. Persistent grid:
    one program per SM. profile: an
    int64 (programs, 8) tensor to receive
    the per-phase cycle sums (bench/ssd_walk_profile.py)."""
    batch, length, heads, head_dim = x.shape
    groups, state_dim = B.shape[2], B.shape[3]
    lpad = dt.shape[-1]
    n_chunks = lpad // CHUNK
    # without store_states a one-state placeholder gives the descriptor (and the shared tile) its layout
    states = torch.empty(batch, n_chunks + 1, heads, head_dim, state_dim, device=x.device, dtype=x.dtype) \
        if store_states else torch.empty(head_dim, state_dim, device=x.device, dtype=x.dtype)
    final = torch.empty(batch, heads, head_dim, state_dim, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    rope = cos is not None
    save_rotated = save_rotated and rope
    rotated_B = torch.empty_like(B) if save_rotated else None
    rotated_C = torch.empty_like(C) if save_rotated else None
    tokens = batch * length
    state_rows = states.numel() // state_dim

    def rows_of(tensor):
        return tma_descriptor(tensor, tokens, groups * state_dim, [CHUNK, state_dim])
    x_desc = tma_descriptor(x, tokens, heads * head_dim, [CHUNK, head_dim])
    y_desc = tma_descriptor(y, tokens, heads * head_dim, [CHUNK, head_dim])
    b_desc, c_desc = rows_of(B), rows_of(C)
    s_desc = tma_descriptor(states, state_rows, state_dim, [head_dim, state_dim])
    rb_desc = rows_of(rotated_B) if save_rotated else b_desc
    rc_desc = rows_of(rotated_C) if save_rotated else c_desc
    n_seq = batch * heads
    programs = sm_count(x.device)
    global LAUNCHES
    LAUNCHES += 1
    _fused_fwd_kernel[(min(programs, n_seq), )](
        x_desc, b_desc, c_desc, s_desc, rb_desc, rc_desc, y_desc, g, dt, D if D is not None else dt,
        cos if rope else dt, sin if rope else dt, initial_state if initial_state is not None else dt, final,
        profile if profile is not None else dt, seq if seq is not None else dt,
        length, heads, heads // groups, n_chunks, lpad, n_seq,
        T=CHUNK, P=head_dim, N=state_dim, STAGES=STAGES if rope else STAGES + 1, HAS_D=D is not None,
        HAS_INIT=initial_state is not None,
        ROPE=rope, HAS_SEQ=seq is not None, SAVE_ROTATED=save_rotated, STORE_STATES=store_states,
        PROFILE=profile is not None, num_warps=8)
    return y, final, states if store_states else None, rotated_B, rotated_C
