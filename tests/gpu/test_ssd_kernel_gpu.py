"""cheems_parallel.kernels.ssd compiled for the GPU, against the float64 references, on a grid of shapes.

Shapes: x (b, l, h, p), B/C (b, l, g, n). Outputs, final state and every gradient are compared by
||kernel - oracle|| / ||oracle||: < 1e-2 for bf16 inputs, < 1e-3 for float32; the two whole-sequence
sums d dt_bias and dA against the magnitude of their terms instead (`tests.kernel_oracles.ssd_sum_error`
says why). The oracle (`tests.kernel_oracles.ssd_float64_oracle`) is the token-by-token recurrence
`ssd_scan_ref` in float64 for l <= 2048, and the chunked dual form `ssd_chunked` in float64 (itself tested
equal to the recurrence) at l = 16k, where the Python loop is slow.
Fresh random inputs on every run. Skipped without CUDA (CI has none); run on the H200 by bench/gpu_ssd.sh.
"""
import pytest
import torch

from cheems_parallel.ops import rope_tables
from tests.kernel_oracles import ssd_kernel_errors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def make_inputs(batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, groups=None):
    """Random SSD inputs on the GPU; B and C have `groups` groups (default: one per head, the Cheems layer)."""
    device = "cuda"
    groups = groups or heads
    inputs = {
        "x": torch.randn(batch, length, heads, head_dim, device=device).to(dtype),
        "dt_raw": torch.randn(batch, length, heads, device=device) - 2.0,
        "dt_bias": torch.randn(heads, device=device) * 0.5,
        "A": -torch.rand(heads, device=device) * 4 - 0.1,
        "B": torch.randn(batch, length, groups, state_dim, device=device).to(dtype) / state_dim ** 0.5,
        "C": torch.randn(batch, length, groups, state_dim, device=device).to(dtype) / state_dim ** 0.5,
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


# (batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, groups, config overrides)
CASES = [
    (1, 100, 1, 64, 64, torch.bfloat16, True, True, True, True, 1, {}),           # b = 1, h = 1
    (2, 1000, 4, 64, 128, torch.float32, True, True, True, True, 4, {}),          # float32, L % 64 != 0
    (2, 777, 3, 128, 128, torch.bfloat16, False, False, False, False, 3, {}),     # plain Mamba-2, odd L
    (3, 2048, 2, 128, 128, torch.bfloat16, True, True, False, True, 2, {}),       # documents, Cheems shape
    (1, 16384, 2, 64, 128, torch.bfloat16, True, True, True, True, 2, {}),        # L = 16k
    (1, 16384, 1, 64, 64, torch.float32, True, False, True, False, 1, {}),        # L = 16k, float32
    # shared B/C groups (mamba_ssm's layout; the defaults run the group dB/dC kernel and shared forward scores
    # there) and the non-default backward variants
    (2, 777, 8, 128, 128, torch.bfloat16, False, True, False, False, 1, {}),      # one group for 8 heads
    (2, 1000, 4, 64, 128, torch.float32, True, True, True, True, 2, {"group_reduce": "sum", "dqk_merged": False,
                                                                      "dqk_group": False, "shared_scores": False}),
    (2, 1000, 8, 64, 128, torch.bfloat16, True, True, True, True, 2, {}),        # groups with RoPE, bf16
    (3, 2048, 4, 128, 128, torch.bfloat16, True, True, False, True, 4, {"dqk_merged": "not default"}),
    # the non-Gluon backward where the Gluon one would run (one group, l a multiple of 64, no RoPE or documents)
    (2, 768, 8, 128, 128, torch.bfloat16, False, True, True, False, 1, {"gluon_bwd": False}),
    (2, 1000, 4, 64, 128, torch.bfloat16, True, True, True, True, 4, {"save_rotated": "not default"}),
    # several chunks per program (the last program's share partial: 16 chunks)
    (2, 1000, 4, 128, 128, torch.bfloat16, True, True, True, True, 4,
     {"fwd_chunks_per_program": 3, "bwd_chunks_per_program": 5, "fwd_stages": 2, "bwd_stages": 2}),
    # per-head dB/dC added atomically into the group's rows (the defaults use the group kernel instead)
    (2, 777, 8, 128, 128, torch.bfloat16, False, True, False, False, 1, {"dqk_group": False, "group_reduce": "atomic"}),
    # the group dB/dC kernel at 2 stages with the forward's own C~B~^T; and rotating on load
    (2, 777, 8, 128, 128, torch.bfloat16, False, True, False, False, 1, {"dqk_group_stages": 2,
                                                                         "shared_scores": False}),
    (1, 100, 4, 64, 64, torch.bfloat16, True, True, True, True, 1, {"save_rotated": False}),
    (2, 1000, 4, 64, 128, torch.float32, True, True, True, True, 1, {}),
    # dx per head with groups (dx_group is the default since v11), dx_group at 8 warps 3 stages, rotating on load
    (2, 777, 8, 128, 128, torch.bfloat16, False, True, False, False, 1, {"dx_group": False}),
    (2, 1000, 8, 64, 128, torch.bfloat16, True, True, True, True, 2, {"dx_group": True, "dx_group_warps": 8,
                                                                      "dx_group_stages": 3}),
    (1, 100, 4, 64, 64, torch.float32, True, True, True, True, 1, {"dx_group": True, "save_rotated": False}),
    # the full-width forward (v13) at 4 warps without D, one chunk per program; per-head dB/dC (v14) at 8 warps
    (1, 777, 2, 64, 64, torch.bfloat16, True, False, False, True, 2, {"fwd_save_warps": 4, "fwd_save_block_p": 64,
                                                                      "fwd_save_chunks_per_program": 1}),
    (1, 777, 2, 64, 64, torch.float32, True, True, True, True, 2, {"dqk_warps": 8}),
    # the merged dB/dC/dg launch at v4's tuning (the default before v4b), atomics over one shared group
    (2, 777, 8, 128, 128, torch.bfloat16, False, True, False, False, 1,
     {"dqk_merged": True, "dqk_group": False, "dqk_warps": 8, "dqk_maxnreg": 128, "group_reduce": "atomic"}),
]


@pytest.mark.parametrize(
    "batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, groups, overrides", CASES)
def test_kernel_matches_float64_reference(batch, length, heads, head_dim, state_dim, dtype, rope, use_d,
                                          use_init, use_seq, groups, overrides):
    from cheems_parallel.kernels.ssd import CONFIG, ssd_fused

    overrides = {key: (not CONFIG.get(key, False)) if value == "not default" else value
                 for key, value in overrides.items()}
    inputs = make_inputs(batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq)
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    errors, plain = ssd_kernel_errors(ssd_fused, inputs, config=overrides)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    print(f"\nshape b={batch} l={length} h={heads} g={groups} p={head_dim} n={state_dim} {dtype} {overrides}: "
          + " ".join(f"{name}={error:.1e}" for name, error in errors.items())
          + " | plain relative: " + " ".join(f"{name}={error:.1e}" for name, error in plain.items()))
    bad = {name: error for name, error in errors.items() if not error < tolerance}
    assert not bad, f"relative error over {tolerance}: {bad}"


@pytest.mark.parametrize("groups, rope, gluon_fwd", [(1, False, False), (8, True, False), (1, False, True),
                                                     (8, True, True)])
def test_forward_without_gradients_matches_float64_reference(groups, rope, gluon_fwd):
    """The no-grad forward (Triton: its own tiles, "fwd_nograd_*"; or the Gluon walk; no saved B~/C~) on fresh
    inputs at l = 1024: y and the final state within 1e-2 of the float64 oracle (bf16)."""
    from cheems_parallel.kernels.ssd import ssd_fused
    from tests.kernel_oracles import relative_error, ssd_float64_oracle

    from cheems_parallel.kernels import ssd_gluon_fwd

    # l = 1000 for the Triton kernels (not a multiple of the chunk); the Gluon walk needs l % 64 == 0
    inputs = make_inputs(2, 1024 if gluon_fwd else 1000, 8, 128, 128, torch.bfloat16, rope, True, False, False)
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    launches = ssd_gluon_fwd.LAUNCHES
    with torch.no_grad():
        y, final = ssd_fused(**inputs, config={"gluon_fwd": gluon_fwd, "gluon_fwd_min_sequences": 1})
    assert (ssd_gluon_fwd.LAUNCHES > launches) == gluon_fwd
    y_ref, final_ref = ssd_float64_oracle(**inputs)
    errors = {"y": relative_error(y.double().cpu(), y_ref.cpu()), "final": relative_error(final.double().cpu(), final_ref.cpu())}
    print(f"\nno-grad forward g={groups} rope={rope}: " + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))
    assert all(error < 1e-2 for error in errors.values()), errors


