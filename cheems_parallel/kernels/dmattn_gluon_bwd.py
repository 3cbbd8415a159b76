"""DMAttn dense backward in Gluon: FA3-style warp specialisation on Hopper (the forward is dmattn_gluon.py).

Computes what `dmattn._key_grad_kernel` computes on the dense path with FUSE_DQ (causal, learnable per-key
bias, MHA or GQA, no keep-window, no documents), given delta = rowsum(dO ∘ O) and a zeroed fp32 dQ buffer
from `dmattn._delta_kernel`: dK (scaled), dV in k's / v's dtype (b, h_kv, l, d), d mask_bias fp32 (b, h, l),
and the unscaled dQ shares dS·K added into the fp32 (b, h, l, d) buffer, which `dmattn._scale_cast_kernel`
then scales and casts.

Structure: one program per (key block of 128 keys, b·h_kv), looping over the key/value head's query heads and,
per head, over the query blocks of BLOCK_M rows from the diagonal to the end ("steps").
- producer partition, 1 warp: TMA loads of the program's K and V tiles (one mbarrier), then per step the Q and
  dO tiles and the step's 64 lse and 64 delta values (1-D TMA) into a STAGES-deep ring (ready / empty mbarriers
  per slot). lse and delta are first copied into rows padded to a multiple of BLOCK_M (`padded_stats`; lse = +inf,
  delta = 0 in the padding): every 1-D TMA start is then 16-byte aligned (an unaligned one is an illegal
  instruction on the H200), and query rows past l get probability 0, so no row mask is needed and the dQ tile that
  reaches into the next head's rows adds exact zeros there.
- two consumer partitions of one warp group (4 warps) each, 64 keys apiece, holding dK and dV (64 x d fp32)
  in registers: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ by async wgmma with M = keys; Pᵀ = exp2(Sᵀ·c + bias - lse)
  (causal mask on the steps that reach the diagonal), dSᵀ = Pᵀ(dPᵀ - delta); dV += Pᵀ dO and dK += dSᵀ Q
  by wgmma with the A operand from registers; d bias = row sums of dSᵀ (the bias, 64 values per head, by plain
  loads). dSᵀ (bf16/fp16) goes to shared memory, and the dQ share dS K is a wgmma with that transposed view as
  A, queued behind dV and dK; the result goes through shared memory to a TMA bulk reduce-add
  (`cp.reduce.async.bulk.tensor.add`) into the fp32 dQ buffer.
  DQ_SPLIT = False: each warp group multiplies its own 64 keys (dQ rows of BLOCK_M x d, two reduce-adds per
  step and program). DQ_SPLIT = True (the default for d 128; measured 13-18 % faster): both warp groups' dSᵀ go
  to one 128-key buffer (an mbarrier per buffer, count 2, orders them), and warp group w computes the d-columns
  [w·d/2, (w+1)·d/2) with K = 128 keys: one reduce-add's worth of bytes per step, as the Triton kernel.
Measured on the H200: bench/dmattn_notes.md, "Session 5: Gluon backward".
"""
import math

import torch
import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from cheems_parallel.kernels.device import is_hopper

LOG2E = 1.4426950408889634
BLOCK_N = 128  # keys per program: two consumer warp groups of 64
BLOCK_N_IN_KERNEL = gl.constexpr(BLOCK_N)
CONFIGS = {
    128: {"block_m": 64, "stages": 2, "dq_split": True},
    64: {"block_m": 64, "stages": 2, "dq_split": False},
}
PRODUCER_REGISTERS = 24
CONSUMER_REGISTERS = 240
SUPPORTED_HEAD_DIMS = (64, 128)


