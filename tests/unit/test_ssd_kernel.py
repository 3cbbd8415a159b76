"""cheems_parallel.kernels.ssd (Triton SSD forward + backward) against the float64 sequential recurrence
`cheems_parallel.ops.ssd_scan_ref`, under TRITON_INTERPRET=1 on the CPU, at small shapes.

Shapes: x (b, l, h, p), B/C (b, l, h, n), cos/sin (b, l, n). Every check draws fresh random inputs,
compares the output, the final state and the gradient of every differentiable input by
||kernel - oracle|| / ||oracle||. The interpreter multiplies bf16 in float32 (its bf16 dot is wrong),
so the kernels round every product operand through bf16 and multiply in float32: the bf16 case sees the
GPU's operand rounding, bf16 loads/stores and the states kept in bf16.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cheems_parallel.ops import rope_tables, ssd_chunked
from tests.kernel_oracles import interpreted_module, relative_error, ssd_kernel_errors, ssd_prologue_float64
from tests.kernel_oracles import ssd_float64_oracle as float64_oracle


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
    yield from interpreted_module("cheems_parallel.kernels.ssd", "_chunk_fwd_kernel",
                                  dependencies=("cheems_parallel.kernels.ssd_prologue",))


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


def compare_with_oracle(kernels, inputs, kernel_chunk, tolerance, config=None):
    """Every output and gradient by relative error; d dt_bias and dA (sums over all tokens) by `ssd_sum_error`."""
    errors, _ = ssd_kernel_errors(kernels.ssd_fused, inputs, kernel_chunk=kernel_chunk, config=config)
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
    1e-2; d dt_bias and dA by `ssd_sum_error`). The GPU test holds bf16 to 1e-2 at real sizes."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = make_inputs(2, 37, 2, 16, 32, torch.bfloat16, True, True, True, True, generator)
    compare_with_oracle(kernels, inputs, 16, tolerance=2e-2)


@pytest.mark.parametrize("groups, config, dtype", [
    (1, {"dqk_merged": True, "dqk_group": False, "group_reduce": "atomic",  # one group, merged, atomics
         "save_rotated": True}, torch.float32),
    (2, {"dqk_merged": False, "dqk_group": False,                      # two groups, per-head two-launch
         "save_rotated": True}, torch.float32),                        # backward + torch group sum
    (4, {"dqk_merged": True, "save_rotated": False,                    # groups = heads, merged, rotate on load,
         "fwd_chunks_per_program": 2, "bwd_chunks_per_program": 3}, torch.bfloat16),  # chunk loops (3 > chunks;
                                                                                     # float32 runs one chunk)
    (2, {"dqk_merged": True, "dqk_group": False, "save_rotated": True}, torch.bfloat16),  # bf16, grouped sum
    (1, {"shared_scores": False, "group_reduce": "atomic",                # per-head dB/dC added by atomics,
         "dqk_group": False}, torch.float32),                             # each head's own C~B~^T
    (1, {"dqk_group": True, "shared_scores": True}, torch.float32),         # the defaults for groups < heads
    (2, {"dqk_group": True, "save_rotated": False}, torch.bfloat16),        # group dB/dC rotating on load
    (1, {"dx_group": False}, torch.float32),                                # per-head dx with groups < heads
    (4, {}, torch.float32),                                                 # g = h: the defaults (merged dB/dC)
    (4, {"dqk_merged": False}, torch.float32),                              # g = h: per-head two-launch dB/dC
    (4, {"save_rotated": False}, torch.bfloat16),                           # the same rotating on load, bf16
    (2, {"shared_scores": False, "fwd_save_chunks_per_program": 1}, torch.bfloat16),  # forward forming scores
    (2, {"dqk_group": False, "group_reduce": "atomic"}, torch.float32),     # per-head dB/dC, atomics
    (2, {"dx_group": True, "dx_group_block_p": 8, "save_rotated": False}, torch.bfloat16),  # 2 p-blocks
])
def test_groups_and_backward_variants(kernels, groups, config, dtype):
    """B/C shared by groups of heads (dB/dC summed over each group's heads) and each backward variant."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = make_inputs(1, 24, 4, 16, 16, dtype, True, True, True, True, generator)
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    compare_with_oracle(kernels, inputs, 16, tolerance=1e-3 if dtype == torch.float32 else 2e-2, config=config)


@pytest.mark.parametrize("groups, rope, module", [(1, False, "ssd_gluon_bwd"), (4, True, "ssd_gluon_head_bwd"),
                                                   (4, True, "ssd_gluon_fwd"), (1, False, "ssd_gluon_fwd")])
def test_gluon_backward_flag_falls_back_on_cpu(kernels, groups, rope, module):
    """gluon_bwd / gluon_head_bwd / gluon_fwd (the defaults) on CPU tensors, with one shared group and with groups =
    heads and RoPE: the Triton kernels run and match the oracle, and the Gluon module (Hopper only) is not imported."""
    import sys as system
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = make_inputs(1, 64, 4, 16, 16, torch.float32, rope, True, False, False, generator)
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    name = "cheems_parallel.kernels." + module
    imported_before = name in system.modules
    compare_with_oracle(kernels, inputs, 16, tolerance=1e-3, config={"gluon_bwd": True, "gluon_head_bwd": True,
                                                                     "gluon_fwd": True, "gluon_fwd_min_sequences": 1})
    assert imported_before or name not in system.modules


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


@pytest.mark.parametrize("batch, length, heads, T, dtype, transposed, two_dg, ddt_parts", [
    (2, 40, 3, 16, torch.float32, True, True, 2),      # l not a multiple of T, the layer's transposed view
    (1, 64, 70, 32, torch.bfloat16, False, False, 1),  # two head blocks (64 + 6), bf16 dt_raw
    (3, 5, 1, 16, torch.float32, False, True, 3),      # one short chunk, one head
])
def test_prologue_matches_float64(kernels, batch, length, heads, T, dtype, transposed, two_dg, ddt_parts):
    """The Triton prologue (`ssd_prologue`): dt, g and, from random ddt partials and dg terms (the padding's dg
    included: g there still depends on the chunk's tokens), d dt_raw, d dt_bias, dA against float64 autograd.
    dt_raw spans softplus's threshold (z > 20: identity) and very negative z (where log(1 + e^z) underflows)."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    raw = torch.randn(batch, length, heads, generator=generator) * 4 - 1
    raw[0, 0] = 25.0
    raw[-1, -1] = -30.0
    if transposed:
        raw = raw.transpose(0, 1).contiguous().transpose(0, 1)   # (b, l, h) view of an (l, b, h) tensor
    raw = raw.to(dtype)
    bias = torch.randn(heads, generator=generator) * 0.5
    A = -torch.rand(heads, generator=generator) * 2 - 0.1
    prologue = kernels.ssd_prologue
    dt, g = prologue.prologue_forward(raw, bias, A, T)
    leaves = [raw.double().requires_grad_(), bias.double().requires_grad_(), A.double().requires_grad_()]
    dt_ref, g_ref = ssd_prologue_float64(*leaves, T)
    assert dt.shape == dt_ref.shape and g.shape == g_ref.shape
    assert relative_error(dt, dt_ref) < 1e-6 and relative_error(g, g_ref) < 1e-6
    tiny, tiny_ref = dt[-1, :, length - 1], dt_ref[-1, :, length - 1]    # ~1e-13: log(1 + e^z) would give 0
    assert (tiny_ref > 0).all() and relative_error(tiny, tiny_ref) < 1e-5

    # positive upstream gradients, so that the sums d dt_bias and dA cannot cancel below float32's summation error
    ddt = torch.rand(ddt_parts, *dt.shape, generator=generator)
    dg_terms = [torch.rand(dt.shape, generator=generator) for _ in range(2 if two_dg else 1)]
    d_raw, d_bias, dA = prologue.prologue_backward(ddt, dg_terms, raw, bias, A, T)
    ref = torch.autograd.grad((dt_ref * ddt.double().sum(0)).sum() + (g_ref * sum(dg_terms).double()).sum(), leaves)
    assert d_raw.dtype == dtype and d_raw.shape == raw.shape
    assert d_bias.dtype == bias.dtype and dA.dtype == A.dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2   # bf16: d dt_raw is rounded to bf16
    for name, value, reference in (("d dt_raw", d_raw, ref[0]), ("d dt_bias", d_bias, ref[1]), ("dA", dA, ref[2])):
        assert relative_error(value, reference) < tolerance, name


def test_converted_tables_are_shared_until_the_tables_change(kernels):
    """The layers of one step share one bf16 copy of the float32 RoPE tables; a changed (in place) or different
    table gets a new copy, so a kernel never reads stale tables."""
    cos, sin = rope_tables(torch.arange(40)[None], 16)
    first = kernels._kernel_tables(cos, sin, torch.bfloat16)
    assert first[0].dtype == torch.bfloat16 and torch.equal(first[0], cos.to(torch.bfloat16))
    assert all(a is b for a, b in zip(kernels._kernel_tables(cos, sin, torch.bfloat16), first))
    cos.mul_(0.5)   # in place: a new version
    changed = kernels._kernel_tables(cos, sin, torch.bfloat16)
    assert changed[0] is not first[0] and torch.equal(changed[0], cos.to(torch.bfloat16))
    other_cos = cos.clone()
    assert kernels._kernel_tables(other_cos, sin, torch.bfloat16)[0] is not changed[0]
    with torch.inference_mode():
        frozen_cos, frozen_sin = rope_tables(torch.arange(8)[None], 16)
        assert torch.equal(kernels._kernel_tables(frozen_cos, frozen_sin, torch.bfloat16)[1],
                           frozen_sin.to(torch.bfloat16))


def test_head_backward_tables_in_its_load_order(kernels):
    """The Gluon head backward reads the un-rotation's tables 16 contiguous values per thread and row, then puts
    them in the wgmma accumulator layout, where thread t of a lane quad holds columns 8 j + 2 t + e. Written out
    here from that layout: column c of cos's (and sin's) first half must be stored at 16 t + 2 j + e; the tables
    are derived once per step like the converted ones, and again after an in-place change."""
    pytest.importorskip("triton.experimental.gluon")
    cos, sin = rope_tables(torch.arange(24)[None].expand(2, -1), 128)
    cos, sin = kernels._kernel_tables(cos, sin, torch.bfloat16)
    tables = kernels._head_backward_tables(cos, sin)
    assert tables.shape == (2, 24, 128) and tables.is_contiguous() and tables.dtype == torch.bfloat16
    for column in range(64):
        t, j, e = (column // 2) % 4, column // 8, column % 2
        assert torch.equal(tables[..., 16 * t + 2 * j + e], cos[..., column]), column
        assert torch.equal(tables[..., 64 + 16 * t + 2 * j + e], sin[..., column]), column
    again = kernels._head_backward_tables(cos, sin)
    assert again is tables
    assert kernels._kernel_tables(cos, sin, torch.bfloat16)[0] is cos   # no copy of bf16 tables, none cached
    sin.neg_()
    changed = kernels._head_backward_tables(cos, sin)
    assert changed is not tables and torch.equal(changed[..., 64:], -tables[..., 64:])


def test_gradients_through_y_alone(kernels):
    """The final state unused (as in the layer): its gradient reaches the backward as None (no zero fill), so the
    state pass runs without dfinal; every input's gradient matches the float64 oracle's for a loss on y alone."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    inputs = make_inputs(1, 40, 2, 16, 16, torch.float32, True, True, True, True, generator)
    names = ("x", "dt_raw", "dt_bias", "A", "B", "C", "D", "initial_state")
    for name in names:
        inputs[name].requires_grad_(True)
    y, _ = kernels.ssd_fused(**inputs, kernel_chunk=16)
    weight = torch.randn(y.shape, generator=generator)
    grads = torch.autograd.grad((y * weight).sum(), [inputs[name] for name in names])
    y_ref, _ = float64_oracle(**inputs)
    refs = torch.autograd.grad((y_ref * weight.double()).sum(), [inputs[name] for name in names])
    errors = {name: relative_error(grad, ref) for name, grad, ref in zip(names, grads, refs)}
    assert all(error < 1e-3 for error in errors.values()), errors
