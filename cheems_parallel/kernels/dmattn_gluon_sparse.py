"""DMAttn SPARSE forward in Gluon: the keep-window / document schedules on Hopper, FA3-style.

Computes what `dmattn._forward_kernel` computes when keep-window and/or documents are present: out (b, h, l, d) in
q's dtype and the base-2 lse (b, h, l) fp32, so the Triton sparse backward runs unchanged on them. Behind
`dmattn.GLUON_SPARSE` (default True since session 6's H200 sweeps).

Structure (the per-tile grid of `dmattn_gluon._forward_ws_kernel`, one program per (128-query block, b·h), the
heaviest query blocks first), with the key blocks taken from the sparse schedule instead of 0 .. diagonal:
- `dmattn.block_schedule(..., row_block=BLOCK_M, col_block=BLOCK_N, by_query=True)` lists, per (b·h, query block),
  the key blocks that can hold a kept pair, ascending (FlexAttention's block mask). Every query block lists at least
  one block (each valid query keeps >= 1 key of its prefix, and that key's block is listed), so count >= 1.
- producer, 1 warp: the Q tile once, then for each listed block j (a scalar load of the list) the K tile with its
  BLOCK_N bias values and the V tile by TMA into the STAGES ring — only the listed blocks travel. No branch in the
  consumers' loop depends on the list except the causal `where` on the block(s) reaching the diagonal, so the
  Triton kernel's "a listed tile costs ~2x a dense one" (the index load defeating the software pipeliner) should
  not recur: the producer reads the index one block ahead (the consumers read it too, for the causal branch,
  before their wgmma). No dense fallback
  (LISTED_LOOP_MAX_FRACTION does not apply): a full list is the dense walk plus the masks.
- consumers, two warp groups of 64 query rows (SPLIT) with FA3's intra-warpgroup overlap as the dense kernel:
  S = Q Kᵀ (async wgmma), then per element the causal mask (diagonal blocks only), the keep-window mask
  rank_j <= threshold_i and the document mask seg_j == seg_i. The block's key ranks and segment ids (512 B each)
  travel with the K tile: 1-D TMA into the ring under the K barrier, read from shared memory like the bias, so
  nothing key-side is held in registers across the wgmma (pointer loads issued under the wgmma spilled 48-296 B).
  The rows' thresholds and segments are loaded once per tile. Keep-window within documents folds the document mask
  into the thresholds on the host (`dmattn.fold_documents_into_thresholds`; FOLD_DOCUMENTS), so that kernel compares
  ranks only. The online softmax shifts by 0 while a row has kept nothing yet (max -inf), as the Triton sparse
  kernel does; an empty row ends with out 0 and lse +inf.

Same input conditions as the dense Gluon forward (`dmattn_gluon.supported`: CUDA sm_90, bf16/fp16, d 64/128,
contiguous, fp32 bias); bias, rank and segment rows of l % 4 != 0 padded (dmattn_gluon._bias_rows, `_padded_rows`)
for the 16-byte TMA alignment; query thresholds and segment ids per row by pointer loads.
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

from cheems_parallel.kernels import dmattn_gluon

LOG2E = 1.4426950408889634
# Tiles per head dim. The schedule is built for exactly these tiles (block_m x block_n).
CONFIGS = {
    128: {"block_m": 128, "block_n": 128, "stages": 2, "split": True},
    64: {"block_m": 128, "block_n": 128, "stages": 2, "split": True},
}
# Keep-window within documents: fold the document mask into the thresholds (dmattn.fold_documents_into_thresholds),
# so the kernel compares ranks only (no segment loads; the segment compare costs 64-88 B of spills, the fold none).
FOLD_DOCUMENTS = True
PRODUCER_REGISTERS = dmattn_gluon.PRODUCER_REGISTERS
CONSUMER_REGISTERS = dmattn_gluon.CONSUMER_REGISTERS


def supported(q, k, v, mask_bias):
    return dmattn_gluon.supported(q, k, v, mask_bias)


# ----------------------------------------------------------------------------------------------
# Producer (1 warp): TMA loads of the listed key blocks only.
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _expect_key_tile(ready, k_desc, bias_desc, rank_desc, segment_desc, HAS_WINDOW: gl.constexpr,
                     HAS_SEGMENTS: gl.constexpr):
    """The K tile's barrier expects the K, bias and (when present) rank and segment bytes."""
    base: gl.constexpr = k_desc.block_type.nbytes + bias_desc.block_type.nbytes
    if HAS_WINDOW:
        if HAS_SEGMENTS:
            mbarrier.expect(ready, base + rank_desc.block_type.nbytes + segment_desc.block_type.nbytes)
        else:
            mbarrier.expect(ready, base + rank_desc.block_type.nbytes)
    else:
        if HAS_SEGMENTS:
            mbarrier.expect(ready, base + segment_desc.block_type.nbytes)
        else:
            mbarrier.expect(ready, base)


