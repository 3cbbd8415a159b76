"""Offline sm_90 compile report of the Gluon DMAttn forward kernels (dense `_forward_ws_kernel`, sparse
`_sparse_forward_kernel`): registers at launch, stack (spills), STL/LDL, shared memory, HGMMA count. No GPU needed:
`triton.compile` with GPUTarget("cuda", 90, 32), ptxas and cuobjdump from the Triton wheel.

  PYTHONPATH=/tmp/t36site .venv/bin/python bench/dmattn_gluon_compile.py sparse   # Triton 3.6, the GPU's version
  PYTHONPATH=/tmp/t36site .venv/bin/python bench/dmattn_gluon_compile.py dense    # + a SASS hash per head dim
  PYTHONPATH=/tmp/t36site .venv/bin/python bench/dmattn_gluon_compile.py sparse-backward  # + the dense backward
"""
import hashlib
import inspect
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch
from triton.runtime.jit import mangle_type
from triton.experimental.gluon._runtime import GluonASTSource

from sm90_compile import compile_sm90


def compile_kernel(kernel, args, constexprs, num_warps):
    names = list(inspect.signature(kernel.fn).parameters)
    signature, constants = {}, {}
    bound = dict(zip(names, args))
    bound.update(constexprs)
    # as the JIT launcher specialises them: integer arguments equal to 1 (a unit stride) become constants, so
    # the compiler knows that dimension is contiguous (e.g. 8-byte instead of 4-byte loads)
    ones = {name for name in names if name not in constexprs and type(bound[name]) is int and bound[name] == 1}
    constexprs = dict(constexprs, **{name: 1 for name in ones})
    for name in names:
        value = bound[name]
        if name in constexprs:
            signature[name] = "constexpr"
            constants[(names.index(name),)] = value
        else:
            signature[name] = mangle_type(value)
    # as the JIT launcher specialises them: tensors (16-byte aligned, as torch allocates) and integers that are
    # multiples of 16 carry tt.divisibility = 16 (vectorised accesses depend on it)
    attrs = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(names) if name not in constexprs
             and (isinstance(bound[name], torch.Tensor)
                  or (isinstance(bound[name], int) and not isinstance(bound[name], bool) and bound[name] % 16 == 0))}
    src = GluonASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return compile_sm90(src, {"num_warps": num_warps})


def sparse_case(head_dim, has_window, has_segments, config=None, length=1024):
    from cheems_parallel.kernels import dmattn_gluon, dmattn_gluon_sparse as m
    cfg = dict(m.CONFIGS[head_dim], **(config or {}))
    b, h, hk = 2, 4, 2
    q = torch.empty(b, h, length, head_dim, dtype=torch.bfloat16)
    k = torch.empty(b, hk, length, head_dim, dtype=torch.bfloat16)
    bias = torch.empty(b, h, length)
    descs = dmattn_gluon.descriptors(q, k, k, bias, cfg["block_m"], cfg["block_n"], cfg["split"])
    i32 = torch.empty(4, dtype=torch.int32)
    key_rank = torch.zeros(b, h, length, dtype=torch.int32) if has_window else None
    segment_ids = torch.zeros(b, length, dtype=torch.int32) if has_segments else None
    rank_desc, seg_desc, _, _ = m.key_descriptors(key_rank, segment_ids, bias, cfg["block_n"], descs[3])
    args = (*descs, rank_desc, seg_desc, q, bias, i32, i32, i32, i32, length, length, length, h, 2, 8, 0.1)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], STAGES=cfg["stages"],
                      SPLIT=cfg["split"], HAS_WINDOW=has_window, HAS_SEGMENTS=has_segments,
                      PRODUCER_REGS=m.PRODUCER_REGISTERS, CONSUMER_REGS=m.CONSUMER_REGISTERS,
                      num_warps=4 if cfg["split"] else 8)
    return compile_kernel(m._sparse_forward_kernel, args, constexprs, constexprs["num_warps"])


def dense_case(head_dim, config=None, length=1024):
    from cheems_parallel.kernels import dmattn_gluon as m
    cfg = dict(m.CONFIGS[head_dim], **(config or {}))
    b, h = 2, 4
    q = torch.empty(b, h, length, head_dim, dtype=torch.bfloat16)
    bias = torch.empty(b, h, length)
    descs = m.descriptors(q, q, q, bias, cfg["block_m"], cfg["block_n"], cfg["split"])
    args = (*descs, q, bias, length, length, h, 1, 0.1)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], STAGES=cfg["stages"],
                      OVERLAP=cfg["overlap"], SPLIT=cfg["split"], PRODUCER_REGS=m.PRODUCER_REGISTERS,
                      CONSUMER_REGS=m.CONSUMER_REGISTERS, num_warps=4 if cfg["split"] else 8)
    return compile_kernel(m._forward_ws_kernel, args, constexprs, constexprs["num_warps"])



