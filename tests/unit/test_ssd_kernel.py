"""cheems_parallel.kernels.ssd (Triton SSD forward + backward) against the float64 sequential recurrence
`cheems_parallel.ops.ssd_scan_ref`, under TRITON_INTERPRET=1 on the CPU, at small shapes.

Shapes: x (b, l, h, p), B/C (b, l, h, n), cos/sin (b, l, n). Every check draws fresh random inputs,
compares the output, the final state and the gradient of every differentiable input by
||kernel - oracle|| / ||oracle||. The interpreter multiplies bf16 in float32 (its bf16 dot is wrong),
so the kernels round every product operand through bf16 and multiply in float32: the bf16 case sees the
GPU's operand rounding, bf16 loads/stores and the states kept in bf16.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cheems_parallel.ops import apply_rope, rope_tables, ssd_chunked, ssd_scan_ref

GRAD_NAMES = ["x", "dt_raw", "dt_bias", "A", "B", "C", "D", "initial_state"]


def _interpreter_usable():
    """Triton's own @jit helpers (tl.sum, ...) run under the interpreter only if triton itself was imported
    with TRITON_INTERPRET=1; an earlier test that imported it for compilation makes that impossible here."""
    if "triton" not in sys.modules:
        return True
    import triton.language.standard as standard
    return type(standard.sum).__name__ == "InterpretedFunction"


IN_CHILD = os.environ.get("SSD_KERNEL_TEST_CHILD") == "1"


@pytest.fixture(scope="module")
def kernels():
    """The kernel module decorated for the interpreter (re-imported if something loaded it for a GPU)."""
    if not _interpreter_usable():
        pytest.skip("triton was imported for compilation earlier in this process: "
                    "test_kernel_tests_in_a_fresh_interpreter_process runs these tests instead")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.import_module("cheems_parallel.kernels.ssd")
    if type(module._chunk_fwd_kernel).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    yield module
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous
    if torch.cuda.is_available():  # leave a GPU-compiled module behind for tests that follow
        importlib.reload(sys.modules["cheems_parallel.kernels.ssd"])


@pytest.mark.skipif(IN_CHILD, reason="already the fresh process")
def test_kernel_tests_in_a_fresh_interpreter_process():
    """When this process cannot interpret (see _interpreter_usable), run this file in a new one."""
    if _interpreter_usable():
        pytest.skip("the tests above ran in this process")
    environment = dict(os.environ, TRITON_INTERPRET="1", SSD_KERNEL_TEST_CHILD="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def make_inputs(batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, generator):
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype)

    inputs = {
        "x": randn(batch, length, heads, head_dim, dtype=dtype),
        "dt_raw": randn(batch, length, heads) - 1.0,
        "dt_bias": randn(heads) * 0.5,
        "A": -torch.rand(heads, generator=generator) * 2 - 0.1,
        "B": (randn(batch, length, heads, state_dim) / state_dim ** 0.5).to(dtype),
        "C": (randn(batch, length, heads, state_dim) / state_dim ** 0.5).to(dtype),
        "D": randn(heads) if use_d else None,
        "initial_state": randn(batch, heads, head_dim, state_dim) if use_init else None,
    }
    if rope:
        offsets = torch.randint(0, 1000, (batch, 1), generator=generator)
        inputs["cos"], inputs["sin"] = rope_tables(torch.arange(length)[None] + offsets, state_dim)
    else:
        inputs["cos"] = inputs["sin"] = None
    if use_seq:  # 2-4 documents per row, boundaries anywhere (also inside and at edges of chunks)
        inputs["seq_idx"] = torch.sort(torch.randint(0, 4, (batch, length), generator=generator), dim=1).values
    else:
        inputs["seq_idx"] = None
    return inputs


def float64_oracle(x, dt_raw, dt_bias, A, B, C, cos, sin, D, initial_state, seq_idx, token_scale=None):
    """The contract in float64 on the token-by-token recurrence (independent of any chunking). B/C may have
    g groups (head i reads group i // (h / g)). token_scale (b, l, h) zeros, optional: enters the decay as
    dt (1 + u) A with the input dt x compensated, so d loss / d u = A * (the per-token terms of dA)."""
    wide = torch.float64
    heads = x.shape[2]
    dt = F.softplus(dt_raw.to(wide) + dt_bias.to(wide))
    B, C = B.to(wide), C.to(wide)
    if B.shape[2] != heads:
        B = B.repeat_interleave(heads // B.shape[2], dim=2)
        C = C.repeat_interleave(heads // C.shape[2], dim=2)
    if cos is not None:
        B = apply_rope(B, cos.to(wide)[:, :, None], sin.to(wide)[:, :, None])
        C = apply_rope(C, cos.to(wide)[:, :, None], sin.to(wide)[:, :, None])
    x = x.to(wide)
    x_in = x
    if token_scale is not None:
        dt = dt * (1 + token_scale)
        x_in = x / (1 + token_scale)[..., None]
    y, final = ssd_scan_ref(x_in, dt, A.to(wide), B, C, None,
                            None if initial_state is None else initial_state.to(wide), seq_idx)
    if D is not None:
        y = y + x * D.to(wide)[:, None]
    return y, final


def sum_error(value, reference, terms, sum_dims):
    """Error of a whole-sequence sum (d dt_bias, dA) against the magnitude of its terms,
    ||value - reference|| / ||sum |terms|||: a relative bound that cancellation among the terms cannot
    inflate (tests/gpu/test_ssd_kernel_gpu.py and bench/ssd_notes.md, v3, say why)."""
    scale = terms.double().abs().sum(dim=sum_dims)
    return ((value.double() - reference.double()).norm() / scale.norm().clamp_min(1e-30)).item()


def relative_error(value, reference):
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def compare_with_oracle(kernels, inputs, kernel_chunk, tolerance, config=None):
    """Every output and gradient by relative error; d dt_bias and dA (sums over all tokens) by `sum_error`."""
    leaves = {name: inputs[name] for name in GRAD_NAMES if inputs[name] is not None}
    for tensor in leaves.values():
        tensor.requires_grad_(True)
    y, final = kernels.ssd_fused(**inputs, kernel_chunk=kernel_chunk, config=config)
    assert y.dtype == inputs["x"].dtype and final.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    # upstream gradient representable in y's dtype, so kernel and oracle differentiate the same loss
    weight_y = torch.randn(y.shape, dtype=torch.float64).to(y.dtype).double()
    weight_final = torch.randn(final.shape, dtype=torch.float64)
    kernel_grads = torch.autograd.grad((y.double() * weight_y).sum() + (final.double() * weight_final).sum(),
                                       list(leaves.values()))
    token_scale = torch.zeros(inputs["dt_raw"].shape, dtype=torch.float64, requires_grad=True)
    y_ref, final_ref = float64_oracle(**inputs, token_scale=token_scale)
    *ref_grads, d_token_scale = torch.autograd.grad((y_ref * weight_y).sum() + (final_ref * weight_final).sum(),
                                                    list(leaves.values()) + [token_scale])
    errors = {"y": relative_error(y, y_ref), "final_state": relative_error(final, final_ref)}
    for name, grad, ref in zip(leaves, kernel_grads, ref_grads):
        assert grad.shape == ref.shape and torch.isfinite(grad).all(), name
        errors["d" + name] = relative_error(grad, ref)
    kernel, ref = dict(zip(leaves, kernel_grads)), dict(zip(leaves, ref_grads))
    errors["ddt_bias"] = sum_error(kernel["dt_bias"], ref["dt_bias"], ref["dt_raw"], (0, 1))
    errors["dA"] = sum_error(kernel["A"], ref["A"], d_token_scale / inputs["A"].double().detach(), (0, 1))
    bad = {name: error for name, error in errors.items() if not error < tolerance}
    assert not bad, f"relative error over {tolerance}: {bad} (all: {errors})"


@pytest.mark.parametrize(
    "batch, length, heads, head_dim, state_dim, kernel_chunk, rope, use_d, use_init, use_seq",
    [
        (2, 40, 2, 16, 32, 16, True, True, True, True),     # everything on, L not a multiple of the chunk
        (1, 33, 1, 32, 16, 32, False, False, False, False),  # b = 1, h = 1, plain Mamba-2
        (1, 48, 3, 24, 64, 16, True, False, True, False),    # p not a power of two, several chunks
        (2, 21, 2, 16, 16, 16, True, True, False, True),     # documents, D, no initial state
    ],
)
def test_kernel_matches_float64_recurrence_fp32(kernels, batch, length, heads, head_dim, state_dim,
                                                kernel_chunk, rope, use_d, use_init, use_seq):
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs each run
    inputs = make_inputs(batch, length, heads, head_dim, state_dim, torch.float32, rope, use_d, use_init,
                         use_seq, generator)
    compare_with_oracle(kernels, inputs, kernel_chunk, tolerance=1e-3)


def test_kernel_matches_float64_recurrence_bf16(kernels):
    """bf16 at interpreter sizes: every output and gradient within 2e-2 (measured worst over 8 seeds:
    1e-2; d dt_bias and dA by `sum_error`). The GPU test holds bf16 to 1e-2 at real sizes."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = make_inputs(2, 37, 2, 16, 32, torch.bfloat16, True, True, True, True, generator)
    compare_with_oracle(kernels, inputs, 16, tolerance=2e-2)


@pytest.mark.parametrize("groups, config, dtype", [
    (1, {"dqk_merged": True, "group_reduce": "atomic", "save_rotated": True}, torch.float32),  # one group
    (2, {"dqk_merged": False, "save_rotated": True}, torch.float32),   # two groups, two-launch backward
    (4, {"dqk_merged": True, "save_rotated": False}, torch.float32),   # groups = heads, merged, rotate on load
    (2, {"dqk_merged": True, "save_rotated": True}, torch.bfloat16),   # bf16 through the grouped sum
])
def test_groups_and_backward_variants(kernels, groups, config, dtype):
    """B/C shared by groups of heads (dB/dC summed over each group's heads) and each backward variant."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = make_inputs(1, 24, 4, 16, 16, dtype, True, True, True, True, generator)
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    compare_with_oracle(kernels, inputs, 16, tolerance=1e-3 if dtype == torch.float32 else 2e-2, config=config)


def test_reference_composition_equals_oracle(kernels):
    """ssd_fused_reference (what the layer runs on CPU) is the same function as the float64 oracle."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = make_inputs(2, 50, 2, 8, 16, torch.float64, True, True, True, True, generator)
    y, final = kernels.ssd_fused_reference(**inputs, chunk_size=16)
    y_ref, final_ref = float64_oracle(**inputs)
    # dt_raw/dt_bias are float32 here, so the reference's softplus rounds in float32: ~1e-8, not 1e-15
    assert relative_error(y, y_ref) < 1e-6 and relative_error(final, final_ref) < 1e-6


def test_kernel_chunk_does_not_change_the_function(kernels):
    """Two kernel chunk lengths agree with each other (and the result ignores the reference's chunk_size)."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = make_inputs(1, 64, 2, 16, 32, torch.float32, True, True, True, True, generator)
    y16, final16 = kernels.ssd_fused(**inputs, kernel_chunk=16)
    y32, final32 = kernels.ssd_fused(**inputs, kernel_chunk=32, chunk_size=7)
    assert relative_error(y16, y32) < 1e-5 and relative_error(final16, final32) < 1e-5


def test_shape_errors_name_the_field(kernels):
    generator = torch.Generator().manual_seed(0)
    inputs = make_inputs(1, 8, 2, 16, 16, torch.float32, True, True, True, False, generator)
    inputs["dt_bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="dt_bias"):
        kernels.ssd_fused(**inputs)
    inputs["dt_bias"] = torch.zeros(2)
    inputs["sin"] = None
    with pytest.raises(ValueError, match="cos and sin"):
        kernels.ssd_fused(**inputs)


def test_matches_chunked_reference_too(kernels):
    """Independent second oracle: the chunked dual form (another chunking) on the same inputs."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = make_inputs(1, 45, 2, 16, 16, torch.float32, False, True, False, True, generator)
    y, final = kernels.ssd_fused(**inputs, kernel_chunk=16)
    dt = F.softplus(inputs["dt_raw"] + inputs["dt_bias"])
    y_ref, final_ref = ssd_chunked(inputs["x"].double(), dt.double(), inputs["A"].double(), inputs["B"].double(),
                                   inputs["C"].double(), 8, inputs["D"].double(), None, inputs["seq_idx"])
    assert relative_error(y, y_ref) < 1e-4 and relative_error(final, final_ref) < 1e-4
