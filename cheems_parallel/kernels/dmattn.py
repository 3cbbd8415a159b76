"""Fused dynamic-mask attention (DMAttn, spec §3): Triton forward and backward, FlashAttention-2 style.

Shapes: q (b, h, l, d); k, v (b, h_kv, l, d) with h % h_kv == 0 (GQA: query head `head` reads
key/value head `head // (h // h_kv)`); mask_bias (b, h, l): the additive per-key mask value m_{h,j},
differentiable; segment_ids (b, l) optional document ids. Returns (b, h, l, d) in q's dtype.

Scores s_ij = q_i·k_j / sqrt(d) + m_j for allowed keys, -inf otherwise; allowed = causal (j <= i),
same document, and with `keep_window` w: among the top-w keys of query i's prefix by m (ties to the
nearest key). The reference is `cheems_parallel.ops.dmattn.dmattn_ref`; this file must agree with it.

Two schedules. Without keep-window or documents ("dense"), each program walks the causal triangle: the
blocks wholly below the diagonal without masks, then the diagonal block(s) with the causal mask. With
either ("sparse"), a pre-pass lists, per (b, h, row block), the column blocks that can hold a kept pair
(as FlexAttention's block mask does); the kernels walk only those, masking every tile.

How the keep-window is fused. The pre-pass (`keep_window_thresholds`) ranks every key of a (b, h) by
(m desc, position desc), the reference's tie rule. Restricted to a prefix the order is the same, so query
i keeps key j <= i iff rank_j <= threshold_i, with threshold_i the w-th smallest rank among keys 0..i
(KEEP_ALL while the prefix holds at most w keys): one integer compare per score. A key block is listed
for a query block iff its smallest rank is <= the block's largest threshold; structured masks (high
values in runs) leave most blocks out. Document masking lists a block pair iff their id ranges overlap.

With documents, the keep-window ranks only the query's own document prefix (as the reference does);
the fused form needs each document to be one contiguous run of positions (checked).

Forward on Hopper: the dense path (no keep-window, no documents; bf16/fp16, head dim 64/128) runs the Gluon
kernel of dmattn_gluon.py (FA3-style warp specialisation: a TMA producer warp, two wgmma consumer warp
groups) when FORWARD_GLUON is set (the default); it writes the same out and lse, so the backward below is
shared. The sparse path has its own Gluon kernels (GLUON_SPARSE, GLUON_SPARSE_BACKWARD). Elsewhere (CPU, the\ninterpreter, fp32, other GPUs) the Triton kernels of this file run.

Backward on Hopper: the same dense path runs the Gluon kernel of dmattn_gluon_bwd.py when BACKWARD_GLUON is set
(the default; FA3-style, dK/dV/d(bias) per 128-key block, dQ added into an fp32 buffer by TMA reduce-add, then
scaled and cast as below). Elsewhere:

Backward: a small kernel computes delta = rowsum(dO ∘ O); by default one kernel per key block (and
key/value head, looping over its query heads) then computes dK, dV and d(mask_bias) in registers and adds
each tile pair's dQ share into an fp32 buffer (TMA reduce-add on the GPU, relaxed atomics elsewhere), and a
last kernel scales and casts dQ: 5 matmuls per tile pair. FUSED_BACKWARD = False instead runs a dK/dV
kernel and a dQ kernel (7 matmuls, deterministic). Sparse programs whose block list is long run the dense
causal loop with the masks instead (LISTED_LOOP_MAX_FRACTION).

Numerics: softmax in fp32 in base 2 (scores pre-multiplied by log2 e); the forward saves the base-2
log-sum-exp per row for the backward, as in FlashAttention-2. A row with no allowed key (which the
reference's rules no longer produce) would yield 0 and zero gradients rather than NaN.

On a machine without CUDA, set TRITON_INTERPRET=1 before this module is imported (the decorator reads
it); the interpreter computes bf16 wrongly, so test it with float32 inputs.
"""
import importlib
import logging
import math
import os

import torch
import triton
import triton.language as tl

from cheems_parallel.kernels.device import is_hopper

LOG2E = 1.4426950408889634
# Threshold meaning "keep every key of the prefix", and the rank of a padding key; ranks are < l.
KEEP_ALL = 2**31 - 1
# Kernels may read module globals only as constexpr.
LOG2E_IN_KERNEL = tl.constexpr(LOG2E)
KEEP_ALL_IN_KERNEL = tl.constexpr(KEEP_ALL)