def sparse_backward_case(head_dim, has_window, has_segments, config=None, length=1024):
    from cheems_parallel.kernels import dmattn_gluon_bwd
    from cheems_parallel.kernels import dmattn_gluon_sparse_bwd as m
    cfg = dict(m.CONFIGS[head_dim], **(config or {}))
    cfg["dq_split"] = cfg["dq_split"] and head_dim >= 128
    b, h, hk = 2, 4, 2
    q = torch.empty(b, h, length, head_dim, dtype=torch.bfloat16)
    k = torch.empty(b, hk, length, head_dim, dtype=torch.bfloat16)
    stats = torch.empty(b, h, length)
    dq = torch.empty(b, h, length, head_dim)
    lse_rows, delta_rows, row_stride = dmattn_gluon_bwd.padded_stats(stats, stats, cfg["block_m"])
    descs = dmattn_gluon_bwd.descriptors(q, k, k, q, dq, lse_rows, delta_rows, cfg["block_m"], cfg["dq_split"])
    threshold = torch.zeros(b, h, length, dtype=torch.int32) if has_window else None
    segments = torch.zeros(b, length, dtype=torch.int32) if has_segments else None
    threshold_desc, segment_desc, _ = m.row_descriptors(threshold, segments, row_stride, cfg["block_m"], descs[5])
    i32 = torch.empty(4, dtype=torch.int32)
    args = (*descs, threshold_desc, segment_desc, stats, i32, i32, i32, i32, k, k, stats, length, row_stride, h, 2,
            8, 16, 0.1, 0.1)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg["block_m"], STAGES=cfg["stages"], DQ_SPLIT=cfg["dq_split"],
                      HAS_WINDOW=has_window, HAS_SEGMENTS=has_segments, PRODUCER_REGS=m.PRODUCER_REGISTERS,
                      CONSUMER_REGS=m.CONSUMER_REGISTERS, num_warps=4)
    return compile_kernel(m._sparse_backward_ws_kernel, args, constexprs, 4)


def dense_backward_case(head_dim, length=1024):
    from cheems_parallel.kernels import dmattn_gluon_bwd as m
    cfg = dict(m.CONFIGS[head_dim])
    cfg["dq_split"] = cfg["dq_split"] and head_dim >= 128
    b, h = 2, 4
    q = torch.empty(b, h, length, head_dim, dtype=torch.bfloat16)
    stats = torch.empty(b, h, length)
    dq = torch.empty(b, h, length, head_dim)
    lse_rows, delta_rows, row_stride = m.padded_stats(stats, stats, cfg["block_m"])
    descs = m.descriptors(q, q, q, q, dq, lse_rows, delta_rows, cfg["block_m"], cfg["dq_split"])
    args = (*descs, stats, q, q, stats, length, row_stride, h, 1, 0.1, 0.1)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg["block_m"], STAGES=cfg["stages"], DQ_SPLIT=cfg["dq_split"],
                      PRODUCER_REGS=m.PRODUCER_REGISTERS, CONSUMER_REGS=m.CONSUMER_REGISTERS, num_warps=4)
    return compile_kernel(m._backward_ws_kernel, args, constexprs, 4)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "sparse"
    if what == "sparse-backward":
        for d, w, s, cfg in [(128, True, False, None), (128, False, True, None), (128, True, True, None),
                             (128, True, False, {"dq_split": False}), (64, True, False, None), (64, True, True, None)]:
            try:
                r, _ = sparse_backward_case(d, w, s, cfg)
                print("sparse-backward d", d, "window", w, "segments", s, cfg, json.dumps(r))
            except Exception as e:
                print("sparse-backward d", d, "window", w, "segments", s, cfg, "FAILED", type(e).__name__,
                      str(e)[-1500:])
        for d in (128, 64):
            r, sass = dense_backward_case(d)
            body = "\n".join(line for line in sass.splitlines() if "/*" in line)
            print("dense-backward", d, json.dumps(r), hashlib.sha1(body.encode()).hexdigest()[:12])
    elif what == "dense":
        for d in (128, 64):
            r, sass = dense_case(d)
            body = "\n".join(l for l in sass.splitlines() if "/*" in l)
            print("dense", d, json.dumps(r), hashlib.sha1(body.encode()).hexdigest()[:12])
    else:
        for d, w, s, cfg in [(128, True, False, None), (128, False, True, None), (128, True, True, None),
                             (128, True, True, {"stages": 3}), (128, True, False, {"split": False}),
                             (128, True, False, {"block_n": 64, "stages": 3}), (64, True, False, None),
                             (64, False, True, None), (64, True, True, None)]:
            try:
                r, _ = sparse_case(d, w, s, cfg)
                print("sparse d", d, "window", w, "segments", s, cfg, json.dumps(r))
            except Exception as e:
                print("sparse d", d, "window", w, "segments", s, cfg, "FAILED", type(e).__name__, str(e)[:1500])
