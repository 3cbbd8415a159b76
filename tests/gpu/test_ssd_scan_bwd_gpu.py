"""cheems_parallel.kernels.ssd_scan_bwd (the fused reverse-walk SSD backward) compiled for the GPU.

Two checks on fresh random inputs: (1) `ssd_fused` with its backward swapped for `scan_backward`: output, final
state and every gradient against the float64 oracle (`tests.kernel_oracles.ssd_kernel_errors`: relative error
< 1e-2 for bf16, < 1e-3 for float32; d dt_bias and dA against the magnitude of their terms), on the grid of
tests/gpu/test_ssd_kernel_gpu.py's shapes incl. L = 16k; (2) on the same saved forward tensors, the seven outputs
of `scan_backward` against the current kernel backward `ssd._backward` at mamba_ssm's problem in small
(one B/C group, p = n = 128). Shapes: x (b, l, h, p), B/C (b, l, g, n).
Skipped without CUDA (CI has none); run on the H200 by `pytest tests/gpu/test_ssd_scan_bwd_gpu.py`.
"""
import pytest
import torch

from tests.gpu.test_ssd_kernel_gpu import make_inputs
from tests.kernel_oracles import relative_error, ssd_kernel_errors

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, groups, config overrides)
CASES = [
    (1, 100, 1, 64, 64, torch.bfloat16, True, True, True, True, 1, {}),           # b = 1, h = 1
    (2, 1000, 4, 64, 128, torch.float32, True, True, True, True, 4, {}),          # float32, L % 64 != 0
    (2, 777, 3, 96, 128, torch.bfloat16, False, False, False, False, 3, {}),      # plain Mamba-2, p = 96
    (2, 1000, 4, 64, 96, torch.bfloat16, True, True, True, True, 4, {}),          # n = 96: RoPE partner adds
    (3, 2048, 2, 128, 128, torch.bfloat16, True, True, False, True, 2, {}),       # documents, Cheems shape
    (1, 16384, 2, 128, 128, torch.bfloat16, True, True, True, True, 2, {}),       # L = 16k, groups = heads
    (1, 16384, 8, 128, 128, torch.bfloat16, False, True, False, False, 1, {}),    # L = 16k, mamba's one group
    (1, 16384, 1, 64, 64, torch.float32, True, False, True, False, 1, {}),        # L = 16k, float32
    (2, 777, 8, 128, 128, torch.bfloat16, False, True, False, False, 1, {}),      # one group for 8 heads
    (2, 1000, 8, 64, 128, torch.bfloat16, True, True, True, True, 2, {"save_rotated": False}),  # rotate on load
    # the options and other tiles
    (2, 1000, 4, 128, 128, torch.bfloat16, True, True, True, True, 4, {"scan_bwd_block_p": 128}),  # one p-block
    (2, 1000, 4, 128, 128, torch.bfloat16, True, True, True, True, 4, {"scan_bwd_block_p": 32, "scan_bwd_stages": 1}),
    (2, 777, 8, 128, 128, torch.bfloat16, False, True, True, True, 1, {"scan_bwd_split_c": True}),
    (2, 1000, 4, 128, 128, torch.bfloat16, True, True, True, True, 4, {"scan_bwd_split_c": True}),
    (2, 777, 8, 128, 128, torch.bfloat16, True, True, True, True, 1,
     {"scan_bwd_transposed": False, "scan_bwd_carried_by_dot": True}),
    (2, 1000, 4, 128, 128, torch.bfloat16, True, True, True, True, 4, {"scan_bwd_transposed": False}),
    (2, 1000, 4, 128, 128, torch.bfloat16, True, True, True, True, 4,                 # one block: direct stores
     {"scan_bwd_transposed": False, "scan_bwd_block_p": 128}),
    (2, 1000, 4, 128, 128, torch.float32, True, True, True, True, 2, {"scan_bwd_warps": 4, "scan_bwd_block_p": 32}),
]


@pytest.mark.parametrize(
    "batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, groups, overrides", CASES)
def test_scan_backward_matches_float64_reference(monkeypatch, batch, length, heads, head_dim, state_dim, dtype,
                                                 rope, use_d, use_init, use_seq, groups, overrides):
    from cheems_parallel.kernels import ssd
    from cheems_parallel.kernels.ssd_scan_bwd import scan_backward

    monkeypatch.setattr(ssd, "_backward", scan_backward)
    inputs = make_inputs(batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq)
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    errors, plain = ssd_kernel_errors(ssd.ssd_fused, inputs, config=overrides)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    print(f"\nscan backward b={batch} l={length} h={heads} g={groups} p={head_dim} n={state_dim} {dtype} {overrides}: "
          + " ".join(f"{name}={error:.1e}" for name, error in errors.items())
          + " | plain relative: " + " ".join(f"{name}={error:.1e}" for name, error in plain.items()))
    bad = {name: error for name, error in errors.items() if not error < tolerance}
    assert not bad, f"relative error over {tolerance}: {bad}"