# the Gluon fused group backward ("gluon_bwd", ssd_gluon_bwd.py): one group for 8 heads, p = n = 128 with D;
# two groups of two heads at l = 16k (each ring slot used once per program); p = n = 64 without D and with an
# initial state; three heads per group (an odd head count: the last head's slot is slot 0); <S, G> all in the C side
GLUON_CASES = [
    (2, 768, 8, 128, 128, True, False, 1, {}),
    (1, 16384, 4, 64, 128, True, True, 2, {}),
    (2, 1024, 8, 64, 64, False, True, 4, {}),
    (1, 512, 3, 128, 128, True, False, 1, {}),
    (2, 768, 8, 128, 128, True, True, 1, {"gluon_overlap_split": False}),
]


@pytest.mark.parametrize("batch, length, heads, head_dim, state_dim, use_d, use_init, groups, overrides", GLUON_CASES)
def test_gluon_fused_backward_matches_float64_reference(batch, length, heads, head_dim, state_dim, use_d, use_init,
                                                        groups, overrides):
    from cheems_parallel.kernels import ssd_gluon_bwd
    from cheems_parallel.kernels.ssd import ssd_fused

    inputs = make_inputs(batch, length, heads, head_dim, state_dim, torch.bfloat16, False, use_d, use_init, False)
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    launches = ssd_gluon_bwd.LAUNCHES
    errors, plain = ssd_kernel_errors(ssd_fused, inputs, config=dict(overrides, gluon_bwd=True))
    assert ssd_gluon_bwd.LAUNCHES > launches, "the Gluon backward did not run for this case"
    print(f"\ngluon shape b={batch} l={length} h={heads} g={groups} p={head_dim} n={state_dim} D={use_d}: "
          + " ".join(f"{name}={error:.1e}" for name, error in errors.items())
          + " | plain relative: " + " ".join(f"{name}={error:.1e}" for name, error in plain.items()))
    bad = {name: error for name, error in errors.items() if not error < 1e-2}
    assert not bad, f"relative error over 1e-2: {bad}"


