"""Fused dynamic-mask attention (DMAttn, spec §3): Triton forward and backward, FlashAttention-2 style.

Shapes: q (b, h, l, d); k, v (b, h_kv, l, d) with h % h_kv == 0 (GQA: query head `head` reads
key/value head `head // (h // h_kv)`); mask_bias (b, h, l): the additive per-key mask value m_{h,j},
differentiable; segment_ids (b, l) optional document ids. Returns (b, h, l, d) in q's dtype.

Scores s_ij = q_i·k_j / sqrt(d) + m_j for allowed keys, -inf otherwise; allowed = causal (j <= i),
same document, and with `keep_window` w: among the top-w keys of query i's prefix by m (ties to the
nearest key). The reference is `cheems_parallel.ops.dmattn.dmattn_ref`; this file must agree with it.

How the keep-window is fused. A cheap pre-pass (`keep_window_thresholds`, torch) ranks every key of a
(batch, head) by (m desc, position desc), which is the reference's tie rule. Restricted to a prefix the
ranking order is the same, so query i keeps key j <= i iff rank_j <= threshold_i, where threshold_i is
the w-th smallest rank among keys 0..i (or "keep all" while the prefix holds at most w keys). The
kernels then compare two integers per score, and skip a whole key block when its smallest rank is above
the largest threshold of the query block (thresholds never grow with i), so structured masks skip
most of the work. Document masking skips a block when the two blocks' id ranges are disjoint.

Numerics: softmax in fp32 in base 2 (scores pre-multiplied by log2 e); the forward saves the base-2
log-sum-exp per row for the backward, as in FlashAttention-2. A query row whose allowed set is empty
(possible only with keep_window and segment_ids together) yields 0 here and NaN in the reference.

On a machine without CUDA, set TRITON_INTERPRET=1 before this module is imported (the decorator reads
it); the interpreter computes bf16 wrongly, so test it with float32 inputs.
"""
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Threshold meaning "keep every key of the prefix"; ranks are < l <= this.
KEEP_ALL = 2**31 - 1
# Kernels may read module globals only as constexpr.
LOG2E_IN_KERNEL = tl.constexpr(LOG2E)
KEEP_ALL_IN_KERNEL = tl.constexpr(KEEP_ALL)

# Tile shapes (block_m, block_n, num_warps, num_stages) per kernel, for bf16/fp16 on Hopper with d = 128.
# bench/dmattn.py --tune sweeps alternatives; bench/dmattn_notes.md records what was measured.
FORWARD_CONFIG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
BACKWARD_KEY_CONFIG = {"block_m": 32, "block_n": 128, "num_warps": 4, "num_stages": 3}
BACKWARD_QUERY_CONFIG = {"block_m": 128, "block_n": 32, "num_warps": 4, "num_stages": 3}
# Small tiles for the CPU interpreter and for fp32 (whose tiles take twice the shared memory).
SMALL_CONFIG = {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 2}


