"""cheems_parallel.kernels.ssd_scan_fwd (the one-walk SSD forward) under TRITON_INTERPRET=1 on the CPU, at
small shapes, against the float64 recurrence `cheems_parallel.ops.ssd_scan_ref` (through
`tests.kernel_oracles.ssd_kernel_errors`) and against the two-kernel forward `ssd._forward` it replaces.

Shapes: x (b, l, h, p), B/C (b, l, g, n), cos/sin (b, l, n). The end-to-end cases run `ssd.ssd_fused` with CONFIG
"scan_forward" (`scan_forward` in place of `_forward`), so the unchanged `ssd._backward` runs on
the states and rotated B~/C~ this kernel saved: y, the final state and every gradient vs the oracle, with the
bounds of tests/unit/test_ssd_kernel.py (1e-3 float32, 2e-2 bf16 at interpreter sizes).
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.kernel_oracles import interpreted_module, relative_error, ssd_float64_oracle, ssd_kernel_errors
from tests.unit.test_ssd_kernel import make_inputs as kernel_test_inputs

IN_CHILD = os.environ.get("SSD_SCAN_FWD_TEST_CHILD") == "1"


def _interpreter_usable():
    """Triton's own @jit helpers run under the interpreter only if triton itself was imported with
    TRITON_INTERPRET=1 (see tests/unit/test_ssd_kernel.py)."""
    if "triton" not in sys.modules:
        return True
    import triton.language.standard as standard
    return type(standard.sum).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def modules():
    """(ssd, ssd_scan_fwd) decorated for the interpreter; the scan module is re-imported after ssd so that
    the @jit helpers it imports from ssd are the interpreted ones."""
    if not _interpreter_usable():
        pytest.skip("triton was imported for compilation earlier in this process: "
                    "test_scan_tests_in_a_fresh_interpreter_process runs these tests instead")
    ssd_fixture = interpreted_module("cheems_parallel.kernels.ssd", "_chunk_fwd_kernel")
    ssd = next(ssd_fixture)
    scan = importlib.reload(importlib.import_module("cheems_parallel.kernels.ssd_scan_fwd"))
    yield ssd, scan
    next(ssd_fixture, None)   # restores TRITON_INTERPRET (and a GPU-compiled ssd on a CUDA machine)
    if torch.cuda.is_available():
        importlib.reload(scan)


@pytest.mark.skipif(IN_CHILD, reason="already the fresh process")
def test_scan_tests_in_a_fresh_interpreter_process():
    """When this process cannot interpret (see _interpreter_usable), run this file in a new one."""
    if _interpreter_usable():
        pytest.skip("the tests above ran in this process")
    environment = dict(os.environ, TRITON_INTERPRET="1", SSD_SCAN_FWD_TEST_CHILD="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def make_inputs(batch, length, heads, groups, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq, seed):
    """tests/unit/test_ssd_kernel.py's inputs with `groups` B/C groups (head i reads group i // (h / g))."""
    inputs = kernel_test_inputs(batch, length, heads, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq,
                                torch.Generator().manual_seed(seed))
    inputs["B"] = inputs["B"][:, :, :groups].contiguous()
    inputs["C"] = inputs["C"][:, :, :groups].contiguous()
    return inputs


def kernel_arguments(ssd, inputs, T):
    """What `ssd_fused` hands `_forward`: the prologue's dt, g (b, h, lpad), padded seq, tables in x's dtype."""
    x = inputs["x"]
    batch, length, heads, _ = x.shape
    pad = (-length) % T
    dt = F.pad(F.softplus(inputs["dt_raw"] + inputs["dt_bias"]).transpose(1, 2), (0, pad)).contiguous()
    g = (dt * inputs["A"][:, None]).view(batch, heads, -1, T).cumsum(dim=-1).view(batch, heads, -1)
    seq = inputs["seq_idx"]
    if seq is not None:
        seq = torch.cat([seq.int(), seq[:, -1:].int().expand(batch, pad)], dim=1).contiguous()
    cos, sin = inputs["cos"], inputs["sin"]
    if cos is not None:
        table_dtype = x.dtype if x.dtype == torch.bfloat16 else torch.float32
        cos, sin = cos.to(table_dtype).contiguous(), sin.to(table_dtype).contiguous()
    return (x, inputs["B"].to(x.dtype), inputs["C"].to(x.dtype), cos, sin, dt, g, seq, inputs["D"],
            inputs["initial_state"], T)


# (batch, length, heads, groups, head_dim, state_dim, T, dtype, rope, D, init, documents, config)
END_TO_END = [
    (2, 40, 2, 1, 16, 32, 16, torch.float32, True, True, True, True, {}),             # one group, L % T != 0
    (1, 37, 3, 3, 24, 16, 32, torch.float32, True, False, True, True,                 # groups = heads, p = 24 in
     {"scan_fwd_block_p": 16, "scan_fwd_rope_prepass": False}),                       # 16-wide blocks, rope in loop
    (1, 33, 4, 2, 16, 16, 16, torch.float32, False, False, False, False, {}),         # plain Mamba-2, 2 groups
    (2, 21, 2, 2, 16, 32, 16, torch.float32, True, True, False, True, {"save_rotated": False}),  # rotate on load
    (2, 37, 2, 1, 16, 32, 16, torch.bfloat16, True, True, True, True, {"scan_fwd_rope_prepass": False}),
    (1, 45, 2, 2, 32, 32, 32, torch.bfloat16, True, True, True, True,               # bf16, g = h, B~ and C~
     {"scan_fwd_step": 32, "scan_fwd_rope_prepass": True}),                            # both from the pre-pass
]


