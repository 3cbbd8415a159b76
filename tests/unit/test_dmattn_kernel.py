"""cheems_parallel.kernels.dmattn (fused Triton DMAttn forward + backward) against the float64 oracle
`cheems_parallel.ops.dmattn_ref`, under TRITON_INTERPRET=1 on the CPU, at small shapes.

Shapes: q (b, h, l, d); k, v (b, h_kv, l, d); mask_bias (b, h, l); segment_ids (b, l). Every check draws
fresh random inputs in float32 (the interpreter's bf16 arithmetic is wrong), runs the kernel, and compares
the output and the gradients of q, k, v and mask_bias with the reference evaluated in float64 on the same
values, by ||kernel - oracle|| / ||oracle||. Lengths are chosen not to be multiples of the tiles (the
interpreter uses 32x16 and 16x32 tiles), so partial blocks, the diagonal split and the block skipping of
the keep-window and document masks are all exercised.
"""
import sys

import pytest
import torch

from cheems_parallel.ops.dmattn import allowed_mask, dmattn_ref
from tests.kernel_oracles import dmattn_kernel_errors, interpreted_module, relative_error

TOLERANCE = 2e-5  # float32 kernel vs float64 oracle; measured errors are ~3e-7


@pytest.fixture(scope="module")
def kernels():
    """The kernel module decorated for the interpreter (re-imported if something loaded it for a GPU)."""
    yield from interpreted_module("cheems_parallel.kernels.dmattn", "_forward_kernel")


def sorted_segments(batch, length, num_documents, generator):
    return torch.sort(torch.randint(0, num_documents, (batch, length), generator=generator), dim=-1).values


def make_inputs(batch, heads, kv_heads, length, head_dim, generator, bias_scale=2.0, bias_levels=None):
    q = torch.randn(batch, heads, length, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=generator)
    if bias_levels is None:
        mask_bias = torch.randn(batch, heads, length, generator=generator) * bias_scale
    else:  # few distinct values: many ties, which the keep-window must break towards the nearest key
        mask_bias = torch.randint(0, bias_levels, (batch, heads, length), generator=generator).float()
    return q, k, v, mask_bias


def compare_with_reference(kernels, q, k, v, mask_bias, keep_window=None, segment_ids=None, generator=None):
    grad_out = torch.randn(q.shape, generator=generator)
    return dmattn_kernel_errors(kernels.dmattn_fused, q, k, v, mask_bias, grad_out, keep_window, segment_ids)


@pytest.mark.parametrize("batch,heads,kv_heads,length,head_dim,keep_window,num_documents", [
    (1, 2, 2, 40, 16, None, None),     # plain causal + learnable bias, MHA
    (2, 4, 2, 33, 32, None, None),     # GQA 2:1, odd length
    (1, 4, 1, 64, 16, None, None),     # GQA 4:1 (MQA), exact tile multiple
    (2, 2, 1, 47, 16, 7, None),        # keep-window, partial tiles
    (1, 2, 2, 64, 32, 40, None),       # keep-window wider than most prefixes
    (1, 2, 2, 50, 16, None, 3),        # document masking
    (2, 2, 1, 53, 16, 9, 3),           # keep-window within documents, GQA
])
def test_matches_reference(kernels, batch, heads, kv_heads, length, head_dim, keep_window, num_documents):
    generator = torch.Generator().manual_seed(hash((batch, heads, kv_heads, length, head_dim, keep_window)) % 2**31)
    q, k, v, mask_bias = make_inputs(batch, heads, kv_heads, length, head_dim, generator)
    segments = None if num_documents is None else sorted_segments(batch, length, num_documents, generator)
    errors = compare_with_reference(kernels, q, k, v, mask_bias, keep_window, segments, generator)
    assert all(error < TOLERANCE for error in errors.values()), errors


@pytest.mark.parametrize("fused_backward,listed_max_fraction,use_tma,dq_transposed",
                         [(False, 1.0, False, False), (False, -1.0, True, False), (True, 1.0, True, False),
                          (True, -1.0, False, True)])
