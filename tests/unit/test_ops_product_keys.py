"""Oracle 5: product-key top-k through k*k candidates == brute force over all n*n pairs."""
import pytest
import torch

from cheems_parallel.ops import product_key_topk


@pytest.mark.parametrize("n,k,heads", [(8, 4, 2), (16, 8, 1), (5, 5, 3)])
def test_product_keys_equal_brute_force(n, k, heads):
    g = torch.Generator().manual_seed(n * k)
    r = 6
    query = torch.randn(7, heads, r, generator=g, dtype=torch.float64)
    keys = torch.randn(heads, n, 2, r // 2, generator=g, dtype=torch.float64)
    scores, ids = product_key_topk(query, keys, k)
    for token in range(7):
        for h in range(heads):
            all_pairs = torch.tensor([query[token, h, : r // 2] @ keys[h, i, 0] + query[token, h, r // 2:] @ keys[h, j, 1]
                                      for i in range(n) for j in range(n)], dtype=torch.float64)
            best = all_pairs.topk(k)
            torch.testing.assert_close(scores[token, h], best.values, rtol=1e-12, atol=1e-12)
            assert ids[token, h].tolist() == best.indices.tolist()
