"""DMAttn dense forward in Gluon (Triton's explicit-layout dialect): FA3-style warp specialisation on Hopper.

Computes exactly what `dmattn._forward_kernel` computes on the dense path (causal, learnable per-key bias,
MHA or GQA, no keep-window, no documents): out (b, h, l, d) in q's dtype and the base-2 log-sum-exp
lse (b, h, l) fp32 = row_max + log2(row_sum) over scores s = (q·k)·scale·log2(e) + m_key·log2(e), which
the Triton backward consumes unchanged.

Structure (one program per (query block of BLOCK_M rows, b·h), heaviest query blocks first; or, for
l <= CONFIGS[d]["persistent_max_length"], a persistent grid of one program per SM looping over these tiles,
`_forward_persistent_kernel`, barriers set up once and the next tile's Q/K/V loaded under the current epilogue):
- producer partition, 1 warp: TMA loads of the Q tile once, then per key block of BLOCK_N keys the K tile
  with its BLOCK_N bias values (one mbarrier) and the V tile (another), into a STAGES-deep shared-memory
  ring; it waits on the ring's "empty" barriers before reusing a slot.
- consumer (the default partition), 8 warps = two warp groups of 64 query rows each (cooperative on
  the same K/V tiles): S = Q Kᵀ by async wgmma from shared memory, online softmax in exp2 with the bias
  added, P kept in registers as the A operand of O += P V (async wgmma). With OVERLAP (FA3's
  intra-warpgroup pipelining) the QKᵀ of block j+1 and the PV of block j are in flight together while
  the softmax of block j+1 runs. The causal mask is applied only to the key blocks that reach the
  diagonal.

Needs Hopper (sm_90) and Triton with `triton.experimental.gluon` (3.6 has the API used here); this module
is imported only on CUDA, lazily, by `dmattn._forward` when `dmattn.FORWARD_GLUON` is set. q, k, v
must be contiguous (b, h, l, d) bf16/fp16 with d in {64, 128}; mask_bias contiguous fp32 (b, h, l).
Tiles that run past a head's last row read the next head's rows (or zeros at the tensor's end): those
rows are never stored, and those keys sit beyond the diagonal, so the causal mask removes them. The bias is
read by a 1-D TMA per key tile, which must start 16-byte aligned (else the H200 raises "illegal
instruction"): rows of l % 4 != 0 are copied into padded rows first (PAD_BIAS_ROWS).
"""
import math

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

from cheems_parallel.kernels.device import is_hopper, sm_count

LOG2E = 1.4426950408889634
# Tile shapes per head dim (bf16/fp16). BLOCK_M rows are split between the consumer's two warp groups.
# persistent_max_length: lengths up to this run on the persistent grid (`_forward_persistent_kernel`) of
# persistent_grid programs (absent or 0: one per SM; the tests set a few so that each program loops over many tiles).
# d 128: persistent up to l = 2048 (H200, b·l = 65 536, 16 heads: 0.726 vs 0.852 ms at 1k, 1.245 vs 1.340 at 2k, but
# 8.06 vs 7.89 ms at 16k; bench/dmattn_notes.md "Session 5: forward at short l"); d 64 not timed, left off.
CONFIGS = {
    128: {"block_m": 128, "block_n": 128, "stages": 2, "overlap": True, "split": True, "persistent_max_length": 2048},
    64: {"block_m": 128, "block_n": 128, "stages": 2, "overlap": True, "split": True, "persistent_max_length": 0},
}
PRODUCER_REGISTERS = 24
CONSUMER_REGISTERS = 240  # the second consumer's (SPLIT); the first gets what is left
SUPPORTED_HEAD_DIMS = (64, 128)