@pytest.mark.parametrize("batch,heads,kv_heads,length,head_dim,keep_window,num_documents", [
    (2, 4, 2, 33, 32, None, None),     # GQA 2:1, odd length
    (2, 2, 1, 47, 16, 7, None),        # keep-window, partial tiles
    (2, 2, 1, 53, 16, 9, 3),           # keep-window within documents, GQA
])
def test_schedules_match_reference(kernels, monkeypatch, fused_backward, listed_max_fraction, use_tma, dq_transposed,
                                   batch, heads, kv_heads, length, head_dim, keep_window, num_documents):
    """Each schedule forced: the two-kernel backward (dK/dV then dQ) and the fused one (dQ by atomics);
    sparse masks through the block lists only (1.0) and through the dense loop with masks only (-1);
    tensor-descriptor (TMA) loads on and off; the fused dQ share as dS·K or (K^T dS^T)^T."""
    monkeypatch.setattr(kernels, "FUSED_BACKWARD", fused_backward)
    monkeypatch.setattr(kernels, "LISTED_LOOP_MAX_FRACTION", listed_max_fraction)
    monkeypatch.setattr(kernels, "FORWARD_TMA", use_tma)
    monkeypatch.setattr(kernels, "BACKWARD_TMA", use_tma)
    monkeypatch.setattr(kernels, "DQ_TRANSPOSED", dq_transposed)
    generator = torch.Generator().manual_seed(length * 31 + (keep_window or 0))
    q, k, v, mask_bias = make_inputs(batch, heads, kv_heads, length, head_dim, generator)
    segments = None if num_documents is None else sorted_segments(batch, length, num_documents, generator)
    errors = compare_with_reference(kernels, q, k, v, mask_bias, keep_window, segments, generator)
    assert all(error < TOLERANCE for error in errors.values()), errors


@pytest.mark.parametrize("documents", [[0] * 10 + [1] * 20 + [2] * 15, [4] * 5 + [9] * 30 + [3] * 10])
def test_keep_window_with_documents_and_ties(kernels, documents):
    """Both masks together, with tied mask values: the window ranks only the query's own document prefix
    (ids need not be sorted, only contiguous)."""
    generator = torch.Generator().manual_seed(7)
    q, k, v, mask_bias = make_inputs(1, 2, 1, 45, 16, generator, bias_levels=4)
    segments = torch.tensor([documents])
    errors = compare_with_reference(kernels, q, k, v, mask_bias, 12, segments, generator)
    assert all(error < TOLERANCE for error in errors.values()), errors


@pytest.mark.parametrize("length,keep_window,chunk_size,levels,num_documents", [
    (37, 5, 8, 4, None), (64, 1, 16, 1000, None), (50, 20, 8, 3, None), (17, 16, 4, 2, None),
    (64, 63, 8, 5, None), (33, 40, 8, 2, None), (70, 9, 32, 1, None), (61, 7, 8, 3, 4), (40, 12, 16, 2, 2),
])
def test_keep_window_thresholds_reproduce_reference_mask(kernels, length, keep_window, chunk_size, levels,
                                                         num_documents):
    """rank_j <= threshold_i (with j <= i and the document mask) must be exactly the reference's allowed set,
    ties included; small chunks and rank blocks give many of each per row (the scan's early stop, partial blocks)."""
    generator = torch.Generator().manual_seed(length * 1000 + keep_window)
    mask_bias = torch.randint(0, levels, (2, 2, length), generator=generator).float()
    segments = None if num_documents is None else sorted_segments(2, length, num_documents, generator)
    key_rank, threshold = kernels.keep_window_thresholds(mask_bias, keep_window, segments, chunk_size=chunk_size,
                                                         rank_block=8)
    positions = torch.arange(length)
    kept = (key_rank[:, :, None, :] <= threshold[:, :, :, None]) & (positions[None, :] <= positions[:, None])
    if segments is not None:
        kept &= (segments[:, :, None] == segments[:, None, :])[:, None]
    assert torch.equal(kept, allowed_mask(mask_bias, keep_window, segments).expand_as(kept))


@pytest.mark.parametrize("keep_window,num_documents,chunk_size,count_by_dot", [
    (13, None, 8, False), (21, None, 8, False), (10, 3, 8, False), (21, None, 16, True), (37, 3, 16, True)])
