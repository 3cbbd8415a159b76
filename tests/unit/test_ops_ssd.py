"""SSD references: oracle 1 (chunked == sequential recurrence), document resets, gradients, RoPE shift (oracle 2)."""
import pytest
import torch

from cheems_parallel.ops import apply_rope, rope_tables, ssd_chunked, ssd_scan_ref


def random_ssd_inputs(b=2, l=37, h=3, p=4, n=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g, dtype=dtype)
    dt = torch.rand(b, l, h, generator=g, dtype=dtype) * 0.5 + 0.01
    A = -torch.rand(h, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(b, l, h, n, generator=g, dtype=dtype)
    C = torch.randn(b, l, h, n, generator=g, dtype=dtype)
    D = torch.randn(h, generator=g, dtype=dtype)
    state = torch.randn(b, h, p, n, generator=g, dtype=dtype)
    return x, dt, A, B, C, D, state


def naive_recurrence(x, dt, A, B, C):
    """Explicit per-(batch, head, time) loops with scalars: independent of the vectorised scan."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    y = torch.zeros_like(x)
    for bi in range(b):
        for hi in range(h):
            S = torch.zeros(p, n, dtype=x.dtype)
            for t in range(l):
                S = torch.exp(dt[bi, t, hi] * A[hi]) * S + dt[bi, t, hi] * torch.outer(x[bi, t, hi], B[bi, t, hi])
                y[bi, t, hi] = S @ C[bi, t, hi]
    return y


def test_scan_ref_matches_naive_loops():
    x, dt, A, B, C, _, _ = random_ssd_inputs(b=1, l=9, h=2, p=3, n=4)
    y, _ = ssd_scan_ref(x, dt, A, B, C)
    torch.testing.assert_close(y, naive_recurrence(x, dt, A, B, C), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length,chunk", [(37, 8), (32, 8), (5, 16), (64, 64), (1, 4), (50, 7)])
@pytest.mark.parametrize("with_extras", [False, True])
def test_chunked_equals_recurrence(length, chunk, with_extras):
    x, dt, A, B, C, D, state = random_ssd_inputs(l=length)
    D, state = (D, state) if with_extras else (None, None)
    y_ref, s_ref = ssd_scan_ref(x, dt, A, B, C, D, state)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, D, state)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)


def test_document_reset_equals_separate_documents():
    x, dt, A, B, C, D, _ = random_ssd_inputs(b=1, l=30)
    cut = 11
    seq_idx = torch.tensor([[0] * cut + [1] * (30 - cut)])
    y, s = ssd_chunked(x, dt, A, B, C, 8, D, seq_idx=seq_idx)
    y_first, _ = ssd_scan_ref(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], D)
    y_second, s_second = ssd_scan_ref(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], D)
    torch.testing.assert_close(y, torch.cat([y_first, y_second], 1), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_second, rtol=1e-9, atol=1e-9)
    y_scan, _ = ssd_scan_ref(x, dt, A, B, C, D, seq_idx=seq_idx)
    torch.testing.assert_close(y_scan, y, rtol=1e-9, atol=1e-9)


def test_chunked_gradients_float64():
    x, dt, A, B, C, D, state = random_ssd_inputs(b=1, l=10, h=2, p=2, n=2)
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, state)]
    assert torch.autograd.gradcheck(lambda *t: ssd_chunked(*t[:5], 4, t[5], t[6]), inputs, eps=1e-6, atol=1e-5)


def test_chunked_gradients_equal_recurrence_gradients():
    inputs = random_ssd_inputs(l=21)
    grads = []
    for fn in (lambda *t: ssd_scan_ref(*t[:5], t[5], t[6]), lambda *t: ssd_chunked(*t[:5], 8, t[5], t[6])):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, s = fn(*leaves)
        (y.square().sum() + s.sum()).backward()
        grads.append([t.grad for t in leaves])
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-8)


def test_rope_on_b_c_is_relative_position():
    """Oracle 2: shifting all positions by a constant leaves SSD-with-RoPE unchanged."""
    x, dt, A, B, C, D, _ = random_ssd_inputs(b=1, l=20, n=8)
    outputs = []
    for offset in (0, 1000):
        cos, sin = rope_tables(torch.arange(20) + offset, 8)
        cos, sin = cos[None, :, None].double(), sin[None, :, None].double()
        outputs.append(ssd_chunked(x, dt, A, apply_rope(B, cos, sin), apply_rope(C, cos, sin), 8, D)[0])
    # the tables are float32 by design, hence 1e-5 and not float64 precision
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    # and RoPE does matter: without it the output differs
    assert not torch.allclose(outputs[0], ssd_chunked(x, dt, A, B, C, 8, D)[0])


def test_rope_matches_complex_rotation():
    """rotate-half RoPE == multiplying (x_i, x_{i+d/2}) pairs by e^{i * pos * theta^(-2i/d)}."""
    d = 8
    positions = torch.arange(7)
    x = torch.randn(7, d, dtype=torch.float64)
    cos, sin = rope_tables(positions, d)
    got = apply_rope(x, cos.double(), sin.double())
    freqs = 1e4 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    z = torch.complex(x[:, : d // 2], x[:, d // 2:]) * torch.polar(torch.ones(7, d // 2, dtype=torch.float64),
                                                                   positions[:, None].double() * freqs)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1), rtol=1e-6, atol=1e-6)


def test_rope_tables_repeat_their_first_half():
    """The Gluon SSD kernels read only the tables' first halves (ssd.py's contract on cos / sin): a row's two
    halves must be equal, at any position and in the kernels' 16-bit copies."""
    cos, sin = rope_tables(torch.randint(0, 100_000, (3, 50)), 128)
    for table in (cos, sin, cos.to(torch.bfloat16), sin.to(torch.bfloat16)):
        assert torch.equal(table[..., :64], table[..., 64:])
    assert not torch.equal(cos[..., :32], cos[..., 32:64])  # the frequencies differ within a half
