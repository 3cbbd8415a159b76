"""cheems_parallel.kernels.ssd_scan_bwd (the fused reverse-walk SSD backward) under TRITON_INTERPRET=1 on the CPU.

Two checks on fresh random inputs at small shapes: (1) on the same saved forward tensors and the same random
dy / d final state, all seven outputs of `scan_backward` equal those of the current kernel backward
`ssd._backward`; (2) `ssd_fused` with CONFIG "scan_backward" (so `scan_backward` in place of `ssd._backward`) gives the float64 oracle's
autograd gradients of x, dt_raw, dt_bias, A, B, C, D, initial_state (through the torch prologue).
Shapes: x (b, l, h, p), B/C (b, l, g, n), cos/sin (b, l, n).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.kernel_oracles import interpreted_module, relative_error, ssd_kernel_errors
from tests.unit.test_ssd_kernel import _interpreter_usable, make_inputs

IN_CHILD = os.environ.get("SSD_SCAN_BWD_TEST_CHILD") == "1"
OUTPUT_NAMES = ["dx", "dB", "dC", "ddt", "dg", "dD", "dinit"]


@pytest.fixture(scope="module")
def modules():
    """(ssd, ssd_scan_bwd) decorated for the interpreter; ssd first, since the scan kernel calls its helpers."""
    if not _interpreter_usable():
        pytest.skip("triton was imported for compilation earlier in this process: "
                    "test_scan_tests_in_a_fresh_interpreter_process runs these tests instead")
    ssd_fixture = interpreted_module("cheems_parallel.kernels.ssd", "_chunk_fwd_kernel")
    ssd = next(ssd_fixture)
    scan_fixture = interpreted_module("cheems_parallel.kernels.ssd_scan_bwd", "_scan_bwd_kernel")
    scan = next(scan_fixture)
    if type(scan._load_rotated_operands).__name__ != "InterpretedFunction":   # imported from a stale ssd
        import importlib
        scan = importlib.reload(scan)
    yield ssd, scan
    for fixture in (scan_fixture, ssd_fixture):
        next(fixture, None)


@pytest.mark.skipif(IN_CHILD, reason="already the fresh process")
def test_scan_tests_in_a_fresh_interpreter_process():
    """When this process cannot interpret (see _interpreter_usable), run this file in a new one."""
    if _interpreter_usable():
        pytest.skip("the tests above ran in this process")
    environment = dict(os.environ, TRITON_INTERPRET="1", SSD_SCAN_BWD_TEST_CHILD="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def saved_forward(ssd, inputs, kernel_chunk, config):
    """What `ssd_fused` hands its backward: the prologue's dt, g, seq, then `ssd._forward`'s saved tensors."""
    x, B, C, D = inputs["x"], inputs["B"], inputs["C"], inputs["D"]
    batch, length, heads, _ = x.shape
    pad = (-length) % kernel_chunk
    dt = F.softplus(inputs["dt_raw"] + inputs["dt_bias"]).transpose(1, 2)
    dt = F.pad(dt, (0, pad)).contiguous()
    g = (dt * inputs["A"][:, None]).view(batch, heads, -1, kernel_chunk).cumsum(dim=-1).view(batch, heads, -1)
    seq = None
    if inputs["seq_idx"] is not None:
        seq = inputs["seq_idx"].to(torch.int32)
        seq = torch.cat([seq, seq[:, -1:].expand(batch, pad)], dim=1).contiguous()
    cos, sin = inputs["cos"], inputs["sin"]
    if cos is not None:
        cos, sin = cos.to(x.dtype).contiguous(), sin.to(x.dtype).contiguous()
    _, final, states, rotated_B, rotated_C = ssd._forward(x, B, C, cos, sin, dt, g, seq, D, inputs["initial_state"],
                                                          kernel_chunk, config, save_for_backward=True)
    return (x, B, C, cos, sin, dt, g, seq, D, states), final, rotated_B, rotated_C


@pytest.mark.parametrize(
    "dtype, groups, rope, save_rotated, use_seq, use_init, use_dfinal, use_d, length, head_dim, block_p, options",
    [
        # everything on, B~/C~ from the forward, groups = heads, p = 24 in two blocks of 16 (atomics, masking)
        (torch.float32, 4, True, True, True, True, True, True, 37, 24, 16, {}),
        # the rotate-half kernel: one group for four heads, RoPE on load, no documents / initial state /
        # d final, p in one block; the C side's dg through q S^T
        (torch.float32, 1, True, False, False, False, False, True, 40, 16, 64,
         {"scan_bwd_transposed": False, "scan_bwd_carried_by_dot": True}),
        # groups = heads and p in one block: dB/dC stored directly; no RoPE, no D
        (torch.float32, 4, False, False, True, True, True, False, 33, 16, 64, {}),
        # n = 48 (not a power of two): un-rotation by adds into the partner columns; p in one block
        (torch.float32, 4, True, True, True, True, True, True, 33, 16, 64, {"state_dim": 48}),
        # the rotate-half kernel storing un-rotated dB/dC directly (groups = heads, one block, RoPE on load)
        (torch.float32, 4, True, False, True, True, True, True, 33, 16, 64, {"scan_bwd_transposed": False}),
        # two groups, RoPE on load, p split, dC from the second launch (its per-head rows summed per group)
        (torch.float32, 2, True, False, True, False, True, True, 37, 24, 16, {"scan_bwd_split_c": True}),
        # bf16, one group, B~/C~ from the forward, p split
        (torch.bfloat16, 1, True, True, True, True, True, True, 37, 24, 16, {}),
    ],
)
def test_same_outputs_as_kernel_backward(modules, dtype, groups, rope, save_rotated, use_seq, use_init, use_dfinal,
                                         use_d, length, head_dim, block_p, options):
    ssd, scan = modules
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs each run
    batch = 2 if dtype == torch.float32 else 1   # the interpreter's bf16 rounding is slow
    options = dict(options)
    state_dim = options.pop("state_dim", 32)
    inputs = make_inputs(batch, length, 4, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, generator)
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    config = dict(ssd.CONFIG, save_rotated=save_rotated, scan_bwd_block_p=block_p, **options)
    saved, final, rotated_B, rotated_C = saved_forward(ssd, inputs, 16, config)
    assert (rotated_B is not None) == (rope and save_rotated)
    dy = torch.randn(inputs["x"].shape, generator=generator).to(dtype)
    dfinal = torch.randn(final.shape, generator=generator) if use_dfinal else None
    expected = ssd._backward(dy, dfinal, *saved, 16, config, rotated_B, rotated_C)
    got = scan.scan_backward(dy, dfinal, *saved, 16, config, rotated_B, rotated_C)
    # bf16: dB/dC are rounded to bf16 from float32 sums added in another order (one bf16 step is 4e-3)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    errors = {}
    for name, value, reference in zip(OUTPUT_NAMES, got, expected):
        if reference is None:
            assert value is None, name
            continue
        assert value.shape == reference.shape and value.dtype == reference.dtype, name
        assert torch.isfinite(value).all(), name
        errors[name] = relative_error(value, reference)
    bad = {name: error for name, error in errors.items() if not error < tolerance}
    assert not bad, f"relative error over {tolerance}: {bad} (all: {errors})"


@pytest.mark.parametrize("dtype, groups, rope, save_rotated, use_seq, length, head_dim, block_p, options", [
    (torch.float32, 2, True, True, True, 37, 24, 16, {}),    # two groups of two heads, documents, p split
    (torch.float32, 1, False, False, False, 33, 16, 64, {}),  # mamba's shape in small: one group, no RoPE
    # groups = heads, RoPE on load, p not a power of two; the rotate-half kernel
    (torch.float32, 4, True, False, True, 40, 24, 64, {"scan_bwd_transposed": False}),
    (torch.bfloat16, 1, True, True, True, 37, 16, 16, {}),
])
def test_gradients_match_float64_oracle(modules, monkeypatch, dtype, groups, rope, save_rotated, use_seq, length,
                                        head_dim, block_p, options):
    """`ssd_fused` with CONFIG "scan_backward": every gradient against float64 autograd."""
    ssd, scan = modules
    calls = []
    original = scan.scan_backward
    monkeypatch.setattr(scan, "scan_backward", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    batch = 2 if dtype == torch.float32 else 1
    inputs = make_inputs(batch, length, 4, head_dim, 32, dtype, rope, True, True, use_seq, generator)
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    # through the module's switch (CONFIG "scan_backward"), as the layer would turn it on
    config = {"save_rotated": save_rotated, "scan_bwd_block_p": block_p, "scan_backward": True, **options}
    errors, _ = ssd_kernel_errors(ssd.ssd_fused, inputs, kernel_chunk=16, config=config)
    assert calls, "ssd_fused did not reach scan_backward"
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    bad = {name: error for name, error in errors.items() if not error < tolerance}
    assert not bad, f"relative error over {tolerance}: {bad} (all: {errors})"