@gluon.jit
def _sparse_producer(q_desc, k_desc, v_desc, bias_desc, rank_desc, segment_desc, q_smem, k_smem, v_smem, bias_smem,
                     rank_smem, segment_smem, q_bar, k_ready, k_empty, v_ready, v_empty, q_row, kv_row, bias_index,
                     segment_index, list_base, count, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     HAS_WINDOW: gl.constexpr, HAS_SEGMENTS: gl.constexpr):
    """The K tile travels with its BLOCK_N bias values, key ranks (HAS_WINDOW) and segment ids (HAS_SEGMENTS),
    all under one mbarrier; then the V tile."""
    halves: gl.constexpr = q_smem.type.shape[0]
    mbarrier.expect(q_bar, halves * q_desc.block_type.nbytes)
    for half in gl.static_range(halves):
        tma.async_copy_global_to_shared(q_desc, [q_row + half * q_desc.block_type.shape[0], 0], q_bar,
                                        q_smem.index(half))
    # The next list entry is loaded one block ahead, so its latency is not on the producer's serial path.
    next_block = gl.load(list_base)
    for index in range(count):
        start_n = next_block * BLOCK_N
        next_block = gl.load(list_base + gl.minimum(index + 1, count - 1))
        slot = index % STAGES
        phase = (index // STAGES) & 1
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        ready = k_ready.index(slot)
        _expect_key_tile(ready, k_desc, bias_desc, rank_desc, segment_desc, HAS_WINDOW, HAS_SEGMENTS)
        tma.async_copy_global_to_shared(k_desc, [kv_row + start_n, 0], ready, k_smem.index(slot))
        tma.async_copy_global_to_shared(bias_desc, [bias_index + start_n], ready, bias_smem.index(slot))
        if HAS_WINDOW:
            tma.async_copy_global_to_shared(rank_desc, [bias_index + start_n], ready, rank_smem.index(slot))
        if HAS_SEGMENTS:
            tma.async_copy_global_to_shared(segment_desc, [segment_index + start_n], ready, segment_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        ready = v_ready.index(slot)
        mbarrier.expect(ready, v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + start_n, 0], ready, v_smem.index(slot))


# ----------------------------------------------------------------------------------------------
# Consumers: wgmma, per-element masks, online softmax.
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _masked_scores(s, bias_smem, rank_smem, segment_smem, slot, start_n, rows, row_threshold, row_segment,
                   scale_log2, s_layout: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                   HAS_WINDOW: gl.constexpr, HAS_SEGMENTS: gl.constexpr):
    """Raw Q Kᵀ tile -> base-2 scores with the bias, -inf where the causal (CAUSAL), keep-window (key rank above
    the row's threshold) or document (other segment) mask removes the pair. The key-side values come from the
    shared-memory ring (loaded with the K tile), so nothing is held in registers across the wgmma."""
    key_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    bias = bias_smem.index(slot).load(key_layout) * 1.4426950408889634
    s = s * scale_log2 + gl.expand_dims(bias, 0)
    if CAUSAL:
        cols = start_n + gl.arange(0, BLOCK_N, layout=key_layout)
        s = gl.where(gl.expand_dims(rows, 1) >= gl.expand_dims(cols, 0), s, float("-inf"))
    if HAS_WINDOW:
        rank = rank_smem.index(slot).load(key_layout)
        s = gl.where(gl.expand_dims(rank, 0) <= gl.expand_dims(row_threshold, 1), s, float("-inf"))
    if HAS_SEGMENTS:
        segment = segment_smem.index(slot).load(key_layout)
        s = gl.where(gl.expand_dims(segment, 0) == gl.expand_dims(row_segment, 1), s, float("-inf"))
    return s


@gluon.jit
def _block_scores(s, bias_smem, rank_smem, segment_smem, slot, block_n, rows, row_threshold, row_segment,
                  scale_log2, num_full, s_layout: gl.constexpr, BLOCK_N: gl.constexpr, HAS_WINDOW: gl.constexpr,
                  HAS_SEGMENTS: gl.constexpr):
    """The causal mask only on the listed blocks that reach the diagonal (block_n >= num_full)."""
    if block_n < num_full:
        s = _masked_scores(s, bias_smem, rank_smem, segment_smem, slot, block_n * BLOCK_N, rows, row_threshold,
                           row_segment, scale_log2, s_layout, BLOCK_N, False, HAS_WINDOW, HAS_SEGMENTS)
    else:
        s = _masked_scores(s, bias_smem, rank_smem, segment_smem, slot, block_n * BLOCK_N, rows, row_threshold,
                           row_segment, scale_log2, s_layout, BLOCK_N, True, HAS_WINDOW, HAS_SEGMENTS)
    return s


@gluon.jit
def _safe_softmax_step(s, row_max, row_sum):
    """Online softmax that shifts by 0 while a row has kept nothing (max -inf), instead of producing NaN."""
    new_max = gl.maximum(row_max, gl.max(s, 1))
    shift = gl.where(new_max == float("-inf"), 0.0, new_max)
    probs = gl.exp2(s - gl.expand_dims(shift, 1))
    correction = gl.exp2(row_max - shift)
    row_sum = row_sum * correction + gl.sum(probs, 1)
    return probs, correction, new_max, row_sum


@gluon.jit
def _sparse_consumer(q_smem, k_smem, v_smem, bias_smem, rank_smem, segment_smem, q_bar, k_ready, k_empty,
                     v_ready, v_empty, out, log_sum_exp, query_threshold, segment_ids, list_base, count,
                     batch_head, batch, start_m, seq_len, num_full, scale_log2,
                     HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     HAS_WINDOW: gl.constexpr, HAS_SEGMENTS: gl.constexpr, NUM_WARPS: gl.constexpr,
                     PART: gl.constexpr):
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    start_m = start_m + PART * BLOCK_M
    q_smem = q_smem.index(PART)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows = start_m + gl.arange(0, BLOCK_M, layout=row_layout)
    row_ok = rows < seq_len
    row_stats = batch_head.to(gl.int64) * seq_len
    segment_base = segment_ids + batch.to(gl.int64) * seq_len
    row_threshold = rows
    row_segment = rows
    if HAS_WINDOW:
        row_threshold = gl.load(query_threshold + row_stats + rows, mask=row_ok, other=-1)
    if HAS_SEGMENTS:
        row_segment = gl.load(segment_base + rows, mask=row_ok, other=-2)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    row_max = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
    row_sum = gl.zeros([BLOCK_M], gl.float32, row_layout)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    mbarrier.wait(q_bar, 0)
    # Listed block 0 (count >= 1 always: see the module docstring).
    block_n = gl.load(list_base)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    s = _block_scores(s, bias_smem, rank_smem, segment_smem, 0, block_n, rows, row_threshold, row_segment,
                      scale_log2, num_full, s_layout, BLOCK_N, HAS_WINDOW, HAS_SEGMENTS)
    mbarrier.arrive(k_empty.index(0))
    probs, correction, row_max, row_sum = _safe_softmax_step(s, row_max, row_sum)
    p = gl.convert_layout(probs.to(q_smem.dtype), p_layout)
    for index in range(1, count):
        slot = index % STAGES
        phase = (index // STAGES) & 1
        previous = (index - 1) % STAGES
        previous_phase = ((index - 1) // STAGES) & 1
        block_n = gl.load(list_base + index)
        mbarrier.wait(k_ready.index(slot), phase)
        s = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(previous), previous_phase)
        acc = warpgroup_mma(p, v_smem.index(previous), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s, ))
        s = _block_scores(s, bias_smem, rank_smem, segment_smem, slot, block_n, rows, row_threshold, row_segment,
                          scale_log2, num_full, s_layout, BLOCK_N, HAS_WINDOW, HAS_SEGMENTS)
        mbarrier.arrive(k_empty.index(slot))
        probs, correction, row_max, row_sum = _safe_softmax_step(s, row_max, row_sum)
        acc, p = warpgroup_mma_wait(0, deps=(acc, p))
        mbarrier.arrive(v_empty.index(previous))
        acc = acc * gl.expand_dims(gl.convert_layout(correction, gl.SliceLayout(1, o_layout)), 1)
        p = gl.convert_layout(probs.to(q_smem.dtype), p_layout)
    last = (count - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((count - 1) // STAGES) & 1)
    acc = warpgroup_mma(p, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    mbarrier.arrive(v_empty.index(last))

    # Epilogue as the dense kernel: out = acc / row_sum, lse = row_max + log2(row_sum) (+inf for an empty row).
    empty = row_sum == 0.0
    safe_sum = gl.where(empty, 1.0, row_sum)
    lse = gl.where(empty, float("inf"), row_max + gl.log2(safe_sum))
    result = acc / gl.expand_dims(gl.convert_layout(safe_sum, gl.SliceLayout(1, o_layout)), 1)
    out_rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    offsets = (batch_head * seq_len + gl.expand_dims(out_rows, 1)).to(gl.int64) * HEAD_DIM + gl.expand_dims(dims, 0)
    gl.store(out + offsets, result.to(out.dtype.element_ty), mask=gl.expand_dims(out_rows < seq_len, 1))
    gl.store(log_sum_exp + row_stats + rows, lse, mask=row_ok)


@gluon.jit
def _second_sparse_consumer(q_smem, k_smem, v_smem, bias_smem, rank_smem, segment_smem, q_bar, k_ready, k_empty,
                            v_ready, v_empty, out, log_sum_exp, query_threshold, segment_ids, list_base, count,
                            batch_head, batch, start_m, seq_len, num_full, scale_log2,
                            HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                            HAS_WINDOW: gl.constexpr, HAS_SEGMENTS: gl.constexpr):
    _sparse_consumer(q_smem, k_smem, v_smem, bias_smem, rank_smem, segment_smem, q_bar, k_ready, k_empty, v_ready,
                     v_empty, out, log_sum_exp, query_threshold, segment_ids, list_base, count, batch_head, batch,
                     start_m, seq_len, num_full, scale_log2, HEAD_DIM, BLOCK_N, STAGES, HAS_WINDOW, HAS_SEGMENTS, 4, 1)


@gluon.jit
def _sparse_forward_kernel(q_desc, k_desc, v_desc, bias_desc, rank_desc, segment_desc, out, log_sum_exp,
                           query_threshold, segment_ids, block_count, block_list, seq_len, bias_row_stride,
                           segment_row_stride, num_heads, group_size, num_key_blocks, scale_log2,
                           HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           STAGES: gl.constexpr, SPLIT: gl.constexpr, HAS_WINDOW: gl.constexpr,
                           HAS_SEGMENTS: gl.constexpr, PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                           num_warps: gl.constexpr):
    """Grid (cdiv(l, BLOCK_M), b·h). block_count (b·h, row blocks) int32 and block_list (b·h, row blocks,
    num_key_blocks) int32 from `dmattn.block_schedule` with these tiles. Descriptors as `_forward_ws_kernel`, plus
    1-D ones over the (padded) key-rank rows (b·h rows of bias_row_stride, int32) and segment-id rows (b rows of
    segment_row_stride, int32); absent masks pass the bias descriptor in their place (never read).
    query_threshold (b, h, l) int32 and segment_ids (b, l) int32 are read per query row by pointer loads."""
    num_row_blocks = gl.num_programs(0)
    block_m = num_row_blocks - 1 - gl.program_id(0)  # heaviest query blocks first
    batch_head = gl.program_id(1)
    batch = batch_head // num_heads
    kv_head = (batch_head % num_heads) // group_size
    start_m = block_m * BLOCK_M
    num_full = start_m // BLOCK_N
    schedule = batch_head.to(gl.int64) * num_row_blocks + block_m
    count = gl.load(block_count + schedule)
    list_base = block_list + schedule * num_key_blocks
    q_row = batch_head * seq_len + start_m
    kv_row = (batch * (num_heads // group_size) + kv_head) * seq_len
    bias_index = batch_head * bias_row_stride
    segment_index = batch * segment_row_stride

    CONSUMERS: gl.constexpr = 2 if SPLIT else 1
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    bias_smem = gl.allocate_shared_memory(bias_desc.dtype, [STAGES] + bias_desc.block_type.shape, bias_desc.layout)
    rank_smem = gl.allocate_shared_memory(rank_desc.dtype, [STAGES] + rank_desc.block_type.shape, rank_desc.layout)
    segment_smem = gl.allocate_shared_memory(segment_desc.dtype, [STAGES] + segment_desc.block_type.shape,
                                             segment_desc.layout)
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

    producer_args = (q_desc, k_desc, v_desc, bias_desc, rank_desc, segment_desc, q_smem, k_smem, v_smem, bias_smem,
                     rank_smem, segment_smem, q_bar, k_ready, k_empty, v_ready, v_empty, q_row, kv_row, bias_index,
                     segment_index, list_base, count, BLOCK_N, STAGES, HAS_WINDOW, HAS_SEGMENTS)
    if SPLIT:
        gl.warp_specialize([
            (_sparse_consumer, (q_smem, k_smem, v_smem, bias_smem, rank_smem, segment_smem, q_bar, k_ready, k_empty,
                                v_ready, v_empty, out, log_sum_exp, query_threshold, segment_ids, list_base, count,
                                batch_head, batch, start_m, seq_len, num_full, scale_log2, HEAD_DIM, BLOCK_N, STAGES,
                                HAS_WINDOW, HAS_SEGMENTS, num_warps, 0)),
            (_second_sparse_consumer, (q_smem, k_smem, v_smem, bias_smem, rank_smem, segment_smem, q_bar, k_ready,
                                       k_empty, v_ready, v_empty, out, log_sum_exp, query_threshold, segment_ids,
                                       list_base, count, batch_head, batch, start_m, seq_len, num_full, scale_log2,
                                       HEAD_DIM, BLOCK_N, STAGES, HAS_WINDOW, HAS_SEGMENTS)),
            (_sparse_producer, producer_args),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_sparse_consumer, (q_smem, k_smem, v_smem, bias_smem, rank_smem, segment_smem, q_bar, k_ready, k_empty,
                                v_ready, v_empty, out, log_sum_exp, query_threshold, segment_ids, list_base, count,
                                batch_head, batch, start_m, seq_len, num_full, scale_log2, HEAD_DIM, BLOCK_N, STAGES,
                                HAS_WINDOW, HAS_SEGMENTS, num_warps, 0)),
            (_sparse_producer, producer_args),
        ], [1], [PRODUCER_REGS])


def _padded_rows(values, length):
    """(rows, l) -> (rows, l') contiguous with l' = l rounded up to 4 elements (16 bytes at 4-byte elements), so that
    every 1-D TMA tile starts 16-byte aligned (dmattn_gluon.PAD_BIAS_ROWS: the H200 raises "illegal instruction"
    otherwise). The padding is never used: keys past l are beyond every query's diagonal."""
    rows = values.reshape(-1, length)
    if length % 4 == 0 or not dmattn_gluon.PAD_BIAS_ROWS:  # the same row stride as the bias rows
        return rows.contiguous()
    padded = torch.zeros(rows.shape[0], (length + 3) // 4 * 4, dtype=rows.dtype, device=rows.device)
    padded[:, :length] = rows
    return padded


def key_descriptors(key_rank, segment_ids, mask_bias, block_n, bias_desc):
    """1-D TMA descriptors over the padded key-rank rows (b·h, l') and segment-id rows (b, l') (int32; None: absent,
    the bias descriptor stands in, never read). Returns (rank_desc, segment_desc, segment_row_stride, tensors to keep
    alive until the launch)."""
    length = mask_bias.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([block_n], gl.int32)
    rank_desc = segment_desc = bias_desc
    segment_row_stride = 0
    keep = []
    if key_rank is not None:
        rank_flat = _padded_rows(key_rank, length).view(-1)
        keep.append(rank_flat)
        rank_desc = TensorDescriptor(rank_flat, list(rank_flat.shape), [1], [block_n], layout)
    if segment_ids is not None:
        segment_rows = _padded_rows(segment_ids, length)
        segment_row_stride = segment_rows.shape[1]
        segment_flat = segment_rows.view(-1)
        keep.append(segment_flat)
        segment_desc = TensorDescriptor(segment_flat, list(segment_flat.shape), [1], [block_n], layout)
    return rank_desc, segment_desc, segment_row_stride, keep


def forward(q, k, v, mask_bias, masks, config=None):
    """(out, lse) as `dmattn._forward_kernel` writes them for the sparse schedule of `masks` (a dmattn._Masks with
    keep-window and/or documents); see `supported`."""
    batch, heads, length, head_dim = q.shape
    config = dict(CONFIGS[head_dim], **(config or {}))
    block_m, block_n = config["block_m"], config["block_n"]
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    block_count, block_list = masks.schedule(block_m, block_n, by_query=True)
    q_desc, k_desc, v_desc, bias_desc = dmattn_gluon.descriptors(q, k, v, mask_bias, block_m, block_n,
                                                                 config["split"])
    has_window, has_segments, query_threshold = masks.has_window, masks.has_segments, masks.query_threshold
    if config.get("fold_documents", FOLD_DOCUMENTS) and has_window and has_segments:
        # Keep-window within documents: the document mask folded into the thresholds (one compare per score).
        from cheems_parallel.kernels.dmattn import fold_documents_into_thresholds

        query_threshold = fold_documents_into_thresholds(masks.key_rank, query_threshold, masks.segment_ids)
        has_segments = False
    rank_desc, segment_desc, segment_row_stride, _keep = key_descriptors(
        masks.key_rank if has_window else None, masks.segment_ids if has_segments else None, mask_bias, block_n,
        bias_desc)
    bias_row_stride = length if not dmattn_gluon.PAD_BIAS_ROWS or length % 4 == 0 else (length + 3) // 4 * 4
    grid = (triton.cdiv(length, block_m), batch * heads)
    _sparse_forward_kernel[grid](
        q_desc, k_desc, v_desc, bias_desc, rank_desc, segment_desc, out, lse, query_threshold,
        masks.segment_ids, block_count, block_list, length, bias_row_stride, segment_row_stride, heads,
        heads // k.shape[1], triton.cdiv(length, block_n), LOG2E / math.sqrt(head_dim),
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=config["stages"], SPLIT=config["split"],
        HAS_WINDOW=has_window, HAS_SEGMENTS=has_segments, PRODUCER_REGS=PRODUCER_REGISTERS,
        CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4 if config["split"] else 8)
    return out, lse
