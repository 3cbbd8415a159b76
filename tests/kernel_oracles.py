"""What the CPU (interpreter) and GPU tests of the Triton kernels share: the float64 oracles, the error
measures, the kernel-vs-oracle comparison of outputs and gradients, and the interpreter fixture body.

The oracles are the pure-PyTorch reference ops of `cheems_parallel.ops` evaluated in float64; nothing
here calls the kernels' own code except through the `kernel` callable a test passes in.
"""
import importlib
import os
import sys

import torch
import torch.nn.functional as F

from cheems_parallel.ops import apply_rope, ssd_chunked, ssd_scan_ref
from cheems_parallel.ops.dmattn import dmattn_ref

SSD_GRAD_NAMES = ["x", "dt_raw", "dt_bias", "A", "B", "C", "D", "initial_state"]


def relative_error(value, reference):
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def interpreted_module(name, probe_kernel, dependencies=()):
    """Generator body of a module-scoped fixture: the kernel module `name` decorated for the Triton
    interpreter (re-imported if something loaded it for a GPU; `probe_kernel` is one of its kernels; the kernel
    modules it imports, `dependencies`, re-imported with it), and afterwards the environment restored and, on a
    CUDA machine, GPU-compiled modules left behind."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.import_module(name)
    if type(getattr(module, probe_kernel)).__name__ != "InterpretedFunction":
        for dependency in dependencies:
            importlib.reload(importlib.import_module(dependency))
        module = importlib.reload(module)
    yield module
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous
    if torch.cuda.is_available():
        for dependency in dependencies:
            importlib.reload(sys.modules[dependency])
        importlib.reload(sys.modules[name])


# ---- SSD ---------------------------------------------------------------------------------------
def ssd_float64_oracle(x, dt_raw, dt_bias, A, B, C, cos, sin, D, initial_state, seq_idx, token_scale=None,
                       recurrence_max_length=2048):
    """The SSD contract in float64: the token-by-token recurrence `ssd_scan_ref` up to
    `recurrence_max_length` tokens, the chunked dual form `ssd_chunked` (itself tested equal to it) beyond,
    where the Python loop is slow. B/C may have g groups (head i reads group i // (h / g)).
    token_scale (b, l, h) zeros, optional: enters the decay as a = dt (1 + u) A with the input dt x
    compensated, so the function is unchanged and d loss / d u = A * (the per-token terms whose sum is dA)."""
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
    args = (x_in, dt, A.to(wide), B, C)
    initial_state = None if initial_state is None else initial_state.to(wide)
    if x.shape[1] <= recurrence_max_length:
        y, final = ssd_scan_ref(*args, None, initial_state, seq_idx)
    else:
        y, final = ssd_chunked(*args, 256, None, initial_state, seq_idx)
    if D is not None:  # the skip term outside the oracle call, on x itself
        y = y + x * D.to(wide)[:, None]
    return y, final


def ssd_prologue_float64(raw, bias, A, T):
    """dt = softplus(raw + bias), g = the within-chunk inclusive cumsum of dt A, both (b, h, l padded to T), in
    float64 torch: the prologue's contract, written out here independently of `ssd_prologue`."""
    batch, length, heads = raw.shape
    dt = F.softplus(raw.double() + bias.double()).transpose(1, 2)
    dt = F.pad(dt, (0, (-length) % T))
    g = (dt * A.double()[:, None]).view(batch, heads, -1, T).cumsum(dim=-1).view(batch, heads, -1)
    return dt, g


def ssd_sum_error(value, reference, terms, sum_dims):
    """Error of a whole-sequence sum (d dt_bias, dA: one number per head, summed over b and l) against the
    sum of its terms' magnitudes: ||value - reference|| / ||sum |terms|||. If every term were within a
    relative 1e-2 of the truth, this would be under 1e-2 for any cancellation among the terms; plain
    relative error instead divides by |sum terms|, which cancellation can make arbitrarily small
    (bench/ssd_notes.md, v3: measured sum|r|/|sum r| up to 33 at l = 100, h = 1)."""
    scale = terms.double().abs().sum(dim=sum_dims)
    return ((value.double() - reference.double()).norm() / scale.norm().clamp_min(1e-30)).item()


def ssd_kernel_errors(kernel, inputs, **kernel_arguments):
    """Run `kernel(**inputs, **kernel_arguments)` -> (y, final) and its backward against the float64
    oracle. Returns (errors, plain): relative errors of y, the final state and every gradient, with
    d dt_bias and dA by `ssd_sum_error`; `plain` holds those two sums' plain relative errors."""
    leaves = {name: inputs[name] for name in SSD_GRAD_NAMES if inputs[name] is not None}
    for tensor in leaves.values():
        tensor.requires_grad_(True)
    y, final = kernel(**inputs, **kernel_arguments)
    assert y.dtype == inputs["x"].dtype and final.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    # upstream gradient representable in y's dtype, so kernel and oracle differentiate the same loss
    # (a float64 weight cast to bf16 on the way in moves sums such as d dt_bias by far more than 1e-2)
    weight_y = torch.randn(y.shape, device=y.device, dtype=torch.float64).to(y.dtype).double()
    weight_final = torch.randn(final.shape, device=y.device, dtype=torch.float64)
    kernel_grads = torch.autograd.grad((y.double() * weight_y).sum() + (final.double() * weight_final).sum(),
                                       list(leaves.values()))
    token_scale = torch.zeros(inputs["dt_raw"].shape, device=y.device, dtype=torch.float64, requires_grad=True)
    y_ref, final_ref = ssd_float64_oracle(**inputs, token_scale=token_scale)
    *ref_grads, d_token_scale = torch.autograd.grad((y_ref * weight_y).sum() + (final_ref * weight_final).sum(),
                                                    list(leaves.values()) + [token_scale])
    errors = {"y": relative_error(y, y_ref), "final_state": relative_error(final, final_ref)}
    for name, grad, ref in zip(leaves, kernel_grads, ref_grads):
        assert grad.shape == ref.shape and torch.isfinite(grad).all(), name
        errors["d" + name] = relative_error(grad, ref)
    kernel_by_name, ref_by_name = dict(zip(leaves, kernel_grads)), dict(zip(leaves, ref_grads))
    plain = {"ddt_bias": errors["ddt_bias"], "dA": errors["dA"]}
    # whole-sequence sums: bounded against their terms (d dt_bias = sum of d dt_raw; dA = sum of d u / A)
    errors["ddt_bias"] = ssd_sum_error(kernel_by_name["dt_bias"], ref_by_name["dt_bias"], ref_by_name["dt_raw"],
                                       (0, 1))
    errors["dA"] = ssd_sum_error(kernel_by_name["A"], ref_by_name["A"],
                                 d_token_scale / inputs["A"].double().detach(), (0, 1))
    return errors, plain


# ---- DMAttn ------------------------------------------------------------------------------------
def dmattn_kernel_errors(kernel, q, k, v, mask_bias, grad_out, keep_window=None, segment_ids=None):
    """Output and the gradients of q, k, v, mask_bias of `kernel` (dmattn_fused's signature) against
    `dmattn_ref` in float64 on the same values, under the upstream gradient `grad_out`."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mask_bias)]
    out = kernel(*leaves, keep_window=keep_window, segment_ids=segment_ids)
    out.backward(grad_out)
    oracle_leaves = [t.double().requires_grad_() for t in (q, k, v, mask_bias)]
    oracle = dmattn_ref(*oracle_leaves, keep_window=keep_window, segment_ids=segment_ids)
    oracle.backward(grad_out.double())
    errors = {"out": relative_error(out.detach(), oracle.detach())}
    for name, leaf, oracle_leaf in zip(["q", "k", "v", "mask_bias"], leaves, oracle_leaves):
        errors[name] = relative_error(leaf.grad, oracle_leaf.grad)
    return errors