# the Gluon fused backward for groups = heads ("gluon_head_bwd", ssd_gluon_head_bwd.py, persistent over
# (chunk, head) tiles): the Cheems shape with RoPE (un-rotated in the kernel) and D; p = 64 with an initial state at
# l = 16k (many tiles per program); no RoPE with three heads; a single tile per program (4 tiles); with an initial
# state and RoPE; with documents
# (batch, length, heads, head_dim, rope, use_d, use_init, use_seq, overrides)
GLUON_HEAD_CASES = [
    (2, 768, 8, 128, True, True, False, False, {}),
    (1, 16384, 4, 64, True, False, True, False, {}),
    (2, 512, 3, 128, False, True, True, False, {}),
    (1, 128, 2, 128, True, True, True, False, {}),
    (2, 768, 8, 128, True, True, True, False, {}),
    (2, 768, 8, 128, True, True, True, True, {}),
    (1, 4096, 4, 64, True, False, False, True, {}),
    (2, 512, 3, 128, False, True, True, True, {}),
]


@pytest.mark.parametrize("batch, length, heads, head_dim, rope, use_d, use_init, use_seq, overrides",
                         GLUON_HEAD_CASES)
def test_gluon_head_backward_matches_float64_reference(batch, length, heads, head_dim, rope, use_d, use_init, use_seq,
                                                       overrides):
    from cheems_parallel.kernels import ssd_gluon_head_bwd
    from cheems_parallel.kernels.ssd import ssd_fused

    inputs = make_inputs(batch, length, heads, head_dim, 128, torch.bfloat16, rope, use_d, use_init, use_seq)
    launches = ssd_gluon_head_bwd.LAUNCHES
    errors, plain = ssd_kernel_errors(ssd_fused, inputs, config=dict(overrides, gluon_bwd=True, gluon_head_bwd=True))
    assert ssd_gluon_head_bwd.LAUNCHES > launches, "the Gluon head backward did not run for this case"
    print(f"\ngluon-head shape b={batch} l={length} h={heads} p={head_dim} rope={rope} D={use_d} documents={use_seq}: "
          + " ".join(f"{name}={error:.1e}" for name, error in errors.items())
          + " | plain relative: " + " ".join(f"{name}={error:.1e}" for name, error in plain.items()))
    bad = {name: error for name, error in errors.items() if not error < 1e-2}
    assert not bad, f"relative error over 1e-2: {bad}"


