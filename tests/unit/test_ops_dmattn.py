"""DMAttn reference: oracle 4 (plain causal attention, GQA == MHA), keep-window vs a brute-force loop,
oracle 7 (causality, with keep-window), cached decode, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from cheems_parallel.ops import dmattn_decode_ref, dmattn_ref


def random_qkv(b=2, h=4, h_kv=2, l=13, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, l, d, generator=g, dtype=dtype)
    k = torch.randn(b, h_kv, l, d, generator=g, dtype=dtype)
    v = torch.randn(b, h_kv, l, d, generator=g, dtype=dtype)
    m = torch.randn(b, h, l, generator=g, dtype=dtype)
    return q, k, v, m


def test_constant_mask_is_plain_causal_attention():
    q, k, v, _ = random_qkv(h_kv=4)
    constant = torch.full(q.shape[:3], 1.0, dtype=q.dtype)   # A' = 0 gives m = exp(0) = 1 everywhere
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(dmattn_ref(q, k, v, constant), expected, rtol=1e-10, atol=1e-10)


def test_gqa_equals_mha_with_repeated_kv():
    q, k, v, m = random_qkv(h=6, h_kv=2)
    mha = dmattn_ref(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), m)
    torch.testing.assert_close(dmattn_ref(q, k, v, m), mha, rtol=1e-12, atol=1e-12)


def brute_force(q, k, v, m, window):
    """Per query loop: rank the prefix keys by (mask value, position) and keep the best `window`."""
    b, h, l, d = q.shape
    rep = h // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(l):
                prefix = sorted(range(i + 1), key=lambda j: (m[bi, hi, j].item(), j), reverse=True)
                keep = prefix[:window] if window else prefix
                scores = torch.stack([q[bi, hi, i] @ k[bi, hi // rep, j] / math.sqrt(d) + m[bi, hi, j] for j in keep])
                out[bi, hi, i] = torch.softmax(scores, 0) @ v[bi, hi // rep, keep]
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 20])
def test_keep_window_matches_brute_force(window):
    q, k, v, m = random_qkv(b=1, h=2, h_kv=1, l=9)
    m = m.round()   # integer mask values create ties: the nearest key must win them
    torch.testing.assert_close(dmattn_ref(q, k, v, m, keep_window=window), brute_force(q, k, v, m, window),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 3])
def test_causality(window):
    q, k, v, m = random_qkv()
    base = dmattn_ref(q, k, v, m, keep_window=window)
    t = 7
    q2, k2, v2, m2 = (x.clone() for x in (q, k, v, m))
    q2[:, :, t] += 1.0
    k2[:, :, t] += 1.0
    v2[:, :, t] += 1.0
    m2[:, :, t] += 5.0   # a key promoted into every later window must not reach earlier queries
    changed = dmattn_ref(q2, k2, v2, m2, keep_window=window)
    torch.testing.assert_close(changed[:, :, :t], base[:, :, :t], rtol=0, atol=0)
    assert not torch.allclose(changed[:, :, t:], base[:, :, t:])


def test_segment_ids_block_other_documents():
    q, k, v, m = random_qkv(b=1, l=10)
    seg = torch.tensor([[0] * 4 + [1] * 6])
    out = dmattn_ref(q, k, v, m, segment_ids=seg)
    second = dmattn_ref(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], m[:, :, 4:])
    torch.testing.assert_close(out[:, :, 4:], second, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [None, 4])
def test_decode_equals_last_row(window):
    q, k, v, m = random_qkv()
    full = dmattn_ref(q, k, v, m, keep_window=window)
    last = dmattn_decode_ref(q[:, :, -1:], k, v, m, keep_window=window)
    torch.testing.assert_close(last, full[:, :, -1:], rtol=1e-12, atol=1e-12)


def test_gradients_float64():
    inputs = [t.requires_grad_() for t in random_qkv(b=1, h=2, h_kv=1, l=6, d=4)]
    assert torch.autograd.gradcheck(lambda q, k, v, m: dmattn_ref(q, k, v, m, keep_window=3), inputs)


def test_keep_window_ranks_only_the_own_document():
    """With documents, a query's window is the top-w of its own document's prefix (never empty)."""
    q, k, v, m = random_qkv(b=1, h=2, h_kv=1, l=10)
    seg = torch.tensor([[0] * 4 + [1] * 6])
    m[..., :4] += 10.0   # the first document's keys outrank every key of the second
    out = dmattn_ref(q, k, v, m, keep_window=2, segment_ids=seg)
    second = brute_force(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], m[:, :, 4:], 2)
    torch.testing.assert_close(out[:, :, 4:], second, rtol=1e-10, atol=1e-10)