@pytest.mark.parametrize("batch, length, heads, groups, head_dim, state_dim, T, dtype, rope, use_d, use_init, "
                         "use_seq, config", END_TO_END)
def test_forward_and_backward_on_its_saved_tensors_match_float64(modules, monkeypatch, batch, length, heads,
                                                                  groups, head_dim, state_dim, T, dtype, rope,
                                                                  use_d, use_init, use_seq, config):
    """ssd_fused with CONFIG "scan_forward" (scan_forward in place of _forward): y, final state and every gradient (the existing
    backward on this kernel's states / B~ / C~) against the float64 recurrence, fresh inputs each run."""
    ssd, scan = modules
    calls = []
    original = scan.scan_forward
    monkeypatch.setattr(scan, "scan_forward", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    inputs = make_inputs(batch, length, heads, groups, head_dim, state_dim, dtype, rope, use_d, use_init, use_seq,
                         seed=torch.seed() % 2**31)
    # through the module's switch (CONFIG "scan_forward"), as the layer would turn it on
    errors, _ = ssd_kernel_errors(ssd.ssd_fused, inputs, kernel_chunk=T, config=dict(config, scan_forward=True))
    assert calls, "ssd_fused did not reach scan_forward"
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    bad = {name: error for name, error in errors.items() if not error < tolerance}
    assert not bad, f"relative error over {tolerance}: {bad} (all: {errors})"


@pytest.mark.parametrize("dtype, groups, rope, config", [
    (torch.float32, 1, True, {"scan_fwd_step": 32, "scan_fwd_rope_prepass": False}),
    (torch.float32, 2, False, {"scan_fwd_block_p": 16}),
    (torch.float32, 2, True, {"scan_fwd_rope_prepass": True}),
    (torch.bfloat16, 1, True, {"scan_fwd_step": 32}),
    (torch.bfloat16, 2, True, {"scan_fwd_rope_prepass": False}),
    (torch.bfloat16, 1, True, {"scan_fwd_rope_prepass": True}),
])
def test_saved_tensors_equal_the_two_kernel_forward(modules, dtype, groups, rope, config):
    """y, final, states, B~, C~ equal `ssd._forward`'s on the same prologue (same config) up to rounding: float32
    within 1e-6 (bitwise when the walk steps whole chunks); bf16 within one bf16 rounding (2^-8 relative: the
    float32 state is the same number up to summation order before rounding; 2^-7 for the final state and the
    states with "scan_fwd_rope_prepass": True, which rounds the weighted B~ twice); B~, C~ (rotated in the walk
    or by the pre-pass) bitwise."""
    ssd, scan = modules
    inputs = make_inputs(2, 45, 2, groups, 24, 32, dtype, rope, True, True, True, seed=torch.seed() % 2**31)
    arguments = kernel_arguments(ssd, inputs, 32)
    full_config = dict(ssd.CONFIG, **config)
    ours = scan.scan_forward(*arguments, full_config, save_for_backward=True)
    theirs = ssd._forward(*arguments, full_config, save_for_backward=True)
    tolerance = 1e-6 if dtype == torch.float32 else 2 ** -8
    for name, value, reference in zip(["y", "final", "states", "rotated_B", "rotated_C"], ours, theirs):
        if reference is None:
            assert value is None, name
            continue
        assert value.shape == reference.shape and value.dtype == reference.dtype, name
        bound = 0.0 if name.startswith("rotated") else tolerance
        if dtype == torch.bfloat16 and name in ("final", "states") and config.get("scan_fwd_rope_prepass") is True:
            bound = 2 ** -7
        assert relative_error(value, reference) <= bound, (name, relative_error(value, reference))
    assert (ours[3] is not None) == rope


def test_without_gradients_nothing_is_saved_and_y_is_the_same(modules):
    """save_for_backward=False (the inference path): no states, no B~/C~; y and final as with saving. At the
    kernel chunk ssd_fused uses (64), walked in the default steps (16)."""
    ssd, scan = modules
    inputs = make_inputs(1, 150, 2, 1, 16, 32, torch.float32, True, True, True, True, seed=torch.seed() % 2**31)
    arguments = kernel_arguments(ssd, inputs, ssd.KERNEL_CHUNK)
    y, final, states, rotated_B, rotated_C = scan.scan_forward(*arguments, dict(ssd.CONFIG), save_for_backward=False)
    assert states is None and rotated_B is None and rotated_C is None
    y_saved, final_saved, *_ = scan.scan_forward(*arguments, dict(ssd.CONFIG), save_for_backward=True)
    assert torch.equal(y, y_saved) and torch.equal(final, final_saved)
    y_ref, final_ref = ssd_float64_oracle(**inputs)
    assert relative_error(y, y_ref) < 1e-4 and relative_error(final, final_ref) < 1e-4


def test_step_must_divide_the_chunk(modules):
    ssd, scan = modules
    inputs = make_inputs(1, 16, 1, 1, 16, 16, torch.float32, False, False, False, False, seed=0)
    with pytest.raises(ValueError, match="scan_fwd_step"):
        scan.scan_forward(*kernel_arguments(ssd, inputs, 48), dict(ssd.CONFIG, scan_fwd_step=32))