# Tile shapes per kernel for bf16/fp16 with d = 128 on Hopper (measured: bench/dmattn_notes.md);
# bench/dmattn.py --tune sweeps alternatives. block_m: queries, block_n: keys.
FORWARD_CONFIG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
BACKWARD_KEY_CONFIG = {"block_m": 32, "block_n": 128, "num_warps": 8, "num_stages": 3}
BACKWARD_QUERY_CONFIG = {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
# The fused backward: one kernel per key block computes dK, dV, d(bias) and adds dQ by atomics (5 matmuls
# per tile pair instead of the two-kernel schedule's 7). block_m: queries per step, block_n: keys.
FUSED_BACKWARD_CONFIG = {"block_m": 32, "block_n": 128, "num_warps": 8, "num_stages": 3}
# True: the fused backward (dQ summed by fp32 atomics, so not bitwise deterministic); False: dK/dV kernel
# then dQ kernel (BACKWARD_KEY_CONFIG, BACKWARD_QUERY_CONFIG), deterministic. The defaults below are the
# fastest of the H200 sweep at l = 4096 (bench/dmattn_notes.md, call 4): fused, 32 x 128 tiles, 3 stages,
# dQ share transposed and added by TMA reduce, pointer loads (TMA loads measured no faster).
FUSED_BACKWARD = True
# Sparse schedules: a program walks its block list only when it lists at most this fraction of its causal
# blocks; otherwise it runs the dense causal loop with the window/document masks (a listed tile costs
# ~2x a dense one: bench/dmattn_notes.md). 1.0: always the list; -1: never.
LISTED_LOOP_MAX_FRACTION = 0.5
# Load K/V in the forward (FORWARD_TMA), Q/dO in the key kernel and K/V in the query kernel (BACKWARD_TMA)
# through tensor descriptors (TMA on Hopper), where the layout allows it (_tma_allowed); False: pointers.
FORWARD_TMA = False
BACKWARD_TMA = False
# The fused backward adds each dQ tile with one TMA bulk reduce-add instead of per-element atomics (needs
# the same layout conditions and a GPU: Triton's CPU interpreter has no descriptor reduce, so CI runs the
# per-element atomics; the GPU tests cover this line).
DQ_TMA_REDUCE = True
# The fused backward computes its dQ share as (K^T dS^T)^T, so that the matmul's M is the key block rather
# than the few queries of a step (wgmma wants M >= 64 per warp group).
DQ_TRANSPOSED = True
# The dense forward (no keep-window, no documents) on Hopper by the Gluon kernel of dmattn_gluon.py (FA3-style:
# a TMA producer warp, wgmma consumer warp groups), for bf16/fp16 with head dim 64 or 128 and contiguous
# inputs; it writes the same out and base-2 lse, so the backward is unchanged. Anything else (CPU, the
# interpreter, sparse masks, fp32, other head dims, Gluon missing) runs the Triton forward.
# GLUON_FORWARD_CONFIG overrides dmattn_gluon.CONFIGS[head_dim] (bench/dmattn.py --tune sweeps it).
# (d 128 runs a persistent grid up to l = 2048: dmattn_gluon.CONFIGS' persistent_max_length.)
# On by default since session 5: on the H200 (Triton 3.6) it passed the GPU tests and ran the forward 1.2-1.4x
# faster than the Triton kernel (0.74x cuDNN causal at l = 1k, 0.86-1.0x at 4k-16k; bench/dmattn_notes.md).
FORWARD_GLUON = True
GLUON_FORWARD_CONFIG = {}
# The dense backward on Hopper by the Gluon kernel of dmattn_gluon_bwd.py (FA3-style: a TMA producer warp, two
# wgmma consumer warp groups of 64 keys holding dK/dV, dQ by TMA reduce-add into the fused backward's fp32 buffer),
# under the same conditions as FORWARD_GLUON (dense, CUDA, bf16/fp16, d 64/128, contiguous); MHA and GQA. Anything
# else runs the Triton backward. GLUON_BACKWARD_CONFIG overrides dmattn_gluon_bwd.CONFIGS[head_dim].
# On by default since session 5 (backward): on the H200 (Triton 3.6) it passed the GPU tests and ran fwd+bwd
# 1.18-1.28x faster than with the Triton backward (0.88x cuDNN causal at l = 1k, 0.93-0.97x at 4k-16k;
# bench/dmattn_notes.md).
BACKWARD_GLUON = True
GLUON_BACKWARD_CONFIG = {}
# float32 tiles take twice the shared memory and registers.
FLOAT32_CONFIGS = ({"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2},
                   {"block_m": 32, "block_n": 64, "num_warps": 4, "num_stages": 2},
                   {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2},
                   {"block_m": 32, "block_n": 64, "num_warps": 4, "num_stages": 2})
# The CPU interpreter: small tiles, so tiny test shapes still span several blocks.
INTERPRETER_CONFIGS = ({"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 2},
                       {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 2},
                       {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 2},
                       {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 2})


# ----------------------------------------------------------------------------------------------
# Keep-window pre-pass: key ranks (torch sort) and per-query thresholds (two Triton kernels).
# ----------------------------------------------------------------------------------------------
# Queries per chunk of the threshold kernels (work per query ~ chunk, scan work ~ l / chunk per row) and how the
# chunk kernel counts (cumsum, or a product on the tensor cores). bench/dmattn_thresholds.py on the H200 (session 6):
# 64 with the product 1.72x / 1.54x / 1.08x faster than 128 with cumsum at l = 1k / 4k / 16k; 32 loses from 4k.
THRESHOLD_CHUNK = 64
THRESHOLD_COUNT_BY_DOT = True


@triton.jit
def _prefix_scan_kernel(key_by_rank, candidate_rank, candidate_count, seq_len, num_chunks, keep_window,
                        CHUNK: tl.constexpr, RANK_BLOCK: tl.constexpr):
    """Grid (num_chunks, b·h). Walks the row's keys in rank order, RANK_BLOCK at a time, counting the keys that
    lie before this chunk ("earlier keys"), and records:
      candidate_rank[u], u = 0..CHUNK: the rank of the (w-u)-th earlier key (left at KEEP_ALL when absent);
      candidate_count[t]: how many earlier keys rank at or below the chunk's own key t (left at -1 when the walk
      stops before reaching that key's rank: it then has at least min(w, #earlier keys) below it).
    It stops once min(w, #earlier keys) earlier keys are seen: no later rank can be a threshold of this chunk."""
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = chunk * CHUNK
    needed = tl.minimum(keep_window, start)
    table_row = row * num_chunks + chunk
    offsets = tl.arange(0, RANK_BLOCK)
    seen = 0
    rank_start = 0
    while seen < needed:
        ranks = rank_start + offsets
        inside = ranks < seq_len
        position = tl.load(key_by_rank + row * seq_len + ranks, mask=inside, other=0)
        earlier = inside & (position < start)
        count = seen + tl.cumsum(earlier.to(tl.int32), 0)  # earlier keys ranked at or below this rank
        slot = keep_window - count
        tl.store(candidate_rank + table_row * (CHUNK + 1) + slot, ranks,
                 mask=earlier & (slot >= 0) & (slot <= CHUNK))
        own = inside & (position >= start) & (position < start + CHUNK)
        tl.store(candidate_count + table_row * CHUNK + (position - start), count, mask=own)
        seen += tl.sum(earlier.to(tl.int32), 0)
        rank_start += RANK_BLOCK


@triton.jit
def _chunk_threshold_kernel(key_rank, candidate_rank, candidate_count, threshold, seq_len, num_chunks, keep_window,
                            CHUNK: tl.constexpr, COUNT_BY_DOT: tl.constexpr):
    """Grid (num_chunks, b·h). Query o of the chunk (offset o) keeps the w smallest ranks of its prefix; its
    threshold is the smallest candidate x (an earlier-key candidate of the scan, or an own key t <= o) whose
    count reaches w, count(x) = (earlier keys ranked <= x) + #{own keys t' <= o ranked <= x}: one cumsum over
    t' for all (o, x) at once: a cumsum over axis 0, or (COUNT_BY_DOT) a product with the lower-triangular ones
    matrix on the tensor cores (0/1 in fp16, sums <= CHUNK in fp32: exact)."""
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = chunk * CHUNK
    table_row = row * num_chunks + chunk
    offsets = tl.arange(0, CHUNK)
    inside = start + offsets < seq_len
    own_rank = tl.load(key_rank + row * seq_len + start + offsets, mask=inside, other=KEEP_ALL_IN_KERNEL)
    own_earlier = tl.load(candidate_count + table_row * CHUNK + offsets)
    own_earlier = tl.where(own_earlier < 0, tl.minimum(keep_window, start), own_earlier)
    prefix_rank = tl.load(candidate_rank + table_row * (CHUNK + 1) + 1 + offsets)  # u = 1..CHUNK
    prefix_earlier = keep_window - 1 - offsets
    best_earlier = tl.load(candidate_rank + table_row * (CHUNK + 1))  # u = 0: already w earlier keys
    if COUNT_BY_DOT:
        lower = (offsets[None, :] <= offsets[:, None]).to(tl.float16)  # [o, t']
        own_count = own_earlier[None, :] + tl.dot(
            lower, (own_rank[:, None] <= own_rank[None, :]).to(tl.float16), out_dtype=tl.float32).to(tl.int32)
        prefix_count = prefix_earlier[None, :] + tl.dot(
            lower, (own_rank[:, None] <= prefix_rank[None, :]).to(tl.float16), out_dtype=tl.float32).to(tl.int32)
    else:
        own_count = own_earlier[None, :] + tl.cumsum((own_rank[:, None] <= own_rank[None, :]).to(tl.int32), 0)
        prefix_count = prefix_earlier[None, :] + tl.cumsum((own_rank[:, None] <= prefix_rank[None, :]).to(tl.int32), 0)
    own_ok = ((own_count >= keep_window) & (offsets[None, :] <= offsets[:, None])
              & (own_rank[None, :] < KEEP_ALL_IN_KERNEL))
    prefix_ok = (prefix_count >= keep_window) & (prefix_rank[None, :] < KEEP_ALL_IN_KERNEL)
    best = tl.minimum(tl.min(tl.where(own_ok, own_rank[None, :], KEEP_ALL_IN_KERNEL), 1),
                      tl.min(tl.where(prefix_ok, prefix_rank[None, :], KEEP_ALL_IN_KERNEL), 1))
    best = tl.minimum(best, best_earlier)
    tl.store(threshold + row * seq_len + start + offsets, best, mask=inside)


def keep_window_thresholds(mask_bias: torch.Tensor, keep_window: int, segment_ids: torch.Tensor | None = None,
                           chunk_size: int | None = None, rank_block: int = 1024, count_by_dot: bool | None = None):
    """(b, h, l) mask -> (key_rank, query_threshold), both int32 (b, h, l).

    key_rank[j]: position of key j when the whole row is sorted by (m desc, j desc).
    query_threshold[i]: the w-th smallest rank among keys 0..i, or KEEP_ALL while i < w.
    Query i keeps key j iff j <= i and key_rank[j] <= query_threshold[i] (== the reference's rule).

    With documents (segment_ids (b, l), each document one contiguous run) the reference ranks only the
    query's own document prefix. Sorting later documents first (then m desc, j desc) gives that for free:
    the w-th smallest rank of prefix 0..i is then the w-th of i's document prefix when that holds w keys,
    and otherwise a rank of an earlier document, which keeps the whole document prefix; keys of earlier
    documents that the threshold admits are removed by the document mask.

    Method, per chunk of `chunk_size` queries: the w-th smallest rank of a query's prefix is one of the
    chunk's own ranks or the (w-u)-th smallest rank of the keys before the chunk, u <= chunk size.
    `_prefix_scan_kernel` finds those candidates and the own keys' starting counts by walking the ranks in
    order, `rank_block` at a time (it stops after w earlier keys: about w·l/start ranks for an unstructured mask),
    and `_chunk_threshold_kernel` finishes.
    """
    batch, heads, length = mask_bias.shape
    device = mask_bias.device
    rows = mask_bias.detach().reshape(batch * heads, length)
    # A stable descending sort of the reversed row puts the nearest key first among ties.
    flipped_order = torch.sort(rows.flip(-1), dim=-1, descending=True, stable=True).indices
    key_by_rank = (length - 1) - flipped_order
    if segment_ids is not None:
        changes = (segment_ids[:, 1:] != segment_ids[:, :-1]).to(torch.int64)
        document = torch.nn.functional.pad(changes.cumsum(-1), (1, 0))  # run index of every position
        document = document[:, None, :].expand(batch, heads, length).reshape(batch * heads, length)
        later_first = torch.sort(document.gather(-1, key_by_rank), dim=-1, descending=True, stable=True).indices
        key_by_rank = key_by_rank.gather(-1, later_first)
    positions = torch.arange(length, device=device, dtype=torch.int32).expand(batch * heads, length)
    key_rank = torch.empty(batch * heads, length, dtype=torch.int32, device=device).scatter_(-1, key_by_rank, positions)
    if keep_window >= length:
        threshold = torch.full_like(key_rank, KEEP_ALL)
        return key_rank.reshape(batch, heads, length), threshold.reshape(batch, heads, length)

    chunk_size = THRESHOLD_CHUNK if chunk_size is None else chunk_size
    count_by_dot = THRESHOLD_COUNT_BY_DOT if count_by_dot is None else count_by_dot
    chunk = min(triton.next_power_of_2(chunk_size), triton.next_power_of_2(length))
    num_chunks = triton.cdiv(length, chunk)
    candidate_rank = torch.full((batch * heads, num_chunks, chunk + 1), KEEP_ALL, dtype=torch.int32, device=device)
    candidate_count = torch.full((batch * heads, num_chunks, chunk), -1, dtype=torch.int32, device=device)
    threshold = torch.empty(batch * heads, length, dtype=torch.int32, device=device)
    _prefix_scan_kernel[(num_chunks, batch * heads)](
        key_by_rank.to(torch.int32), candidate_rank, candidate_count, length, num_chunks, keep_window,
        CHUNK=chunk, RANK_BLOCK=min(triton.next_power_of_2(rank_block), triton.next_power_of_2(length)), num_warps=4)
    _chunk_threshold_kernel[(num_chunks, batch * heads)](
        key_rank, candidate_rank, candidate_count, threshold, length, num_chunks, keep_window, CHUNK=chunk,
        COUNT_BY_DOT=count_by_dot and chunk >= 16, num_warps=8 if chunk >= 128 else 4)
    return key_rank.reshape(batch, heads, length), threshold.reshape(batch, heads, length)


@triton.jit
def _block_summary_kernel(key_rank, query_threshold, segment_ids, key_min_rank, query_max_threshold, key_segments,
                          query_segments, heads, seq_len, num_key_blocks, num_query_blocks,
                          KEY_BLOCK: tl.constexpr, QUERY_BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          HAS_SEGMENTS: tl.constexpr):
    """Grid (b·h, max(key blocks, query blocks)). Program i summarises key block i (smallest rank; lowest and
    highest document id) and query block i (largest threshold; lowest and highest document id)."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    far = KEEP_ALL_IN_KERNEL  # beyond any int32 document id
    if block < num_key_blocks:
        keys = block * KEY_BLOCK + tl.arange(0, KEY_BLOCK)
        inside = keys < seq_len
        if HAS_WINDOW:
            rank = tl.load(key_rank + row * seq_len + keys, mask=inside, other=KEEP_ALL_IN_KERNEL)
            tl.store(key_min_rank + row * num_key_blocks + block, tl.min(rank, 0))
        if HAS_SEGMENTS:
            ids = tl.load(segment_ids + (row // heads) * seq_len + keys, mask=inside, other=0)
            tl.store(key_segments + (row * num_key_blocks + block) * 2, tl.min(tl.where(inside, ids, far), 0))
            tl.store(key_segments + (row * num_key_blocks + block) * 2 + 1, tl.max(tl.where(inside, ids, -far), 0))
    if block < num_query_blocks:
        queries = block * QUERY_BLOCK + tl.arange(0, QUERY_BLOCK)
        inside = queries < seq_len
        if HAS_WINDOW:
            threshold = tl.load(query_threshold + row * seq_len + queries, mask=inside, other=-1)
            tl.store(query_max_threshold + row * num_query_blocks + block, tl.max(threshold, 0))
        if HAS_SEGMENTS:
            ids = tl.load(segment_ids + (row // heads) * seq_len + queries, mask=inside, other=0)
            tl.store(query_segments + (row * num_query_blocks + block) * 2, tl.min(tl.where(inside, ids, far), 0))
            tl.store(query_segments + (row * num_query_blocks + block) * 2 + 1,
                     tl.max(tl.where(inside, ids, -far), 0))


@triton.jit
def _block_list_kernel(key_min_rank, query_max_threshold, key_segments, query_segments, block_count, block_list,
                       seq_len, num_key_blocks, num_query_blocks, num_rows, num_cols,
                       KEY_BLOCK: tl.constexpr, QUERY_BLOCK: tl.constexpr, COLS: tl.constexpr, BY_QUERY: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """Grid (b·h, rows). One row of the schedule: which column blocks it visits (causal, keep-window and document
    tests on the block summaries), listed in ascending order, then the others in ascending order."""
    head = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    cols = tl.arange(0, COLS)
    if BY_QUERY:
        query, key, valid = row + 0 * cols, cols, cols < num_key_blocks
    else:
        query, key, valid = cols, row + 0 * cols, cols < num_query_blocks
    query_end = tl.minimum(query * QUERY_BLOCK + QUERY_BLOCK - 1, seq_len - 1)
    visit = valid & (key * KEY_BLOCK <= query_end)
    if HAS_WINDOW:
        smallest = tl.load(key_min_rank + head * num_key_blocks + key, mask=valid, other=KEEP_ALL_IN_KERNEL)
        largest = tl.load(query_max_threshold + head * num_query_blocks + query, mask=valid, other=-1)
        visit &= smallest <= largest
    if HAS_SEGMENTS:
        key_low = tl.load(key_segments + (head * num_key_blocks + key) * 2, mask=valid, other=0)
        key_high = tl.load(key_segments + (head * num_key_blocks + key) * 2 + 1, mask=valid, other=0)
        query_low = tl.load(query_segments + (head * num_query_blocks + query) * 2, mask=valid, other=0)
        query_high = tl.load(query_segments + (head * num_query_blocks + query) * 2 + 1, mask=valid, other=0)
        visit &= (key_low <= query_high) & (key_high >= query_low)
    visited = visit.to(tl.int32)
    count = tl.sum(visited, 0)
    skipped = (valid & ~visit).to(tl.int32)
    slot = tl.where(visit, tl.cumsum(visited, 0) - 1, count + tl.cumsum(skipped, 0) - 1)
    schedule = head * num_rows + row
    tl.store(block_list + schedule * num_cols + slot, cols, mask=valid)
    tl.store(block_count + schedule, count)


def block_schedule(key_rank, query_threshold, segment_ids, batch, heads, length, row_block, col_block, by_query):
    """The sparse schedule: which column blocks each (b·h, row block) must visit, ascending.

    by_query: rows are query blocks of `row_block` queries and columns key blocks of `col_block` keys
    (forward, dQ); otherwise rows are key blocks and columns query blocks (dK/dV). key_rank and
    query_threshold (b, h, l) or None; segment_ids (b, l) or None. Returns counts (b·h, rows) int32 and
    lists (b·h, rows, columns) int32 whose first counts[...] entries are the blocks to visit (then the others).
    Two launches (block summaries, then one list per row), the same result as `block_schedule_reference`.
    """
    device = (key_rank if key_rank is not None else segment_ids).device
    query_block, key_block = (row_block, col_block) if by_query else (col_block, row_block)
    num_query_blocks, num_key_blocks = triton.cdiv(length, query_block), triton.cdiv(length, key_block)
    num_rows, num_cols = (num_query_blocks, num_key_blocks) if by_query else (num_key_blocks, num_query_blocks)
    has_window, has_segments = key_rank is not None, segment_ids is not None
    placeholder = torch.zeros(1, dtype=torch.int32, device=device)
    key_min_rank = torch.empty(batch * heads, num_key_blocks, dtype=torch.int32, device=device)
    query_max_threshold = torch.empty(batch * heads, num_query_blocks, dtype=torch.int32, device=device)
    key_segments = torch.empty(batch * heads, num_key_blocks, 2, dtype=torch.int32, device=device)
    query_segments = torch.empty(batch * heads, num_query_blocks, 2, dtype=torch.int32, device=device)
    counts = torch.empty(batch * heads, num_rows, dtype=torch.int32, device=device)
    lists = torch.empty(batch * heads, num_rows, num_cols, dtype=torch.int32, device=device)
    key_rank = key_rank.contiguous() if has_window else placeholder
    query_threshold = query_threshold.contiguous() if has_window else placeholder
    segment_ids = segment_ids.to(torch.int32).contiguous() if has_segments else placeholder
    _block_summary_kernel[(batch * heads, max(num_key_blocks, num_query_blocks))](
        key_rank, query_threshold, segment_ids, key_min_rank, query_max_threshold, key_segments, query_segments,
        heads, length, num_key_blocks, num_query_blocks, KEY_BLOCK=key_block, QUERY_BLOCK=query_block,
        HAS_WINDOW=has_window, HAS_SEGMENTS=has_segments)
    _block_list_kernel[(batch * heads, num_rows)](
        key_min_rank, query_max_threshold, key_segments, query_segments, counts, lists, length, num_key_blocks,
        num_query_blocks, num_rows, num_cols, KEY_BLOCK=key_block, QUERY_BLOCK=query_block,
        COLS=max(16, triton.next_power_of_2(num_cols)), BY_QUERY=by_query, HAS_WINDOW=has_window,
        HAS_SEGMENTS=has_segments)
    return counts, lists


def block_schedule_reference(key_rank, query_threshold, segment_ids, batch, heads, length, row_block, col_block,
                             by_query):
    """`block_schedule` in plain torch (the reference its kernels are tested against)."""
    device = (key_rank if key_rank is not None else segment_ids).device
    query_block, key_block = (row_block, col_block) if by_query else (col_block, row_block)
    num_query_blocks, num_key_blocks = triton.cdiv(length, query_block), triton.cdiv(length, key_block)
    key_start = torch.arange(num_key_blocks, device=device) * key_block
    query_end = torch.clamp(torch.arange(num_query_blocks, device=device) * query_block + query_block - 1,
                            max=length - 1)
    visit = (key_start[None, :] <= query_end[:, None])[None, None]  # causal, (1, 1, q blocks, k blocks)

    def block_reduce(values, block, fill, reduce):
        blocks = triton.cdiv(length, block)
        padded = torch.nn.functional.pad(values, (0, blocks * block - length), value=fill)
        return reduce(padded.reshape(*values.shape[:-1], blocks, block), -1)

    if key_rank is not None:
        smallest_rank = block_reduce(key_rank.to(torch.int64), key_block, KEEP_ALL, torch.amin)
        largest_threshold = block_reduce(query_threshold.to(torch.int64), query_block, -1, torch.amax)
        visit = visit & (smallest_rank[:, :, None, :] <= largest_threshold[:, :, :, None])
    if segment_ids is not None:
        ids, far = segment_ids.to(torch.int64), 2**40
        query_low, query_high = (block_reduce(ids, query_block, far, torch.amin),
                                 block_reduce(ids, query_block, -far, torch.amax))
        key_low, key_high = block_reduce(ids, key_block, far, torch.amin), block_reduce(ids, key_block, -far, torch.amax)
        overlap = (key_low[:, None, :] <= query_high[:, :, None]) & (key_high[:, None, :] >= query_low[:, :, None])
        visit = visit & overlap[:, None]
    visit = visit.expand(batch, heads, num_query_blocks, num_key_blocks).reshape(
        batch * heads, num_query_blocks, num_key_blocks)
    if not by_query:
        visit = visit.transpose(1, 2)
    counts = visit.sum(-1, dtype=torch.int32)
    # A stable sort of "not visited" puts the visited blocks first, in ascending order.
    lists = torch.sort((~visit).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return counts.contiguous(), lists.contiguous()


# ----------------------------------------------------------------------------------------------
# Forward kernel.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _forward_block(acc, row_max, row_sum, q, rows, row_threshold, row_segment, start_n, cols, col_valid,
                   key_base, value_base, key_stride, value_stride, bias_base, rank_base, segment_base,
                   scale_log2,
                   HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_SEGMENTS: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block for the program's query block: online-softmax update of (acc, row_max, row_sum).
    MASKED: apply the causal mask and the sequence end (blocks below the diagonal need neither).
    USE_TMA: key_base / value_base are tensor descriptors over the head's (l, d) rows (TMA loads; rows
    past the end read as zero)."""
    dims = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        key_t = tl.trans(key_base.load([start_n, 0]))
        if MASKED:
            bias = tl.load(bias_base + cols, mask=col_valid, other=0.0).to(tl.float32) * LOG2E_IN_KERNEL
        else:
            bias = tl.load(bias_base + cols).to(tl.float32) * LOG2E_IN_KERNEL
    elif MASKED:
        key_t = tl.load(key_base + cols[None, :] * key_stride + dims[:, None], mask=col_valid[None, :], other=0.0)
        bias = tl.load(bias_base + cols, mask=col_valid, other=0.0).to(tl.float32) * LOG2E_IN_KERNEL
    else:
        key_t = tl.load(key_base + cols[None, :] * key_stride + dims[:, None])
        bias = tl.load(bias_base + cols).to(tl.float32) * LOG2E_IN_KERNEL
    scores = tl.dot(q, key_t, input_precision=DOT_PRECISION) * scale_log2 + bias[None, :]
    if MASKED:
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
    if USE_TMA:
        value = value_base.load([start_n, 0])
    elif MASKED:
        value = tl.load(value_base + cols[:, None] * value_stride + dims[None, :], mask=col_valid[:, None], other=0.0)
    else:
        value = tl.load(value_base + cols[:, None] * value_stride + dims[None, :])
    acc = acc * correction[:, None] + tl.dot(probs.to(value.dtype), value, input_precision=DOT_PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _forward_kernel(query, key, value, mask_bias, key_rank, query_threshold, segment_ids, block_count, block_list,
                    out, log_sum_exp,
                    q_stride_b, q_stride_h, q_stride_l, k_stride_b, k_stride_h, k_stride_l,
                    v_stride_b, v_stride_h, v_stride_l, o_stride_b, o_stride_h, o_stride_l,
                    num_heads, group_size, seq_len, scale_log2, listed_max_fraction,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, USE_TMA: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(l, BLOCK_M), b·h): one query block of one head; writes out and base-2 lse (b, h, l)."""
    # Late query blocks have the most keys: start them first so that the last wave is short.
    num_row_blocks = tl.num_programs(0)
    block_m = num_row_blocks - 1 - tl.program_id(0)
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
    if USE_TMA:
        key_base = tl.make_tensor_descriptor(key_base, shape=[seq_len, HEAD_DIM], strides=[k_stride_l, 1],
                                             block_shape=[BLOCK_N, HEAD_DIM])
        value_base = tl.make_tensor_descriptor(value_base, shape=[seq_len, HEAD_DIM], strides=[v_stride_l, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
    bias_base = mask_bias + batch_head * seq_len
    rank_base = key_rank + batch_head * seq_len
    segment_base = segment_ids + batch * seq_len
    row_threshold = tl.zeros([BLOCK_M], dtype=tl.int32)
    row_segment = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_WINDOW:
        row_threshold = tl.load(query_threshold + batch_head * seq_len + rows, mask=row_valid, other=-1)
    if HAS_SEGMENTS:
        row_segment = tl.load(segment_base + rows, mask=row_valid, other=-1)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Key blocks wholly below the diagonal need no causal mask; then the diagonal block(s). The window
    # and document masks, when present, apply to every block.
    below_end = start_m
    diagonal_end = tl.minimum(start_m + BLOCK_M, seq_len)
    if HAS_WINDOW or HAS_SEGMENTS:
        schedule = batch_head * num_row_blocks + block_m
        count = tl.load(block_count + schedule)
        # A listed tile costs ~2x a dense one (the index load defeats pipelining): walk the list only when
        # it is short, else empty it and run the dense loops below (and the other way round).
        use_list = count.to(tl.float32) <= listed_max_fraction * tl.cdiv(diagonal_end, BLOCK_N)
        count = tl.where(use_list, count, 0)
        below_end = tl.where(use_list, 0, below_end)
        diagonal_end = tl.where(use_list, start_m, diagonal_end)
        for index in range(0, count):
            block_n = tl.load(block_list + schedule * tl.cdiv(seq_len, BLOCK_N) + index)
            cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc, row_max, row_sum = _forward_block(
                acc, row_max, row_sum, q, rows, row_threshold, row_segment, block_n * BLOCK_N, cols, cols < seq_len,
                key_base, value_base, k_stride_l, v_stride_l, bias_base, rank_base, segment_base, scale_log2,
                HEAD_DIM, True, HAS_WINDOW, HAS_SEGMENTS, USE_TMA, DOT_PRECISION)
    for start_n in range(0, below_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        acc, row_max, row_sum = _forward_block(
            acc, row_max, row_sum, q, rows, row_threshold, row_segment, start_n, cols, cols < seq_len,
            key_base, value_base, k_stride_l, v_stride_l, bias_base, rank_base, segment_base, scale_log2,
            HEAD_DIM, False, HAS_WINDOW, HAS_SEGMENTS, USE_TMA, DOT_PRECISION)
    for start_n in range(start_m, diagonal_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        acc, row_max, row_sum = _forward_block(
            acc, row_max, row_sum, q, rows, row_threshold, row_segment, start_n, cols, cols < seq_len,
            key_base, value_base, k_stride_l, v_stride_l, bias_base, rank_base, segment_base, scale_log2,
            HEAD_DIM, True, HAS_WINDOW, HAS_SEGMENTS, USE_TMA, DOT_PRECISION)

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
def _delta_kernel(out, grad_out, delta, grad_query_accum, o_stride_b, o_stride_h, o_stride_l,
                  g_stride_b, g_stride_h, g_stride_l, num_heads, seq_len,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQ: tl.constexpr):
    """delta = rowsum(dO ∘ O); with ZERO_DQ also zeroes the same rows of the fused backward's dQ buffer."""
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
    if ZERO_DQ:
        tl.store(grad_query_accum + batch_head * seq_len * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :],
                 tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), mask=row_valid[:, None])


@triton.jit
def _key_grad_block(grad_key, grad_value, grad_bias, key, value, bias_log2, rank, cols, col_segment,
                    query_base, grad_out_base, q_stride, g_stride, lse_base, delta_base, threshold_base,
                    row_segment_base, grad_query_base, start_m, seq_len, scale_log2,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, FUSE_DQ: tl.constexpr,
                    USE_TMA: tl.constexpr, DQ_TMA_REDUCE: tl.constexpr, DQ_TRANSPOSED: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """One query block against the program's key block, in transposed form (keys on rows).
    FUSE_DQ: also add this block's dQ share dS·K into the fp32 buffer at grad_query_base (atomics, since
    every key block of the head adds into the same rows), which saves the dQ kernel's two recomputed
    matmuls (S and dP) per tile pair."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_valid = rows < seq_len
    dims = tl.arange(0, HEAD_DIM)
    if USE_TMA:  # query_base / grad_out_base are descriptors over the head's (l, d) rows
        query_t = tl.trans(query_base.load([start_m, 0]))
    else:
        query_t = tl.load(query_base + rows[None, :] * q_stride + dims[:, None], mask=row_valid[None, :], other=0.0)
    # Rows past the end get lse = +inf, hence probability 0 and no contribution.
    lse = tl.load(lse_base + rows, mask=row_valid, other=float("inf"))
    scores_t = tl.dot(key, query_t, input_precision=DOT_PRECISION) * scale_log2 + bias_log2[:, None]
    probs_t = tl.math.exp2(scores_t - lse[None, :])
    if CAUSAL:
        probs_t = tl.where(rows[None, :] >= cols[:, None], probs_t, 0.0)
    if HAS_WINDOW:
        threshold = tl.load(threshold_base + rows, mask=row_valid, other=-1)
        probs_t = tl.where(rank[:, None] <= threshold[None, :], probs_t, 0.0)
    if HAS_SEGMENTS:
        row_segment = tl.load(row_segment_base + rows, mask=row_valid, other=-1)
        probs_t = tl.where(col_segment[:, None] == row_segment[None, :], probs_t, 0.0)
    if USE_TMA:
        grad_out = grad_out_base.load([start_m, 0])
    else:
        grad_out = tl.load(grad_out_base + rows[:, None] * g_stride + dims[None, :], mask=row_valid[:, None],
                           other=0.0)
    grad_value += tl.dot(probs_t.to(grad_out.dtype), grad_out, input_precision=DOT_PRECISION)
    delta = tl.load(delta_base + rows, mask=row_valid, other=0.0)
    grad_probs_t = tl.dot(value, tl.trans(grad_out), input_precision=DOT_PRECISION)
    grad_scores_t = probs_t * (grad_probs_t - delta[None, :])
    grad_scores_t_low = grad_scores_t.to(query_t.dtype)
    grad_key += tl.dot(grad_scores_t_low, tl.trans(query_t), input_precision=DOT_PRECISION)
    grad_bias += tl.sum(grad_scores_t, 1)
    if FUSE_DQ:
        if DQ_TRANSPOSED:  # dQ^T = K^T dS^T: the key block (128) is the matmul's M, not the few queries
            grad_query_part = tl.trans(tl.dot(tl.trans(key), grad_scores_t_low, input_precision=DOT_PRECISION))
        else:
            grad_query_part = tl.dot(tl.trans(grad_scores_t_low), key, input_precision=DOT_PRECISION)
        if DQ_TMA_REDUCE:
            # One bulk reduce-add of the tile (TMA, done in L2; rows past the end are clipped).
            grad_query_base.atomic_add([start_m, 0], grad_query_part)
        else:
            # Relaxed: plain reductions with no ordering fences; the buffer is read only by a later kernel.
            tl.atomic_add(grad_query_base + rows[:, None] * HEAD_DIM + dims[None, :], grad_query_part,
                          mask=row_valid[:, None], sem="relaxed")
    return grad_key, grad_value, grad_bias


@triton.jit
def _key_grad_kernel(query, key, value, mask_bias, key_rank, query_threshold, segment_ids, block_count, block_list,
                     grad_out, log_sum_exp, delta, grad_key_out, grad_value_out, grad_bias_out, grad_query_accum,
                     q_stride_b, q_stride_h, q_stride_l, k_stride_b, k_stride_h, k_stride_l,
                     v_stride_b, v_stride_h, v_stride_l, g_stride_b, g_stride_h, g_stride_l,
                     num_heads, num_kv_heads, group_size, seq_len, scale_log2, scale, listed_max_fraction,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, FUSE_DQ: tl.constexpr,
                     USE_TMA: tl.constexpr, DQ_TMA_REDUCE: tl.constexpr, DQ_TRANSPOSED: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(l, BLOCK_N), b·h_kv): one key block of one key/value head, summed over its query
    heads (so GQA needs no atomics for dK/dV); also writes d(mask_bias) of those query heads (fp32,
    (b, h, l)) and, with FUSE_DQ, adds the dQ shares into grad_query_accum (fp32 (b, h, l, d), zeroed)."""
    block_n = tl.program_id(0)
    num_key_blocks = tl.num_programs(0)
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
    if HAS_SEGMENTS:
        col_segment = tl.load(row_segment_base + cols, mask=col_valid, other=-1)
    grad_key = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    grad_value = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for group_index in range(group_size):
        head = kv_head * group_size + group_index
        batch_head = batch * num_heads + head
        bias_log2 = tl.load(mask_bias + batch_head * seq_len + cols, mask=col_valid, other=0.0).to(tl.float32) \
            * LOG2E_IN_KERNEL
        rank = tl.zeros([BLOCK_N], dtype=tl.int32)
        if HAS_WINDOW:
            rank = tl.load(key_rank + batch_head * seq_len + cols, mask=col_valid, other=KEEP_ALL_IN_KERNEL)
        query_base = query + batch * q_stride_b + head * q_stride_h
        grad_out_base = grad_out + batch * g_stride_b + head * g_stride_h
        if USE_TMA:
            query_base = tl.make_tensor_descriptor(query_base, shape=[seq_len, HEAD_DIM], strides=[q_stride_l, 1],
                                                   block_shape=[BLOCK_M, HEAD_DIM])
            grad_out_base = tl.make_tensor_descriptor(grad_out_base, shape=[seq_len, HEAD_DIM],
                                                      strides=[g_stride_l, 1], block_shape=[BLOCK_M, HEAD_DIM])
        lse_base = log_sum_exp + batch_head * seq_len
        delta_base = delta + batch_head * seq_len
        threshold_base = query_threshold + batch_head * seq_len
        grad_query_base = grad_query_accum + batch_head * seq_len * HEAD_DIM
        if DQ_TMA_REDUCE:
            grad_query_base = tl.make_tensor_descriptor(grad_query_base, shape=[seq_len, HEAD_DIM],
                                                        strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, HEAD_DIM])
        grad_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        # Query blocks on the diagonal need the causal mask; those wholly below it do not. The window and
        # document masks, when present, apply to every block.
        diagonal_end = tl.minimum(start_n + BLOCK_N, seq_len)
        below_start = start_n + BLOCK_N
        if HAS_WINDOW or HAS_SEGMENTS:
            schedule = batch_head * num_key_blocks + block_n
            count = tl.load(block_count + schedule)
            # As in the forward: the list when it is short, else the dense loops with masks.
            use_list = count.to(tl.float32) <= listed_max_fraction * tl.cdiv(seq_len - start_n, BLOCK_M)
            count = tl.where(use_list, count, 0)
            diagonal_end = tl.where(use_list, start_n, diagonal_end)
            below_start = tl.where(use_list, seq_len, below_start)
            for index in range(0, count):
                block_m = tl.load(block_list + schedule * tl.cdiv(seq_len, BLOCK_M) + index)
                grad_key, grad_value, grad_bias = _key_grad_block(
                    grad_key, grad_value, grad_bias, key_tile, value_tile, bias_log2, rank, cols, col_segment,
                    query_base, grad_out_base, q_stride_l, g_stride_l, lse_base, delta_base, threshold_base,
                    row_segment_base, grad_query_base, block_m * BLOCK_M, seq_len, scale_log2,
                    HEAD_DIM, BLOCK_M, True, HAS_WINDOW, HAS_SEGMENTS, FUSE_DQ, USE_TMA, DQ_TMA_REDUCE,
                    DQ_TRANSPOSED, DOT_PRECISION)
        for start_m in range(start_n, diagonal_end, BLOCK_M):
            grad_key, grad_value, grad_bias = _key_grad_block(
                grad_key, grad_value, grad_bias, key_tile, value_tile, bias_log2, rank, cols, col_segment,
                query_base, grad_out_base, q_stride_l, g_stride_l, lse_base, delta_base, threshold_base,
                row_segment_base, grad_query_base, start_m, seq_len, scale_log2,
                HEAD_DIM, BLOCK_M, True, HAS_WINDOW, HAS_SEGMENTS, FUSE_DQ, USE_TMA, DQ_TMA_REDUCE,
                DQ_TRANSPOSED, DOT_PRECISION)
        for start_m in range(below_start, seq_len, BLOCK_M):
            grad_key, grad_value, grad_bias = _key_grad_block(
                grad_key, grad_value, grad_bias, key_tile, value_tile, bias_log2, rank, cols, col_segment,
                query_base, grad_out_base, q_stride_l, g_stride_l, lse_base, delta_base, threshold_base,
                row_segment_base, grad_query_base, start_m, seq_len, scale_log2,
                HEAD_DIM, BLOCK_M, False, HAS_WINDOW, HAS_SEGMENTS, FUSE_DQ, USE_TMA, DQ_TMA_REDUCE,
                DQ_TRANSPOSED, DOT_PRECISION)
        tl.store(grad_bias_out + batch_head * seq_len + cols, grad_bias, mask=col_valid)
    out_offsets = batch_kv_head * seq_len * HEAD_DIM + cols[:, None] * HEAD_DIM + dims[None, :]
    tl.store(grad_key_out + out_offsets, (grad_key * scale).to(grad_key_out.dtype.element_ty), mask=col_valid[:, None])
    tl.store(grad_value_out + out_offsets, grad_value.to(grad_value_out.dtype.element_ty), mask=col_valid[:, None])


@triton.jit
def _scale_cast_kernel(source, target, scale, numel, BLOCK: tl.constexpr):
    """target = source * scale in target's dtype (the fused backward's fp32 dQ buffer -> dQ)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < numel
    values = tl.load(source + offsets, mask=valid, other=0.0)
    tl.store(target + offsets, (values * scale).to(target.dtype.element_ty), mask=valid)


@triton.jit
def _query_grad_block(grad_query, q, grad_out, lse, delta, rows, row_threshold, row_segment, start_n, cols,
                      col_valid, key_base, value_base, key_stride, value_stride, bias_base, rank_base, segment_base,
                      scale_log2,
                      HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_SEGMENTS: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block for the program's query block. USE_TMA: key_base / value_base are descriptors."""
    dims = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        key_t = tl.trans(key_base.load([start_n, 0]))
        value_t = tl.trans(value_base.load([start_n, 0]))
        if MASKED:
            bias = tl.load(bias_base + cols, mask=col_valid, other=0.0).to(tl.float32) * LOG2E_IN_KERNEL
        else:
            bias = tl.load(bias_base + cols).to(tl.float32) * LOG2E_IN_KERNEL
    elif MASKED:
        key_t = tl.load(key_base + cols[None, :] * key_stride + dims[:, None], mask=col_valid[None, :], other=0.0)
        value_t = tl.load(value_base + cols[None, :] * value_stride + dims[:, None], mask=col_valid[None, :],
                          other=0.0)
        bias = tl.load(bias_base + cols, mask=col_valid, other=0.0).to(tl.float32) * LOG2E_IN_KERNEL
    else:
        key_t = tl.load(key_base + cols[None, :] * key_stride + dims[:, None])
        value_t = tl.load(value_base + cols[None, :] * value_stride + dims[:, None])
        bias = tl.load(bias_base + cols).to(tl.float32) * LOG2E_IN_KERNEL
    scores = tl.dot(q, key_t, input_precision=DOT_PRECISION) * scale_log2 + bias[None, :]
    probs = tl.math.exp2(scores - lse[:, None])
    if MASKED:
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
def _query_grad_kernel(query, key, value, mask_bias, key_rank, query_threshold, segment_ids, block_count, block_list,
                       grad_out, log_sum_exp, delta, grad_query_out,
                       q_stride_b, q_stride_h, q_stride_l, k_stride_b, k_stride_h, k_stride_l,
                       v_stride_b, v_stride_h, v_stride_l, g_stride_b, g_stride_h, g_stride_l,
                       num_heads, group_size, seq_len, scale_log2, scale, listed_max_fraction,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, USE_TMA: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(l, BLOCK_M), b·h): dQ of one query block of one head (contiguous (b, h, l, d) output)."""
    num_row_blocks = tl.num_programs(0)
    block_m = num_row_blocks - 1 - tl.program_id(0)  # heaviest first, as in the forward
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
    if USE_TMA:
        key_base = tl.make_tensor_descriptor(key_base, shape=[seq_len, HEAD_DIM], strides=[k_stride_l, 1],
                                             block_shape=[BLOCK_N, HEAD_DIM])
        value_base = tl.make_tensor_descriptor(value_base, shape=[seq_len, HEAD_DIM], strides=[v_stride_l, 1],
                                               block_shape=[BLOCK_N, HEAD_DIM])
    bias_base = mask_bias + batch_head * seq_len
    rank_base = key_rank + batch_head * seq_len
    segment_base = segment_ids + batch * seq_len
    row_threshold = tl.zeros([BLOCK_M], dtype=tl.int32)
    row_segment = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_WINDOW:
        row_threshold = tl.load(query_threshold + batch_head * seq_len + rows, mask=row_valid, other=-1)
    if HAS_SEGMENTS:
        row_segment = tl.load(segment_base + rows, mask=row_valid, other=-1)
    grad_query = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    below_end = start_m
    diagonal_end = tl.minimum(start_m + BLOCK_M, seq_len)
    if HAS_WINDOW or HAS_SEGMENTS:
        schedule = batch_head * num_row_blocks + block_m
        count = tl.load(block_count + schedule)
        use_list = count.to(tl.float32) <= listed_max_fraction * tl.cdiv(diagonal_end, BLOCK_N)
        count = tl.where(use_list, count, 0)
        below_end = tl.where(use_list, 0, below_end)
        diagonal_end = tl.where(use_list, start_m, diagonal_end)
        for index in range(0, count):
            block_n = tl.load(block_list + schedule * tl.cdiv(seq_len, BLOCK_N) + index)
            cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
            grad_query = _query_grad_block(
                grad_query, q, grad_out_tile, lse, delta_rows, rows, row_threshold, row_segment, block_n * BLOCK_N,
                cols, cols < seq_len, key_base, value_base, k_stride_l, v_stride_l, bias_base, rank_base,
                segment_base,
                scale_log2, HEAD_DIM, True, HAS_WINDOW, HAS_SEGMENTS, USE_TMA, DOT_PRECISION)
    for start_n in range(0, below_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        grad_query = _query_grad_block(
            grad_query, q, grad_out_tile, lse, delta_rows, rows, row_threshold, row_segment, start_n, cols,
            cols < seq_len, key_base, value_base, k_stride_l, v_stride_l, bias_base, rank_base, segment_base,
            scale_log2, HEAD_DIM, False, HAS_WINDOW, HAS_SEGMENTS, USE_TMA, DOT_PRECISION)
    for start_n in range(start_m, diagonal_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        grad_query = _query_grad_block(
            grad_query, q, grad_out_tile, lse, delta_rows, rows, row_threshold, row_segment, start_n, cols,
            cols < seq_len, key_base, value_base, k_stride_l, v_stride_l, bias_base, rank_base, segment_base,
            scale_log2, HEAD_DIM, True, HAS_WINDOW, HAS_SEGMENTS, USE_TMA, DOT_PRECISION)
    out_offsets = batch_head * seq_len * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    tl.store(grad_query_out + out_offsets, (grad_query * scale).to(grad_query_out.dtype.element_ty),
             mask=row_valid[:, None])


# ----------------------------------------------------------------------------------------------
# Launchers and the autograd function.
# ----------------------------------------------------------------------------------------------
def _configs(dtype: torch.dtype, device: torch.device):
    """(forward, key-gradient, query-gradient, fused backward) tile configs for this dtype/device."""
    if device.type != "cuda":
        return INTERPRETER_CONFIGS
    if dtype == torch.float32:
        return FLOAT32_CONFIGS
    return FORWARD_CONFIG, BACKWARD_KEY_CONFIG, BACKWARD_QUERY_CONFIG, FUSED_BACKWARD_CONFIG


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
    if segment_ids is not None and keep_window is not None and keep_window < length:
        # The fused keep-window ranks each document as one run of positions (see keep_window_thresholds).
        runs = 1 + (segment_ids[:, 1:] != segment_ids[:, :-1]).sum(-1)
        ordered = torch.sort(segment_ids, dim=-1).values
        distinct = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(-1)
        if bool((runs != distinct).any()):
            raise ValueError("dmattn_fused: with keep_window, each document id in segment_ids must occupy one "
                             "contiguous run of positions (packed documents)")


def _scratch_allocator(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu")


def _tma_allowed(*tensors):
    """TMA descriptors need 16-byte aligned bases and row strides; they are built on the device, which
    needs a global-scratch allocator. Triton keeps that in a context variable, i.e. per thread (autograd
    runs the backward in its own thread), so it is set on every call that uses descriptors."""
    if any(t.data_ptr() % 16 or any(stride * t.element_size() % 16 for stride in t.stride()[:-1])
           for t in tensors):
        return False
    triton.set_allocator(_scratch_allocator)
    return True


def _rows_last_contiguous(tensor):
    """Kernels take any (b, h, l) strides but need the head dimension contiguous."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


class _Masks:
    """What the kernels need besides q, k, v: flags, per-key ranks / per-query thresholds, document
    ids, and the sparse schedules of each kernel (built lazily: the backward's only when it runs)."""

    def __init__(self, mask_bias, keep_window, segment_ids, batch, heads, length):
        device = mask_bias.device
        self.placeholder = torch.zeros(1, dtype=torch.int32, device=device)
        self.has_window = keep_window is not None and keep_window < length
        self.has_segments = segment_ids is not None
        self.sparse = self.has_window or self.has_segments
        self.key_rank = self.query_threshold = self.placeholder
        if self.has_window:
            self.key_rank, self.query_threshold = keep_window_thresholds(mask_bias, keep_window, segment_ids)
        self.segment_ids = segment_ids.to(torch.int32).contiguous() if self.has_segments else self.placeholder
        self.shape = (batch, heads, length)

    def schedule(self, row_block, col_block, by_query):
        if not self.sparse:
            return self.placeholder, self.placeholder
        return block_schedule(self.key_rank if self.has_window else None,
                              self.query_threshold if self.has_window else None,
                              self.segment_ids if self.has_segments else None,
                              *self.shape, row_block, col_block, by_query)


# Gluon kernel files (Hopper), imported on first use: None when the import fails (a Triton without the Gluon
# Hopper API) or after a compile error (`_run_gluon`); the Triton kernels run instead.
_GLUON_MODULES = {}


def _gluon_kernels(name):
    if name not in _GLUON_MODULES:
        try:
            _GLUON_MODULES[name] = importlib.import_module(f"cheems_parallel.kernels.{name}")
        except Exception:
            _GLUON_MODULES[name] = None
    return _GLUON_MODULES[name]


def _gluon_module():
    return _gluon_kernels("dmattn_gluon")


def _gluon_backward_module():
    return _gluon_kernels("dmattn_gluon_bwd")


def _gluon_sparse_module():
    return _gluon_kernels("dmattn_gluon_sparse")


def _gluon_sparse_backward_module():
    return _gluon_kernels("dmattn_gluon_sparse_bwd")


def _gluon_applies(enabled, sparse, q, masks):
    """What every Gluon kernel needs of a call: its flag, a Hopper GPU outside the interpreter, the dense or the
    sparse path, bf16/fp16, head dim 64/128 (each module's `supported` checks the rest: layouts, alignment)."""
    return (enabled and q.is_cuda and masks.sparse == sparse and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-1] in (64, 128) and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
            and is_hopper(q.device))


def _gluon_wants_rows(q, masks):
    """A Gluon kernel would take this call: they load (b·h·l, d) row tiles by TMA, so permuted q, k, v (the layer's
    views of its (l, b, ...) projections) are copied to rows first (~50 us at cheems-320m's attention shapes, against
    ~1.2x on the attention itself); the Triton kernels take any strides and get no copy."""
    enabled = (GLUON_SPARSE or GLUON_SPARSE_BACKWARD) if masks.sparse else (FORWARD_GLUON or BACKWARD_GLUON)
    return _gluon_applies(enabled, masks.sparse, q, masks)


def _gluon_forward_usable(q, k, v, mask_bias, masks):
    """FORWARD_GLUON is set and this call can take the Gluon forward (dense)."""
    module = _gluon_applies(FORWARD_GLUON, False, q, masks) and _gluon_module()
    return bool(module) and module.supported(q, k, v, mask_bias.float())


def _gluon_backward_usable(grad_out, q, k, v, mask_bias, masks):
    """BACKWARD_GLUON is set and this call can take the Gluon backward (dense)."""
    module = _gluon_applies(BACKWARD_GLUON, False, q, masks) and _gluon_backward_module()
    return bool(module) and module.supported(q, k, v, mask_bias.float(), grad_out)


# The SPARSE forward (keep-window and/or documents) on Hopper by the Gluon kernel of dmattn_gluon_sparse.py (the
# dense Gluon forward's producer/consumer structure; the producer TMA-loads only the key blocks of the sparse schedule,
# the consumers apply the keep-window and document masks per element), under the dense Gluon forward's input
# conditions (CUDA sm_90, bf16/fp16, d 64/128, contiguous). It writes the same out and lse as the Triton sparse
# forward. On by default since session 6's H200 sweeps (bench/dmattn_notes.md): forward+backward ahead of the Triton
# sparse forward's in every case and length (1k-16k) but keep-window within documents at 1k-4k (within +-8 % either
# way). GLUON_SPARSE_CONFIG overrides dmattn_gluon_sparse.CONFIGS[head_dim].
GLUON_SPARSE = True
GLUON_SPARSE_CONFIG = {}
# The same for the sparse BACKWARD (dmattn_gluon_sparse_bwd.py: the Gluon dense backward's kernel walking the per-key-
# block lists, masks per element); independent of GLUON_SPARSE (either runs on the other's out / lse). On by default;
# with documents only from l = GLUON_SPARSE_BACKWARD_MIN_LENGTH_WITH_DOCUMENTS. Session 6's three H200 sweeps
# (bench/dmattn_notes.md), forward+backward against the Triton sparse backward's: keep-window alone 1.2-1.4x from 2k and
# ahead at 1k in 2 of 3 sweeps for clustered masks, 3 of 3 for random ones; with documents 1.2-1.6x from 8k but
# behind at 1k in 3 of 3 sweeps (short per-key lists: its per-program set-up is not repaid) and mixed at 2k-4k.
# GLUON_SPARSE_BACKWARD_CONFIG overrides dmattn_gluon_sparse_bwd.CONFIGS[head_dim].
GLUON_SPARSE_BACKWARD = True
GLUON_SPARSE_BACKWARD_CONFIG = {}
GLUON_SPARSE_BACKWARD_MIN_LENGTH_WITH_DOCUMENTS = 4096


def fold_documents_into_thresholds(key_rank, query_threshold, segment_ids):
    """With keep-window AND documents (each document one contiguous run, as `_validate` checks), a threshold that
    also applies the document mask: query i keeps key j <= i iff key_rank[j] <= result[i], with no segment compare.

    Why: `keep_window_thresholds` ranks later documents first, so every key of i's document D ranks below every key
    of an earlier document, and keys of later documents lie beyond i (causal). Capping the threshold at the largest
    rank among D's keys therefore removes exactly the earlier documents' keys, and changes nothing when D's prefix
    holds >= w keys (the w-th smallest rank of i's prefix is then one of D's). key_rank, query_threshold (b, h, l)
    int32; segment_ids (b, l). Returns (b, h, l) int32."""
    batch, heads, length = key_rank.shape
    changes = (segment_ids[:, 1:] != segment_ids[:, :-1]).to(torch.int64)
    document = torch.nn.functional.pad(changes.cumsum(-1), (1, 0))  # run index of every position, (b, l)
    index = document[:, None, :].expand(batch, heads, length).contiguous()
    largest = torch.full((batch, heads, length), -1, dtype=key_rank.dtype, device=key_rank.device)
    largest.scatter_reduce_(-1, index, key_rank, reduce="amax", include_self=True)
    return torch.minimum(query_threshold, largest.gather(-1, index))


def _gluon_sparse_usable(q, k, v, mask_bias, masks):
    """GLUON_SPARSE is set and this call can take the Gluon sparse forward (keep-window and/or documents)."""
    module = _gluon_applies(GLUON_SPARSE, True, q, masks) and _gluon_sparse_module()
    return bool(module) and module.supported(q, k, v, mask_bias.float())


def _gluon_sparse_backward_usable(grad_out, q, k, v, mask_bias, masks):
    """GLUON_SPARSE_BACKWARD is set (with documents: from GLUON_SPARSE_BACKWARD_MIN_LENGTH_WITH_DOCUMENTS) and this
    call can take the Gluon sparse backward."""
    enabled = GLUON_SPARSE_BACKWARD and (not masks.has_segments
                                         or q.shape[2] >= GLUON_SPARSE_BACKWARD_MIN_LENGTH_WITH_DOCUMENTS)
    module = _gluon_applies(enabled, True, q, masks) and _gluon_sparse_backward_module()
    return bool(module) and module.supported(q, k, v, mask_bias.float(), grad_out)


def _run_gluon(name, call):
    """call() with the Gluon kernels of module `name`; None (and that module off for good, with a warning) when it
    does not compile: a Triton whose Gluon API differs."""
    try:
        return call()
    except triton.compiler.errors.CompilationError as error:
        logging.getLogger(__name__).warning("dmattn: %s does not compile (%s); using the Triton kernel", name,
                                            str(error).splitlines()[0][:200])
        _GLUON_MODULES[name] = None
        return None


def _gluon_backward(module, grad_out, q, k, v, mask_bias, out, lse, *schedule, config):
    """A Gluon backward (`module`: dense, or sparse with `schedule` = (masks,)): delta and the zeroed fp32 dQ buffer
    from `_delta_kernel`, dK, dV, d(bias) and the dQ sums from the Gluon kernel, dQ scaled and cast by
    `_scale_cast_kernel`."""
    batch, heads, length, head_dim = q.shape
    grad_out = grad_out.contiguous()
    delta = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    grad_query_accum = torch.empty((batch, heads, length, head_dim), dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(length, 64), batch * heads)](
        out, grad_out, delta, grad_query_accum, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), heads, length,
        HEAD_DIM=head_dim, BLOCK_M=64, ZERO_DQ=True)
    grad_key, grad_value, grad_bias = module.backward(
        q, k, v, mask_bias.float(), grad_out, lse, delta, grad_query_accum, *schedule, config)
    grad_query = torch.empty((batch, heads, length, head_dim), dtype=q.dtype, device=q.device)
    cast_block = 4096
    _scale_cast_kernel[(triton.cdiv(grad_query.numel(), cast_block),)](
        grad_query_accum, grad_query, 1.0 / math.sqrt(head_dim), grad_query.numel(), BLOCK=cast_block)
    return grad_query, grad_key, grad_value, grad_bias


