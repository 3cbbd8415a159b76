"""Probe: the learnable per-key bias folded into cuDNN's causal attention by widening the head dim.

S = scale·q·k + m[key] equals scale·[q, c1, c2, 0…]·[k, m, m, 0…] when scale·(c1 + c2) = 1. c1 = bf16(√d),
c2 = bf16(√d − c1) makes the bias coefficient exact to ~1e-7 in bf16. Autograd through the concatenation
gives d m = Σ_queries dS. Measures cuDNN's time at the widened q/k head dims against d = 128, checks the
gradients against dmattn_ref (float64), and times our Triton kernel beside it. Needs CUDA.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cheems_parallel.kernels.dmattn import dmattn_fused  # noqa: E402
from cheems_parallel.ops.dmattn import dmattn_ref  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402


def widened(q, k, v, bias, width, pad_v):
    d = q.shape[-1]
    c1 = torch.tensor(math.sqrt(d), dtype=q.dtype).item()
    c2 = math.sqrt(d) - c1
    extra = width - d
    shape = q.shape[:-1]
    q_cols = [q, q.new_full(shape + (1,), c1), q.new_full(shape + (1,), c2)]
    b = bias.to(k.dtype).unsqueeze(-1)
    k_cols = [k, b, b]
    if extra > 2:
        q_cols.append(q.new_zeros(shape + (extra - 2,)))
        k_cols.append(k.new_zeros(k.shape[:-1] + (extra - 2,)))
    qx, kx = torch.cat(q_cols, -1), torch.cat(k_cols, -1)
    vx = torch.cat([v, v.new_zeros(v.shape[:-1] + (extra,))], -1) if pad_v else v
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = F.scaled_dot_product_attention(qx, kx, vx, is_causal=True, scale=1.0 / math.sqrt(d))
    return out[..., :d] if pad_v else out


def plain(q, k, v, bias):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(width, pad_v):
    torch.manual_seed(0)
    b, h, l, d = 2, 4, 777, 128
    q, k, v = (torch.randn(b, h, l, d, device="cuda").to(torch.bfloat16).requires_grad_() for _ in range(3))
    bias = (2 * torch.randn(b, h, l, device="cuda")).to(torch.bfloat16).requires_grad_()
    g = torch.randn(b, h, l, d, device="cuda").to(torch.bfloat16)
    out = widened(q, k, v, bias, width, pad_v)
    grads = torch.autograd.grad(out, (q, k, v, bias), g)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    ref = dmattn_ref(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    return [rel(out, ref)] + [rel(a, r) for a, r in zip(grads, ref_grads)]


def bench(fn, inputs, g):
    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fb():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs[:3], g)
    fb()
    return (triton.testing.do_bench(fwd, warmup=50, rep=300, return_mode="median"),
            triton.testing.do_bench(fb, warmup=50, rep=300, return_mode="median"))


def main():
    rows = []
    for width, pad_v in ((136, False), (136, True), (144, False), (160, False), (192, False)):
        try:
            errors = check(width, pad_v)
            print(f"check width {width} pad_v {pad_v}: out/dq/dk/dv/dbias rel err "
                  + " ".join(f"{e:.2e}" for e in errors), flush=True)
        except Exception as error:  # report and go on: this is a probe
            print(f"check width {width} pad_v {pad_v}: FAILED {type(error).__name__}: {str(error)[:200]}", flush=True)
    for length in (1024, 4096, 16384):
        batch = 65536 // length
        h, d = 16, 128
        torch.manual_seed(1)
        q, k, v = (torch.randn(batch, h, length, d, device="cuda").to(torch.bfloat16).requires_grad_()
                   for _ in range(3))
        bias = torch.randn(batch, h, length, device="cuda").to(torch.bfloat16).requires_grad_()
        g = torch.randn_like(q)
        flops = 2.0 * batch * h * length * length * d
        base_f, base_fb = bench(plain, (q, k, v, bias), g)
        variants = {"triton ours": lambda *a: dmattn_fused(*a)}
        for width, pad_v in ((136, False), (136, True), (144, False), (160, False), (192, False)):
            variants[f"cudnn w{width}{' padv' if pad_v else ''}"] = (
                lambda *a, width=width, pad_v=pad_v: widened(*a, width, pad_v))
        rows.append((length, "cudnn d128 (ceiling)", base_f, base_fb, 1.0, 1.0))
        for name, fn in variants.items():
            try:
                f_ms, fb_ms = bench(fn, (q, k, v, bias), g)
                rows.append((length, name, f_ms, fb_ms, base_f / f_ms, base_fb / fb_ms))
            except Exception as error:
                print(f"L {length} {name}: FAILED {type(error).__name__}: {str(error)[:200]}", flush=True)
        print(f"L {length}: base fwd {flops / base_f / 1e9:.0f} TFLOP/s, fwd+bwd {3.5 * flops / base_fb / 1e9:.0f}",
              flush=True)
    print(f"{'L':>6} {'method':<22} {'fwd ms':>8} {'f+b ms':>8} {'fwd x':>6} {'f+b x':>6}")
    for length, name, f_ms, fb_ms, rf, rfb in rows:
        print(f"{length:>6} {name:<22} {f_ms:8.3f} {fb_ms:8.3f} {rf:6.2f} {rfb:6.2f}")


if __name__ == "__main__":
    main()