# the Gluon reverse state walk ("gluon_state_bwd", ssd_gluon_state_bwd.py, one program per (batch, head) sequence),
# forced onto small shapes: the Cheems shape (RoPE: C~ from the forward) with an initial state and documents, mamba's
# one group, p = 64 at 4k with documents, and behind the Triton dx / dB / dC kernels (gluon_bwd off)
# (batch, length, heads, head_dim, groups, rope, use_d, use_init, use_seq, overrides)
GLUON_STATE_CASES = [
    (2, 768, 8, 128, 8, True, True, True, True, {}),
    (2, 768, 8, 128, 1, False, True, False, False, {}),
    (1, 4096, 4, 64, 4, True, False, True, True, {}),
    (3, 512, 3, 128, 3, True, True, False, False, {"gluon_bwd": False}),
]


@pytest.mark.parametrize("batch, length, heads, head_dim, groups, rope, use_d, use_init, use_seq, overrides",
                         GLUON_STATE_CASES)
def test_gluon_state_backward_matches_float64_reference(batch, length, heads, head_dim, groups, rope, use_d, use_init,
                                                        use_seq, overrides):
    from cheems_parallel.kernels import ssd_gluon_state_bwd
    from cheems_parallel.kernels.ssd import ssd_fused

    inputs = make_inputs(batch, length, heads, head_dim, 128, torch.bfloat16, rope, use_d, use_init, use_seq, groups)
    launches = ssd_gluon_state_bwd.LAUNCHES
    errors, plain = ssd_kernel_errors(ssd_fused, inputs,
                                      config=dict(overrides, gluon_state_bwd=True, gluon_state_bwd_min_sequences=1))
    assert ssd_gluon_state_bwd.LAUNCHES > launches, "the Gluon state walk did not run for this case"
    print(f"\ngluon-state shape b={batch} l={length} h={heads} g={groups} p={head_dim} rope={rope} "
          f"documents={use_seq}: " + " ".join(f"{name}={error:.1e}" for name, error in errors.items()))
    bad = {name: error for name, error in errors.items() if not error < 1e-2}
    assert not bad, f"relative error over 1e-2: {bad}"


def test_gluon_state_backward_is_skipped_for_few_sequences():
    """Below one walk per SM (the default gluon_state_bwd_min_sequences) the Triton state kernel runs."""
    from cheems_parallel.kernels import ssd_gluon_state_bwd
    from cheems_parallel.kernels.ssd import ssd_fused

    inputs = make_inputs(2, 256, 4, 128, 128, torch.bfloat16, True, True, False, False)
    for tensor in (inputs["x"], inputs["B"], inputs["C"]):
        tensor.requires_grad_(True)
    launches = ssd_gluon_state_bwd.LAUNCHES
    ssd_fused(**inputs)[0].float().sum().backward()
    assert ssd_gluon_state_bwd.LAUNCHES == launches
    ssd_fused(**inputs, config={"gluon_state_bwd_min_sequences": 8})[0].float().sum().backward()
    assert ssd_gluon_state_bwd.LAUNCHES == launches + 1


