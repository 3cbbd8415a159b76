"""DMAttn SPARSE backward in Gluon (keep-window and/or documents): `dmattn_gluon_bwd`'s FA3-style kernel walking the
sparse schedule's per-key-block lists. Behind `dmattn.GLUON_SPARSE_BACKWARD` (default True; with documents from l = 4096).

Computes what `dmattn._key_grad_kernel` computes with FUSE_DQ for the sparse masks: dK (scaled), dV, d mask_bias and
the unscaled dQ shares added into the zeroed fp32 dQ buffer (`dmattn._scale_cast_kernel` then scales and casts).

Same structure as `dmattn_gluon_bwd._backward_ws_kernel` (one program per (128-key block, b·h_kv), looping over the
kv head's query heads; a 1-warp TMA producer; two consumer warp groups of 64 keys holding dK/dV; dQ by TMA
reduce-add, DQ_SPLIT shares one 128-key dSᵀ per step), but per query head the 64-query steps are the listed query
blocks of `dmattn.block_schedule(..., row_block=128 keys, col_block=BLOCK_M queries, by_query=False)` instead of all
blocks from the diagonal on, and per element:
- causal `where` only on listed steps that reach the diagonal (query block < start_n / BLOCK_M + 128 / BLOCK_M);
- keep-window: rank_j <= threshold_i, the step's BLOCK_M thresholds by 1-D TMA with lse / delta (rows padded as
  theirs, -1 in the padding), the 64 key ranks per head by plain loads (2 values a thread, as the bias);
- documents: seg_j == seg_i, the step's segment ids by 1-D TMA (per-batch rows, padded), the key ids by plain loads;
  keep-window within documents folds the documents into the thresholds (`dmattn.fold_documents_into_thresholds`).
A key block that no query of a head keeps has an empty list for that head (count 0): the loops then do nothing, and
dK/dV/d bias come out 0, as they must.
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

from cheems_parallel.kernels import dmattn_gluon_bwd
from cheems_parallel.kernels.dmattn_gluon_bwd import _issue_dq, _send_dq

LOG2E = 1.4426950408889634
BLOCK_N = dmattn_gluon_bwd.BLOCK_N
BLOCK_N_IN_KERNEL = gl.constexpr(BLOCK_N)
CONFIGS = dmattn_gluon_bwd.CONFIGS
FOLD_DOCUMENTS = True
PRODUCER_REGISTERS = dmattn_gluon_bwd.PRODUCER_REGISTERS
CONSUMER_REGISTERS = dmattn_gluon_bwd.CONSUMER_REGISTERS


def supported(q, k, v, mask_bias, grad_out):
    return dmattn_gluon_bwd.supported(q, k, v, mask_bias, grad_out)


@gluon.jit
def _expect_step(bar, q_desc, do_desc, lse_desc, threshold_desc, segment_desc, HAS_WINDOW: gl.constexpr,
                 HAS_SEGMENTS: gl.constexpr):
    base: gl.constexpr = q_desc.block_type.nbytes + do_desc.block_type.nbytes + 2 * lse_desc.block_type.nbytes
    if HAS_WINDOW:
        if HAS_SEGMENTS:
            mbarrier.expect(bar, base + threshold_desc.block_type.nbytes + segment_desc.block_type.nbytes)
        else:
            mbarrier.expect(bar, base + threshold_desc.block_type.nbytes)
    else:
        if HAS_SEGMENTS:
            mbarrier.expect(bar, base + segment_desc.block_type.nbytes)
        else:
            mbarrier.expect(bar, base)


@gluon.jit
def _sparse_bwd_producer(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, threshold_desc, segment_desc, q_smem,
                         do_smem, k_smem, v_smem, lse_smem, delta_smem, threshold_smem, segment_smem, kv_bar, ready,
                         empty, block_count, block_list, kv_row, first_head, batch, seq_len, row_stride, block_n,
                         num_key_blocks, num_query_blocks, group_size, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                         HAS_WINDOW: gl.constexpr, HAS_SEGMENTS: gl.constexpr):
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_row, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [kv_row, 0], kv_bar, v_smem)
    step = 0
    for group_index in range(group_size):
        head = first_head + group_index
        schedule = head.to(gl.int64) * num_key_blocks + block_n
        count = gl.load(block_count + schedule)
        list_base = block_list + schedule * num_query_blocks
        q_head_row = head * seq_len
        stat_head_row = head * row_stride
        segment_row = batch * row_stride
        for index in range(count):
            start_m = gl.load(list_base + index) * BLOCK_M
            slot = step % STAGES
            phase = (step // STAGES) & 1
            mbarrier.wait(empty.index(slot), phase ^ 1)
            bar = ready.index(slot)
            _expect_step(bar, q_desc, do_desc, lse_desc, threshold_desc, segment_desc, HAS_WINDOW, HAS_SEGMENTS)
            tma.async_copy_global_to_shared(q_desc, [q_head_row + start_m, 0], bar, q_smem.index(slot))
            tma.async_copy_global_to_shared(lse_desc, [stat_head_row + start_m], bar, lse_smem.index(slot))
            if HAS_WINDOW:
                tma.async_copy_global_to_shared(threshold_desc, [stat_head_row + start_m], bar,
                                                threshold_smem.index(slot))
            if HAS_SEGMENTS:
                tma.async_copy_global_to_shared(segment_desc, [segment_row + start_m], bar, segment_smem.index(slot))
            tma.async_copy_global_to_shared(do_desc, [q_head_row + start_m, 0], bar, do_smem.index(slot))
            tma.async_copy_global_to_shared(delta_desc, [stat_head_row + start_m], bar, delta_smem.index(slot))
            step += 1


@gluon.jit
def _sparse_probabilities(s, bias_log2, lse_rows, start_m, cols, key_rank, key_segment, threshold_smem,
                          segment_smem, slot, scale_log2, s_layout: gl.constexpr, BLOCK_M: gl.constexpr,
                          CAUSAL: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_SEGMENTS: gl.constexpr):
    p = gl.exp2(s * scale_log2 + gl.expand_dims(bias_log2, 1) - gl.expand_dims(lse_rows, 0))
    if CAUSAL:
        rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        p = gl.where(gl.expand_dims(rows, 0) >= gl.expand_dims(cols, 1), p, 0.0)
    if HAS_WINDOW:
        threshold = threshold_smem.index(slot).load(gl.SliceLayout(0, s_layout))
        p = gl.where(gl.expand_dims(key_rank, 1) <= gl.expand_dims(threshold, 0), p, 0.0)
    if HAS_SEGMENTS:
        row_segment = segment_smem.index(slot).load(gl.SliceLayout(0, s_layout))
        p = gl.where(gl.expand_dims(key_segment, 1) == gl.expand_dims(row_segment, 0), p, 0.0)
    return p


@gluon.jit
def _sparse_bwd_consumer(q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, threshold_smem, segment_smem, ds_smem,
                         dq_smem, kv_bar, ready, empty, ds_bar, dq_desc, mask_bias, key_rank, segment_ids,
                         block_count, block_list, grad_key, grad_value, grad_bias, batch_kv_head, first_head, batch,
                         seq_len, start_n, block_n, num_key_blocks, num_query_blocks, group_size, scale_log2, scale,
                         HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                         DQ_SPLIT: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_SEGMENTS: gl.constexpr,
                         PART: gl.constexpr):
    KEYS: gl.constexpr = 64
    DQ_COLS: gl.constexpr = HEAD_DIM // 2 if DQ_SPLIT else HEAD_DIM
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_COLS, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    dtype: gl.constexpr = q_smem.dtype
    key_start = start_n + PART * KEYS
    cols = key_start + gl.arange(0, KEYS, layout=gl.SliceLayout(1, s_layout))
    col_valid = cols < seq_len
    k_part = k_smem.slice(PART * KEYS, KEYS, dim=0)
    v_part = v_smem.slice(PART * KEYS, KEYS, dim=0)
    zero_s = gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout)
    zero_dq = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, dq_layout)
    grad_k = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
    grad_v = gl.zeros([KEYS, HEAD_DIM], gl.float32, acc_layout)
    # Query blocks before this one reach the diagonal (need the causal mask): start_n / BLOCK_M + 128 / BLOCK_M.
    diagonal_end = (start_n + BLOCK_N_IN_KERNEL) // BLOCK_M
    key_segment = cols
    if HAS_SEGMENTS:
        key_segment = gl.load(segment_ids + batch.to(gl.int64) * seq_len + cols, mask=col_valid, other=-3)
    mbarrier.wait(kv_bar, 0)
    step = 0
    for group_index in range(group_size):
        batch_head = first_head + group_index
        head_row = batch_head * seq_len
        schedule = batch_head.to(gl.int64) * num_key_blocks + block_n
        count = gl.load(block_count + schedule)
        list_base = block_list + schedule * num_query_blocks
        bias_log2 = gl.load(mask_bias + head_row + cols, mask=col_valid, other=0.0) * 1.4426950408889634
        rank_values = cols
        if HAS_WINDOW:  # this head's ranks of the 64 keys (padding keys: never kept)
            rank_values = gl.load(key_rank + head_row + cols, mask=col_valid, other=2147483647)
        grad_b = gl.zeros([KEYS], gl.float32, gl.SliceLayout(1, s_layout))
        for index in range(count):
            query_block = gl.load(list_base + index)
            slot = step % STAGES
            phase = (step // STAGES) & 1
            start_m = query_block * BLOCK_M
            mbarrier.wait(ready.index(slot), phase)
            q_tile = q_smem.index(slot)
            do_tile = do_smem.index(slot)
            s = warpgroup_mma(k_part, q_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dp = warpgroup_mma(v_part, do_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, ))
            lse_rows = lse_smem.index(slot).load(gl.SliceLayout(0, s_layout))
            if query_block < diagonal_end:
                p = _sparse_probabilities(s, bias_log2, lse_rows, start_m, cols, rank_values, key_segment,
                                          threshold_smem, segment_smem, slot, scale_log2, s_layout, BLOCK_M, True,
                                          HAS_WINDOW, HAS_SEGMENTS)
            else:
                p = _sparse_probabilities(s, bias_log2, lse_rows, start_m, cols, rank_values, key_segment,
                                          threshold_smem, segment_smem, slot, scale_log2, s_layout, BLOCK_M, False,
                                          HAS_WINDOW, HAS_SEGMENTS)
            dp = warpgroup_mma_wait(0, deps=(dp, ))
            delta_rows = delta_smem.index(slot).load(gl.SliceLayout(0, s_layout))
            ds = p * (dp - gl.expand_dims(delta_rows, 0))
            p_a = gl.convert_layout(p.to(dtype), a_layout)
            grad_b += gl.sum(ds, 1)
            ds_low = ds.to(dtype)
            ds_a = gl.convert_layout(ds_low, a_layout)
            grad_v = warpgroup_mma(p_a, do_tile, grad_v, is_async=True)
            grad_k = warpgroup_mma(ds_a, q_tile, grad_k, is_async=True)
            ds_buf = ds_smem.index(step % 2)
            if DQ_SPLIT:
                ds_buf.slice(PART * KEYS, KEYS, dim=0).store(ds_low)
            else:
                ds_buf.store(ds_low)
            fence_async_shared()
            if DQ_SPLIT:
                mbarrier.arrive(ds_bar.index(step % 2))
            dq = _issue_dq(ds_buf, k_smem, k_part, ds_bar, step, zero_dq, True, DQ_COLS, DQ_SPLIT, PART)
            dq, grad_k, grad_v, p_a, ds_a = warpgroup_mma_wait(0, deps=(dq, grad_k, grad_v, p_a, ds_a))
            mbarrier.arrive(empty.index(slot))
            _send_dq(dq, dq_smem, dq_desc, head_row + start_m, PART, DQ_COLS, DQ_SPLIT)
            step += 1
        gl.store(grad_bias + head_row.to(gl.int64) + cols, grad_b, mask=col_valid)
    tma.store_wait(0)
    out_rows = key_start + gl.arange(0, KEYS, layout=gl.SliceLayout(1, acc_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    offsets = (batch_kv_head * seq_len + gl.expand_dims(out_rows, 1)).to(gl.int64) * HEAD_DIM \
        + gl.expand_dims(dims, 0)
    out_mask = gl.expand_dims(out_rows < seq_len, 1)
    gl.store(grad_key + offsets, (grad_k * scale).to(grad_key.dtype.element_ty), mask=out_mask)
    gl.store(grad_value + offsets, grad_v.to(grad_value.dtype.element_ty), mask=out_mask)


@gluon.jit
def _sparse_bwd_second_consumer(q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, threshold_smem, segment_smem,
                                ds_smem, dq_smem, kv_bar, ready, empty, ds_bar, dq_desc, mask_bias, key_rank,
                                segment_ids, block_count, block_list, grad_key, grad_value, grad_bias, batch_kv_head,
                                first_head, batch, seq_len, start_n, block_n, num_key_blocks, num_query_blocks,
                                group_size, scale_log2, scale, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                                STAGES: gl.constexpr, DQ_SPLIT: gl.constexpr, HAS_WINDOW: gl.constexpr,
                                HAS_SEGMENTS: gl.constexpr):
    _sparse_bwd_consumer(q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, threshold_smem, segment_smem, ds_smem,
                         dq_smem.index(1), kv_bar, ready, empty, ds_bar, dq_desc, mask_bias, key_rank, segment_ids,
                         block_count, block_list, grad_key, grad_value, grad_bias, batch_kv_head, first_head, batch,
                         seq_len, start_n, block_n, num_key_blocks, num_query_blocks, group_size, scale_log2, scale,
                         HEAD_DIM, BLOCK_M, STAGES, DQ_SPLIT, HAS_WINDOW, HAS_SEGMENTS, 1)


@gluon.jit
def _sparse_backward_ws_kernel(q_desc, do_desc, k_desc, v_desc, dq_desc, lse_desc, delta_desc, threshold_desc,
                               segment_desc, mask_bias, key_rank, segment_ids, block_count, block_list, grad_key,
                               grad_value, grad_bias, seq_len, row_stride, num_heads, group_size, num_key_blocks,
                               num_query_blocks, scale_log2, scale,
                               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                               DQ_SPLIT: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_SEGMENTS: gl.constexpr,
                               PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Grid (cdiv(l, 128), b·h_kv). As `dmattn_gluon_bwd._backward_ws_kernel`, plus: block_count (b·h, key blocks)
    and block_list (b·h, key blocks, query blocks of BLOCK_M) int32 from `dmattn.block_schedule(..., by_query=False)`;
    1-D descriptors over the padded threshold rows (b·h, row_stride) and segment rows (b, row_stride), int32 (the lse
    descriptor stands in when absent, never read); key_rank (b, h, l) and segment_ids (b, l) int32 by plain loads."""
    block_n = gl.program_id(0)
    batch_kv_head = gl.program_id(1)
    kv_heads = num_heads // group_size
    batch = batch_kv_head // kv_heads
    kv_head = batch_kv_head % kv_heads
    first_head = batch * num_heads + kv_head * group_size
    start_n = block_n * BLOCK_N_IN_KERNEL
    kv_row = batch_kv_head * seq_len + start_n

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
    DS_KEYS: gl.constexpr = BLOCK_N_IN_KERNEL if DQ_SPLIT else 64
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([DS_KEYS, BLOCK_M], q_desc.dtype)
    first_ds = gl.allocate_shared_memory(q_desc.dtype, [2, DS_KEYS, BLOCK_M], ds_layout)
    if DQ_SPLIT:
        second_ds = first_ds
    else:
        second_ds = gl.allocate_shared_memory(q_desc.dtype, [2, DS_KEYS, BLOCK_M], ds_layout)
    dq_smem = gl.allocate_shared_memory(dq_desc.dtype, [2] + dq_desc.block_type.shape, dq_desc.layout)
    lse_smem = gl.allocate_shared_memory(lse_desc.dtype, [STAGES] + lse_desc.block_type.shape, lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(delta_desc.dtype, [STAGES] + delta_desc.block_type.shape, delta_desc.layout)
    threshold_smem = gl.allocate_shared_memory(threshold_desc.dtype, [STAGES] + threshold_desc.block_type.shape,
                                               threshold_desc.layout)
    segment_smem = gl.allocate_shared_memory(segment_desc.dtype, [STAGES] + segment_desc.block_type.shape,
                                             segment_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(ds_bar.index(i), count=2)
    fence_async_shared()

    gl.warp_specialize([
        (_sparse_bwd_consumer, (q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, threshold_smem, segment_smem,
                                first_ds, dq_smem.index(0), kv_bar, ready, empty, ds_bar, dq_desc, mask_bias, key_rank,
                                segment_ids, block_count, block_list, grad_key, grad_value, grad_bias, batch_kv_head,
                                first_head, batch, seq_len, start_n, block_n, num_key_blocks, num_query_blocks,
                                group_size, scale_log2, scale, HEAD_DIM, BLOCK_M, STAGES, DQ_SPLIT, HAS_WINDOW,
                                HAS_SEGMENTS, 0)),
        (_sparse_bwd_second_consumer, (q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, threshold_smem,
                                       segment_smem, second_ds, dq_smem, kv_bar, ready, empty, ds_bar, dq_desc,
                                       mask_bias, key_rank, segment_ids, block_count, block_list, grad_key,
                                       grad_value, grad_bias, batch_kv_head, first_head, batch, seq_len, start_n,
                                       block_n, num_key_blocks, num_query_blocks, group_size, scale_log2, scale,
                                       HEAD_DIM, BLOCK_M, STAGES, DQ_SPLIT, HAS_WINDOW, HAS_SEGMENTS)),
        (_sparse_bwd_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, threshold_desc, segment_desc,
                                q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, threshold_smem, segment_smem,
                                kv_bar, ready, empty, block_count, block_list, kv_row, first_head, batch, seq_len,
                                row_stride, block_n, num_key_blocks, num_query_blocks, group_size, BLOCK_M, STAGES,
                                HAS_WINDOW, HAS_SEGMENTS)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def padded_rows(values, row_stride, fill):
    """(rows, l) int32 -> (rows, row_stride) with `fill` in the padding (row_stride: l rounded up to BLOCK_M)."""
    length = values.shape[-1]
    rows = values.reshape(-1, length)
    padded = torch.full((rows.shape[0], row_stride), fill, dtype=rows.dtype, device=rows.device)
    padded[:, :length] = rows
    return padded


def row_descriptors(query_threshold, segment_ids, row_stride, block_m, stand_in):
    """1-D descriptors over padded threshold rows (-1: never kept) and segment rows (-2: never equal to a key's id,
    which is >= 0 or -3 past l); None -> `stand_in` (never read). Returns (threshold_desc, segment_desc, tensors)."""
    layout = gl.NVMMASharedLayout.get_default_for([block_m], gl.int32)
    threshold_desc = segment_desc = stand_in
    keep = []
    if query_threshold is not None:
        flat = padded_rows(query_threshold, row_stride, -1).view(-1)
        keep.append(flat)
        threshold_desc = TensorDescriptor(flat, list(flat.shape), [1], [block_m], layout)
    if segment_ids is not None:
        flat = padded_rows(segment_ids, row_stride, -2).view(-1)
        keep.append(flat)
        segment_desc = TensorDescriptor(flat, list(flat.shape), [1], [block_m], layout)
    return threshold_desc, segment_desc, keep


def backward(q, k, v, mask_bias, grad_out, lse, delta, grad_query_accum, masks, config=None):
    """(dK, dV, d mask_bias) as `dmattn._key_grad_kernel` writes them with FUSE_DQ for the sparse schedule of `masks`
    (a dmattn._Masks with keep-window and/or documents), and the unscaled dQ shares added into grad_query_accum
    (fp32 (b, h, l, d), zeroed); see `supported`."""
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    config = dict(CONFIGS[head_dim], **(config or {}))
    config["dq_split"] = config["dq_split"] and head_dim >= 128
    block_m = config["block_m"]
    grad_key = torch.empty_like(k)
    grad_value = torch.empty_like(v)
    grad_bias = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    lse_rows, delta_rows, row_stride = dmattn_gluon_bwd.padded_stats(lse, delta, block_m)
    descs = dmattn_gluon_bwd.descriptors(q, k, v, grad_out, grad_query_accum, lse_rows, delta_rows, block_m,
                                         config["dq_split"])
    has_window, has_segments, query_threshold = masks.has_window, masks.has_segments, masks.query_threshold
    if config.get("fold_documents", FOLD_DOCUMENTS) and has_window and has_segments:
        from cheems_parallel.kernels.dmattn import fold_documents_into_thresholds

        query_threshold = fold_documents_into_thresholds(masks.key_rank, query_threshold, masks.segment_ids)
        has_segments = False
    threshold_desc, segment_desc, _keep = row_descriptors(query_threshold if has_window else None,
                                                          masks.segment_ids if has_segments else None, row_stride,
                                                          block_m, descs[5])
    block_count, block_list = masks.schedule(BLOCK_N, block_m, by_query=False)
    grid = (triton.cdiv(length, BLOCK_N), batch * kv_heads)
    scale = 1.0 / math.sqrt(head_dim)
    _sparse_backward_ws_kernel[grid](
        *descs, threshold_desc, segment_desc, mask_bias, masks.key_rank, masks.segment_ids, block_count, block_list,
        grad_key, grad_value, grad_bias, length, row_stride, heads, heads // kv_heads, triton.cdiv(length, BLOCK_N),
        triton.cdiv(length, block_m), scale * LOG2E, scale,
        HEAD_DIM=head_dim, BLOCK_M=block_m, STAGES=config["stages"], DQ_SPLIT=config["dq_split"],
        HAS_WINDOW=has_window, HAS_SEGMENTS=has_segments, PRODUCER_REGS=PRODUCER_REGISTERS,
        CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return grad_key, grad_value, grad_bias
