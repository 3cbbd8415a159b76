"""cheems_parallel.kernels.ssd compiled for the GPU, against the float64 references, on a grid of shapes.

Shapes: x (b, l, h, p), B/C (b, l, h, n). Outputs, final state and every gradient are compared by
||kernel - oracle|| / ||oracle||: < 1e-2 for bf16 inputs, < 1e-3 for float32. The oracle is the
token-by-token recurrence `ssd_scan_ref` in float64 for l <= 2048, and the chunked dual form
`ssd_chunked` in float64 (itself tested equal to the recurrence) at l = 16k, where the Python loop is slow.
Fresh random inputs on every run. Skipped without CUDA (CI has none); run on the H200 by bench/gpu_ssd.sh.
"""
import pytest
import torch
import torch.nn.functional as F

from cheems_parallel.ops import apply_rope, rope_tables, ssd_chunked, ssd_scan_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

GRAD_NAMES = ["x", "dt_raw", "dt_bias", "A", "B", "C", "D", "initial_state"]


def make_inputs(batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq):
    device = "cuda"
    inputs = {
        "x": torch.randn(batch, length, heads, head_dim, device=device).to(dtype),
        "dt_raw": torch.randn(batch, length, heads, device=device) - 2.0,
        "dt_bias": torch.randn(heads, device=device) * 0.5,
        "A": -torch.rand(heads, device=device) * 4 - 0.1,
        "B": torch.randn(batch, length, heads, state_dim, device=device).to(dtype) / state_dim ** 0.5,
        "C": torch.randn(batch, length, heads, state_dim, device=device).to(dtype) / state_dim ** 0.5,
        "D": torch.randn(heads, device=device) if use_d else None,
        "initial_state": torch.randn(batch, heads, head_dim, state_dim, device=device) if use_init else None,
    }
    if rope:
        offsets = torch.randint(0, 10000, (batch, 1), device=device)
        inputs["cos"], inputs["sin"] = rope_tables(torch.arange(length, device=device)[None] + offsets, state_dim)
    else:
        inputs["cos"] = inputs["sin"] = None
    if use_seq:  # a handful of documents per row, boundaries at random places
        inputs["seq_idx"] = torch.sort(torch.randint(0, 6, (batch, length), device=device), dim=1).values
    else:
        inputs["seq_idx"] = None
    return inputs


def float64_oracle(x, dt_raw, dt_bias, A, B, C, cos, sin, D, initial_state, seq_idx):
    wide = torch.float64
    dt = F.softplus(dt_raw.to(wide) + dt_bias.to(wide))
    B, C = B.to(wide), C.to(wide)
    if cos is not None:
        B = apply_rope(B, cos.to(wide)[:, :, None], sin.to(wide)[:, :, None])
        C = apply_rope(C, cos.to(wide)[:, :, None], sin.to(wide)[:, :, None])
    args = (x.to(wide), dt, A.to(wide), B, C)
    D = None if D is None else D.to(wide)
    initial_state = None if initial_state is None else initial_state.to(wide)
    if x.shape[1] <= 2048:
        return ssd_scan_ref(*args, D, initial_state, seq_idx)
    return ssd_chunked(*args, 256, D, initial_state, seq_idx)


def relative_error(value, reference):
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq",
    [
        (1, 100, 1, 64, 64, torch.bfloat16, True, True, True, True),         # b = 1, h = 1
        (2, 1000, 4, 64, 128, torch.float32, True, True, True, True),        # float32, L % 64 != 0
        (2, 777, 3, 128, 128, torch.bfloat16, False, False, False, False),   # plain Mamba-2, odd L
        (3, 2048, 2, 128, 128, torch.bfloat16, True, True, False, True),     # documents, Cheems shape
        (1, 16384, 2, 64, 128, torch.bfloat16, True, True, True, True),      # L = 16k
        (1, 16384, 1, 64, 64, torch.float32, True, False, True, False),      # L = 16k, float32
    ],
)
def test_kernel_matches_float64_reference(batch, length, heads, head_dim, state_dim, dtype, rope, use_d,
                                          use_init, use_seq):
    from cheems_parallel.kernels.ssd import ssd_fused

    inputs = make_inputs(batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq)
    leaves = {name: inputs[name] for name in GRAD_NAMES if inputs[name] is not None}
    for tensor in leaves.values():
        tensor.requires_grad_(True)
    y, final = ssd_fused(**inputs)
    # upstream gradient representable in y's dtype, so kernel and oracle differentiate the same loss
    # (a float64 weight cast to bf16 on the way in moves sums such as d dt_bias by far more than 1e-2)
    weight_y = torch.randn(y.shape, device="cuda", dtype=torch.float64).to(y.dtype).double()
    weight_final = torch.randn(final.shape, device="cuda", dtype=torch.float64)
    kernel_grads = torch.autograd.grad((y.double() * weight_y).sum() + (final.double() * weight_final).sum(),
                                       list(leaves.values()))
    torch.cuda.synchronize()
    y_ref, final_ref = float64_oracle(**inputs)
    ref_grads = torch.autograd.grad((y_ref * weight_y).sum() + (final_ref * weight_final).sum(), list(leaves.values()))
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    errors = {"y": relative_error(y, y_ref), "final_state": relative_error(final, final_ref)}
    for name, grad, ref in zip(leaves, kernel_grads, ref_grads):
        errors["d" + name] = relative_error(grad, ref)
    print(f"\nshape b={batch} l={length} h={heads} p={head_dim} n={state_dim} {dtype}: "
          + " ".join(f"{name}={error:.1e}" for name, error in errors.items()))
    bad = {name: error for name, error in errors.items() if not error < tolerance}
    assert not bad, f"relative error over {tolerance}: {bad}"