def test_keep_window_thresholds_where_the_window_fills_inside_a_chunk(kernels, keep_window, num_documents, chunk_size,
                                                                      count_by_dot):
    """The chunk holding query w: the scan stops after the last earlier key, so own keys ranked above every earlier
    key start from the default count (all earlier keys); many rows of continuous values make that case frequent."""
    generator = torch.Generator().manual_seed(keep_window)
    mask_bias = torch.randn(4, 8, 64, generator=generator)
    segments = None if num_documents is None else sorted_segments(4, 64, num_documents, generator)
    key_rank, threshold = kernels.keep_window_thresholds(mask_bias, keep_window, segments, chunk_size=chunk_size,
                                                         rank_block=8, count_by_dot=count_by_dot)
    positions = torch.arange(64)
    kept = (key_rank[:, :, None, :] <= threshold[:, :, :, None]) & (positions[None, :] <= positions[:, None])
    if segments is not None:
        kept &= (segments[:, :, None] == segments[:, None, :])[:, None]
    assert torch.equal(kept, allowed_mask(mask_bias, keep_window, segments).expand_as(kept))


@pytest.mark.parametrize("length,keep_window,num_documents,row_block,col_block,by_query", [
    (100, 12, None, 16, 16, True), (100, 12, None, 32, 16, False), (64, None, 3, 16, 32, True),
    (77, 9, 4, 16, 8, False), (77, 9, 4, 8, 16, True), (200, 5, None, 64, 64, True), (130, None, 6, 16, 16, False),
])
def test_block_schedule_kernels_equal_torch_reference(kernels, length, keep_window, num_documents, row_block,
                                                      col_block, by_query):
    """The sparse schedule from the two Triton kernels equals block_schedule_reference (torch) exactly: counts and
    the whole lists (visited blocks ascending, then the rest), both orientations, partial blocks, documents."""
    generator = torch.Generator().manual_seed(length + row_block)
    mask_bias = torch.randn(2, 3, length, generator=generator)
    segments = None if num_documents is None else sorted_segments(2, length, num_documents, generator)
    key_rank = threshold = None
    if keep_window is not None:
        key_rank, threshold = kernels.keep_window_thresholds(mask_bias, keep_window, segments)
    arguments = (key_rank, threshold, segments, 2, 3, length, row_block, col_block, by_query)
    counts, lists = kernels.block_schedule(*arguments)
    expected_counts, expected_lists = kernels.block_schedule_reference(*arguments)
    assert 0 < counts.sum() < counts.numel() * lists.shape[-1]  # some blocks skipped, some visited
    assert torch.equal(counts, expected_counts)
    assert torch.equal(lists, expected_lists)


def test_strided_inputs_and_layout(kernels):
    """q/k/v given as (b, l, h, d) memory transposed to (b, h, l, d), as a layer produces them."""
    generator = torch.Generator().manual_seed(3)
    q, k, v, mask_bias = make_inputs(2, 2, 1, 29, 16, generator)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not strided[0].is_contiguous()
    out = kernels.dmattn_fused(*strided, mask_bias)
    oracle = dmattn_ref(q.double(), k.double(), v.double(), mask_bias.double())
    assert relative_error(out, oracle) < TOLERANCE


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "k": a["k"][:, :, :, :8]}, "k and v must be"),
    (lambda a: {**a, "mask_bias": a["mask_bias"][:, :1]}, "mask_bias must be"),
    (lambda a: {**a, "keep_window": 0}, "keep_window must be"),
    (lambda a: {**a, "segment_ids": torch.zeros(2, 3, dtype=torch.long)}, "segment_ids must be"),
    (lambda a: {**a, "q": a["q"][:, :3]}, "not divisible"),
    (lambda a: {**a, "q": a["q"].double()}, "float16/bfloat16/float32"),
    (lambda a: {**a, "keep_window": 4, "segment_ids": torch.tensor([[0] * 8 + [1] * 4 + [0] * 4])}, "contiguous run"),
])
def test_rejects_bad_arguments(kernels, change, message):
    arguments = {"q": torch.randn(1, 4, 16, 16), "k": torch.randn(1, 2, 16, 16), "v": torch.randn(1, 2, 16, 16),
                 "mask_bias": torch.randn(1, 4, 16), "keep_window": None, "segment_ids": None}
    with pytest.raises(ValueError, match=message):
        kernels.dmattn_fused(**change(arguments))