def _forward(q, k, v, mask_bias, masks):
    batch, heads, length, head_dim = q.shape
    if _gluon_sparse_usable(q, k, v, mask_bias, masks):
        result = _run_gluon("dmattn_gluon_sparse", lambda: _gluon_sparse_module().forward(
            q, k, v, mask_bias.float(), masks, GLUON_SPARSE_CONFIG))
        if result is not None:
            return result
    if _gluon_forward_usable(q, k, v, mask_bias, masks):
        result = _run_gluon("dmattn_gluon", lambda: _gluon_module().forward(
            q, k, v, mask_bias.float(), GLUON_FORWARD_CONFIG))
        if result is not None:
            return result
    config = _configs(q.dtype, q.device)[0]
    out = torch.empty((batch, heads, length, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    block_count, block_list = masks.schedule(config["block_m"], config["block_n"], by_query=True)
    grid = (triton.cdiv(length, config["block_m"]), batch * heads)
    _forward_kernel[grid](
        q, k, v, mask_bias, masks.key_rank, masks.query_threshold, masks.segment_ids, block_count, block_list,
        out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, heads // k.shape[1], length, LOG2E / math.sqrt(head_dim), LISTED_LOOP_MAX_FRACTION,
        HEAD_DIM=head_dim, BLOCK_M=config["block_m"], BLOCK_N=config["block_n"],
        HAS_WINDOW=masks.has_window, HAS_SEGMENTS=masks.has_segments, USE_TMA=FORWARD_TMA and _tma_allowed(k, v),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out, lse


def _backward(grad_out, q, k, v, mask_bias, out, lse, masks):
    batch, heads, length, head_dim = q.shape
    if _gluon_sparse_backward_usable(grad_out, q, k, v, mask_bias, masks):
        result = _run_gluon("dmattn_gluon_sparse_bwd", lambda: _gluon_backward(
            _gluon_sparse_backward_module(), grad_out, q, k, v, mask_bias, out, lse, masks,
            config=GLUON_SPARSE_BACKWARD_CONFIG))
        if result is not None:
            return result
    if _gluon_backward_usable(grad_out, q, k, v, mask_bias, masks):
        result = _run_gluon("dmattn_gluon_bwd", lambda: _gluon_backward(
            _gluon_backward_module(), grad_out, q, k, v, mask_bias, out, lse, config=GLUON_BACKWARD_CONFIG))
        if result is not None:
            return result
    kv_heads = k.shape[1]
    _, key_config, query_config, fused_config = _configs(q.dtype, q.device)
    fused = FUSED_BACKWARD
    if fused:
        key_config = fused_config
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    scale = 1.0 / math.sqrt(head_dim)
    delta = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    # The fused backward's dQ sum (fp32, contiguous (b, h, l, d)); zeroed by the delta kernel.
    grad_query_accum = (torch.empty((batch, heads, length, head_dim), dtype=torch.float32, device=q.device)
                        if fused else masks.placeholder)
    _delta_kernel[(triton.cdiv(length, 64), batch * heads)](
        out, grad_out, delta, grad_query_accum, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), heads, length,
        HEAD_DIM=head_dim, BLOCK_M=64, ZERO_DQ=fused)
    grad_key = torch.empty((batch, kv_heads, length, head_dim), dtype=k.dtype, device=q.device)
    grad_value = torch.empty_like(grad_key, dtype=v.dtype)
    grad_bias = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    block_count, block_list = masks.schedule(key_config["block_n"], key_config["block_m"], by_query=False)
    _key_grad_kernel[(triton.cdiv(length, key_config["block_n"]), batch * kv_heads)](
        q, k, v, mask_bias, masks.key_rank, masks.query_threshold, masks.segment_ids, block_count, block_list,
        grad_out, lse, delta, grad_key, grad_value, grad_bias, grad_query_accum, *strides,
        heads, kv_heads, heads // kv_heads, length, scale * LOG2E, scale, LISTED_LOOP_MAX_FRACTION,
        HEAD_DIM=head_dim, BLOCK_M=key_config["block_m"], BLOCK_N=key_config["block_n"],
        HAS_WINDOW=masks.has_window, HAS_SEGMENTS=masks.has_segments, FUSE_DQ=fused,
        USE_TMA=BACKWARD_TMA and _tma_allowed(q, grad_out),
        DQ_TMA_REDUCE=fused and DQ_TMA_REDUCE and q.is_cuda and _tma_allowed(q, grad_out, grad_query_accum),
        DQ_TRANSPOSED=DQ_TRANSPOSED,
        DOT_PRECISION=precision,
        num_warps=key_config["num_warps"], num_stages=key_config["num_stages"])
    grad_query = torch.empty((batch, heads, length, head_dim), dtype=q.dtype, device=q.device)
    if fused:
        cast_block = 4096
        _scale_cast_kernel[(triton.cdiv(grad_query.numel(), cast_block),)](
            grad_query_accum, grad_query, scale, grad_query.numel(), BLOCK=cast_block)
        return grad_query, grad_key, grad_value, grad_bias
    block_count, block_list = masks.schedule(query_config["block_m"], query_config["block_n"], by_query=True)
    _query_grad_kernel[(triton.cdiv(length, query_config["block_m"]), batch * heads)](
        q, k, v, mask_bias, masks.key_rank, masks.query_threshold, masks.segment_ids, block_count, block_list,
        grad_out, lse, delta, grad_query, *strides,
        heads, heads // kv_heads, length, scale * LOG2E, scale, LISTED_LOOP_MAX_FRACTION,
        HEAD_DIM=head_dim, BLOCK_M=query_config["block_m"], BLOCK_N=query_config["block_n"],
        HAS_WINDOW=masks.has_window, HAS_SEGMENTS=masks.has_segments,
        USE_TMA=BACKWARD_TMA and _tma_allowed(k, v), DOT_PRECISION=precision,
        num_warps=query_config["num_warps"], num_stages=query_config["num_stages"])
    return grad_query, grad_key, grad_value, grad_bias


class _DynamicMaskAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_bias, keep_window, segment_ids):
        mask_bias = mask_bias.contiguous()
        masks = _Masks(mask_bias, keep_window, segment_ids, q.shape[0], q.shape[1], q.shape[2])
        rows = torch.Tensor.contiguous if _gluon_wants_rows(q, masks) else _rows_last_contiguous
        q, k, v = (rows(t) for t in (q, k, v))
        out, lse = _forward(q, k, v, mask_bias, masks)
        ctx.save_for_backward(q, k, v, mask_bias, out, lse)
        ctx.masks, ctx.rows = masks, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask_bias, out, lse = ctx.saved_tensors
        grad_query, grad_key, grad_value, grad_bias = _backward(
            ctx.rows(grad_out), q, k, v, mask_bias, out, lse, ctx.masks)
        return grad_query, grad_key, grad_value, grad_bias.to(mask_bias.dtype), None, None


def dmattn_fused(q, k, v, mask_bias, keep_window=None, segment_ids=None):
    """Fused DMAttn; same arguments, shapes and semantics as `cheems_parallel.ops.dmattn.dmattn_ref`.

    q (b, h, l, d); k, v (b, h_kv, l, d); mask_bias (b, h, l); keep_window: int >= 1 or None;
    segment_ids (b, l) integer document ids or None. Returns (b, h, l, d) in q's dtype, differentiable
    with respect to q, k, v and mask_bias.
    """
    _validate(q, k, v, mask_bias, keep_window, segment_ids)
    return _DynamicMaskAttention.apply(q, k, v, mask_bias, keep_window, segment_ids)