def supported(q, k, v, mask_bias):
    """True when the Gluon forward can run these inputs (else the caller uses the Triton kernel)."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] in SUPPORTED_HEAD_DIMS and is_hopper(q.device)
            and all(t.is_contiguous() for t in (q, k, v)) and mask_bias.dtype == torch.float32
            and mask_bias.is_contiguous() and all(t.data_ptr() % 16 == 0 for t in (q, k, v, mask_bias)))


# ----------------------------------------------------------------------------------------------
# Producer partition (1 warp): TMA loads into the ring.
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _producer(q_desc, k_desc, v_desc, bias_desc, q_smem, k_smem, v_smem, bias_smem, q_bar,
              k_ready, k_empty, v_ready, v_empty, q_row, kv_row, bias_index, num_blocks,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    # The Q tile, as one buffer per consumer warp group (SPLIT) or one for both.
    halves: gl.constexpr = q_smem.type.shape[0]
    mbarrier.expect(q_bar, halves * q_desc.block_type.nbytes)
    for half in gl.static_range(halves):
        tma.async_copy_global_to_shared(q_desc, [q_row + half * q_desc.block_type.shape[0], 0], q_bar,
                                        q_smem.index(half))
    for block in range(num_blocks):
        slot = block % STAGES
        phase = (block // STAGES) & 1
        # Empty barriers start in phase 0 not yet complete: waiting on phase 1 passes at once.
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        ready = k_ready.index(slot)
        mbarrier.expect(ready, k_desc.block_type.nbytes + bias_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + block * BLOCK_N, 0], ready, k_smem.index(slot))
        tma.async_copy_global_to_shared(bias_desc, [bias_index + block * BLOCK_N], ready, bias_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        ready = v_ready.index(slot)
        mbarrier.expect(ready, v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + block * BLOCK_N, 0], ready, v_smem.index(slot))


# ----------------------------------------------------------------------------------------------
# Consumer (default partition, 8 warps): wgmma + online softmax.
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _scores(s, bias_smem, slot, start_n, rows, scale_log2, s_layout: gl.constexpr, BLOCK_N: gl.constexpr,
            MASKED: gl.constexpr):
    """Raw Q Kᵀ tile -> base-2 scores with the bias added (and the causal mask on diagonal blocks)."""
    bias = bias_smem.index(slot).load(gl.SliceLayout(0, s_layout)) * 1.4426950408889634
    s = s * scale_log2 + gl.expand_dims(bias, 0)
    if MASKED:
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(rows, 1) >= gl.expand_dims(cols, 0), s, float("-inf"))
    return s


@gluon.jit
def _softmax_step(s, row_max, row_sum):
    """Online softmax: (probabilities, correction for the old accumulator, new max, new sum)."""
    new_max = gl.maximum(row_max, gl.max(s, 1))
    probs = gl.exp2(s - gl.expand_dims(new_max, 1))
    correction = gl.exp2(row_max - new_max)
    row_sum = row_sum * correction + gl.sum(probs, 1)
    return probs, correction, new_max, row_sum


@gluon.jit
def _consumer_simple(q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     start_m, num_blocks, num_full, scale_log2, acc, row_max, row_sum,
                     s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     base, q_phase, q_empty, RELEASE_Q: gl.constexpr):
    """Both matmuls waited on at once (no intra-warpgroup overlap): the reference schedule. `base`: ring
    position of this tile's first key block (persistent grid; 0 otherwise); RELEASE_Q: arrive on q_empty
    once the last Q Kᵀ is done (persistent grid: the producer then loads the next tile's Q)."""
    rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, q_phase)
    for block in range(num_blocks):
        slot = (base + block) % STAGES
        phase = ((base + block) // STAGES) & 1
        mbarrier.wait(k_ready.index(slot), phase)
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        if block < num_full:
            s = _scores(s, bias_smem, slot, block * BLOCK_N, rows, scale_log2, s_layout, BLOCK_N, False)
        else:
            s = _scores(s, bias_smem, slot, block * BLOCK_N, rows, scale_log2, s_layout, BLOCK_N, True)
        mbarrier.arrive(k_empty.index(slot))
        if RELEASE_Q:
            if block == num_blocks - 1:
                mbarrier.arrive(q_empty)
        probs, correction, row_max, row_sum = _softmax_step(s, row_max, row_sum)
        acc = acc * gl.expand_dims(gl.convert_layout(correction, gl.SliceLayout(1, o_layout)), 1)
        p = gl.convert_layout(probs.to(q_smem.dtype), p_layout)
        mbarrier.wait(v_ready.index(slot), phase)
        acc = warpgroup_mma(p, v_smem.index(slot), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        mbarrier.arrive(v_empty.index(slot))
    return acc, row_max, row_sum


@gluon.jit
def _consumer_overlap(q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                      start_m, num_blocks, num_full, scale_log2, acc, row_max, row_sum,
                      s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      base, q_phase, q_empty, RELEASE_Q: gl.constexpr):
    """FA3's intra-warpgroup pipelining: S_{j+1} = Q K_{j+1}ᵀ and O += P_j V_j are in flight together,
    and the softmax of block j+1 runs while P_j V_j finishes. wgmma groups complete in issue order.
    `base`, `q_phase`, RELEASE_Q as in `_consumer_simple`."""
    rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, q_phase)
    # Block 0.
    first = base % STAGES
    mbarrier.wait(k_ready.index(first), (base // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(first).permute((1, 0)), zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    if num_full > 0:
        s = _scores(s, bias_smem, first, 0, rows, scale_log2, s_layout, BLOCK_N, False)
    else:
        s = _scores(s, bias_smem, first, 0, rows, scale_log2, s_layout, BLOCK_N, True)
    mbarrier.arrive(k_empty.index(first))
    if RELEASE_Q:
        if num_blocks == 1:
            mbarrier.arrive(q_empty)
    probs, correction, row_max, row_sum = _softmax_step(s, row_max, row_sum)
    p = gl.convert_layout(probs.to(q_smem.dtype), p_layout)
    for block in range(1, num_blocks):
        slot = (base + block) % STAGES
        phase = ((base + block) // STAGES) & 1
        previous = (base + block - 1) % STAGES
        previous_phase = ((base + block - 1) // STAGES) & 1
        mbarrier.wait(k_ready.index(slot), phase)
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(previous), previous_phase)
        acc = warpgroup_mma(p, v_smem.index(previous), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))
        if block < num_full:
            s = _scores(s, bias_smem, slot, block * BLOCK_N, rows, scale_log2, s_layout, BLOCK_N, False)
        else:
            s = _scores(s, bias_smem, slot, block * BLOCK_N, rows, scale_log2, s_layout, BLOCK_N, True)
        mbarrier.arrive(k_empty.index(slot))
        if RELEASE_Q:
            if block == num_blocks - 1:
                mbarrier.arrive(q_empty)
        probs, correction, row_max, row_sum = _softmax_step(s, row_max, row_sum)
        # P (a register operand of the PV wgmma) stays live until here.
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))
        mbarrier.arrive(v_empty.index(previous))
        acc = acc * gl.expand_dims(gl.convert_layout(correction, gl.SliceLayout(1, o_layout)), 1)
        p = gl.convert_layout(probs.to(q_smem.dtype), p_layout)
    last = (base + num_blocks - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((base + num_blocks - 1) // STAGES) & 1)
    acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(v_empty.index(last))
    return acc, row_max, row_sum


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
              out, log_sum_exp, batch_head, start_m, seq_len, num_blocks, num_full, scale_log2,
              HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              OVERLAP: gl.constexpr, NUM_WARPS: gl.constexpr, PART: gl.constexpr):
    """The query rows of this partition: all BLOCK_M (one 8-warp consumer) or half (SPLIT: partition PART
    of two 4-warp consumers, each with its own Q buffer, arriving separately on the empty barriers)."""
    _consumer_tile(q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty, out, log_sum_exp,
                   batch_head, start_m, seq_len, num_blocks, num_full, scale_log2, 0, 0, q_bar, HEAD_DIM, BLOCK_N,
                   STAGES, OVERLAP, NUM_WARPS, PART, False)


@gluon.jit
def _consumer_tile(q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                   out, log_sum_exp, batch_head, start_m, seq_len, num_blocks, num_full, scale_log2,
                   base, q_phase, q_empty, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                   OVERLAP: gl.constexpr, NUM_WARPS: gl.constexpr, PART: gl.constexpr, RELEASE_Q: gl.constexpr):
    """One (query block, b·h) tile of `_consumer`, its key blocks at ring positions base, base + 1, ..."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    start_m = start_m + PART * BLOCK_M
    q_smem = q_smem.index(PART)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    row_sum = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    if OVERLAP:
        acc, row_max, row_sum = _consumer_overlap(
            q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty, start_m, num_blocks,
            num_full, scale_log2, acc, row_max, row_sum, s_layout, o_layout, p_layout, BLOCK_M, BLOCK_N, STAGES,
            base, q_phase, q_empty, RELEASE_Q)
    else:
        acc, row_max, row_sum = _consumer_simple(
            q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty, start_m, num_blocks,
            num_full, scale_log2, acc, row_max, row_sum, s_layout, o_layout, p_layout, BLOCK_M, BLOCK_N, STAGES,
            base, q_phase, q_empty, RELEASE_Q)
    # Epilogue, as the Triton forward: out = acc / row_sum, lse = row_max + log2(row_sum) (+inf if empty).
    empty = row_sum == 0.0
    safe_sum = gl.where(empty, 1.0, row_sum)
    lse = gl.where(empty, float("inf"), row_max + gl.log2(safe_sum))
    result = acc / gl.expand_dims(gl.convert_layout(safe_sum, gl.SliceLayout(1, o_layout)), 1)
    rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    offsets = (batch_head * seq_len + gl.expand_dims(rows, 1)).to(gl.int64) * HEAD_DIM + gl.expand_dims(dims, 0)
    gl.store(out + offsets, result.to(out.dtype.element_ty), mask=gl.expand_dims(rows < seq_len, 1))
    lse_rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    gl.store(log_sum_exp + batch_head.to(gl.int64) * seq_len + lse_rows, lse, mask=lse_rows < seq_len)


@gluon.jit
def _second_consumer(q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                     out, log_sum_exp, batch_head, start_m, seq_len, num_blocks, num_full, scale_log2,
                     HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr):
    _consumer(q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty, out, log_sum_exp,
              batch_head, start_m, seq_len, num_blocks, num_full, scale_log2, HEAD_DIM, BLOCK_N, STAGES, OVERLAP,
              4, 1)


@gluon.jit
def _forward_ws_kernel(q_desc, k_desc, v_desc, bias_desc, out, log_sum_exp, seq_len, bias_row_stride, num_heads,
                       group_size, scale_log2, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, OVERLAP: gl.constexpr, SPLIT: gl.constexpr,
                       PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Grid (cdiv(l, BLOCK_M), b·h). Descriptors over (b·h·l, d) rows (q; blocks of BLOCK_M rows, or of
    BLOCK_M / 2 with SPLIT), (b·h_kv·l, d) rows (k, v) and the flat (b·h·l,) bias. SPLIT: num_warps = 4
    (the first consumer) plus a second 4-warp consumer partition; otherwise num_warps = 8, one consumer."""
    num_row_blocks = gl.num_programs(0)
    block_m = num_row_blocks - 1 - gl.program_id(0)  # heaviest query blocks first
    batch_head = gl.program_id(1)
    batch = batch_head // num_heads
    kv_head = (batch_head % num_heads) // group_size
    start_m = block_m * BLOCK_M
    diagonal_end = gl.minimum(start_m + BLOCK_M, seq_len)
    num_blocks = gl.cdiv(diagonal_end, BLOCK_N)
    # Key blocks ending at or before the block's first query need no causal mask.
    num_full = start_m // BLOCK_N
    q_row = batch_head * seq_len + start_m
    kv_row = (batch * (num_heads // group_size) + kv_head) * seq_len
    bias_index = batch_head * bias_row_stride

    CONSUMERS: gl.constexpr = 2 if SPLIT else 1
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    bias_smem = gl.allocate_shared_memory(bias_desc.dtype, [STAGES] + bias_desc.block_type.shape, bias_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    fence_async_shared()

    producer_args = (q_desc, k_desc, v_desc, bias_desc, q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty,
                     v_ready, v_empty, q_row, kv_row, bias_index, num_blocks, BLOCK_N, STAGES)
    if SPLIT:
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty, out,
                         log_sum_exp, batch_head, start_m, seq_len, num_blocks, num_full, scale_log2, HEAD_DIM,
                         BLOCK_N, STAGES, OVERLAP, num_warps, 0)),
            (_second_consumer, (q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty, out,
                                log_sum_exp, batch_head, start_m, seq_len, num_blocks, num_full, scale_log2,
                                HEAD_DIM, BLOCK_N, STAGES, OVERLAP)),
            (_producer, producer_args),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty, out,
                         log_sum_exp, batch_head, start_m, seq_len, num_blocks, num_full, scale_log2, HEAD_DIM,
                         BLOCK_N, STAGES, OVERLAP, num_warps, 0)),
            (_producer, producer_args),
        ], [1], [PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------
# Persistent grid (PERSISTENT): one program per SM, each looping over (query block, b·h) tiles.
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _tile_coordinates(tile, num_row_blocks, seq_len, num_heads, group_size, bias_row_stride,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Tile t -> (b·h, first query row, key blocks, unmasked key blocks, q row, kv row, bias index). Tiles run
    head by head (so the programs in flight share their heads' K/V in L2), and within a head the query blocks
    alternate direction from one head to the next (light-to-heavy, then heavy-to-light), so that a program
    striding by the grid size meets both ends and the programs' loads even out."""
    batch_head = tile // num_row_blocks
    position = tile % num_row_blocks
    block_m = gl.where(batch_head % 2 == 0, num_row_blocks - 1 - position, position)
    batch = batch_head // num_heads
    kv_head = (batch_head % num_heads) // group_size
    start_m = block_m * BLOCK_M
    num_blocks = gl.cdiv(gl.minimum(start_m + BLOCK_M, seq_len), BLOCK_N)
    num_full = start_m // BLOCK_N
    q_row = batch_head * seq_len + start_m
    kv_row = (batch * (num_heads // group_size) + kv_head) * seq_len
    bias_index = batch_head * bias_row_stride
    return batch_head, start_m, num_blocks, num_full, q_row, kv_row, bias_index


@gluon.jit
def _producer_persistent(q_desc, k_desc, v_desc, bias_desc, q_smem, k_smem, v_smem, bias_smem, q_bar, q_empty,
                         k_ready, k_empty, v_ready, v_empty, num_tiles, num_row_blocks, seq_len, num_heads,
                         group_size, bias_row_stride, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         STAGES: gl.constexpr):
    """`_producer` over this program's tiles: the ring position runs on across tiles; the next tile's Q is
    loaded as soon as both consumers have issued their last Q Kᵀ of the current one (q_empty), i.e. under the
    current tile's last P V and epilogue, and its first K/V blocks follow into the free ring slots."""
    halves: gl.constexpr = q_smem.type.shape[0]
    count = 0
    iteration = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        batch_head, start_m, num_blocks, num_full, q_row, kv_row, bias_index = _tile_coordinates(
            tile, num_row_blocks, seq_len, num_heads, group_size, bias_row_stride, BLOCK_M, BLOCK_N)
        mbarrier.wait(q_empty, (iteration & 1) ^ 1)
        mbarrier.expect(q_bar, halves * q_desc.block_type.nbytes)
        for half in gl.static_range(halves):
            tma.async_copy_global_to_shared(q_desc, [q_row + half * q_desc.block_type.shape[0], 0], q_bar,
                                            q_smem.index(half))
        for block in range(num_blocks):
            slot = (count + block) % STAGES
            phase = ((count + block) // STAGES) & 1
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            ready = k_ready.index(slot)
            mbarrier.expect(ready, k_desc.block_type.nbytes + bias_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row + block * BLOCK_N, 0], ready, k_smem.index(slot))
            tma.async_copy_global_to_shared(bias_desc, [bias_index + block * BLOCK_N], ready,
                                            bias_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            ready = v_ready.index(slot)
            mbarrier.expect(ready, v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [kv_row + block * BLOCK_N, 0], ready, v_smem.index(slot))
        count += num_blocks
        iteration += 1


@gluon.jit
def _consumer_persistent(q_smem, k_smem, v_smem, bias_smem, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty,
                         out, log_sum_exp, num_tiles, num_row_blocks, seq_len, num_heads, group_size,
                         bias_row_stride, scale_log2, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr,
                         NUM_WARPS: gl.constexpr, PART: gl.constexpr):
    count = 0
    iteration = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        batch_head, start_m, num_blocks, num_full, q_row, kv_row, bias_index = _tile_coordinates(
            tile, num_row_blocks, seq_len, num_heads, group_size, bias_row_stride, BLOCK_M, BLOCK_N)
        _consumer_tile(q_smem, k_smem, v_smem, bias_smem, q_bar, k_ready, k_empty, v_ready, v_empty, out,
                       log_sum_exp, batch_head, start_m, seq_len, num_blocks, num_full, scale_log2, count,
                       iteration & 1, q_empty, HEAD_DIM, BLOCK_N, STAGES, OVERLAP, NUM_WARPS, PART, True)
        count += num_blocks
        iteration += 1


@gluon.jit
def _second_consumer_persistent(q_smem, k_smem, v_smem, bias_smem, q_bar, q_empty, k_ready, k_empty, v_ready,
                                v_empty, out, log_sum_exp, num_tiles, num_row_blocks, seq_len, num_heads,
                                group_size, bias_row_stride, scale_log2, HEAD_DIM: gl.constexpr,
                                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                                OVERLAP: gl.constexpr):
    _consumer_persistent(q_smem, k_smem, v_smem, bias_smem, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty,
                         out, log_sum_exp, num_tiles, num_row_blocks, seq_len, num_heads, group_size,
                         bias_row_stride, scale_log2, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, OVERLAP, 4, 1)


@gluon.jit(do_not_specialize=["num_tiles", "num_row_blocks"])
def _forward_persistent_kernel(q_desc, k_desc, v_desc, bias_desc, out, log_sum_exp, seq_len, bias_row_stride,
                               num_heads, group_size, scale_log2, num_tiles, num_row_blocks,
                               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                               STAGES: gl.constexpr, OVERLAP: gl.constexpr, SPLIT: gl.constexpr,
                               PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """`_forward_ws_kernel` on a persistent grid of min(#SMs, tiles) programs, program p taking tiles p,
    p + grid, ... (`_tile_coordinates`); shared memory and barriers are set up once per program."""
    CONSUMERS: gl.constexpr = 2 if SPLIT else 1
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    bias_smem = gl.allocate_shared_memory(bias_desc.dtype, [STAGES] + bias_desc.block_type.shape, bias_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(q_empty, count=CONSUMERS)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    fence_async_shared()

    if SPLIT:
        gl.warp_specialize([
            (_consumer_persistent, (q_smem, k_smem, v_smem, bias_smem, q_bar, q_empty, k_ready, k_empty, v_ready,
                                    v_empty, out, log_sum_exp, num_tiles, num_row_blocks, seq_len, num_heads,
                                    group_size, bias_row_stride, scale_log2, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                                    OVERLAP, num_warps, 0)),
            (_second_consumer_persistent, (q_smem, k_smem, v_smem, bias_smem, q_bar, q_empty, k_ready, k_empty,
                                           v_ready, v_empty, out, log_sum_exp, num_tiles, num_row_blocks, seq_len,
                                           num_heads, group_size, bias_row_stride, scale_log2, HEAD_DIM, BLOCK_M,
                                           BLOCK_N, STAGES, OVERLAP)),
            (_producer_persistent, (q_desc, k_desc, v_desc, bias_desc, q_smem, k_smem, v_smem, bias_smem, q_bar,
                                    q_empty, k_ready, k_empty, v_ready, v_empty, num_tiles, num_row_blocks, seq_len,
                                    num_heads, group_size, bias_row_stride, BLOCK_M, BLOCK_N, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer_persistent, (q_smem, k_smem, v_smem, bias_smem, q_bar, q_empty, k_ready, k_empty, v_ready,
                                    v_empty, out, log_sum_exp, num_tiles, num_row_blocks, seq_len, num_heads,
                                    group_size, bias_row_stride, scale_log2, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES,
                                    OVERLAP, num_warps, 0)),
            (_producer_persistent, (q_desc, k_desc, v_desc, bias_desc, q_smem, k_smem, v_smem, bias_smem, q_bar,
                                    q_empty, k_ready, k_empty, v_ready, v_empty, num_tiles, num_row_blocks, seq_len,
                                    num_heads, group_size, bias_row_stride, BLOCK_M, BLOCK_N, STAGES)),
        ], [1], [PRODUCER_REGS])


# Pad each (b, h) row of the bias to a multiple of 4 floats, so that every bias tile the TMA reads starts
# 16-byte aligned (the first H200 run failed with "illegal instruction" exactly in the cases whose rows
# were not: l = 777; bench/dmattn_notes.md, session 5).
PAD_BIAS_ROWS = True


def _bias_rows(mask_bias):
    """(b·h, l') fp32 rows the kernel reads the bias from; l' = l, or l rounded up to 4 (PAD_BIAS_ROWS)."""
    length = mask_bias.shape[-1]
    rows = mask_bias.reshape(-1, length)
    if not PAD_BIAS_ROWS or length % 4 == 0:
        return rows
    padded = torch.zeros(rows.shape[0], (length + 3) // 4 * 4, dtype=rows.dtype, device=rows.device)
    padded[:, :length] = rows
    return padded


def descriptors(q, k, v, mask_bias, block_m, block_n, split=False):
    """Host-side TMA descriptors over the rows of contiguous q (b·h·l, d), k and v (b·h_kv·l, d), and the flat
    (padded) bias."""
    head_dim = q.shape[-1]
    element = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_rows, k_rows, v_rows = (t.view(-1, head_dim) for t in (q, k, v))
    q_block = block_m // 2 if split else block_m
    q_layout = gl.NVMMASharedLayout.get_default_for([q_block, head_dim], element)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block_n, head_dim], element)
    bias_layout = gl.NVMMASharedLayout.get_default_for([block_n], gl.float32)
    bias_flat = _bias_rows(mask_bias).view(-1)
    return (TensorDescriptor(q_rows, list(q_rows.shape), list(q_rows.stride()), [q_block, head_dim], q_layout),
            TensorDescriptor(k_rows, list(k_rows.shape), list(k_rows.stride()), [block_n, head_dim], kv_layout),
            TensorDescriptor(v_rows, list(v_rows.shape), list(v_rows.stride()), [block_n, head_dim], kv_layout),
            TensorDescriptor(bias_flat, list(bias_flat.shape), [1], [block_n], bias_layout))


def forward(q, k, v, mask_bias, config=None):
    """(out, lse) as `dmattn._forward_kernel` writes them for the dense schedule; see `supported`."""
    batch, heads, length, head_dim = q.shape
    config = dict(CONFIGS[head_dim], **(config or {}))
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    q_desc, k_desc, v_desc, bias_desc = descriptors(q, k, v, mask_bias, config["block_m"], config["block_n"],
                                                    config["split"])
    bias_row_stride = length if not PAD_BIAS_ROWS or length % 4 == 0 else (length + 3) // 4 * 4
    num_row_blocks = triton.cdiv(length, config["block_m"])
    if length <= config.get("persistent_max_length", 0):
        num_tiles = num_row_blocks * batch * heads
        programs = config.get("persistent_grid", 0) or sm_count(q.device)
        _forward_persistent_kernel[(min(num_tiles, programs), )](
            q_desc, k_desc, v_desc, bias_desc, out, lse, length, bias_row_stride, heads, heads // k.shape[1],
            LOG2E / math.sqrt(head_dim), num_tiles, num_row_blocks,
            HEAD_DIM=head_dim, BLOCK_M=config["block_m"], BLOCK_N=config["block_n"], STAGES=config["stages"],
            OVERLAP=config["overlap"], SPLIT=config["split"], PRODUCER_REGS=PRODUCER_REGISTERS,
            CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4 if config["split"] else 8)
        return out, lse
    grid = (num_row_blocks, batch * heads)
    _forward_ws_kernel[grid](
        q_desc, k_desc, v_desc, bias_desc, out, lse, length, bias_row_stride, heads, heads // k.shape[1],
        LOG2E / math.sqrt(head_dim),
        HEAD_DIM=head_dim, BLOCK_M=config["block_m"], BLOCK_N=config["block_n"], STAGES=config["stages"],
        OVERLAP=config["overlap"], SPLIT=config["split"], PRODUCER_REGS=PRODUCER_REGISTERS,
        CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4 if config["split"] else 8)
    return out, lse