@pytest.mark.parametrize("groups, rope, module", [(1, False, "ssd_gluon_bwd"), (8, True, "ssd_gluon_head_bwd")])
def test_gluon_backwards_in_float16(groups, rope, module):
    """Both Gluon backwards accept float16 as well as bfloat16 (`supported`): one case each, fp16 within 1e-2."""
    import importlib

    from cheems_parallel.kernels.ssd import ssd_fused

    gluon_module = importlib.import_module("cheems_parallel.kernels." + module)
    inputs = make_inputs(2, 768, 8, 128, 128, torch.float16, rope, True, True, False)
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    launches = gluon_module.LAUNCHES
    errors, _ = ssd_kernel_errors(ssd_fused, inputs, config={"gluon_bwd": True, "gluon_head_bwd": True})
    assert gluon_module.LAUNCHES > launches, f"{module} did not run for this case"
    print(f"\ngluon fp16 {module}: " + " ".join(f"{name}={error:.1e}" for name, error in errors.items()))
    bad = {name: error for name, error in errors.items() if not error < 1e-2}
    assert not bad, f"relative error over 1e-2: {bad}"


# the Gluon forward walk ("gluon_fwd", ssd_gluon_fwd.py, persistent over the b·h sequences): the Cheems shape with
# RoPE (B~, C~ saved for the Gluon head backward) and D; l = 16k; 160 sequences on the H200's 132 SMs (some programs
# walk two: the state restarts at the second one's first chunk) with an initial state; mamba's one-group shape
# (RoPE off); a single chunk per sequence; with the Triton backward (B~, C~ as the Triton kernels read them)
# (batch, length, heads, rope, use_d, use_init, use_seq, groups, overrides); with documents (use_seq) the backward
# after the walk is the Gluon head backward for groups = heads, the Triton kernels for one group
GLUON_FWD_CASES = [
    (2, 768, 8, True, True, False, False, 8, {}),
    (1, 16384, 4, True, True, True, False, 4, {}),
    (2, 256, 80, True, False, True, False, 80, {}),
    (2, 1024, 8, False, True, False, False, 1, {}),
    (3, 64, 5, True, True, True, False, 5, {}),
    (2, 768, 8, True, True, True, False, 8, {"gluon_head_bwd": False}),
    (2, 1024, 8, True, True, True, True, 8, {}),
    (1, 4096, 4, False, True, False, True, 1, {}),
    (3, 256, 5, True, False, True, True, 5, {}),
]


@pytest.mark.parametrize("batch, length, heads, rope, use_d, use_init, use_seq, groups, overrides", GLUON_FWD_CASES)
def test_gluon_forward_matches_float64_reference(batch, length, heads, rope, use_d, use_init, use_seq, groups,
                                                 overrides):
    from cheems_parallel.kernels import ssd_gluon_fwd
    from cheems_parallel.kernels.ssd import ssd_fused

    inputs = make_inputs(batch, length, heads, 128, 128, torch.bfloat16, rope, use_d, use_init, use_seq,
                         groups=groups)
    launches = ssd_gluon_fwd.LAUNCHES
    errors, plain = ssd_kernel_errors(ssd_fused, inputs, config=dict(overrides, gluon_fwd=True,
                                                                     gluon_fwd_min_sequences=1))
    assert ssd_gluon_fwd.LAUNCHES > launches, "the Gluon forward did not run for this case"
    print(f"\ngluon-fwd shape b={batch} l={length} h={heads} g={groups} rope={rope} D={use_d} init={use_init} "
          f"documents={use_seq}: "
          + " ".join(f"{name}={error:.1e}" for name, error in errors.items())
          + " | plain relative: " + " ".join(f"{name}={error:.1e}" for name, error in plain.items()))
    bad = {name: error for name, error in errors.items() if not error < 1e-2}
    assert not bad, f"relative error over 1e-2: {bad}"