# ----------------------------------------------------------------------------------------------
# Keep-window pre-pass (torch).
# ----------------------------------------------------------------------------------------------
def keep_window_thresholds(mask_bias: torch.Tensor, keep_window: int, chunk_size: int = 128,
                           max_elements: int = 2**27):
    """(b, h, l) mask -> (key_rank, query_threshold), both int32 (b, h, l).

    key_rank[j]: position of key j when the whole row is sorted by (m desc, j desc).
    query_threshold[i]: the w-th smallest rank among keys 0..i, or KEEP_ALL while i < w.
    Query i keeps key j iff j <= i and key_rank[j] <= query_threshold[i] (== the reference's rule).

    Method, per query chunk c of `chunk_size` queries: the w-th smallest rank of the prefix is either
    one of the chunk's own ranks or the (w-u)-th smallest rank of the keys before the chunk, u <= chunk
    size. A table T[c, r] = #{keys before chunk c with rank <= r} (cumulative count) gives every
    candidate's count in O(1); the in-chunk part of each count is a cumulative sum over the chunk.
    Cost: b·h·l²/chunk_size table entries plus b·h·l·(2·chunk_size + 1)·chunk_size/chunk... counts,
    processed in slices of at most `max_elements`.
    """
    batch, heads, length = mask_bias.shape
    device = mask_bias.device
    rows = mask_bias.detach().reshape(batch * heads, length)
    # A stable descending sort of the reversed row puts the nearest key first among ties.
    flipped_order = torch.sort(rows.flip(-1), dim=-1, descending=True, stable=True).indices
    key_by_rank = (length - 1) - flipped_order
    positions = torch.arange(length, device=device).expand(batch * heads, length)
    key_rank = torch.empty_like(key_by_rank).scatter_(-1, key_by_rank, positions)
    if keep_window >= length:
        threshold = torch.full_like(key_rank, KEEP_ALL)
        return _as_output(key_rank, batch, heads), _as_output(threshold, batch, heads)

    chunk = min(chunk_size, length)
    num_chunks = triton.cdiv(length, chunk)
    padded = num_chunks * chunk
    absent = padded + chunk + 1  # larger than any rank: an absent candidate
    candidates_per_chunk = 2 * chunk + 1
    per_row = num_chunks * (length + candidates_per_chunk * chunk)
    rows_per_slice = max(1, max_elements // per_row)
    thresholds = []
    chunk_index = torch.arange(num_chunks, device=device)
    offsets = torch.arange(chunk, device=device)
    # Count targets w - u for u = 0..chunk: the pre-chunk (w-u)-th smallest rank is a candidate.
    targets = keep_window - torch.arange(chunk + 1, device=device)
    for start in range(0, batch * heads, rows_per_slice):
        rank_slice = key_rank[start:start + rows_per_slice]
        n = rank_slice.shape[0]
        chunk_of_rank = key_by_rank[start:start + rows_per_slice] // chunk  # (n, l)
        # table[r, c, rank] = number of keys before chunk c whose rank is <= rank.
        table = (chunk_of_rank[:, None, :] < chunk_index[None, :, None]).cumsum(-1, dtype=torch.int32)
        # Candidates of kind A: the (w-u)-th smallest rank before the chunk (first rank where T hits w-u).
        found = torch.searchsorted(table.reshape(n * num_chunks, length),
                                   targets.to(torch.int32).expand(n * num_chunks, chunk + 1).contiguous())
        found = found.reshape(n, num_chunks, chunk + 1)
        a_present = (targets >= 1) & (found < length)
        a_value = torch.where(a_present, found, absent)
        a_base = targets.expand_as(found)
        # Candidates of kind N: the chunk's own ranks (padding keys get `absent`).
        padded_rank = torch.full((n, padded), absent, device=device, dtype=key_rank.dtype)
        padded_rank[:, :length] = rank_slice
        chunk_rank = padded_rank.reshape(n, num_chunks, chunk)
        n_base = table.gather(-1, chunk_rank.clamp(max=length - 1)).to(a_base.dtype)
        value = torch.cat([a_value, chunk_rank], dim=-1)  # (n, chunks, K)
        base = torch.cat([a_base, n_base], dim=-1)
        # in_chunk[t, k] = #{s <= t in this chunk : rank_s <= value_k}
        below = chunk_rank[:, :, :, None] <= value[:, :, None, :]  # (n, chunks, chunk(s), K)
        in_chunk = below.cumsum(2, dtype=torch.int16)
        count = base[:, :, None, :] + in_chunk  # (n, chunks, t, K)
        # An N candidate s exists for query offset t only when s <= t.
        exists = torch.cat([a_present[:, :, None, :].expand(n, num_chunks, chunk, chunk + 1),
                            (offsets[None, :] <= offsets[:, None])[None, None].expand(n, num_chunks, chunk, chunk)],
                           dim=-1)
        eligible = exists & (count >= keep_window) & (value[:, :, None, :] < absent)
        best = torch.where(eligible, value[:, :, None, :], absent).amin(-1)  # (n, chunks, t)
        best = torch.where(best >= absent, KEEP_ALL, best)
        thresholds.append(best.reshape(n, padded)[:, :length])
    threshold = torch.cat(thresholds, dim=0)
    return _as_output(key_rank, batch, heads), _as_output(threshold, batch, heads)


def _as_output(values, batch, heads):
    return values.to(torch.int32).reshape(batch, heads, -1).contiguous()


# ----------------------------------------------------------------------------------------------
# Forward kernel.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _block_is_visited(rank_ptrs, segment_ptrs, col_valid, max_threshold, min_segment, max_segment,
                      HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """True when some (query, key) pair of the two blocks may be kept (a cheap, conservative test)."""
    visit = True
    if HAS_WINDOW:
        rank = tl.load(rank_ptrs, mask=col_valid, other=KEEP_ALL_IN_KERNEL)
        visit = visit & (tl.min(rank, 0) <= max_threshold)
    if HAS_SEGMENTS:
        segment = tl.load(segment_ptrs, mask=col_valid, other=0)
        low = tl.min(tl.where(col_valid, segment, 2147483647), 0)
        high = tl.max(tl.where(col_valid, segment, -2147483647), 0)
        visit = visit & (low <= max_segment) & (high >= min_segment)
    return visit


@triton.jit
def _forward_block(acc, row_max, row_sum, q, rows, row_threshold, row_segment, cols, col_valid,
                   key_base, value_base, key_stride, value_stride, bias_base, rank_base, segment_base,
                   scale_log2,
                   HEAD_DIM: tl.constexpr, CAUSAL_BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    key_t = tl.load(key_base + cols[None, :] * key_stride + dims[:, None], mask=col_valid[None, :], other=0.0)
    bias = tl.load(bias_base + cols, mask=col_valid, other=0.0).to(tl.float32) * LOG2E_IN_KERNEL
    scores = tl.dot(q, key_t, input_precision=DOT_PRECISION) * scale_log2 + bias[None, :]
    if CAUSAL_BLOCK:
        scores = tl.where((rows[:, None] >= cols[None, :]) & col_valid[None, :], scores, float("-inf"))
    if HAS_WINDOW:
        rank = tl.load(rank_base + cols, mask=col_valid, other=KEEP_ALL_IN_KERNEL)
        scores = tl.where(rank[None, :] <= row_threshold[:, None], scores, float("-inf"))
    if HAS_SEGMENTS:
        segment = tl.load(segment_base + cols, mask=col_valid, other=-1)
        scores = tl.where(segment[None, :] == row_segment[:, None], scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    shift = new_max
    if HAS_WINDOW or HAS_SEGMENTS:
        # A row that has kept nothing so far has max -inf; shift by 0 instead of producing NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    probs = tl.math.exp2(scores - shift[:, None])
    correction = tl.math.exp2(row_max - shift)
    row_sum = row_sum * correction + tl.sum(probs, 1)
    value = tl.load(value_base + cols[:, None] * value_stride + dims[None, :], mask=col_valid[:, None], other=0.0)
    acc = acc * correction[:, None] + tl.dot(probs.to(value.dtype), value, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _forward_range(acc, row_max, row_sum, q, rows, row_threshold, row_segment, max_threshold,
                   min_segment, max_segment, key_base, value_base, key_stride, value_stride, bias_base,
                   rank_base, segment_base, start, end, seq_len, scale_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_BLOCK: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_valid = cols < seq_len
        if HAS_WINDOW or HAS_SEGMENTS:
            if _block_is_visited(rank_base + cols, segment_base + cols, col_valid, max_threshold,
                                 min_segment, max_segment, HAS_WINDOW, HAS_SEGMENTS):
                acc, row_max, row_sum = _forward_block(
                    acc, row_max, row_sum, q, rows, row_threshold, row_segment, cols, col_valid,
                    key_base, value_base, key_stride, value_stride, bias_base, rank_base, segment_base,
                    scale_log2, HEAD_DIM, CAUSAL_BLOCK, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
        else:
            acc, row_max, row_sum = _forward_block(
                acc, row_max, row_sum, q, rows, row_threshold, row_segment, cols, col_valid,
                key_base, value_base, key_stride, value_stride, bias_base, rank_base, segment_base,
                scale_log2, HEAD_DIM, CAUSAL_BLOCK, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
    return acc, row_max, row_sum


@triton.jit
def _forward_kernel(query, key, value, mask_bias, key_rank, query_threshold, segment_ids, out, log_sum_exp,
                    q_stride_b, q_stride_h, q_stride_l, k_stride_b, k_stride_h, k_stride_l,
                    v_stride_b, v_stride_h, v_stride_l, o_stride_b, o_stride_h, o_stride_l,
                    num_heads, group_size, seq_len, scale_log2,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(l, BLOCK_M), b·h): one query block of one head; writes out and base-2 lse (b, h, l)."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // group_size
    start_m = block_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    row_valid = rows < seq_len
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(query + batch * q_stride_b + head * q_stride_h + rows[:, None] * q_stride_l + dims[None, :],
                mask=row_valid[:, None], other=0.0)
    key_base = key + batch * k_stride_b + kv_head * k_stride_h
    value_base = value + batch * v_stride_b + kv_head * v_stride_h
    bias_base = mask_bias + batch_head * seq_len
    rank_base = key_rank + batch_head * seq_len
    segment_base = segment_ids + batch * seq_len
    row_threshold = tl.zeros([BLOCK_M], dtype=tl.int32)
    max_threshold = 0
    row_segment = tl.zeros([BLOCK_M], dtype=tl.int32)
    min_segment = 0
    max_segment = 0
    if HAS_WINDOW:
        row_threshold = tl.load(query_threshold + batch_head * seq_len + rows, mask=row_valid, other=-1)
        max_threshold = tl.max(row_threshold, 0)
    if HAS_SEGMENTS:
        row_segment = tl.load(segment_base + rows, mask=row_valid, other=-1)
        min_segment = tl.min(tl.where(row_valid, row_segment, 2147483647), 0)
        max_segment = tl.max(tl.where(row_valid, row_segment, -2147483647), 0)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Key blocks wholly below the diagonal need no causal mask; then the diagonal block(s).
    acc, row_max, row_sum = _forward_range(
        acc, row_max, row_sum, q, rows, row_threshold, row_segment, max_threshold, min_segment, max_segment,
        key_base, value_base, k_stride_l, v_stride_l, bias_base, rank_base, segment_base,
        0, start_m, seq_len, scale_log2, HEAD_DIM, BLOCK_N, False, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
    acc, row_max, row_sum = _forward_range(
        acc, row_max, row_sum, q, rows, row_threshold, row_segment, max_threshold, min_segment, max_segment,
        key_base, value_base, k_stride_l, v_stride_l, bias_base, rank_base, segment_base,
        start_m, tl.minimum(start_m + BLOCK_M, seq_len), seq_len, scale_log2,
        HEAD_DIM, BLOCK_N, True, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)

    empty = row_sum == 0.0
    result = acc / tl.where(empty, 1.0, row_sum)[:, None]
    # +inf for an empty row makes every backward probability exp2(s - inf) = 0.
    lse = tl.where(empty, float("inf"), row_max + tl.math.log2(tl.where(empty, 1.0, row_sum)))
    tl.store(out + batch * o_stride_b + head * o_stride_h + rows[:, None] * o_stride_l + dims[None, :],
             result.to(out.dtype.element_ty), mask=row_valid[:, None])
    tl.store(log_sum_exp + batch_head * seq_len + rows, lse, mask=row_valid)


# ----------------------------------------------------------------------------------------------
# Backward kernels: delta = rowsum(dO ∘ O); dK, dV and d(mask_bias) per key block; dQ per query block.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(out, grad_out, delta, o_stride_b, o_stride_h, o_stride_l, g_stride_b, g_stride_h, g_stride_l,
                  num_heads, seq_len, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < seq_len
    dims = tl.arange(0, HEAD_DIM)
    o = tl.load(out + batch * o_stride_b + head * o_stride_h + rows[:, None] * o_stride_l + dims[None, :],
                mask=row_valid[:, None], other=0.0).to(tl.float32)
    g = tl.load(grad_out + batch * g_stride_b + head * g_stride_h + rows[:, None] * g_stride_l + dims[None, :],
                mask=row_valid[:, None], other=0.0).to(tl.float32)
    tl.store(delta + batch_head * seq_len + rows, tl.sum(o * g, 1), mask=row_valid)


@triton.jit
def _key_grad_block(grad_key, grad_value, grad_bias, key, value, bias_log2, rank, cols,
                    query_base, grad_out_base, q_stride, g_stride, lse_base, delta_base, threshold_base,
                    row_segment_base, col_segment, start_m, seq_len, scale_log2,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL_BLOCK: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query block against the program's key block, in transposed form (keys on rows)."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_valid = rows < seq_len
    dims = tl.arange(0, HEAD_DIM)
    query_t = tl.load(query_base + rows[None, :] * q_stride + dims[:, None], mask=row_valid[None, :], other=0.0)
    # Rows past the end get lse = +inf, hence probability 0 and no contribution.
    lse = tl.load(lse_base + rows, mask=row_valid, other=float("inf"))
    scores_t = tl.dot(key, query_t, input_precision=DOT_PRECISION) * scale_log2 + bias_log2[:, None]
    probs_t = tl.math.exp2(scores_t - lse[None, :])
    if CAUSAL_BLOCK:
        probs_t = tl.where(rows[None, :] >= cols[:, None], probs_t, 0.0)
    if HAS_WINDOW:
        threshold = tl.load(threshold_base + rows, mask=row_valid, other=-1)
        probs_t = tl.where(rank[:, None] <= threshold[None, :], probs_t, 0.0)
    if HAS_SEGMENTS:
        row_segment = tl.load(row_segment_base + rows, mask=row_valid, other=-1)
        probs_t = tl.where(col_segment[:, None] == row_segment[None, :], probs_t, 0.0)
    grad_out = tl.load(grad_out_base + rows[:, None] * g_stride + dims[None, :], mask=row_valid[:, None], other=0.0)
    grad_value += tl.dot(probs_t.to(grad_out.dtype), grad_out, input_precision=DOT_PRECISION)
    delta = tl.load(delta_base + rows, mask=row_valid, other=0.0)
    grad_probs_t = tl.dot(value, tl.trans(grad_out), input_precision=DOT_PRECISION)
    grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
    grad_key += tl.dot(grad_scores_t.to(query_t.dtype), tl.trans(query_t), input_precision=DOT_PRECISION)
    grad_bias += tl.sum(grad_scores_t, 1)
    return grad_key, grad_value, grad_bias


@triton.jit
def _key_grad_range(grad_key, grad_value, grad_bias, key, value, bias_log2, rank, min_rank, cols,
                    col_segment, min_col_segment, max_col_segment,
                    query_base, grad_out_base, q_stride, g_stride, lse_base, delta_base, threshold_base,
                    row_segment_base, start, end, seq_len, scale_log2,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL_BLOCK: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_m in range(start, end, BLOCK_M):
        if HAS_WINDOW or HAS_SEGMENTS:
            rows = start_m + tl.arange(0, BLOCK_M)
            row_valid = rows < seq_len
            # Roles swap: the query block's thresholds / ids play the part of the key block's.
            visit = True
            if HAS_WINDOW:
                threshold = tl.load(threshold_base + rows, mask=row_valid, other=-1)
                visit = visit & (min_rank <= tl.max(threshold, 0))
            if HAS_SEGMENTS:
                row_segment = tl.load(row_segment_base + rows, mask=row_valid, other=0)
                low = tl.min(tl.where(row_valid, row_segment, 2147483647), 0)
                high = tl.max(tl.where(row_valid, row_segment, -2147483647), 0)
                visit = visit & (low <= max_col_segment) & (high >= min_col_segment)
            if visit:
                grad_key, grad_value, grad_bias = _key_grad_block(
                    grad_key, grad_value, grad_bias, key, value, bias_log2, rank, cols,
                    query_base, grad_out_base, q_stride, g_stride, lse_base, delta_base, threshold_base,
                    row_segment_base, col_segment, start_m, seq_len, scale_log2,
                    HEAD_DIM, BLOCK_M, CAUSAL_BLOCK, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
        else:
            grad_key, grad_value, grad_bias = _key_grad_block(
                grad_key, grad_value, grad_bias, key, value, bias_log2, rank, cols,
                query_base, grad_out_base, q_stride, g_stride, lse_base, delta_base, threshold_base,
                row_segment_base, col_segment, start_m, seq_len, scale_log2,
                HEAD_DIM, BLOCK_M, CAUSAL_BLOCK, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
    return grad_key, grad_value, grad_bias


@triton.jit
def _key_grad_kernel(query, key, value, mask_bias, key_rank, query_threshold, segment_ids, grad_out,
                     log_sum_exp, delta, grad_key_out, grad_value_out, grad_bias_out,
                     q_stride_b, q_stride_h, q_stride_l, k_stride_b, k_stride_h, k_stride_l,
                     v_stride_b, v_stride_h, v_stride_l, g_stride_b, g_stride_h, g_stride_l,
                     num_heads, num_kv_heads, group_size, seq_len, scale_log2, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(l, BLOCK_N), b·h_kv): one key block of one key/value head, summed over its query
    heads (so GQA needs no atomics); also writes d(mask_bias) of those query heads (fp32, (b, h, l))."""
    block_n = tl.program_id(0)
    batch_kv_head = tl.program_id(1).to(tl.int64)
    batch = batch_kv_head // num_kv_heads
    kv_head = batch_kv_head % num_kv_heads
    start_n = block_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    col_valid = cols < seq_len
    dims = tl.arange(0, HEAD_DIM)
    key_tile = tl.load(key + batch * k_stride_b + kv_head * k_stride_h + cols[:, None] * k_stride_l + dims[None, :],
                       mask=col_valid[:, None], other=0.0)
    value_tile = tl.load(value + batch * v_stride_b + kv_head * v_stride_h + cols[:, None] * v_stride_l + dims[None, :],
                         mask=col_valid[:, None], other=0.0)
    row_segment_base = segment_ids + batch * seq_len
    col_segment = tl.zeros([BLOCK_N], dtype=tl.int32)
    min_col_segment = 0
    max_col_segment = 0
    if HAS_SEGMENTS:
        col_segment = tl.load(row_segment_base + cols, mask=col_valid, other=-1)
        min_col_segment = tl.min(tl.where(col_valid, col_segment, 2147483647), 0)
        max_col_segment = tl.max(tl.where(col_valid, col_segment, -2147483647), 0)
    grad_key = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    grad_value = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for group_index in range(group_size):
        head = kv_head * group_size + group_index
        batch_head = batch * num_heads + head
        bias_log2 = tl.load(mask_bias + batch_head * seq_len + cols, mask=col_valid, other=0.0).to(tl.float32) * LOG2E_IN_KERNEL
        rank = tl.zeros([BLOCK_N], dtype=tl.int32)
        min_rank = 0
        if HAS_WINDOW:
            rank = tl.load(key_rank + batch_head * seq_len + cols, mask=col_valid, other=KEEP_ALL_IN_KERNEL)
            min_rank = tl.min(rank, 0)
        query_base = query + batch * q_stride_b + head * q_stride_h
        grad_out_base = grad_out + batch * g_stride_b + head * g_stride_h
        lse_base = log_sum_exp + batch_head * seq_len
        delta_base = delta + batch_head * seq_len
        threshold_base = query_threshold + batch_head * seq_len
        grad_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        # Query blocks on the diagonal need the causal mask; those wholly below it do not.
        grad_key, grad_value, grad_bias = _key_grad_range(
            grad_key, grad_value, grad_bias, key_tile, value_tile, bias_log2, rank, min_rank, cols,
            col_segment, min_col_segment, max_col_segment, query_base, grad_out_base, q_stride_l, g_stride_l,
            lse_base, delta_base, threshold_base, row_segment_base,
            start_n, tl.minimum(start_n + BLOCK_N, seq_len), seq_len, scale_log2,
            HEAD_DIM, BLOCK_M, True, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
        grad_key, grad_value, grad_bias = _key_grad_range(
            grad_key, grad_value, grad_bias, key_tile, value_tile, bias_log2, rank, min_rank, cols,
            col_segment, min_col_segment, max_col_segment, query_base, grad_out_base, q_stride_l, g_stride_l,
            lse_base, delta_base, threshold_base, row_segment_base,
            start_n + BLOCK_N, seq_len, seq_len, scale_log2,
            HEAD_DIM, BLOCK_M, False, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
        tl.store(grad_bias_out + batch_head * seq_len + cols, grad_bias, mask=col_valid)
    out_offsets = batch_kv_head * seq_len * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    tl.store(grad_key_out + out_offsets, (grad_key * scale).to(grad_key_out.dtype.element_ty), mask=col_valid[:, None])
    tl.store(grad_value_out + out_offsets, grad_value.to(grad_value_out.dtype.element_ty), mask=col_valid[:, None])


@triton.jit
def _query_grad_block(grad_query, q, grad_out, lse, delta, rows, row_threshold, row_segment, cols, col_valid,
                      key_base, value_base, key_stride, value_stride, bias_base, rank_base, segment_base,
                      scale_log2,
                      HEAD_DIM: tl.constexpr, CAUSAL_BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    key_t = tl.load(key_base + cols[None, :] * key_stride + dims[:, None], mask=col_valid[None, :], other=0.0)
    value_t = tl.load(value_base + cols[None, :] * value_stride + dims[:, None], mask=col_valid[None, :], other=0.0)
    bias = tl.load(bias_base + cols, mask=col_valid, other=0.0).to(tl.float32) * LOG2E_IN_KERNEL
    scores = tl.dot(q, key_t, input_precision=DOT_PRECISION) * scale_log2 + bias[None, :]
    probs = tl.math.exp2(scores - lse[:, None])
    if CAUSAL_BLOCK:
        probs = tl.where((rows[:, None] >= cols[None, :]) & col_valid[None, :], probs, 0.0)
    if HAS_WINDOW:
        rank = tl.load(rank_base + cols, mask=col_valid, other=KEEP_ALL_IN_KERNEL)
        probs = tl.where(rank[None, :] <= row_threshold[:, None], probs, 0.0)
    if HAS_SEGMENTS:
        segment = tl.load(segment_base + cols, mask=col_valid, other=-1)
        probs = tl.where(segment[None, :] == row_segment[:, None], probs, 0.0)
    grad_probs = tl.dot(grad_out, value_t, input_precision=DOT_PRECISION)
    grad_scores = probs * (grad_probs - delta[:, None])
    grad_query += tl.dot(grad_scores.to(key_t.dtype), tl.trans(key_t), input_precision=DOT_PRECISION)
    return grad_query


@triton.jit
def _query_grad_range(grad_query, q, grad_out, lse, delta, rows, row_threshold, row_segment, max_threshold,
                      min_segment, max_segment, key_base, value_base, key_stride, value_stride, bias_base,
                      rank_base, segment_base, start, end, seq_len, scale_log2,
                      HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_BLOCK: tl.constexpr,
                      HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_valid = cols < seq_len
        if HAS_WINDOW or HAS_SEGMENTS:
            if _block_is_visited(rank_base + cols, segment_base + cols, col_valid, max_threshold,
                                 min_segment, max_segment, HAS_WINDOW, HAS_SEGMENTS):
                grad_query = _query_grad_block(
                    grad_query, q, grad_out, lse, delta, rows, row_threshold, row_segment, cols, col_valid,
                    key_base, value_base, key_stride, value_stride, bias_base, rank_base, segment_base,
                    scale_log2, HEAD_DIM, CAUSAL_BLOCK, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
        else:
            grad_query = _query_grad_block(
                grad_query, q, grad_out, lse, delta, rows, row_threshold, row_segment, cols, col_valid,
                key_base, value_base, key_stride, value_stride, bias_base, rank_base, segment_base,
                scale_log2, HEAD_DIM, CAUSAL_BLOCK, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
    return grad_query


@triton.jit
def _query_grad_kernel(query, key, value, mask_bias, key_rank, query_threshold, segment_ids, grad_out,
                       log_sum_exp, delta, grad_query_out,
                       q_stride_b, q_stride_h, q_stride_l, k_stride_b, k_stride_h, k_stride_l,
                       v_stride_b, v_stride_h, v_stride_l, g_stride_b, g_stride_h, g_stride_l,
                       num_heads, group_size, seq_len, scale_log2, scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(l, BLOCK_M), b·h): dQ of one query block of one head (contiguous (b, h, l, d) output)."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    kv_head = head // group_size
    start_m = block_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    row_valid = rows < seq_len
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(query + batch * q_stride_b + head * q_stride_h + rows[:, None] * q_stride_l + dims[None, :],
                mask=row_valid[:, None], other=0.0)
    grad_out_tile = tl.load(grad_out + batch * g_stride_b + head * g_stride_h + rows[:, None] * g_stride_l
                            + dims[None, :], mask=row_valid[:, None], other=0.0)
    lse = tl.load(log_sum_exp + batch_head * seq_len + rows, mask=row_valid, other=float("inf"))
    delta_rows = tl.load(delta + batch_head * seq_len + rows, mask=row_valid, other=0.0)
    key_base = key + batch * k_stride_b + kv_head * k_stride_h
    value_base = value + batch * v_stride_b + kv_head * v_stride_h
    bias_base = mask_bias + batch_head * seq_len
    rank_base = key_rank + batch_head * seq_len
    segment_base = segment_ids + batch * seq_len
    row_threshold = tl.zeros([BLOCK_M], dtype=tl.int32)
    max_threshold = 0
    row_segment = tl.zeros([BLOCK_M], dtype=tl.int32)
    min_segment = 0
    max_segment = 0
    if HAS_WINDOW:
        row_threshold = tl.load(query_threshold + batch_head * seq_len + rows, mask=row_valid, other=-1)
        max_threshold = tl.max(row_threshold, 0)
    if HAS_SEGMENTS:
        row_segment = tl.load(segment_base + rows, mask=row_valid, other=-1)
        min_segment = tl.min(tl.where(row_valid, row_segment, 2147483647), 0)
        max_segment = tl.max(tl.where(row_valid, row_segment, -2147483647), 0)
    grad_query = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    grad_query = _query_grad_range(
        grad_query, q, grad_out_tile, lse, delta_rows, rows, row_threshold, row_segment, max_threshold,
        min_segment, max_segment, key_base, value_base, k_stride_l, v_stride_l, bias_base, rank_base,
        segment_base, 0, start_m, seq_len, scale_log2,
        HEAD_DIM, BLOCK_N, False, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
    grad_query = _query_grad_range(
        grad_query, q, grad_out_tile, lse, delta_rows, rows, row_threshold, row_segment, max_threshold,
        min_segment, max_segment, key_base, value_base, k_stride_l, v_stride_l, bias_base, rank_base,
        segment_base, start_m, tl.minimum(start_m + BLOCK_M, seq_len), seq_len, scale_log2,
        HEAD_DIM, BLOCK_N, True, HAS_WINDOW, HAS_SEGMENTS, DOT_PRECISION)
    out_offsets = batch_head * seq_len * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    tl.store(grad_query_out + out_offsets, (grad_query * scale).to(grad_query_out.dtype.element_ty),
             mask=row_valid[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers and the autograd function.
# ----------------------------------------------------------------------------------------------
def _configs(dtype: torch.dtype, device: torch.device):
    """(forward, key-gradient, query-gradient) tile configs for this dtype/device."""
    if device.type != "cuda":
        small = dict(SMALL_CONFIG)
        return small, {**small, "block_m": 16, "block_n": 32}, small
    if dtype == torch.float32:
        return ({"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2},
                {"block_m": 32, "block_n": 64, "num_warps": 4, "num_stages": 2},
                {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2})
    return FORWARD_CONFIG, BACKWARD_KEY_CONFIG, BACKWARD_QUERY_CONFIG


def _validate(q, k, v, mask_bias, keep_window, segment_ids):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"dmattn_fused: q, k, v must be 4-D (b, h, l, d); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    batch, heads, length, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2] != length or k.shape[3] != head_dim:
        raise ValueError(f"dmattn_fused: k and v must be (b, h_kv, l, d) = ({batch}, h_kv, {length}, {head_dim}); "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    if heads % k.shape[1]:
        raise ValueError(f"dmattn_fused: query heads {heads} not divisible by key/value heads {k.shape[1]}")
    if tuple(mask_bias.shape) != (batch, heads, length):
        raise ValueError(f"dmattn_fused: mask_bias must be (b, h, l) = {(batch, heads, length)}; "
                         f"got {tuple(mask_bias.shape)}")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"dmattn_fused: head dim must be a power of two in [16, 256]; got {head_dim}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dmattn_fused: q, k, v must share one of float16/bfloat16/float32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if keep_window is not None and (not isinstance(keep_window, int) or keep_window < 1):
        raise ValueError(f"dmattn_fused: keep_window must be a positive int or None; got {keep_window!r}")
    if segment_ids is not None and tuple(segment_ids.shape) != (batch, length):
        raise ValueError(f"dmattn_fused: segment_ids must be (b, l) = {(batch, length)}; got {tuple(segment_ids.shape)}")


def _rows_last_contiguous(tensor):
    """Kernels take any (b, h, l) strides but need the head dimension contiguous."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _forward(q, k, v, mask_bias, key_rank, query_threshold, segment_ids, has_window, has_segments):
    batch, heads, length, head_dim = q.shape
    config, _, _ = _configs(q.dtype, q.device)
    out = torch.empty((batch, heads, length, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(length, config["block_m"]), batch * heads)
    _forward_kernel[grid](
        q, k, v, mask_bias, key_rank, query_threshold, segment_ids, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, heads // k.shape[1], length, LOG2E / math.sqrt(head_dim),
        HEAD_DIM=head_dim, BLOCK_M=config["block_m"], BLOCK_N=config["block_n"],
        HAS_WINDOW=has_window, HAS_SEGMENTS=has_segments,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out, lse


def _backward(grad_out, q, k, v, mask_bias, out, lse, key_rank, query_threshold, segment_ids,
              has_window, has_segments):
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    _, key_config, query_config = _configs(q.dtype, q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    scale = 1.0 / math.sqrt(head_dim)
    delta = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(length, 64), batch * heads)](
        out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), heads, length,
        HEAD_DIM=head_dim, BLOCK_M=64)
    grad_key = torch.empty((batch, kv_heads, length, head_dim), dtype=k.dtype, device=q.device)
    grad_value = torch.empty_like(grad_key, dtype=v.dtype)
    grad_bias = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    _key_grad_kernel[(triton.cdiv(length, key_config["block_n"]), batch * kv_heads)](
        q, k, v, mask_bias, key_rank, query_threshold, segment_ids, grad_out, lse, delta,
        grad_key, grad_value, grad_bias, *common,
        heads, kv_heads, heads // kv_heads, length, scale * LOG2E, scale,
        HEAD_DIM=head_dim, BLOCK_M=key_config["block_m"], BLOCK_N=key_config["block_n"],
        HAS_WINDOW=has_window, HAS_SEGMENTS=has_segments, DOT_PRECISION=precision,
        num_warps=key_config["num_warps"], num_stages=key_config["num_stages"])
    grad_query = torch.empty((batch, heads, length, head_dim), dtype=q.dtype, device=q.device)
    _query_grad_kernel[(triton.cdiv(length, query_config["block_m"]), batch * heads)](
        q, k, v, mask_bias, key_rank, query_threshold, segment_ids, grad_out, lse, delta, grad_query, *common,
        heads, heads // kv_heads, length, scale * LOG2E, scale,
        HEAD_DIM=head_dim, BLOCK_M=query_config["block_m"], BLOCK_N=query_config["block_n"],
        HAS_WINDOW=has_window, HAS_SEGMENTS=has_segments, DOT_PRECISION=precision,
        num_warps=query_config["num_warps"], num_stages=query_config["num_stages"])
    return grad_query, grad_key, grad_value, grad_bias


class _DynamicMaskAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_bias, keep_window, segment_ids):
        length = q.shape[2]
        q, k, v = (_rows_last_contiguous(t) for t in (q, k, v))
        mask_bias = mask_bias.contiguous()
        placeholder = torch.zeros(1, dtype=torch.int32, device=q.device)
        has_window = keep_window is not None and keep_window < length
        if has_window:
            key_rank, query_threshold = keep_window_thresholds(mask_bias, keep_window)
        else:
            key_rank = query_threshold = placeholder
        has_segments = segment_ids is not None
        segments = segment_ids.to(torch.int32).contiguous() if has_segments else placeholder
        out, lse = _forward(q, k, v, mask_bias, key_rank, query_threshold, segments, has_window, has_segments)
        ctx.save_for_backward(q, k, v, mask_bias, out, lse, key_rank, query_threshold, segments)
        ctx.flags = (has_window, has_segments)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask_bias, out, lse, key_rank, query_threshold, segments = ctx.saved_tensors
        grad_out = _rows_last_contiguous(grad_out)
        grad_query, grad_key, grad_value, grad_bias = _backward(
            grad_out, q, k, v, mask_bias, out, lse, key_rank, query_threshold, segments, *ctx.flags)
        return grad_query, grad_key, grad_value, grad_bias.to(mask_bias.dtype), None, None


def dmattn_fused(q, k, v, mask_bias, keep_window=None, segment_ids=None):
    """Fused DMAttn; same arguments, shapes and semantics as `cheems_parallel.ops.dmattn.dmattn_ref`.

    q (b, h, l, d); k, v (b, h_kv, l, d); mask_bias (b, h, l); keep_window: int >= 1 or None;
    segment_ids (b, l) integer document ids or None. Returns (b, h, l, d) in q's dtype, differentiable
    with respect to q, k, v and mask_bias.
    """
    _validate(q, k, v, mask_bias, keep_window, segment_ids)
    return _DynamicMaskAttention.apply(q, k, v, mask_bias, keep_window, segment_ids)