@pytest.mark.parametrize("groups, rope, overrides", [
    (1, False, {}),                                   # mamba's problem: one group, no RoPE
    (8, True, {}),                                    # the Cheems problem: groups = heads, RoPE (B~/C~ saved)
    (1, False, {"scan_bwd_split_c": True}),
    (8, True, {"scan_bwd_transposed": False}),
])
def test_same_outputs_as_kernel_backward(groups, rope, overrides):
    """The seven outputs against `ssd._backward` on the same saved tensors (bf16, b 2, l 2048, h 8, p = n = 128).
    Both round differently (dS in bf16 there, float32 here; dB/dC summed in another order): within 1e-2."""
    import torch.nn.functional as F

    from cheems_parallel.kernels import ssd
    from cheems_parallel.kernels.ssd_scan_bwd import scan_backward

    inputs = make_inputs(2, 2048, 8, 128, 128, torch.bfloat16, rope, True, True, True)
    x, D = inputs["x"], inputs["D"]
    B, C = inputs["B"][:, :, :groups].contiguous(), inputs["C"][:, :, :groups].contiguous()
    T = ssd.KERNEL_CHUNK
    batch, length, heads, _ = x.shape
    dt = F.softplus(inputs["dt_raw"] + inputs["dt_bias"]).transpose(1, 2).contiguous()
    g = (dt * inputs["A"][:, None]).view(batch, heads, -1, T).cumsum(dim=-1).view(batch, heads, -1)
    seq = inputs["seq_idx"].to(torch.int32).contiguous()
    cos = inputs["cos"].to(x.dtype).contiguous() if rope else None
    sin = inputs["sin"].to(x.dtype).contiguous() if rope else None
    config = dict(ssd.CONFIG, **overrides)
    _, final, states, rotated_B, rotated_C = ssd._forward(x, B, C, cos, sin, dt, g, seq, D, inputs["initial_state"],
                                                          T, config, save_for_backward=True)
    dy = torch.randn_like(x)
    dfinal = torch.randn_like(final)
    saved = (x, B, C, cos, sin, dt, g, seq, D, states, T, config, rotated_B, rotated_C)
    expected = ssd._backward(dy, dfinal, *saved)
    got = scan_backward(dy, dfinal, *saved)
    errors = {}
    for name, value, reference in zip(["dx", "dB", "dC", "ddt", "dg", "dD", "dinit"], got, expected):
        assert value.shape == reference.shape and value.dtype == reference.dtype, name
        errors[name] = relative_error(value, reference)
    print(f"\nscan backward vs kernel backward g={groups} rope={rope} {overrides}: "
          + " ".join(f"{name}={error:.1e}" for name, error in errors.items()))
    bad = {name: error for name, error in errors.items() if not error < 1e-2}
    assert not bad, f"relative error over 1e-2: {bad}"


@pytest.mark.parametrize("problem", ["mamba", "cheems"])
def test_configs_agree_with_kernel_backward_at_bench_shape(problem):
    """Each config in SCAN_CONFIGS gives `ssd._backward`'s seven outputs (within 1e-2) on the bench problem at
    L = 4k (B·L = 65 536 tokens, h = 32, p = n = 128, bf16, D on; mamba: one B/C group, no RoPE; cheems: groups =
    heads, RoPE, B~/C~ saved), on the same saved tensors. Their speed is measured by `bench/ssd.py --sweep-scan`."""
    import torch.nn.functional as F

    from cheems_parallel.kernels import ssd
    from cheems_parallel.kernels.ssd_scan_bwd import scan_backward

    batch, length, heads, size = 16, 4096, 32, 128
    rope, groups = (False, 1) if problem == "mamba" else (True, heads)
    inputs = make_inputs(batch, length, heads, size, size, torch.bfloat16, rope, True, False, False)
    x, D = inputs["x"], inputs["D"]
    B, C = inputs["B"][:, :, :groups].contiguous(), inputs["C"][:, :, :groups].contiguous()
    T = ssd.KERNEL_CHUNK
    dt = F.softplus(inputs["dt_raw"] + inputs["dt_bias"]).transpose(1, 2).contiguous()
    g = (dt * inputs["A"][:, None]).view(batch, heads, -1, T).cumsum(dim=-1).view(batch, heads, -1)
    cos = inputs["cos"].to(x.dtype).contiguous() if rope else None
    sin = inputs["sin"].to(x.dtype).contiguous() if rope else None
    config = dict(ssd.CONFIG)
    _, final, states, rotated_B, rotated_C = ssd._forward(x, B, C, cos, sin, dt, g, None, D, None, T, config)
    dy = torch.randn_like(x)
    saved = (x, B, C, cos, sin, dt, g, None, D, states, T)
    expected = ssd._backward(dy, None, *saved, config, rotated_B, rotated_C)
    for overrides in SCAN_CONFIGS:
        scan_config = dict(config, **overrides)
        got = scan_backward(dy, None, *saved, scan_config, rotated_B, rotated_C)
        errors = {name: relative_error(value, reference) for name, value, reference
                  in zip(["dx", "dB", "dC", "ddt", "dg", "dD", "dinit"], got, expected)}
        assert all(error < 1e-2 for error in errors.values()), (overrides, errors)


# the configurations checked at the bench shape (the defaults first); the offline compile numbers are in
# cheems_parallel/kernels/ssd_scan_bwd.py beside SCAN_BWD_CONFIG
SCAN_CONFIGS = [
    {},
    {"scan_bwd_block_p": 32},
    {"scan_bwd_stages": 1},
    {"scan_bwd_transposed": False, "scan_bwd_stages": 1},
    {"scan_bwd_split_c": True, "scan_bwd_block_p": 32, "scan_bwd_stages": 1},
    {"scan_bwd_warps": 4, "scan_bwd_block_p": 32},
]