@pytest.mark.parametrize("rope, groups, use_seq", [(True, 8, False), (False, 1, False), (True, 8, True)])
def test_gluon_forward_saves_what_the_triton_forward_saves(rope, groups, use_seq):
    """The walk's saved tensors (every chunk's entering state, B~, C~) and y against the two Triton launches' on
    the same inputs: equal up to a few bf16 roundings (the state is carried in float32 by both)."""
    from cheems_parallel.kernels import ssd as ssd_kernels
    from cheems_parallel.kernels import ssd_gluon_fwd
    from cheems_parallel.kernels.ssd_prologue import prologue_forward
    from tests.kernel_oracles import relative_error

    inputs = make_inputs(2, 1024, 8, 128, 128, torch.bfloat16, rope, True, True, use_seq, groups=groups)
    dt, g = prologue_forward(inputs["dt_raw"], inputs["dt_bias"], inputs["A"], 64)
    cos = inputs["cos"].to(torch.bfloat16).contiguous() if rope else None
    sin = inputs["sin"].to(torch.bfloat16).contiguous() if rope else None
    seq = inputs["seq_idx"].to(torch.int32).contiguous() if use_seq else None   # l % 64 == 0: no padding
    args = (inputs["x"], inputs["B"], inputs["C"], cos, sin, dt, g, seq, inputs["D"], inputs["initial_state"], 64)
    triton_out = ssd_kernels._forward(*args, dict(ssd_kernels.CONFIG, gluon_fwd=False))
    launches = ssd_gluon_fwd.LAUNCHES
    gluon_out = ssd_kernels._forward(*args, dict(ssd_kernels.CONFIG, gluon_fwd=True, gluon_fwd_min_sequences=1))
    assert ssd_gluon_fwd.LAUNCHES > launches
    names = ("y", "final", "states", "B~", "C~")
    for name, ours, theirs in zip(names, gluon_out, triton_out):
        if theirs is None:
            assert ours is None, name
            continue
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
        error = relative_error(ours.double(), theirs.double())
        print(f"{name}: {error:.1e}")
        assert error < (2e-3 if name in ("B~", "C~") else 1e-2), (name, error)


def test_gluon_forward_is_skipped_for_few_sequences():
    """With fewer b·h sequences than gluon_fwd_min_sequences (default: 3/8 of the SMs) the Triton forward runs: the
    walk would leave most SMs idle."""
    from cheems_parallel.kernels import ssd_gluon_fwd
    from cheems_parallel.kernels.ssd import ssd_fused

    inputs = make_inputs(1, 256, 4, 128, 128, torch.bfloat16, True, True, False, False)
    launches = ssd_gluon_fwd.LAUNCHES
    with torch.no_grad():
        ssd_fused(**inputs)
    assert ssd_gluon_fwd.LAUNCHES == launches
    with torch.no_grad():
        ssd_fused(**inputs, config={"gluon_fwd_min_sequences": 4})
    assert ssd_gluon_fwd.LAUNCHES == launches + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prologue_matches_float64_at_a_training_size(dtype):
    """The Triton prologue (`ssd_prologue`) compiled: dt, g and d dt_raw, d dt_bias, dA at 4 x 4109 tokens (l not a
    multiple of the chunk), 32 heads, against float64 autograd; dt_raw as the layer passes it, a transposed view."""
    from cheems_parallel.kernels import ssd_prologue
    from tests.kernel_oracles import relative_error, ssd_prologue_float64

    batch, length, heads, chunk = 4, 4109, 32, 64
    raw = (torch.randn(length, batch, heads, device="cuda") * 3 - 1).to(dtype).transpose(0, 1)
    bias = torch.randn(heads, device="cuda") * 0.5
    A = -torch.rand(heads, device="cuda") * 4 - 0.1
    dt, g = ssd_prologue.prologue_forward(raw, bias, A, chunk)
    leaves = [raw.double().requires_grad_(), bias.double().requires_grad_(), A.double().requires_grad_()]
    dt_ref, g_ref = ssd_prologue_float64(*leaves, chunk)
    errors = {"dt": relative_error(dt, dt_ref), "g": relative_error(g, g_ref)}
    # positive upstream gradients: d dt_bias and dA are sums over 16k tokens, which random signs would cancel down
    # to where float32 summation error, not the kernel, decides a relative bound
    ddt = torch.rand(1, *dt.shape, device="cuda")
    dg = [torch.rand(dt.shape, device="cuda") for _ in range(2)]
    grads = ssd_prologue.prologue_backward(ddt, dg, raw, bias, A, chunk)
    refs = torch.autograd.grad((dt_ref * ddt[0].double()).sum() + (g_ref * (dg[0] + dg[1]).double()).sum(), leaves)
    errors.update({name: relative_error(value, ref) for name, value, ref in zip(("d dt_raw", "d dt_bias", "dA"),
                                                                                 grads, refs)})
    print(" ".join(f"{name}={error:.1e}" for name, error in errors.items()))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert all(error < tolerance for error in errors.values()), errors