def test_benchmark_script_smoke(kernels, tmp_path):
    """bench/dmattn.py end to end on the CPU (--device cpu: interpreter, tiny sizes): it runs, writes the
    JSON with per-length ratios, and leaves no partial file. The numbers themselves mean nothing here."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "dmattn.py"
    spec = importlib.util.spec_from_file_location("bench_dmattn", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / "dmattn.json"
    sys_argv = ["dmattn.py", "--device", "cpu", "--tokens", "32", "--lengths", "32", "--heads", "2", "--kv-heads", "1",
                "--head-dim", "16", "--baselines", "cudnn", "--output", str(output)]
    previous, sys.argv = sys.argv, sys_argv
    try:
        bench.run_benchmark(bench.parse_arguments())
    finally:
        sys.argv = previous
    report = json.loads(output.read_text())
    entry = report["results"]["32"]
    assert entry["fwd_bwd"]["ratio_vs_cudnn"] > 0 and entry["keep_window"]["w"] == 4
    assert not (tmp_path / "dmattn.json.partial").exists()


def test_gluon_forward_flag_falls_back_on_cpu(kernels, monkeypatch):
    """FORWARD_GLUON on a CPU machine: the Gluon forward is not usable for CPU tensors, the Triton forward
    runs (and matches the oracle), and the Gluon module is not imported for it."""
    import sys as system

    monkeypatch.setattr(kernels, "FORWARD_GLUON", True)
    imported_before = "cheems_parallel.kernels.dmattn_gluon" in system.modules
    generator = torch.Generator().manual_seed(5)
    q, k, v, mask_bias = make_inputs(1, 4, 2, 37, 16, generator)
    masks = kernels._Masks(mask_bias, None, None, 1, 4, 37)
    assert not kernels._gluon_forward_usable(q, k, v, mask_bias, masks)
    errors = compare_with_reference(kernels, q, k, v, mask_bias, None, None, generator)
    assert all(error < TOLERANCE for error in errors.values()), errors
    assert imported_before or "cheems_parallel.kernels.dmattn_gluon" not in system.modules


def test_gluon_backward_flag_falls_back_on_cpu(kernels, monkeypatch):
    """BACKWARD_GLUON on a CPU machine: the Gluon backward is not usable for CPU tensors, the Triton backward
    runs (the gradients match the oracle), and the Gluon backward module is not imported for it."""
    import sys as system

    monkeypatch.setattr(kernels, "BACKWARD_GLUON", True)
    imported_before = "cheems_parallel.kernels.dmattn_gluon_bwd" in system.modules
    generator = torch.Generator().manual_seed(6)
    q, k, v, mask_bias = make_inputs(1, 4, 2, 37, 16, generator)
    masks = kernels._Masks(mask_bias, None, None, 1, 4, 37)
    assert not kernels._gluon_backward_usable(torch.randn_like(q), q, k, v, mask_bias, masks)
    errors = compare_with_reference(kernels, q, k, v, mask_bias, None, None, generator)
    assert all(error < TOLERANCE for error in errors.values()), errors
    assert imported_before or "cheems_parallel.kernels.dmattn_gluon_bwd" not in system.modules


def test_gluon_sparse_flag_falls_back_on_cpu(kernels, monkeypatch):
    """GLUON_SPARSE / GLUON_SPARSE_BACKWARD on a CPU machine: the Gluon sparse kernels are not usable for CPU tensors,
    the Triton sparse path runs (and matches the oracle), and the Gluon sparse modules are not imported for it."""
    import sys as system

    monkeypatch.setattr(kernels, "GLUON_SPARSE", True)
    imported_before = "cheems_parallel.kernels.dmattn_gluon_sparse" in system.modules
    generator = torch.Generator().manual_seed(7)
    q, k, v, mask_bias = make_inputs(1, 4, 2, 45, 16, generator)
    segments = sorted_segments(1, 45, 3, generator)
    masks = kernels._Masks(mask_bias, 6, segments, 1, 4, 45)
    assert masks.sparse and not kernels._gluon_sparse_usable(q, k, v, mask_bias, masks)
    monkeypatch.setattr(kernels, "GLUON_SPARSE_BACKWARD", True)
    assert not kernels._gluon_sparse_backward_usable(torch.randn_like(q), q, k, v, mask_bias, masks)
    errors = compare_with_reference(kernels, q, k, v, mask_bias, 6, segments, generator)
    assert all(error < TOLERANCE for error in errors.values()), errors
    assert imported_before or "cheems_parallel.kernels.dmattn_gluon_sparse" not in system.modules
    assert "cheems_parallel.kernels.dmattn_gluon_sparse_bwd" not in system.modules or imported_before


class _StandInGluonKernels:
    """Stands in for a Gluon kernel file on the CPU (Gluon does not run in the interpreter) so that the glue around
    the Gluon kernels runs: its `forward` / `backward` are the Triton path's (the flags off inside), its backward
    fills the fp32 dQ buffer with unscaled sums as the Gluon kernels do, and `fail` makes it raise a compile error."""

    busy = []  # non-empty while a stand-in runs the Triton path: its inner calls must not come back here

    def __init__(self, kernels, fail=False):
        self.kernels, self.fail, self.calls = kernels, fail, 0

    def supported(self, *tensors):  # as the real kernels: contiguous rows only
        return all(t.is_contiguous() for t in tensors)

    def _call(self, run):
        import triton

        self.calls += 1
        if self.fail:
            raise triton.compiler.errors.CompilationError("stand-in", None, "no such Gluon API")
        self.busy.append(True)
        try:
            return run()
        finally:
            self.busy.pop()

    def forward(self, q, k, v, mask_bias, *schedule_and_config):
        masks = schedule_and_config[0] if len(schedule_and_config) == 2 else self.kernels._Masks(
            mask_bias, None, None, *q.shape[:3])
        return self._call(lambda: self.kernels._forward(q, k, v, mask_bias, masks))

    def backward(self, q, k, v, mask_bias, grad_out, lse, delta, grad_query_accum, *schedule_and_config):
        masks = schedule_and_config[0] if len(schedule_and_config) == 2 else self.kernels._Masks(
            mask_bias, None, None, *q.shape[:3])

        def run():
            out, _ = self.kernels._forward(q, k, v, mask_bias, masks)
            grad_query, grad_key, grad_value, grad_bias = self.kernels._backward(
                grad_out, q, k, v, mask_bias, out, lse, masks)
            grad_query_accum.copy_(grad_query.float() * q.shape[-1] ** 0.5)  # unscaled, as the kernels leave it
            return grad_key, grad_value, grad_bias
        return self._call(run)


@pytest.mark.parametrize("keep_window,num_documents", [(None, None), (6, 3)])
@pytest.mark.parametrize("fail", [False, True])
def test_gluon_dispatch_glue(kernels, monkeypatch, keep_window, num_documents, fail):
    """The code around the Gluon kernels (dense and sparse): which module a call reaches (permuted q, k, v copied to
    the rows the kernels need), the delta / dQ scale-and-cast around their backward, and, when a module does not
    compile, the warning and the Triton kernels for that call and every later one; the gradients match the float64
    oracle either way."""
    generator = torch.Generator().manual_seed(11)
    q, k, v, mask_bias = make_inputs(1, 4, 2, 45, 16, generator)
    # q, k, v as the attention layer passes them: permuted views of (l, b, h, d); the glue must copy them to rows
    q, k, v = (t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for t in (q, k, v))
    segments = None if num_documents is None else sorted_segments(1, 45, num_documents, generator)
    names = ["dmattn_gluon_sparse", "dmattn_gluon_sparse_bwd"] if keep_window else ["dmattn_gluon", "dmattn_gluon_bwd"]
    stand_ins = {name: _StandInGluonKernels(kernels, fail) for name in names}
    monkeypatch.setattr(kernels, "_GLUON_MODULES", dict(stand_ins))
    for flag in ("FORWARD_GLUON", "BACKWARD_GLUON", "GLUON_SPARSE", "GLUON_SPARSE_BACKWARD"):
        monkeypatch.setattr(kernels, flag, True)
    monkeypatch.setattr(kernels, "GLUON_SPARSE_BACKWARD_MIN_LENGTH_WITH_DOCUMENTS", 0)

    def applies(enabled, sparse, q, masks):  # the real one also wants CUDA outside the interpreter
        return enabled and masks.sparse == sparse and not _StandInGluonKernels.busy
    monkeypatch.setattr(kernels, "_gluon_applies", applies)

    errors = compare_with_reference(kernels, q, k, v, mask_bias, keep_window, segments, generator)
    assert all(error < TOLERANCE for error in errors.values()), errors
    for name in names:
        assert stand_ins[name].calls >= 1, name
        assert (kernels._GLUON_MODULES[name] is None) == fail, name


@pytest.mark.parametrize("length,keep_window,levels,num_documents", [
    (61, 7, 3, 4), (40, 12, 2, 2), (50, 30, 1000, 5), (64, 3, 1, 8), (33, 1, 4, 3),
])
def test_folded_document_thresholds_reproduce_reference_mask(kernels, length, keep_window, levels, num_documents):
    """fold_documents_into_thresholds (the Gluon sparse forward's keep-window-within-documents form): rank_j <=
    folded_i with j <= i and NO document compare is exactly the reference's allowed set, ties included, also for
    documents shorter than the window (where the plain threshold admits earlier documents' keys)."""
    generator = torch.Generator().manual_seed(length * 100 + keep_window)
    mask_bias = torch.randint(0, levels, (2, 3, length), generator=generator).float()
    segments = sorted_segments(2, length, num_documents, generator)
    key_rank, threshold = kernels.keep_window_thresholds(mask_bias, keep_window, segments)
    folded = kernels.fold_documents_into_thresholds(key_rank, threshold, segments)
    positions = torch.arange(length)
    kept = (key_rank[:, :, None, :] <= folded[:, :, :, None]) & (positions[None, :] <= positions[:, None])
    assert torch.equal(kept, allowed_mask(mask_bias, keep_window, segments).expand_as(kept))


def emulate_gluon_sparse_forward(kernels, q, k, v, mask_bias, keep_window, segments, block_m, block_n, fold):
    """What dmattn_gluon_sparse._sparse_forward_kernel computes, in float64 torch: per (b·h, query block) only the
    listed key blocks of `block_schedule` (tiles block_m x block_n), the causal mask only on listed blocks from
    start_m // block_n on, the window compare (folded thresholds when `fold`) and the document compare per element,
    the online softmax shifting by 0 while a row is empty. Returns (out, base-2 lse)."""
    import math

    batch, heads, length, head_dim = q.shape
    group = heads // k.shape[1]
    masks = kernels._Masks(mask_bias, keep_window, segments, batch, heads, length)
    counts, lists = masks.schedule(block_m, block_n, by_query=True)
    has_window, has_segments, threshold = masks.has_window, masks.has_segments, masks.query_threshold
    if fold and has_window and has_segments:
        threshold = kernels.fold_documents_into_thresholds(masks.key_rank, threshold, masks.segment_ids)
        has_segments = False
    scale_log2 = 1.4426950408889634 / math.sqrt(head_dim)
    out = torch.zeros(batch, heads, length, head_dim, dtype=torch.float64)
    lse = torch.zeros(batch, heads, length, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            row = b * heads + h
            for block_m_index in range(triton_cdiv(length, block_m)):
                start_m = block_m_index * block_m
                rows = torch.arange(start_m, min(start_m + block_m, length))
                acc = torch.zeros(len(rows), head_dim, dtype=torch.float64)
                row_max = torch.full((len(rows),), float("-inf"), dtype=torch.float64)
                row_sum = torch.zeros(len(rows), dtype=torch.float64)
                for index in range(int(counts[row, block_m_index])):
                    block = int(lists[row, block_m_index, index])
                    cols = torch.arange(block * block_n, min(block * block_n + block_n, length))
                    s = (q[b, h, rows].double() @ k[b, h // group, cols].double().T) * scale_log2
                    s = s + mask_bias[b, h, cols].double() * 1.4426950408889634
                    keep = torch.ones_like(s, dtype=torch.bool)
                    if block >= start_m // block_n:
                        keep &= rows[:, None] >= cols[None, :]
                    if has_window:
                        keep &= masks.key_rank[b, h, cols][None, :] <= threshold[b, h, rows][:, None]
                    if has_segments:
                        keep &= segments[b, cols][None, :] == segments[b, rows][:, None]
                    s = s.masked_fill(~keep, float("-inf"))
                    new_max = torch.maximum(row_max, s.max(1).values)
                    shift = torch.where(new_max == float("-inf"), 0.0, new_max)
                    probs = torch.exp2(s - shift[:, None])
                    correction = torch.exp2(row_max - shift)
                    row_sum = row_sum * correction + probs.sum(1)
                    acc = acc * correction[:, None] + probs @ v[b, h // group, cols].double()
                    row_max = new_max
                empty = row_sum == 0
                out[b, h, rows] = acc / torch.where(empty, 1.0, row_sum)[:, None]
                safe_sum = torch.where(empty, 1.0, row_sum)
                lse[b, h, rows] = torch.where(empty, float("inf"), row_max + torch.log2(safe_sum))
    return out, lse


def triton_cdiv(a, b):
    return (a + b - 1) // b


@pytest.mark.parametrize("length,keep_window,num_documents,bias_levels,fold", [
    (77, 9, None, None, True),      # keep-window, l % 4 != 0, partial last blocks
    (64, None, 3, None, True),      # documents only
    (70, 8, 4, None, True),         # keep-window within documents, folded
    (70, 8, 4, None, False),        # the same with the document compare
    (53, 5, 2, 3, True),            # ties
])
def test_gluon_sparse_schedule_emulation_matches_reference(kernels, length, keep_window, num_documents, bias_levels,
                                                           fold):
    """The Gluon sparse forward's schedule and masking logic (emulated in torch at 16 x 16 tiles: the kernel itself
    needs an sm_90 GPU) against the float64 oracle, GQA 2:1."""
    generator = torch.Generator().manual_seed(length + 17)
    q, k, v, mask_bias = make_inputs(1, 4, 2, length, 16, generator, bias_levels=bias_levels)
    segments = None if num_documents is None else sorted_segments(1, length, num_documents, generator)
    out, lse = emulate_gluon_sparse_forward(kernels, q, k, v, mask_bias, keep_window, segments, 16, 16, fold)
    oracle = dmattn_ref(q.double(), k.double(), v.double(), mask_bias.double(), keep_window, segments)
    assert torch.isfinite(lse).all()
    assert relative_error(out, oracle) < 1e-10


@pytest.mark.parametrize("length,keep_window,num_documents,bias_levels,fold", [
    (77, 9, None, None, True), (64, None, 3, None, True), (70, 8, 4, None, True), (70, 8, 4, None, False),
    (53, 5, 2, 3, True), (45, 1, 6, None, True),
])
def test_gluon_sparse_backward_walk_covers_exactly_the_allowed_pairs(kernels, length, keep_window, num_documents,
                                                                     bias_levels, fold):
    """dmattn_gluon_sparse_bwd's walk (per key block of 16 and query head: the listed query steps of 8 of
    `block_schedule(..., by_query=False)`, the causal compare only on steps before (start_n + 16) / 8, the window
    compare with the (folded) thresholds, the document compare) visits and keeps exactly the reference's allowed
    pairs: no kept pair outside the lists, no allowed pair dropped."""
    generator = torch.Generator().manual_seed(length * 7 + 1)
    _, _, _, mask_bias = make_inputs(2, 3, 1, length, 16, generator, bias_levels=bias_levels)
    segments = None if num_documents is None else sorted_segments(2, length, num_documents, generator)
    masks = kernels._Masks(mask_bias, keep_window, segments, 2, 3, length)
    key_block, query_block = 16, 8
    counts, lists = masks.schedule(key_block, query_block, by_query=False)
    has_window, has_segments, threshold = masks.has_window, masks.has_segments, masks.query_threshold
    if fold and has_window and has_segments:
        threshold = kernels.fold_documents_into_thresholds(masks.key_rank, threshold, masks.segment_ids)
        has_segments = False
    kept = torch.zeros(2, 3, length, length, dtype=torch.bool)
    for b in range(2):
        for h in range(3):
            for block_n in range(triton_cdiv(length, key_block)):
                start_n = block_n * key_block
                cols = torch.arange(start_n, min(start_n + key_block, length))
                for index in range(int(counts[b * 3 + h, block_n])):
                    step = int(lists[b * 3 + h, block_n, index])
                    rows = torch.arange(step * query_block, min(step * query_block + query_block, length))
                    keep = torch.ones(len(rows), len(cols), dtype=torch.bool)
                    if step < (start_n + key_block) // query_block:
                        keep &= rows[:, None] >= cols[None, :]
                    if has_window:
                        keep &= masks.key_rank[b, h, cols][None, :] <= threshold[b, h, rows][:, None]
                    if has_segments:
                        keep &= segments[b, cols][None, :] == segments[b, rows][:, None]
                    kept[b, h, rows[:, None], cols[None, :]] |= keep
    assert torch.equal(kept, allowed_mask(mask_bias, keep_window, segments).expand_as(kept))
