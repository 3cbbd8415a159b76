"""Offline sm_90 compile report of the Gluon fused group backward (`ssd_gluon_bwd._fused_group_bwd_kernel`):
registers, stack (spills), STL/LDL, shared memory, HGMMA, setmaxnreg. No GPU needed.

  PYTHONPATH=/tmp/t36site .venv/bin/python bench/ssd_gluon_compile.py     # Triton 3.6, the GPU's version
(not under TRITON_INTERPRET=1: Gluon compiles only with the real compiler; tests/unit/test_ssd_gluon_compile.py
runs this file in a subprocess without it).
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch

from dmattn_gluon_compile import compile_kernel


def _placeholders(batch, length, heads, head_dim, state_dim, groups):
    """Empty CPU tensors of a problem's shapes (only their shapes, strides and dtypes reach the compiler):
    x, the states, a (b, h, l) float32 vector, the six TMA descriptors and a small float32 buffer."""
    from cheems_parallel.kernels.ssd_gluon_bwd import CHUNK, descriptors
    x = torch.empty(batch, length, heads, head_dim, dtype=torch.bfloat16)
    B = torch.empty(batch, length, groups, state_dim, dtype=torch.bfloat16)
    states = torch.empty(batch, length // CHUNK + 1, heads, head_dim, state_dim, dtype=torch.bfloat16)
    vec = torch.empty(batch, heads, length)
    return x, B, vec, descriptors(x, x, states, states, B, B), torch.empty(4)


def fused_case(head_dim=128, state_dim=128, has_d=True, batch=2, length=1024, heads=32, groups=1, **overrides):
    from cheems_parallel.kernels import ssd_gluon_bwd as m
    x, _, vec, descs, f32 = _placeholders(batch, length, heads, head_dim, state_dim, groups)
    args = (*descs, vec, vec, f32, x, f32, f32, f32, vec, vec, vec, f32, length, heads, heads // groups,
            length // m.CHUNK, length)
    constexprs = dict(T=m.CHUNK, P=head_dim, N=state_dim, STAGES=m.STAGES, HAS_D=has_d, P_C=head_dim // 2,
                      PRODUCER_REGS=m.PRODUCER_REGISTERS, CONSUMER_REGS=m.CONSUMER_REGISTERS, num_warps=4)
    constexprs.update(overrides)
    return compile_kernel(m._fused_group_bwd_kernel, args, constexprs, 4)


def head_case(head_dim=128, has_d=True, rope=True, batch=2, length=1024, heads=8, has_seq=False, **overrides):
    """The groups = heads kernel (`ssd_gluon_head_bwd`, n = 128)."""
    from cheems_parallel.kernels import ssd_gluon_head_bwd as m
    state_dim = 128
    n_chunks = length // m.CHUNK
    x, B, vec, descs, f32 = _placeholders(batch, length, heads, head_dim, state_dim, heads)
    table = torch.empty(batch, length, state_dim, dtype=torch.bfloat16)   # fragment_tables' form
    out_descs = (descs[0], descs[5], descs[4])   # dx, dB, dC: x's and B's shapes
    args = (*descs, *out_descs, vec, vec, f32, table, vec, vec, vec, f32,
            torch.empty(batch, length, dtype=torch.int32), torch.empty(4, dtype=torch.int64), length, heads,
            batch * heads, n_chunks, length, n_chunks * batch * heads, *table.stride()[:2])
    constexprs = dict(T=m.CHUNK, P=head_dim, N=state_dim, STAGES=m.STAGES, HAS_D=has_d,
                      ROPE=rope, HAS_SEQ=has_seq,
                      PROFILE=False,
                      PRODUCER_REGS=m.PRODUCER_REGISTERS, CONSUMER_REGS=m.B_SIDE_REGISTERS, num_warps=4)
    constexprs.update(overrides)
    return compile_kernel(m._fused_head_bwd_kernel, args, constexprs, 4)


def forward_case(has_d=True, rope=True, save_rotated=True, has_init=False, batch=2, length=1024, heads=8, groups=8,
                 has_seq=False, **overrides):
    """The forward walk (`ssd_gluon_fwd`, p = n = 128)."""
    from cheems_parallel.kernels import ssd_gluon_fwd as m
    from cheems_parallel.kernels.ssd_gluon_bwd import tma_descriptor
    head_dim = state_dim = 128
    n_chunks = length // m.CHUNK
    x, B, vec, _, f32 = _placeholders(batch, length, heads, head_dim, state_dim, groups)
    states = torch.empty(batch, n_chunks + 1, heads, head_dim, state_dim, dtype=torch.bfloat16)
    tokens = batch * length
    x_desc = tma_descriptor(x, tokens, heads * head_dim, [m.CHUNK, head_dim])
    b_desc = tma_descriptor(B, tokens, groups * state_dim, [m.CHUNK, state_dim])
    s_desc = tma_descriptor(states, states.numel() // state_dim, state_dim, [head_dim, state_dim])
    table = torch.empty(batch, length, state_dim, dtype=torch.bfloat16)
    args = (x_desc, b_desc, b_desc, s_desc, b_desc, b_desc, x_desc, vec, vec, f32, table, table, f32, f32,
            torch.empty(8, dtype=torch.int64), torch.empty(batch, length, dtype=torch.int32), length, heads,
            heads // groups, n_chunks, length, batch * heads)
    constexprs = dict(T=m.CHUNK, P=head_dim, N=state_dim, STAGES=m.STAGES if rope else m.STAGES + 1, HAS_D=has_d,
                      HAS_INIT=has_init, HAS_SEQ=has_seq,
                      ROPE=rope, SAVE_ROTATED=save_rotated, STORE_STATES=save_rotated or not rope, PROFILE=False,
                      num_warps=8)
    constexprs.update(overrides)
    return compile_kernel(m._fused_fwd_kernel, args, constexprs, 8)


def state_case(head_dim=128, state_dim=128, batch=2, length=1024, heads=8, groups=8, has_seq=False, has_dfinal=True,
               **overrides):
    """The reverse state walk (`ssd_gluon_state_bwd`)."""
    from cheems_parallel.kernels import ssd_gluon_state_bwd as m
    from cheems_parallel.kernels.ssd_gluon_bwd import tma_descriptor
    n_chunks = length // m.CHUNK
    x, B, vec, _, f32 = _placeholders(batch, length, heads, head_dim, state_dim, groups)
    states = torch.empty(batch, n_chunks + 1, heads, head_dim, state_dim, dtype=torch.bfloat16)
    tokens = batch * length
    args = (tma_descriptor(x, tokens, heads * head_dim, [m.CHUNK, head_dim]),
            tma_descriptor(B, tokens, groups * state_dim, [m.CHUNK, state_dim]),
            tma_descriptor(states, states.numel() // state_dim, state_dim, [head_dim, state_dim]),
            vec, torch.empty(batch, length, dtype=torch.int32), f32, f32, length, heads, heads // groups, n_chunks,
            length, batch * heads)
    constexprs = dict(T=m.CHUNK, P=head_dim, N=state_dim, STAGES=m.STAGES, HAS_SEQ=has_seq, HAS_DFINAL=has_dfinal,
                      num_warps=head_dim // 16)
    constexprs.update(overrides)
    return compile_kernel(m._state_bwd_walk_kernel, args, constexprs, head_dim // 16)


CASES = ((128, 128, True), (128, 128, False), (64, 128, True), (64, 64, False))
# (D, RoPE, save B~/C~, initial state, groups, documents): the Cheems layer's training and no-grad forwards, its
# training forward with documents; mamba's shape
FORWARD_CASES = ((True, True, True, False, 8, False), (True, True, False, True, 8, False),
                 (True, True, True, False, 8, True), (True, False, False, False, 1, False))
# (p, n, groups, documents): the Cheems layer's (with documents too), mamba's shape, p = 64
STATE_CASES = ((128, 128, 8, False), (128, 128, 8, True), (128, 128, 1, False), (64, 128, 8, False))
# (p, D, RoPE, documents)
HEAD_CASES = ((128, True, True, False), (128, False, False, False), (64, True, True, False), (128, True, True, True))

def builds():
    """(case fields, builder name, keyword arguments) of every build the report covers."""
    for p, n, has_d in CASES:
        yield {"p": p, "n": n, "D": has_d}, "fused_case", dict(head_dim=p, state_dim=n, has_d=has_d)
    for has_d, rope, save, init, groups, seq in FORWARD_CASES:
        yield ({"kernel": "forward", "p": 128, "n": 128, "D": has_d, "rope": rope, "save_rotated": save, "init": init,
                "groups": groups, "documents": seq}, "forward_case",
               dict(has_d=has_d, rope=rope, save_rotated=save, has_init=init, groups=groups, has_seq=seq))
    for p, has_d, rope, seq in HEAD_CASES:
        yield ({"kernel": "head", "p": p, "n": 128, "D": has_d, "rope": rope, "documents": seq}, "head_case",
               dict(head_dim=p, has_d=has_d, rope=rope, has_seq=seq))
    for p, n, groups, seq in STATE_CASES:
        yield ({"kernel": "state", "p": p, "n": n, "groups": groups, "documents": seq}, "state_case",
               dict(head_dim=p, state_dim=n, groups=groups, has_seq=seq))
    # the cycle-profile builds bench/ssd_head_profile.py and bench/ssd_walk_profile.py launch
    for kernel, builder in (("head", "head_case"), ("forward", "forward_case")):
        yield ({"kernel": kernel, "p": 128, "n": 128, "D": True, "rope": True, "profile": True}, builder,
               dict(PROFILE=True))


def report_line(build):
    """One JSON line: the case's fields and its report, or the error that stopped its build."""
    case, builder, arguments = build
    try:
        report, _ = globals()[builder](**arguments)
        return json.dumps(dict(case, report=report))
    except Exception as error:
        return json.dumps(dict(case, error=f"{type(error).__name__}: {str(error)[-2500:]}"))


if __name__ == "__main__":
    # one JSON object per line, in the order of `builds`: the builds are independent, so they compile in parallel
    # (one process per core: ptxas and the Triton passes are single-threaded)
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for line in pool.map(report_line, list(builds())):
            print(line, flush=True)