def supported(q, k, v, mask_bias, grad_out):
    """True when the Gluon backward can run these inputs (else the caller uses the Triton kernels)."""
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and v.dtype == q.dtype
            and grad_out.dtype == q.dtype and q.shape[-1] in SUPPORTED_HEAD_DIMS
            and is_hopper(q.device)
            and all(t.is_contiguous() for t in (q, k, v, grad_out)) and mask_bias.dtype == torch.float32
            and mask_bias.is_contiguous() and all(t.data_ptr() % 16 == 0 for t in (q, k, v, grad_out)))


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """global[box at coord] += shared `src` by one TMA bulk reduce (completion as a TMA store: tma.store_wait).
    Triton 3.6's Gluon has the builder op but no Python wrapper."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


# ----------------------------------------------------------------------------------------------
# Producer partition (1 warp).
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _bwd_producer(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem, v_smem, lse_smem,
                  delta_smem, kv_bar, ready, empty, kv_row, first_head, seq_len, row_stride, start_n, num_steps,
                  group_size,
                  BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_row, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [kv_row, 0], kv_bar, v_smem)
    step = 0
    for group_index in range(group_size):
        q_row = (first_head + group_index) * seq_len + start_n
        stat_row = (first_head + group_index) * row_stride + start_n
        for i in range(num_steps):
            slot = step % STAGES
            phase = (step // STAGES) & 1
            mbarrier.wait(empty.index(slot), phase ^ 1)
            bar = ready.index(slot)
            mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes + 2 * lse_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row + i * BLOCK_M, 0], bar, q_smem.index(slot))
            tma.async_copy_global_to_shared(lse_desc, [stat_row + i * BLOCK_M], bar, lse_smem.index(slot))
            tma.async_copy_global_to_shared(do_desc, [q_row + i * BLOCK_M, 0], bar, do_smem.index(slot))
            tma.async_copy_global_to_shared(delta_desc, [stat_row + i * BLOCK_M], bar, delta_smem.index(slot))
            step += 1


# ----------------------------------------------------------------------------------------------
# Consumer partitions (one warp group each, 64 keys).
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _probabilities(s, bias_log2, lse_rows, start_m, cols, scale_log2, BLOCK_M: gl.constexpr, MASKED: gl.constexpr):
    p = gl.exp2(s * scale_log2 + gl.expand_dims(bias_log2, 1) - gl.expand_dims(lse_rows, 0))
    if MASKED:
        rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s.type.layout))
        p = gl.where(gl.expand_dims(rows, 0) >= gl.expand_dims(cols, 1), p, 0.0)
    return p


@gluon.jit
def _issue_dq(ds_buf, k_smem, k_part, ds_bar, step, zero_dq, pred, DQ_COLS: gl.constexpr, DQ_SPLIT: gl.constexpr,
              PART: gl.constexpr):
    """The dQ share of `step` (its dSᵀ in ds_buf) by async wgmma: dS (BLOCK_M x 128 keys, both warp groups')
    times this warp group's d-columns of K (DQ_SPLIT), or dS (BLOCK_M x 64) times this warp group's K rows."""
    if DQ_SPLIT:
        mbarrier.wait(ds_bar.index(step % 2), (step // 2) & 1, pred=pred)
        dq = warpgroup_mma(ds_buf.permute((1, 0)), k_smem.slice(PART * DQ_COLS, DQ_COLS, dim=1), zero_dq,
                           use_acc=False, is_async=True)
    else:
        dq = warpgroup_mma(ds_buf.permute((1, 0)), k_part, zero_dq, use_acc=False, is_async=True)
    return dq


@gluon.jit
def _send_dq(dq, dq_smem, dq_desc, row, PART: gl.constexpr, DQ_COLS: gl.constexpr, DQ_SPLIT: gl.constexpr):
    """dq (registers) -> shared memory -> TMA reduce-add into the fp32 buffer at `row`."""
    tma.store_wait(0)  # the previous reduce-add has read dq_smem
    dq_smem.store(dq)
    fence_async_shared()
    _tma_reduce_add(dq_desc, [row, PART * DQ_COLS if DQ_SPLIT else 0], dq_smem)


@gluon.jit
def _bwd_consumer(q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, ds_smem, dq_smem, kv_bar, ready, empty,
                  ds_bar, dq_desc, mask_bias, grad_key, grad_value, grad_bias, batch_kv_head, first_head,
                  seq_len, start_n, num_steps, group_size, scale_log2, scale,
                  HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, DQ_SPLIT: gl.constexpr,
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
    num_masked = BLOCK_N_IN_KERNEL // BLOCK_M  # steps that reach the diagonal (the first ones)
    mbarrier.wait(kv_bar, 0)
    step = 0
    for group_index in range(group_size):
        batch_head = first_head + group_index
        head_row = batch_head * seq_len
        bias_log2 = gl.load(mask_bias + head_row + cols, mask=col_valid, other=0.0) * 1.4426950408889634
        grad_b = gl.zeros([KEYS], gl.float32, gl.SliceLayout(1, s_layout))
        for i in range(num_steps):
            slot = step % STAGES
            phase = (step // STAGES) & 1
            start_m = start_n + i * BLOCK_M
            mbarrier.wait(ready.index(slot), phase)
            q_tile = q_smem.index(slot)
            do_tile = do_smem.index(slot)
            s = warpgroup_mma(k_part, q_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dp = warpgroup_mma(v_part, do_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s, ))
            lse_rows = lse_smem.index(slot).load(gl.SliceLayout(0, s_layout))
            if i < num_masked:
                p = _probabilities(s, bias_log2, lse_rows, start_m, cols, scale_log2, BLOCK_M, True)
            else:
                p = _probabilities(s, bias_log2, lse_rows, start_m, cols, scale_log2, BLOCK_M, False)
            dp = warpgroup_mma_wait(0, deps=(dp, ))
            delta_rows = delta_smem.index(slot).load(gl.SliceLayout(0, s_layout))
            ds = p * (dp - gl.expand_dims(delta_rows, 0))
            p_a = gl.convert_layout(p.to(dtype), a_layout)
            grad_b += gl.sum(ds, 1)
            ds_low = ds.to(dtype)
            ds_a = gl.convert_layout(ds_low, a_layout)
            grad_v = warpgroup_mma(p_a, do_tile, grad_v, is_async=True)
            grad_k = warpgroup_mma(ds_a, q_tile, grad_k, is_async=True)
            # dSᵀ to shared memory (every earlier dQ wgmma reading this buffer was waited on: the own one at
            # the end of step - 2, the other warp group's before it arrived on ds_bar in step - 1).
            ds_buf = ds_smem.index(step % 2)
            if DQ_SPLIT:
                ds_buf.slice(PART * KEYS, KEYS, dim=0).store(ds_low)
            else:
                ds_buf.store(ds_low)
            fence_async_shared()
            if DQ_SPLIT:
                mbarrier.arrive(ds_bar.index(step % 2))
            # The dQ wgmma is queued behind dV and dK (wgmma groups complete in issue order): one wait.
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
def _bwd_second_consumer(q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, ds_smem, dq_smem, kv_bar, ready,
                         empty, ds_bar, dq_desc, mask_bias, grad_key, grad_value, grad_bias, batch_kv_head, first_head,
                         seq_len, start_n, num_steps, group_size, scale_log2, scale,
                         HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                         DQ_SPLIT: gl.constexpr):
    _bwd_consumer(q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, ds_smem, dq_smem.index(1), kv_bar, ready,
                  empty, ds_bar, dq_desc, mask_bias, grad_key, grad_value, grad_bias, batch_kv_head,
                  first_head, seq_len, start_n, num_steps, group_size, scale_log2, scale, HEAD_DIM, BLOCK_M,
                  STAGES, DQ_SPLIT, 1)


@gluon.jit
def _backward_ws_kernel(q_desc, do_desc, k_desc, v_desc, dq_desc, lse_desc, delta_desc, mask_bias, grad_key,
                        grad_value, grad_bias, seq_len, row_stride, num_heads, group_size, scale_log2, scale,
                        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                        DQ_SPLIT: gl.constexpr, PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        num_warps: gl.constexpr):
    """Grid (cdiv(l, 128), b·h_kv), key block 0 (the most query blocks) first. Descriptors over (b·h·l, d)
    rows: q, dO (blocks of BLOCK_M rows), k, v ((b·h_kv·l, d), blocks of 128 rows) and the fp32 dQ buffer
    (blocks of BLOCK_M x d, or x d/2 with DQ_SPLIT). num_warps = 4: the first consumer; a second 4-warp
    consumer and a 1-warp producer partition."""
    block_n = gl.program_id(0)
    batch_kv_head = gl.program_id(1)
    kv_heads = num_heads // group_size
    batch = batch_kv_head // kv_heads
    kv_head = batch_kv_head % kv_heads
    first_head = batch * num_heads + kv_head * group_size
    start_n = block_n * BLOCK_N_IN_KERNEL
    num_steps = gl.cdiv(seq_len - start_n, BLOCK_M)
    kv_row = batch_kv_head * seq_len + start_n

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
    DS_KEYS: gl.constexpr = BLOCK_N_IN_KERNEL if DQ_SPLIT else 64
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([DS_KEYS, BLOCK_M], q_desc.dtype)
    # Two dSᵀ buffers (alternating steps) per warp group, or shared by both with DQ_SPLIT.
    first_ds = gl.allocate_shared_memory(q_desc.dtype, [2, DS_KEYS, BLOCK_M], ds_layout)
    if DQ_SPLIT:
        second_ds = first_ds
    else:
        second_ds = gl.allocate_shared_memory(q_desc.dtype, [2, DS_KEYS, BLOCK_M], ds_layout)
    dq_smem = gl.allocate_shared_memory(dq_desc.dtype, [2] + dq_desc.block_type.shape, dq_desc.layout)
    lse_smem = gl.allocate_shared_memory(lse_desc.dtype, [STAGES] + lse_desc.block_type.shape, lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(delta_desc.dtype, [STAGES] + delta_desc.block_type.shape, delta_desc.layout)
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
        (_bwd_consumer, (q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, first_ds, dq_smem.index(0), kv_bar,
                         ready, empty, ds_bar, dq_desc, mask_bias, grad_key, grad_value, grad_bias, batch_kv_head,
                         first_head, seq_len, start_n, num_steps, group_size, scale_log2, scale, HEAD_DIM, BLOCK_M,
                         STAGES, DQ_SPLIT, 0)),
        (_bwd_second_consumer, (q_smem, do_smem, k_smem, v_smem, lse_smem, delta_smem, second_ds, dq_smem, kv_bar,
                                ready, empty, ds_bar, dq_desc, mask_bias, grad_key, grad_value, grad_bias,
                                batch_kv_head, first_head, seq_len, start_n, num_steps, group_size, scale_log2,
                                scale, HEAD_DIM, BLOCK_M, STAGES, DQ_SPLIT)),
        (_bwd_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_smem, do_smem, k_smem, v_smem,
                         lse_smem, delta_smem, kv_bar, ready, empty, kv_row, first_head, seq_len, row_stride, start_n,
                         num_steps, group_size, BLOCK_M, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def padded_stats(lse, delta, block_m):
    """lse and delta as (b·h, L) fp32 rows with L = l rounded up to a multiple of block_m: every step's 1-D TMA
    tile then starts 16-byte aligned (an unaligned start is an illegal instruction on the H200) and stays in
    its head's row; the padding holds lse = +inf (probability 0) and delta = 0."""
    length = lse.shape[-1]
    row_stride = triton.cdiv(length, block_m) * block_m
    lse_rows = torch.full((lse.numel() // length, row_stride), float("inf"), dtype=torch.float32, device=lse.device)
    delta_rows = torch.zeros_like(lse_rows)
    lse_rows[:, :length] = lse.reshape(-1, length)
    delta_rows[:, :length] = delta.reshape(-1, length)
    return lse_rows, delta_rows, row_stride


def descriptors(q, k, v, grad_out, grad_query_accum, lse_rows, delta_rows, block_m, dq_split):
    """Host-side TMA descriptors over the rows of contiguous q, dO (b·h·l, d), k, v (b·h_kv·l, d), the fp32 dQ
    buffer and the flat padded lse / delta rows."""
    head_dim = q.shape[-1]
    element = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_rows, do_rows, k_rows, v_rows = (t.view(-1, head_dim) for t in (q, grad_out, k, v))
    dq_rows = grad_query_accum.view(-1, head_dim)
    q_layout = gl.NVMMASharedLayout.get_default_for([block_m, head_dim], element)
    kv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, head_dim], element)
    dq_block = [block_m, head_dim // 2 if dq_split else head_dim]
    dq_layout = gl.NVMMASharedLayout.get_default_for(dq_block, gl.float32)
    stat_layout = gl.NVMMASharedLayout.get_default_for([block_m], gl.float32)

    def make(rows, block, layout):
        return TensorDescriptor(rows, list(rows.shape), list(rows.stride()), block, layout)
    lse_flat, delta_flat = lse_rows.view(-1), delta_rows.view(-1)
    return (make(q_rows, [block_m, head_dim], q_layout), make(do_rows, [block_m, head_dim], q_layout),
            make(k_rows, [BLOCK_N, head_dim], kv_layout), make(v_rows, [BLOCK_N, head_dim], kv_layout),
            make(dq_rows, dq_block, dq_layout), make(lse_flat, [block_m], stat_layout),
            make(delta_flat, [block_m], stat_layout))


def backward(q, k, v, mask_bias, grad_out, lse, delta, grad_query_accum, config=None):
    """(dK, dV, d mask_bias) as `dmattn._key_grad_kernel` writes them with FUSE_DQ, and the unscaled dQ shares
    added into grad_query_accum (fp32 (b, h, l, d), zeroed); see `supported`."""
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    config = dict(CONFIGS[head_dim], **(config or {}))
    # With d = 64 a dQ half is 32 columns, which starts inside a 128-byte swizzle atom of the K tile: not split.
    config["dq_split"] = config["dq_split"] and head_dim >= 128
    grad_key = torch.empty_like(k)
    grad_value = torch.empty_like(v)
    grad_bias = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
    lse_rows, delta_rows, row_stride = padded_stats(lse, delta, config["block_m"])
    descs = descriptors(q, k, v, grad_out, grad_query_accum, lse_rows, delta_rows, config["block_m"],
                        config["dq_split"])
    grid = (triton.cdiv(length, BLOCK_N), batch * kv_heads)
    scale = 1.0 / math.sqrt(head_dim)
    _backward_ws_kernel[grid](
        *descs, mask_bias, grad_key, grad_value, grad_bias, length, row_stride, heads, heads // kv_heads,
        scale * LOG2E, scale,
        HEAD_DIM=head_dim, BLOCK_M=config["block_m"], STAGES=config["stages"], DQ_SPLIT=config["dq_split"],
        PRODUCER_REGS=PRODUCER_REGISTERS, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return grad_key, grad_value, grad_bias
