"""cheems_parallel.kernels.dmattn compiled for the GPU, against the float64 oracle `dmattn_ref`.

Shapes: q (b, h, l, d); k, v (b, h_kv, l, d); mask_bias (b, h, l). Fresh random inputs per case; output and
the gradients of q, k, v and mask_bias compared by ||kernel - oracle|| / ||oracle|| with the oracle run in
float64 on the same (rounded) values. bf16 tiles and probabilities round to 8 bits, so bf16 tolerances
are loose (METHOD.md: 1e-3..1e-2); float32 runs with ieee dots and must be tight. Skipped without CUDA;
run on the GPU machine by bench/gpu_dmattn.sh.
"""
import json
import os

import pytest
import torch

from cheems_parallel.ops.dmattn import allowed_mask
from tests.kernel_oracles import dmattn_kernel_errors

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton kernels)")]

TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def clustered_bias(batch, heads, length, generator, run=256):
    """A mask whose high values come in runs of `run` keys, as a trained dynamic mask plausibly does."""
    levels = torch.randn(batch, heads, length // run + 1, generator=generator, device="cuda")
    noise = 0.1 * torch.randn(batch, heads, length, generator=generator, device="cuda")
    return levels.repeat_interleave(run, dim=-1)[..., :length] + noise


def recency_bias(batch, heads, length, generator):
    """A mask that favours recent keys: top-w is a jittered sliding window."""
    ramp = 8.0 * torch.arange(length, device="cuda") / length
    return ramp + 0.3 * torch.randn(batch, heads, length, generator=generator, device="cuda")


def run_case(batch, heads, kv_heads, length, head_dim, dtype, keep_window=None, num_documents=None,
             mask_kind="random", seed=0):
    from cheems_parallel.kernels.dmattn import dmattn_fused

    generator = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda")

    q = randn(batch, heads, length, head_dim).to(dtype)
    k = randn(batch, kv_heads, length, head_dim).to(dtype)
    v = randn(batch, kv_heads, length, head_dim).to(dtype)
    mask_bias = {"random": lambda: randn(batch, heads, length),
                 "clustered": lambda: clustered_bias(batch, heads, length, generator),
                 "recency": lambda: recency_bias(batch, heads, length, generator)}[mask_kind]()
    segments = None
    if num_documents is not None:
        segments = torch.sort(torch.randint(0, num_documents, (batch, length), generator=generator,
                                            device="cuda"), dim=-1).values
    grad_out = randn(*q.shape).to(dtype)
    errors = dmattn_kernel_errors(dmattn_fused, q, k, v, mask_bias, grad_out, keep_window, segments)
    log = os.environ.get("DMATTN_ERRORS_LOG")  # bench/gpu_dmattn.sh collects the errors for its summary
    if log:
        import cheems_parallel.kernels.dmattn as kernels

        case = {"dtype": str(dtype), "shape": [batch, heads, kv_heads, length, head_dim], "keep_window": keep_window,
                "documents": num_documents, "mask": mask_kind, "fused": kernels.FUSED_BACKWARD,
                "dq_tma_reduce": kernels.DQ_TMA_REDUCE, "tma": [kernels.FORWARD_TMA, kernels.BACKWARD_TMA],
                "listed_max_fraction": kernels.LISTED_LOOP_MAX_FRACTION, "errors": errors}
        with open(log, "a") as handle:
            handle.write(json.dumps(case) + "\n")
    return errors


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("dtype,batch,heads,kv_heads,length,head_dim,keep_window,num_documents,mask_kind", [
    (BF16, 2, 4, 4, 1024, 128, None, None, "random"),     # the benchmark's head shape
    (BF16, 1, 8, 2, 1000, 128, None, None, "random"),     # GQA 4:1, partial tiles
    (BF16, 2, 4, 2, 777, 64, None, None, "random"),       # smaller head dim
    (BF16, 1, 4, 4, 1024, 128, 128, None, "random"),      # keep-window w = l/8, random mask (little skipping)
    (BF16, 1, 4, 2, 1536, 128, 192, None, "clustered"),   # keep-window w = l/8, clustered mask (heavy skipping)
    (BF16, 2, 4, 4, 1024, 128, None, 4, "random"),        # document masking
    (BF16, 1, 4, 4, 1024, 128, 200, 3, "recency"),        # both
    (FP32, 1, 8, 2, 1000, 128, None, None, "random"),     # float32 (ieee dots): tight
    (FP32, 1, 4, 4, 1024, 128, 200, 3, "recency"),
])
def test_matches_reference_on_gpu(dtype, batch, heads, kv_heads, length, head_dim, keep_window, num_documents,
                                  mask_kind):
    errors = run_case(batch, heads, kv_heads, length, head_dim, dtype, keep_window, num_documents, mask_kind,
                      seed=length + (keep_window or 0))
    assert all(error < TOLERANCE[dtype] for error in errors.values()), errors


GLUON_FLAGS = ("FORWARD_GLUON", "BACKWARD_GLUON", "GLUON_SPARSE", "GLUON_SPARSE_BACKWARD")

# Module settings per schedule (cheems_parallel.kernels.dmattn): the two-kernel backward with pointer or
# TMA loads, the fused one with per-element atomics, the fused one with TMA loads and TMA reduce-add of dQ, and sparse masks forced
# through the block lists or through the dense loop.
SCHEDULES = {
    "two_kernel": {"FUSED_BACKWARD": False, "FORWARD_TMA": False, "BACKWARD_TMA": False, "DQ_TMA_REDUCE": False},
    "two_kernel_tma": {"FUSED_BACKWARD": False, "FORWARD_TMA": True, "BACKWARD_TMA": True},
    "fused_atomic": {"FUSED_BACKWARD": True, "FORWARD_TMA": False, "BACKWARD_TMA": False, "DQ_TMA_REDUCE": False},
    "fused_tma": {"FUSED_BACKWARD": True, "FORWARD_TMA": True, "BACKWARD_TMA": True, "DQ_TMA_REDUCE": True},
    "fused_reduce_dq_transposed": {"FUSED_BACKWARD": True, "FORWARD_TMA": False, "BACKWARD_TMA": False,
                                   "DQ_TMA_REDUCE": True, "DQ_TRANSPOSED": True},
    "fused_tma_lists": {"FUSED_BACKWARD": True, "FORWARD_TMA": True, "BACKWARD_TMA": True, "DQ_TMA_REDUCE": True,
                        "LISTED_LOOP_MAX_FRACTION": 1.0},
    "fused_tma_dense": {"FUSED_BACKWARD": True, "FORWARD_TMA": True, "BACKWARD_TMA": True, "DQ_TMA_REDUCE": True,
                        "LISTED_LOOP_MAX_FRACTION": -1.0},
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("dtype,batch,heads,kv_heads,length,head_dim,keep_window,num_documents,mask_kind", [
    (BF16, 1, 8, 2, 1000, 128, None, None, "random"),     # GQA 4:1, partial tiles
    (BF16, 1, 4, 2, 1536, 128, 192, None, "clustered"),   # keep-window, heavy skipping
    (BF16, 1, 4, 4, 1024, 128, 200, 3, "recency"),        # keep-window within documents
    (FP32, 1, 4, 2, 777, 64, 100, None, "random"),        # float32 (ieee dots), d 64, odd length
])
def test_schedules_match_reference_on_gpu(monkeypatch, schedule, dtype, batch, heads, kv_heads, length, head_dim,
                                          keep_window, num_documents, mask_kind):
    import cheems_parallel.kernels.dmattn as kernels

    for name, value in SCHEDULES[schedule].items():
        monkeypatch.setattr(kernels, name, value)
    for flag in GLUON_FLAGS:  # these are the Triton kernels' schedules (the path of fp32 and of other GPUs)
        monkeypatch.setattr(kernels, flag, False)
    errors = run_case(batch, heads, kv_heads, length, head_dim, dtype, keep_window, num_documents, mask_kind,
                      seed=length + 17)
    assert all(error < TOLERANCE[dtype] for error in errors.values()), errors


@pytest.mark.parametrize("num_documents", [None, 5])
def test_keep_window_thresholds_on_gpu_match_reference_mask(num_documents):
    """The pre-pass at a benchmark-like length (several chunks, several rank blocks) is exact on CUDA."""
    from cheems_parallel.kernels.dmattn import keep_window_thresholds

    generator = torch.Generator(device="cuda").manual_seed(11)
    mask_bias = torch.randint(0, 50, (2, 3, 1200), generator=generator, device="cuda").float()
    segments = None
    if num_documents is not None:
        segments = torch.sort(torch.randint(0, num_documents, (2, 1200), generator=generator, device="cuda"),
                              dim=-1).values
    key_rank, threshold = keep_window_thresholds(mask_bias, 150, segments)
    positions = torch.arange(1200, device="cuda")
    kept = (key_rank[:, :, None, :] <= threshold[:, :, :, None]) & (positions[None, :] <= positions[:, None])
    if segments is not None:
        kept &= (segments[:, :, None] == segments[:, None, :])[:, None]
    assert torch.equal(kept, allowed_mask(mask_bias, 150, segments).expand_as(kept))


@pytest.mark.parametrize("num_documents,by_query", [(None, True), (5, False), (5, True)])
def test_block_schedule_on_gpu_equals_torch_reference(num_documents, by_query):
    """The schedule kernels at a benchmark-like shape (many blocks, partial last block) equal the torch reference."""
    from cheems_parallel.kernels.dmattn import block_schedule, block_schedule_reference, keep_window_thresholds

    generator = torch.Generator(device="cuda").manual_seed(12)
    mask_bias = clustered_bias(2, 3, 4000, generator)
    segments = None
    if num_documents is not None:
        segments = torch.sort(torch.randint(0, num_documents, (2, 4000), generator=generator, device="cuda"),
                              dim=-1).values
    key_rank, threshold = keep_window_thresholds(mask_bias, 500, segments)
    arguments = (key_rank, threshold, segments, 2, 3, 4000, 128, 64, by_query)
    counts, lists = block_schedule(*arguments)
    expected_counts, expected_lists = block_schedule_reference(*arguments)
    assert torch.equal(counts, expected_counts) and torch.equal(lists, expected_lists)


# The Gluon forward (cheems_parallel/kernels/dmattn_gluon.py, FORWARD_GLUON) with the existing Triton backward:
# tile/schedule variants as dmattn.GLUON_FORWARD_CONFIG overrides.
GLUON_VARIANTS = {
    # one program per tile (persistent_max_length 0: the default grid of d 128 at long l)
    "split_overlap_s2": {"split": True, "overlap": True, "stages": 2, "block_n": 128, "persistent_max_length": 0},
    "one_consumer_overlap_s2": {"split": False, "overlap": True, "stages": 2, "block_n": 128,
                                "persistent_max_length": 0},
    "split_simple_s2": {"split": True, "overlap": False, "stages": 2, "block_n": 128, "persistent_max_length": 0},
    "split_overlap_n64_s3": {"split": True, "overlap": True, "stages": 3, "block_n": 64, "persistent_max_length": 0},
    # the persistent grid at every length, on 7 / 3 programs so that each loops over many tiles (the ring and the Q
    # barrier phases carried across tiles of odd and even key-block counts)
    "persistent_split_overlap_s2": {"split": True, "overlap": True, "stages": 2, "block_n": 128,
                                    "persistent_max_length": 1 << 30, "persistent_grid": 7},
    "persistent_split_overlap_s3": {"split": True, "overlap": True, "stages": 3, "block_n": 128,
                                    "persistent_max_length": 1 << 30, "persistent_grid": 3},
}


def use_gluon(monkeypatch, module_getter, flag, config_name, config, entry):
    """Turns on one Gluon kernel file (its flag and config variant); returns the list that counts calls of its
    `entry` ("forward" / "backward"), so a test can check that the Gluon kernel, not the Triton one, ran."""
    import cheems_parallel.kernels.dmattn as kernels

    module = getattr(kernels, module_getter)()
    assert module is not None, "triton.experimental.gluon (Hopper) not importable"
    monkeypatch.setattr(kernels, flag, True)
    monkeypatch.setattr(kernels, config_name, dict(config))
    calls = []
    original = getattr(module, entry)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, entry, counted)
    return calls


def use_gluon_forward(monkeypatch, variant):
    return use_gluon(monkeypatch, "_gluon_module", "FORWARD_GLUON", "GLUON_FORWARD_CONFIG",
                     GLUON_VARIANTS[variant], "forward")


@pytest.mark.parametrize("variant", list(GLUON_VARIANTS))
@pytest.mark.parametrize("dtype,batch,heads,kv_heads,length,head_dim", [
    (BF16, 2, 4, 4, 1024, 128),   # MHA, the benchmark's head shape
    (BF16, 1, 8, 2, 1000, 128),   # GQA 4:1, l not a multiple of the tile
    (BF16, 2, 4, 2, 777, 64),     # d 64, odd length (bias rows not 16-byte aligned: padded)
    (BF16, 2, 4, 2, 777, 128),    # the same with d 128
    (BF16, 2, 4, 2, 1024, 64),    # d 64, aligned
    (FP16, 1, 4, 4, 1100, 128),   # float16
])
def test_gluon_forward_matches_reference_on_gpu(monkeypatch, variant, dtype, batch, heads, kv_heads, length,
                                                head_dim):
    """Outputs and gradients (the existing Triton backward on the Gluon forward's out and lse) vs float64."""
    calls = use_gluon_forward(monkeypatch, variant)
    errors = run_case(batch, heads, kv_heads, length, head_dim, dtype, seed=length + 3)
    assert calls, "the Gluon forward did not run"
    assert all(error < TOLERANCE[dtype] for error in errors.values()), errors


@pytest.mark.parametrize("variant", list(GLUON_VARIANTS))
def test_gluon_forward_agrees_with_triton_forward_and_is_deterministic(monkeypatch, variant):
    """out and the base-2 lse equal the Triton forward's up to rounding; two runs are bitwise equal."""
    import cheems_parallel.kernels.dmattn as kernels

    generator = torch.Generator(device="cuda").manual_seed(9)
    q, k, v = (torch.randn(2, 8, 1000, 128, generator=generator, device="cuda").to(BF16) for _ in range(3))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    mask_bias = torch.randn(2, 8, 1000, generator=generator, device="cuda")
    masks = kernels._Masks(mask_bias, None, None, 2, 8, 1000)
    out_triton, lse_triton = kernels._forward(q, k, v, mask_bias, masks)
    calls = use_gluon_forward(monkeypatch, variant)
    out_first, lse_first = kernels._forward(q, k, v, mask_bias, masks)
    out_second, lse_second = kernels._forward(q, k, v, mask_bias, masks)
    assert len(calls) == 2
    assert torch.isfinite(out_first).all() and torch.isfinite(lse_first).all()
    assert (lse_first - lse_triton).abs().max().item() < 1e-2
    assert ((out_first.float() - out_triton.float()).norm() / out_triton.float().norm()).item() < 1e-2
    assert torch.equal(out_first, out_second) and torch.equal(lse_first, lse_second)


# The Gluon backward (cheems_parallel/kernels/dmattn_gluon_bwd.py, BACKWARD_GLUON) on the Gluon forward's out and
# lse: variants as dmattn.GLUON_BACKWARD_CONFIG overrides. dq_split: the two warp groups share one 128-key dS^T
# buffer and each computes half of dQ's columns (else each multiplies its own 64 keys).
GLUON_BACKWARD_VARIANTS = {
    "split_s2": {"dq_split": True, "stages": 2},
    "own_keys_s2": {"dq_split": False, "stages": 2},
}


def use_gluon_backward(monkeypatch, variant):
    return use_gluon(monkeypatch, "_gluon_backward_module", "BACKWARD_GLUON", "GLUON_BACKWARD_CONFIG",
                     GLUON_BACKWARD_VARIANTS[variant], "backward")


@pytest.mark.parametrize("variant", list(GLUON_BACKWARD_VARIANTS))
@pytest.mark.parametrize("dtype,batch,heads,kv_heads,length,head_dim", [
    (BF16, 2, 4, 4, 1024, 128),   # MHA, the benchmark's head shape
    (BF16, 1, 8, 2, 1000, 128),   # GQA 4:1, l not a multiple of the tile
    (BF16, 2, 4, 4, 777, 128),    # l % 4 != 0 (lse / delta rows padded for the 1-D TMA)
    (BF16, 2, 4, 2, 777, 64),     # d 64, GQA 2:1, odd length
    (BF16, 1, 2, 2, 100, 128),    # one partial key block
    (FP16, 1, 4, 4, 1100, 128),   # float16
])
def test_gluon_backward_matches_reference_on_gpu(monkeypatch, variant, dtype, batch, heads, kv_heads, length,
                                                 head_dim):
    """Output and the four gradients (Gluon forward + Gluon backward) vs the float64 oracle."""
    calls = use_gluon_backward(monkeypatch, variant)
    errors = run_case(batch, heads, kv_heads, length, head_dim, dtype, seed=length + 5)
    assert calls, "the Gluon backward did not run"
    assert all(error < TOLERANCE[dtype] for error in errors.values()), errors


@pytest.mark.parametrize("variant", list(GLUON_BACKWARD_VARIANTS))
def test_gluon_backward_agrees_with_triton_backward(monkeypatch, variant):
    """The gradients equal the Triton backward's up to rounding (both add dQ by reduce-add in any order, so
    runs are compared with a tolerance, not bitwise), and two Gluon runs agree to the same tolerance."""
    import cheems_parallel.kernels.dmattn as kernels

    generator = torch.Generator(device="cuda").manual_seed(13)
    q = torch.randn(2, 8, 1000, 128, generator=generator, device="cuda").to(BF16)
    k, v = (torch.randn(2, 2, 1000, 128, generator=generator, device="cuda").to(BF16) for _ in range(2))
    mask_bias = torch.randn(2, 8, 1000, generator=generator, device="cuda")
    grad_out = torch.randn_like(q)
    masks = kernels._Masks(mask_bias, None, None, 2, 8, 1000)
    out, lse = kernels._forward(q, k, v, mask_bias, masks)
    monkeypatch.setattr(kernels, "BACKWARD_GLUON", False)
    triton_grads = kernels._backward(grad_out, q, k, v, mask_bias, out, lse, masks)
    calls = use_gluon_backward(monkeypatch, variant)
    first = kernels._backward(grad_out, q, k, v, mask_bias, out, lse, masks)
    second = kernels._backward(grad_out, q, k, v, mask_bias, out, lse, masks)
    assert len(calls) == 2
    for name, expected, got, again in zip(("dq", "dk", "dv", "dbias"), triton_grads, first, second):
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        assert torch.isfinite(got).all(), name
        scale = expected.float().norm()
        assert ((got.float() - expected.float()).norm() / scale).item() < 1e-2, name
        assert ((got.float() - again.float()).norm() / scale).item() < 1e-3, name


# The Gluon SPARSE forward (cheems_parallel/kernels/dmattn_gluon_sparse.py, GLUON_SPARSE): keep-window and/or documents,
# the producer loading only the listed key blocks; the Triton sparse backward on its out and lse. Variants as
# dmattn.GLUON_SPARSE_CONFIG overrides.
GLUON_SPARSE_VARIANTS = {
    "split_s2": {},                                         # the default: two consumer warp groups, 2 stages
    "split_s2_segment_compare": {"fold_documents": False},  # documents compared per element even with keep-window
    "one_consumer_s2": {"split": False},
}


def use_gluon_sparse(monkeypatch, variant):
    import cheems_parallel.kernels.dmattn as kernels

    monkeypatch.setattr(kernels, "GLUON_SPARSE_BACKWARD", False)  # the Triton sparse backward, unless a test adds it
    return use_gluon(monkeypatch, "_gluon_sparse_module", "GLUON_SPARSE", "GLUON_SPARSE_CONFIG",
                     GLUON_SPARSE_VARIANTS[variant], "forward")


GLUON_SPARSE_CASES = [
    (BF16, 1, 4, 4, 1024, 128, 128, None, "random"),     # keep-window w = l/8, random mask: every block listed
    (BF16, 1, 4, 2, 1536, 128, 192, None, "clustered"),  # keep-window, clustered mask: heavy skipping, GQA 2:1
    (BF16, 2, 4, 2, 1000, 128, None, 3, "random"),       # documents only, l not a multiple of the tile
    (BF16, 1, 8, 2, 1100, 128, 96, 4, "clustered"),      # keep-window within documents, GQA 4:1
    (BF16, 2, 4, 2, 777, 128, 64, None, "random"),       # l % 4 != 0: padded bias / rank rows
    (BF16, 2, 4, 2, 777, 64, 64, 3, "recency"),          # d 64, both masks, odd length
    (FP16, 1, 4, 4, 1100, 128, 100, None, "clustered"),  # float16
    # w = 2, many short documents (w = 1 is degenerate for these tolerances: every softmax has one key, so the
    # float64 dQ and dK are zero up to rounding and a relative error divides by ~0)
    (BF16, 1, 4, 4, 300, 128, 2, 5, "random"),
]


@pytest.mark.parametrize("variant", list(GLUON_SPARSE_VARIANTS))
@pytest.mark.parametrize("dtype,batch,heads,kv_heads,length,head_dim,keep_window,num_documents,mask_kind",
                         GLUON_SPARSE_CASES)
def test_gluon_sparse_matches_reference_on_gpu(monkeypatch, variant, dtype, batch, heads, kv_heads, length, head_dim,
                                               keep_window, num_documents, mask_kind):
    """Output and gradients (Triton sparse backward on the Gluon sparse forward's out and lse) vs float64."""
    calls = use_gluon_sparse(monkeypatch, variant)
    errors = run_case(batch, heads, kv_heads, length, head_dim, dtype, keep_window, num_documents, mask_kind,
                      seed=length + 11)
    assert calls, "the Gluon sparse forward did not run"
    assert all(error < TOLERANCE[dtype] for error in errors.values()), errors


def sparse_agreement_case(seed, keep_window, num_documents, mask_kind):
    """q, k, v, grad_out (bf16; GQA 4:1, b 2, l 1000, d 128), the mask bias and the kernels' _Masks of the
    Gluon-vs-Triton sparse agreement tests."""
    import cheems_parallel.kernels.dmattn as kernels

    generator = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, grad_out = (torch.randn(2, 8, 1000, 128, generator=generator, device="cuda").to(BF16) for _ in range(4))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()
    mask_bias = (clustered_bias(2, 8, 1000, generator) if mask_kind == "clustered"
                 else torch.randn(2, 8, 1000, generator=generator, device="cuda"))
    segments = None
    if num_documents:
        segments = torch.sort(torch.randint(0, num_documents, (2, 1000), generator=generator, device="cuda"),
                              dim=-1).values
    return q, k, v, grad_out, mask_bias, kernels._Masks(mask_bias, keep_window, segments, 2, 8, 1000)


@pytest.mark.parametrize("variant", list(GLUON_SPARSE_VARIANTS))
@pytest.mark.parametrize("keep_window,num_documents,mask_kind", [
    (125, None, "random"), (125, None, "clustered"), (None, 4, "random"), (125, 4, "clustered")])
def test_gluon_sparse_agrees_with_triton_sparse_forward(monkeypatch, variant, keep_window, num_documents, mask_kind):
    """out and lse equal the Triton sparse forward's up to rounding (GQA 4:1, l = 1000); two runs bitwise equal."""
    import cheems_parallel.kernels.dmattn as kernels

    q, k, v, _, mask_bias, masks = sparse_agreement_case(13, keep_window, num_documents, mask_kind)
    monkeypatch.setattr(kernels, "GLUON_SPARSE", False)
    out_triton, lse_triton = kernels._forward(q, k, v, mask_bias, masks)
    calls = use_gluon_sparse(monkeypatch, variant)
    out_first, lse_first = kernels._forward(q, k, v, mask_bias, masks)
    out_second, lse_second = kernels._forward(q, k, v, mask_bias, masks)
    assert len(calls) == 2
    assert torch.isfinite(out_first).all() and torch.isfinite(lse_first).all()
    assert (lse_first - lse_triton).abs().max().item() < 1e-2
    assert ((out_first.float() - out_triton.float()).norm() / out_triton.float().norm()).item() < 1e-2
    assert torch.equal(out_first, out_second) and torch.equal(lse_first, lse_second)


def test_gluon_sparse_flag_off_leaves_sparse_path_unchanged(monkeypatch):
    """GLUON_SPARSE False: a keep-window call never enters the Gluon sparse module."""
    import cheems_parallel.kernels.dmattn as kernels

    monkeypatch.setattr(kernels, "GLUON_SPARSE", False)
    module = kernels._gluon_sparse_module()
    if module is not None:
        monkeypatch.setattr(module, "forward", lambda *args, **kwargs: pytest.fail("Gluon sparse forward ran"))
    run_case(1, 4, 4, 512, 128, BF16, keep_window=64, mask_kind="clustered")


# The Gluon SPARSE backward (cheems_parallel/kernels/dmattn_gluon_sparse_bwd.py, GLUON_SPARSE_BACKWARD) on the Triton
# sparse forward's out and lse (GLUON_SPARSE off, so that a failure points at the backward); variants as
# dmattn.GLUON_SPARSE_BACKWARD_CONFIG overrides.
GLUON_SPARSE_BACKWARD_VARIANTS = {
    "split_s2": {},                                         # the default: dSᵀ shared by both warp groups (d 128)
    "own_keys_s2": {"dq_split": False},
    "split_s2_segment_compare": {"fold_documents": False},  # documents compared per element even with keep-window
}


def use_gluon_sparse_backward(monkeypatch, variant, gluon_forward=False):
    import cheems_parallel.kernels.dmattn as kernels

    monkeypatch.setattr(kernels, "GLUON_SPARSE_BACKWARD_MIN_LENGTH_WITH_DOCUMENTS", 0)  # the grid's lengths are short
    monkeypatch.setattr(kernels, "GLUON_SPARSE", gluon_forward)
    return use_gluon(monkeypatch, "_gluon_sparse_backward_module", "GLUON_SPARSE_BACKWARD", "GLUON_SPARSE_BACKWARD_CONFIG",
                     GLUON_SPARSE_BACKWARD_VARIANTS[variant], "backward")


@pytest.mark.parametrize("variant", list(GLUON_SPARSE_BACKWARD_VARIANTS))
@pytest.mark.parametrize("dtype,batch,heads,kv_heads,length,head_dim,keep_window,num_documents,mask_kind",
                         GLUON_SPARSE_CASES)
def test_gluon_sparse_backward_matches_reference_on_gpu(monkeypatch, variant, dtype, batch, heads, kv_heads, length,
                                                        head_dim, keep_window, num_documents, mask_kind):
    """Gradients of the Gluon sparse backward (on the Triton sparse forward) vs float64."""
    calls = use_gluon_sparse_backward(monkeypatch, variant)
    errors = run_case(batch, heads, kv_heads, length, head_dim, dtype, keep_window, num_documents, mask_kind,
                      seed=length + 12)
    assert calls, "the Gluon sparse backward did not run"
    assert all(error < TOLERANCE[dtype] for error in errors.values()), errors


@pytest.mark.parametrize("case", [
    (BF16, 1, 8, 2, 1100, 128, 96, 4, "clustered"),  # keep-window within documents, GQA 4:1
    (BF16, 1, 4, 4, 1024, 128, 128, None, "random"),  # keep-window, every block listed
])
def test_gluon_sparse_forward_and_backward_together_on_gpu(monkeypatch, case):
    """Both Gluon sparse kernels (the defaults) in one call vs float64."""
    dtype, batch, heads, kv_heads, length, head_dim, keep_window, num_documents, mask_kind = case
    forward_calls = use_gluon_sparse(monkeypatch, "split_s2")
    backward_calls = use_gluon_sparse_backward(monkeypatch, "split_s2", gluon_forward=True)
    errors = run_case(batch, heads, kv_heads, length, head_dim, dtype, keep_window, num_documents, mask_kind,
                      seed=length + 13)
    assert forward_calls and backward_calls
    assert all(error < TOLERANCE[dtype] for error in errors.values()), errors


@pytest.mark.parametrize("variant", list(GLUON_SPARSE_BACKWARD_VARIANTS))
@pytest.mark.parametrize("keep_window,num_documents,mask_kind", [
    (125, None, "random"), (125, None, "clustered"), (None, 4, "random"), (125, 4, "clustered")])
def test_gluon_sparse_backward_agrees_with_triton_sparse_backward(monkeypatch, variant, keep_window, num_documents,
                                                                  mask_kind):
    """dQ, dK, dV, d bias of the Gluon sparse backward equal the Triton sparse backward's up to rounding (GQA 4:1,
    l = 1000, the same Triton forward's out and lse)."""
    import cheems_parallel.kernels.dmattn as kernels

    q, k, v, grad_out, mask_bias, masks = sparse_agreement_case(14, keep_window, num_documents, mask_kind)
    monkeypatch.setattr(kernels, "GLUON_SPARSE", False)
    monkeypatch.setattr(kernels, "GLUON_SPARSE_BACKWARD", False)
    out, lse = kernels._forward(q, k, v, mask_bias, masks)
    reference = kernels._backward(grad_out, q, k, v, mask_bias, out, lse, masks)
    calls = use_gluon_sparse_backward(monkeypatch, variant)
    gradients = kernels._backward(grad_out, q, k, v, mask_bias, out, lse, masks)
    assert calls
    for name, value, expected in zip(("dq", "dk", "dv", "dbias"), gradients, reference):
        assert torch.isfinite(value).all(), name
        error = ((value.float() - expected.float()).norm() / expected.float().norm()).item()
        assert error < 1e-2, (name, error)
