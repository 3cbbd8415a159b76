"""cheems_parallel.kernels.ssd_scan_fwd (the one-walk SSD forward) compiled for the GPU, against the float64
references, on a grid of shapes (the grid of tests/gpu/test_ssd_kernel_gpu.py, bf16 up to L = 16k).

Shapes: x (b, l, h, p), B/C (b, l, g, n). `ssd.ssd_fused` runs with its `_forward` swapped for `scan_forward`
(how the integrator wires it in), so the unchanged `ssd._backward` runs on the states / B~ / C~ this kernel
saved. Outputs, final state and every gradient are compared by ||kernel - oracle|| / ||oracle||: < 1e-2 for
bf16, < 1e-3 for float32; d dt_bias and dA against the magnitude of their terms (`ssd_sum_error`). The oracle
is the float64 recurrence for l <= 2048 and the float64 chunked form beyond. Fresh random inputs every run.
Skipped without CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

from tests.gpu.test_ssd_kernel_gpu import make_inputs
from tests.kernel_oracles import relative_error, ssd_float64_oracle, ssd_kernel_errors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def scan_ssd(monkeypatch):
    """The ssd module with scan_forward as its forward."""
    from cheems_parallel.kernels import ssd
    from cheems_parallel.kernels.ssd_scan_fwd import scan_forward

    monkeypatch.setattr(ssd, "_forward", scan_forward)
    return ssd


# (batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, groups, config overrides)
CASES = [
    (1, 100, 1, 64, 64, torch.bfloat16, True, True, True, True, 1, {}),            # b = 1, h = 1
    (2, 1000, 4, 64, 128, torch.float32, True, True, True, True, 4, {}),           # float32, L % 64 != 0
    (2, 777, 3, 128, 128, torch.bfloat16, False, False, False, False, 3, {}),      # plain Mamba-2, odd L
    (3, 2048, 2, 128, 128, torch.bfloat16, True, True, False, True, 2, {}),        # documents, Cheems shape
    (1, 16384, 2, 64, 128, torch.bfloat16, True, True, True, True, 2, {}),         # L = 16k
    (1, 16384, 4, 128, 128, torch.bfloat16, False, True, False, True, 1, {}),      # L = 16k, mamba's shape
    (2, 777, 8, 128, 128, torch.bfloat16, False, True, True, True, 1, {}),         # one group for 8 heads
    (2, 1000, 8, 64, 128, torch.bfloat16, True, True, True, True, 2, {}),         # groups with RoPE
    (2, 1000, 4, 96, 128, torch.bfloat16, True, True, True, True, 4, {"save_rotated": False}),  # p = 96 masked
    # the tile variants the compile report lists (block_p 64 / 128, 4 / 8 warps, steps 16 / 32 / 64)
    (2, 1000, 8, 128, 128, torch.bfloat16, False, True, True, True, 1,
     {"scan_fwd_block_p": 128, "scan_fwd_warps": 8, "scan_fwd_step": 32}),
    (2, 1000, 8, 128, 128, torch.bfloat16, True, True, True, True, 8,
     {"scan_fwd_block_p": 64, "scan_fwd_warps": 4, "scan_fwd_step": 16}),
    (2, 1000, 8, 128, 128, torch.bfloat16, True, True, True, True, 8,
     {"scan_fwd_block_p": 64, "scan_fwd_warps": 8, "scan_fwd_step": 64}),
    (2, 1000, 8, 128, 128, torch.bfloat16, False, True, True, True, 1,
     {"scan_fwd_save_block_p": 128, "scan_fwd_save_warps": 8, "scan_fwd_step": 64}),
    # where RoPE happens: in the walk (spills), B~ and C~ from the pre-pass (no spills, B~ rounded twice)
    (2, 1000, 8, 128, 128, torch.bfloat16, True, True, True, True, 8, {"scan_fwd_rope_prepass": False}),
    (2, 1000, 8, 128, 128, torch.bfloat16, True, True, True, True, 8, {"scan_fwd_rope_prepass": True}),
    (1, 16384, 2, 128, 128, torch.bfloat16, True, True, True, True, 2,
     {"scan_fwd_rope_prepass": True, "scan_fwd_warps": 8, "scan_fwd_step": 32}),
]


@pytest.mark.parametrize(
    "batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, groups, overrides", CASES)
def test_scan_forward_matches_float64_reference(scan_ssd, batch, length, heads, head_dim, state_dim, dtype, rope,
                                                use_d, use_init, use_seq, groups, overrides):
    inputs = make_inputs(batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, groups)
    errors, plain = ssd_kernel_errors(scan_ssd.ssd_fused, inputs, config=overrides)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    print(f"\nscan fwd b={batch} l={length} h={heads} g={groups} p={head_dim} n={state_dim} {dtype} {overrides}: "
          + " ".join(f"{name}={error:.1e}" for name, error in errors.items())
          + " | plain relative: " + " ".join(f"{name}={error:.1e}" for name, error in plain.items()))
    bad = {name: error for name, error in errors.items() if not error < tolerance}
    assert not bad, f"relative error over {tolerance}: {bad}"


@pytest.mark.parametrize("groups, rope, length", [(1, False, 1000), (8, True, 1000), (1, False, 16384)])
def test_scan_forward_without_gradients_matches_float64_reference(scan_ssd, groups, rope, length):
    """The inference path (save_for_backward=False: nothing stored but y and final) within 1e-2 (bf16)."""
    inputs = make_inputs(2 if length < 4096 else 1, length, 8, 128, 128, torch.bfloat16, rope, True, False, True,
                         groups)
    with torch.no_grad():
        y, final = scan_ssd.ssd_fused(**inputs)
    y_ref, final_ref = ssd_float64_oracle(**inputs)
    errors = {"y": relative_error(y.cpu(), y_ref.cpu()), "final": relative_error(final.cpu(), final_ref.cpu())}
    print(f"\nscan fwd no-grad g={groups} rope={rope} l={length}: "
          + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    assert all(error < 1e-2 for error in errors.values()), errors


@pytest.mark.parametrize("groups, rope", [(1, False), (8, True)])
def test_saved_tensors_equal_the_two_kernel_forward(groups, rope):
    """At the mamba / Cheems shapes: y, final, states, B~, C~ as `ssd._forward` stores them (same prologue),
    each within one bf16 rounding (2^-8 relative): the walk steps 16 tokens where the two kernels step 64, and
    the compiler may contract the rotation's products into FMAs differently in the two kernels."""
    from cheems_parallel.kernels import ssd
    from cheems_parallel.kernels.ssd_scan_fwd import scan_forward

    inputs = make_inputs(2, 1000, 8, 128, 128, torch.bfloat16, rope, True, True, True, groups)
    T = ssd.KERNEL_CHUNK
    batch, length, heads, _ = inputs["x"].shape
    pad = (-length) % T
    dt = F.pad(F.softplus(inputs["dt_raw"] + inputs["dt_bias"]).transpose(1, 2), (0, pad)).contiguous()
    g = (dt * inputs["A"][:, None]).view(batch, heads, -1, T).cumsum(dim=-1).view(batch, heads, -1)
    seq = torch.cat([inputs["seq_idx"].int(), inputs["seq_idx"][:, -1:].int().expand(batch, pad)], 1).contiguous()
    cos = inputs["cos"].to(torch.bfloat16).contiguous() if rope else None
    sin = inputs["sin"].to(torch.bfloat16).contiguous() if rope else None
    arguments = (inputs["x"], inputs["B"], inputs["C"], cos, sin, dt, g, seq, inputs["D"], inputs["initial_state"], T,
                 dict(ssd.CONFIG))
    ours = scan_forward(*arguments, save_for_backward=True)
    theirs = ssd._forward(*arguments, save_for_backward=True)
    bounds = dict.fromkeys(["y", "final", "states", "rotated_B", "rotated_C"], 2 ** -8)
    for (name, bound), value, reference in zip(bounds.items(), ours, theirs):
        if reference is None:
            assert value is None, name
            continue
        error = relative_error(value, reference)
        print(f"\nsaved {name} g={groups} rope={rope}: {error:.1e}")
        assert error <= bound, (name, error)
