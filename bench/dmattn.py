"""Benchmark: fused DMAttn (cheems_parallel.kernels.dmattn) against the attention it must keep up with.

Same run, same inputs, per length l with b·l tokens fixed: our kernel with a learnable per-key bias; cuDNN
causal SDPA without any mask (the ceiling); FlexAttention with the same learnable per-key bias; SDPA with
the bias materialised as a dense (b, h, l, l) mask; and our kernel with the keep-window w = l/8 on a
clustered mask (high values in runs of 256 keys, where block skipping works) and on an i.i.d. random mask
(where it cannot), timed with its torch pre-pass included. Forward and forward+backward are timed with
`triton.testing.do_bench` (median, L2 flushed). TFLOP/s use the causal count for every method: forward
2·b·h·l²·d (two matmuls over half the square), forward+backward 3.5x that. The keep-window rows use the
same count, so they read as "effective" throughput; their speedup column is time(full causal)/time(w).

--tune first times the kernel's schedule variants at --tune-length (TUNE_CANDIDATES: forward tiles and TMA
loads by forward time, then the backward schedules by forward+backward time) and benchmarks the fastest;
the JSON records the timings ("tuning") and the settings used ("settings").

Writes a JSON (per l: fwd / fwd_bwd / keep_window blocks with ratios, e.g. fwd_bwd.ratio_vs_cudnn) and
prints a table. Needs CUDA.

Example (one H200, about 2 minutes after compilation; bench/gpu_dmattn.sh runs it with the GPU tests):
  python bench/dmattn.py --tune --lengths 1024 2048 4096 8192 16384 --output bench/results/dmattn_h200.json
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

logger = logging.getLogger("bench.dmattn")

# Candidates for --tune, as module settings of cheems_parallel.kernels.dmattn. The forward is tuned first
# (forward time), then the backward schedule with the chosen forward (forward+backward time). Registers,
# spills and HGMMA of each were checked offline with ptxas (bench/dmattn_notes.md).
def _tiles(block_m, block_n, num_warps, num_stages):
    return {"block_m": block_m, "block_n": block_n, "num_warps": num_warps, "num_stages": num_stages}


# Calls 1-4 swept pointer/TMA loads, 2-4 stages and fused/two-kernel backward schedules; calls 5-7 tried
# Triton's Hopper auto warp specialisation (wrong results, then a hang: removed; bench/dmattn_notes.md).
# Session 5: the Gluon forward (cheems_parallel/kernels/dmattn_gluon.py; FORWARD_GLUON) beside the Triton one:
# "split" = two 4-warp consumer partitions of 64 query rows each (else one 8-warp consumer of 128 rows),
# "overlap" = FA3's intra-warpgroup pipelining of QK^T(j+1) with PV(j), stages = K/V ring depth.
# "persistent" = a grid of one program per SM looping over the tiles (persistent_max_length: up to which l).
def _gluon(block_n, stages, split, overlap, persistent_max_length=0):
    return {"FORWARD_GLUON": True, "GLUON_FORWARD_CONFIG": {"block_m": 128, "block_n": block_n, "stages": stages,
                                                            "split": split, "overlap": overlap,
                                                            "persistent_max_length": persistent_max_length}}


# Session 5 (backward): the Gluon backward (cheems_parallel/kernels/dmattn_gluon_bwd.py; BACKWARD_GLUON) beside the
# Triton fused one: "split" = both warp groups' dS^T in one 128-key buffer, each computing half of dQ's columns
# (else each warp group multiplies its own 64 keys and reduce-adds a whole dQ tile), stages = Q/dO ring depth.
# The Triton candidates set BACKWARD_GLUON False so that they time the Triton backward.
def _gluon_backward(dq_split, stages):
    return {"BACKWARD_GLUON": True, "GLUON_BACKWARD_CONFIG": {"dq_split": dq_split, "stages": stages}}


TUNE_CANDIDATES = {
    "forward": {
        "fwd 128x64 w8 s3": {"FORWARD_CONFIG": _tiles(128, 64, 8, 3), "FORWARD_TMA": False, "FORWARD_GLUON": False},
        "gluon 128x128 s2 split overlap": _gluon(128, 2, True, True),
        "gluon 128x128 s2 one-consumer overlap": _gluon(128, 2, False, True),
        "gluon 128x128 s2 split no-overlap": _gluon(128, 2, True, False),
        "gluon 128x64 s3 split overlap": _gluon(64, 3, True, True),
        "gluon 128x128 s3 split overlap": _gluon(128, 3, True, True),
        "gluon 128x128 s2 split overlap persistent": _gluon(128, 2, True, True, 1 << 30),
        "gluon 128x128 s3 split overlap persistent": _gluon(128, 3, True, True, 1 << 30),
        "gluon 128x128 s2 split overlap persistent<=2k": _gluon(128, 2, True, True, 2048),  # the d 128 default
    },
    "backward": {
        "fused 32x128 w8 s3 reduce dqT": {"FUSED_BACKWARD": True, "FUSED_BACKWARD_CONFIG": _tiles(32, 128, 8, 3),
                                          "BACKWARD_TMA": False, "DQ_TMA_REDUCE": True, "DQ_TRANSPOSED": True,
                                          "BACKWARD_GLUON": False},
        "two-kernel": {"FUSED_BACKWARD": False, "BACKWARD_TMA": False, "BACKWARD_KEY_CONFIG": _tiles(32, 128, 8, 3),
                       "BACKWARD_QUERY_CONFIG": _tiles(64, 64, 4, 2), "BACKWARD_GLUON": False},
        "gluon-bwd 128x64 s2 split": _gluon_backward(True, 2),
        "gluon-bwd 128x64 s2 own-keys": _gluon_backward(False, 2),
        "gluon-bwd 128x64 s3 split": _gluon_backward(True, 3),
    },
}
# What the benchmark records as the kernel's configuration.
SETTING_NAMES = ("FORWARD_CONFIG", "FORWARD_TMA", "FORWARD_GLUON", "GLUON_FORWARD_CONFIG", "BACKWARD_GLUON",
                 "GLUON_BACKWARD_CONFIG", "FUSED_BACKWARD",
                 "FUSED_BACKWARD_CONFIG", "BACKWARD_KEY_CONFIG", "BACKWARD_QUERY_CONFIG", "BACKWARD_TMA",
                 "DQ_TMA_REDUCE", "DQ_TRANSPOSED", "LISTED_LOOP_MAX_FRACTION", "GLUON_SPARSE", "GLUON_SPARSE_CONFIG",
                 "GLUON_SPARSE_BACKWARD", "GLUON_SPARSE_BACKWARD_CONFIG", "GLUON_SPARSE_BACKWARD_MIN_LENGTH_WITH_DOCUMENTS",
                 "THRESHOLD_CHUNK", "THRESHOLD_COUNT_BY_DOT")


class BenchError(Exception):
    """A problem the user can fix (arguments, machine); shown as one line, exit code 2."""


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths l to time (each must divide --tokens)")
    parser.add_argument("--tokens", type=int, default=65536, help="b·l, fixed across lengths")
    parser.add_argument("--heads", type=int, default=16, help="query heads h")
    parser.add_argument("--kv-heads", type=int, default=16, help="key/value heads h_kv (GQA when < h)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension d")
    parser.add_argument("--keep-window-fraction", type=float, default=0.125, help="w = l · this for the keep-window rows")
    parser.add_argument("--baselines", nargs="*", default=["cudnn", "flex", "sdpa_mask"],
                        choices=["cudnn", "flex", "sdpa_mask"], help="anchors to time beside our kernel")
    parser.add_argument("--max-mask-gib", type=float, default=20.0,
                        help="skip the materialised-mask SDPA when its (b, h, l, l) mask would exceed this")
    parser.add_argument("--tune", action="store_true", help="time the tile candidates at --tune-length first and "
                        "use the fastest for each kernel")
    parser.add_argument("--tune-length", type=int, nargs="+", default=[4096],
                        help="sequence length(s) for --tune; the settings are chosen at the first")
    parser.add_argument("--tune-phases", nargs="+", default=None, choices=["forward", "backward"],
                        help="with --tune: only these phases of TUNE_CANDIDATES (default: all)")
    parser.add_argument("--tune-match", nargs="+", default=None,
                        help="with --tune: only candidates whose name contains one of these strings")
    parser.add_argument("--tune-only", action="store_true",
                        help="with --tune: time the candidates (and cuDNN causal, for the ratios) at every "
                             "--tune-length, write the JSON and stop (a sweep, no per-length benchmark)")
    parser.add_argument("--precompile-workers", type=int, default=8,
                        help="processes that compile the Triton variants in parallel before timing (0: none)")
    parser.add_argument("--precompile-only", action="store_true",
                        help="fill Triton's cache with the --tune candidates (and the default settings' "
                             "keep-window kernels) and exit; lets a caller compile while the GPU does other work")
    parser.add_argument("--warmup-ms", type=float, default=30.0, help="do_bench warm-up per measurement (ms)")
    parser.add_argument("--rep-ms", type=float, default=150.0, help="do_bench repetition time per measurement (ms)")
    parser.add_argument("--time-budget-s", type=float, default=1e9,
                        help="after this many seconds skip the remaining Flex/materialised-mask rows (recorded)")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=JSON",
                        help="set a module setting of cheems_parallel.kernels.dmattn before anything runs (one of "
                             "the recorded settings, e.g. THRESHOLD_CHUNK=64); repeatable")
    parser.add_argument("--output", default="bench/results/dmattn_h200.json", help="JSON file to write")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of this script's logic at tiny sizes under TRITON_INTERPRET=1 "
                             "(times meaningless; use with --baselines cudnn sdpa_mask and small --tokens)")
    return parser.parse_args()


# ----------------------------------------------------------------------------------------------
# Inputs and methods. Every method takes the same q, k, v (b, h, l, d) and fp32 bias (b, h, l).
# ----------------------------------------------------------------------------------------------
DEVICE = "cuda"


def make_inputs(batch, heads, kv_heads, length, head_dim, mask_kind="random", seed=0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=DEVICE)

    q = randn(batch, heads, length, head_dim).to(torch.bfloat16).requires_grad_()
    k = randn(batch, kv_heads, length, head_dim).to(torch.bfloat16).requires_grad_()
    v = randn(batch, kv_heads, length, head_dim).to(torch.bfloat16).requires_grad_()
    if mask_kind == "clustered":  # runs of 256 keys share a level: what block skipping needs
        levels = randn(batch, heads, length // 256 + 1).repeat_interleave(256, dim=-1)[..., :length]
        bias = levels + 0.1 * randn(batch, heads, length)
    else:
        bias = randn(batch, heads, length)
    return q, k, v, bias.requires_grad_()


def ours(keep_window=None):
    from cheems_parallel.kernels.dmattn import dmattn_fused

    def run(q, k, v, bias):
        return dmattn_fused(q, k, v, bias, keep_window=keep_window)
    return run


def cudnn_causal(q, k, v, bias):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def make_flex(length, bias):
    """FlexAttention with the learnable per-key bias as a score_mod over a causal block mask; the bias
    tensor is captured (Flex differentiates captured tensors), so `run` must be given this same bias."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compile per length and phase: past Dynamo's default limit of 8 it silently runs the unfused
    # (l x l materialising) flex_attention, which is what made l = 16k run out of memory in call 2.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    block_mask = create_block_mask(lambda b, h, q_index, kv_index: q_index >= kv_index, None, None, length, length,
                                   device=DEVICE)
    compiled = torch.compile(flex_attention, dynamic=False)

    def score_mod(score, b, h, q_index, kv_index):
        return score + bias[b, h, kv_index]

    def run(q, k, v, bias_argument):
        assert bias_argument is bias
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return run


def make_sdpa_mask(length):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    causal = torch.ones(length, length, dtype=torch.bool, device=DEVICE).tril()
    backend = SDPBackend.EFFICIENT_ATTENTION if DEVICE == "cuda" else SDPBackend.MATH

    def run(q, k, v, bias):
        mask = bias.to(q.dtype)[:, :, None, :].masked_fill(~causal, float("-inf"))  # (b, h, l, l) materialised
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return run


def median_ms(function, warmup_ms, rep_ms):
    if DEVICE == "cpu":  # smoke runs only: one call on the wall clock
        start = time.perf_counter()
        function()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return triton.testing.do_bench(function, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def time_method(method, inputs, warmup_ms, rep_ms):
    """(forward ms, forward+backward ms), medians; the forward without autograd bookkeeping."""
    grad_out = torch.randn_like(inputs[0])

    def forward():
        with torch.no_grad():
            method(*inputs)

    def forward_backward():
        out = method(*inputs)
        torch.autograd.grad(out, inputs, grad_out, allow_unused=True)  # cuDNN has no bias input

    forward_backward()  # compile / autotune outside the timing
    forward_ms = median_ms(forward, warmup_ms, rep_ms)
    forward_backward_ms = median_ms(forward_backward, warmup_ms, rep_ms)
    return forward_ms, forward_backward_ms


def causal_flops(batch, heads, length, head_dim):
    forward = 2.0 * batch * heads * length * length * head_dim
    return forward, 3.5 * forward


# ----------------------------------------------------------------------------------------------
# Parallel precompilation and tuning.
# ----------------------------------------------------------------------------------------------
def apply_settings(settings):
    import cheems_parallel.kernels.dmattn as kernels

    for name, value in settings.items():
        if isinstance(value, dict):
            getattr(kernels, name).update(value)
        else:
            setattr(kernels, name, value)


def compile_variant(job):
    """Worker: run forward+backward once on a small problem with the benchmark's specialisation, which
    fills Triton's on-disk cache for the main process."""
    settings, heads, kv_heads, head_dim, keep_window = job
    try:
        apply_settings(settings)
        q, k, v, bias = make_inputs(1, heads, kv_heads, 1024, head_dim)
        out = ours(keep_window)(q, k, v, bias)
        torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out))
        torch.cuda.synchronize()
    except Exception as error:  # the timing run reports it again, against its variant
        return repr(error)[:300]
    return True


def precompile(jobs, workers):
    if workers <= 0 or not jobs:
        return
    start = time.time()
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, result in zip(jobs, pool.map(compile_variant, jobs)):
            if result is not True:
                logger.warning("precompile failed (%s): %s", job[0], result)
    logger.info("precompiled %d variants in %.0f s", len(jobs), time.time() - start)


def current_settings():
    import copy

    import cheems_parallel.kernels.dmattn as kernels

    return {name: copy.deepcopy(getattr(kernels, name)) for name in SETTING_NAMES}


# A candidate whose output or gradients differ from the settings in force when tuning starts (which the GPU
# tests cover) by more than this (relative norm) or hold a non-finite value is recorded as failed, never
# chosen: a fast wrong kernel must not win (call 5: warp-specialised kernels gave NaN and beat the defaults).
TUNE_AGREEMENT = 2e-2


def forward_backward_values(inputs, grad_out):
    out = ours()(*inputs)
    return [out.detach().float()] + [g.float() for g in torch.autograd.grad(out, inputs, grad_out)]


def disagreement(values, reference):
    """None when `values` agree with `reference` (finite, relative norm <= TUNE_AGREEMENT), else why not."""
    for name, value, expected in zip(("out", "dq", "dk", "dv", "dbias"), values, reference):
        if not bool(torch.isfinite(value).all()):
            return f"wrong results: non-finite {name}"
        error = ((value - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        if error > TUNE_AGREEMENT:
            return f"wrong results: {name} differs from the current settings' by {error:.2e} (relative)"
    return None


def tune(arguments, batch, length=None):
    """The forward candidates by forward time, then the backward ones (with the chosen forward) by
    forward+backward time; leaves the fastest of each applied and returns the table of timings. Each
    candidate's results are first compared with those of the settings in force (`disagreement`)."""
    length = length or arguments.tune_length[0]
    inputs = make_inputs(batch, arguments.heads, arguments.kv_heads, length, arguments.head_dim)
    base = current_settings()
    table = {}
    grad_out = torch.randn_like(inputs[0])
    reference = forward_backward_values(inputs, grad_out)
    if arguments.tune_only and "cudnn" in arguments.baselines:
        forward_ms, forward_backward_ms = time_method(cudnn_causal, inputs, arguments.warmup_ms, arguments.rep_ms)
        table["cudnn_causal"] = {"fwd_ms": forward_ms, "fwd_bwd_ms": forward_backward_ms}
        logger.info("tune l=%d cuDNN causal fwd %.3f, fwd+bwd %.3f", length, forward_ms, forward_backward_ms)
    for phase, candidates in TUNE_CANDIDATES.items():
        if arguments.tune_phases and phase not in arguments.tune_phases:
            continue
        timings = []
        for name, settings in candidates.items():
            if arguments.tune_match and not any(part in name for part in arguments.tune_match):
                continue
            apply_settings({**base, **settings})
            try:
                wrong = disagreement(forward_backward_values(inputs, grad_out), reference)
                if wrong:
                    raise RuntimeError(wrong)
                forward_ms, forward_backward_ms = time_method(ours(), inputs, arguments.warmup_ms, arguments.rep_ms)
            except Exception as error:  # a variant that fails to compile, launch or agree is recorded, not fatal
                timings.append({"name": name, "failed": str(error).splitlines()[0][:300] if str(error) else repr(error)})
                logger.warning("tune %-8s %-32s failed: %s", phase, name, timings[-1]["failed"])
                continue
            measured = forward_ms if phase == "forward" else forward_backward_ms
            timings.append({"name": name, "settings": settings, "ms": measured,
                            "fwd_ms": forward_ms, "fwd_bwd_ms": forward_backward_ms})
            if "cudnn_causal" in table:
                timings[-1]["fwd_ratio_vs_cudnn"] = table["cudnn_causal"]["fwd_ms"] / forward_ms
                timings[-1]["fwd_bwd_ratio_vs_cudnn"] = table["cudnn_causal"]["fwd_bwd_ms"] / forward_backward_ms
            logger.info("tune l=%d %-8s %-34s %.3f ms (fwd %.3f, fwd+bwd %.3f)%s", length, phase, name, measured,
                        forward_ms, forward_backward_ms,
                        " ratio vs cuDNN fwd %.3f f+b %.3f" % (timings[-1]["fwd_ratio_vs_cudnn"],
                                                               timings[-1]["fwd_bwd_ratio_vs_cudnn"])
                        if "cudnn_causal" in table else "")
        best = min((entry for entry in timings if "ms" in entry), key=lambda entry: entry["ms"])
        base = {**base, **best["settings"]}
        table[phase] = {"candidates": timings, "chosen": best["name"]}
    apply_settings(base)
    return table


# ----------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------
def run_benchmark(arguments):
    global DEVICE
    DEVICE = arguments.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise BenchError("bench/dmattn.py: --device cuda but no CUDA GPU is visible")
    if DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported, just below
        arguments.precompile_workers = 0
    for length in arguments.lengths:
        if arguments.tokens % length:
            raise BenchError(f"--lengths: {length} does not divide --tokens {arguments.tokens}")
    if arguments.heads % arguments.kv_heads:
        raise BenchError(f"--heads {arguments.heads} is not a multiple of --kv-heads {arguments.kv_heads}")
    import triton

    started = time.time()
    heads, kv_heads, head_dim = arguments.heads, arguments.kv_heads, arguments.head_dim
    import cheems_parallel.kernels.dmattn  # noqa: F401  (decorated now, interpreted on --device cpu)

    overrides = {}
    for setting in arguments.setting:
        name, _, value = setting.partition("=")
        if name not in SETTING_NAMES:
            raise BenchError(f"--setting {setting}: {name!r} is not one of {', '.join(SETTING_NAMES)}")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError as error:
            raise BenchError(f"--setting {setting}: the value is not JSON ({error.msg})") from None
    apply_settings(overrides)

    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke run)", "torch": torch.__version__, "triton": triton.__version__,
              "shape": {"tokens": arguments.tokens, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                        "dtype": "bfloat16", "mask_bias_dtype": "float32"},
              "flops": "causal: forward 2*b*h*l^2*d, forward+backward 3.5x forward, for every method",
              "keep_window_fraction": arguments.keep_window_fraction, "results": {}}

    windows = sorted({max(1, int(length * arguments.keep_window_fraction)) for length in arguments.lengths})
    jobs = []
    if arguments.tune:
        base = current_settings()
        for phase, candidates in TUNE_CANDIDATES.items():
            if arguments.tune_phases and phase not in arguments.tune_phases:
                continue
            jobs += [({**base, **settings}, heads, kv_heads, head_dim, None) for name, settings in candidates.items()
                     if not arguments.tune_match or any(part in name for part in arguments.tune_match)]
    precompile(jobs, arguments.precompile_workers)
    if arguments.precompile_only:
        precompile([(current_settings(), heads, kv_heads, head_dim, windows[0])], arguments.precompile_workers)
        return report
    if arguments.tune:
        for length in arguments.tune_length:
            if arguments.tokens % length:
                raise BenchError(f"--tune-length: {length} does not divide --tokens {arguments.tokens}")
        initial = current_settings()
        report["tuning"] = tune(arguments, arguments.tokens // arguments.tune_length[0])
        chosen = current_settings()
        if len(arguments.tune_length) > 1:
            report["tuning_by_length"] = {str(arguments.tune_length[0]): report["tuning"]}
            for length in arguments.tune_length[1:]:
                apply_settings(initial)
                report["tuning_by_length"][str(length)] = tune(arguments, arguments.tokens // length, length)
            apply_settings(chosen)
        if arguments.tune_only:
            report["settings"] = chosen
            report["wall_s"] = time.time() - started
            write_json(report, arguments.output)
            return report
    report["settings"] = current_settings()
    logger.info("settings: %s", report["settings"])
    # The keep-window variants (one compile each kernel, whatever w) with the chosen settings.
    precompile([(current_settings(), heads, kv_heads, head_dim, windows[0])], arguments.precompile_workers)

    for length in arguments.lengths:
        batch = arguments.tokens // length
        forward_flops, forward_backward_flops = causal_flops(batch, heads, length, head_dim)
        inputs = make_inputs(batch, heads, kv_heads, length, head_dim)
        entry = {"batch": batch, "methods": {}}

        def record(name, make_method, method_inputs=inputs, baseline=True):
            """Times one method; a baseline that fails (memory, backend) is recorded as such, not fatal."""
            try:
                forward_ms, forward_backward_ms = time_method(make_method(), method_inputs, arguments.warmup_ms,
                                                              arguments.rep_ms)
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if not baseline:
                    raise
                entry["methods"][name] = {"failed": str(error).splitlines()[0][:300]}
                logger.warning("l=%d %s failed: %s", length, name, entry["methods"][name]["failed"])
                torch.cuda.empty_cache()
                return
            entry["methods"][name] = {
                "fwd_ms": forward_ms, "fwd_tflops": forward_flops / forward_ms / 1e9,
                "fwd_bwd_ms": forward_backward_ms, "fwd_bwd_tflops": forward_backward_flops / forward_backward_ms / 1e9}
            logger.info("l=%d %-26s fwd %.3f ms (%.0f TFLOP/s)  fwd+bwd %.3f ms (%.0f TFLOP/s)", length, name,
                        forward_ms, forward_flops / forward_ms / 1e9, forward_backward_ms,
                        forward_backward_flops / forward_backward_ms / 1e9)

        record("ours_bias", ours, baseline=False)
        if "cudnn" in arguments.baselines:
            record("cudnn_causal", lambda: cudnn_causal)
        keep_window = max(1, int(length * arguments.keep_window_fraction))
        for mask_kind in ("clustered", "random"):
            kw_inputs = make_inputs(batch, heads, kv_heads, length, head_dim, mask_kind=mask_kind, seed=1)
            record(f"ours_keep_window_{mask_kind}", lambda: ours(keep_window), kw_inputs, baseline=False)
            from cheems_parallel.kernels.dmattn import keep_window_thresholds
            prepass_ms = median_ms(lambda: keep_window_thresholds(kw_inputs[3], keep_window),
                                   arguments.warmup_ms, arguments.rep_ms)
            entry["methods"][f"ours_keep_window_{mask_kind}"]["prepass_ms"] = prepass_ms
            del kw_inputs
        if "flex" in arguments.baselines:
            if time.time() - started > arguments.time_budget_s:
                entry["methods"]["flex_bias"] = {"skipped": "time budget of this run (--time-budget-s)"}
            else:
                record("flex_bias", lambda: make_flex(length, inputs[3]))
        if "sdpa_mask" in arguments.baselines:
            mask_gib = batch * heads * length * length * 2 / 2**30
            if mask_gib > arguments.max_mask_gib:
                entry["methods"]["sdpa_mask"] = {"skipped": f"materialised mask would take {mask_gib:.0f} GiB "
                                                            f"(> --max-mask-gib {arguments.max_mask_gib:g})"}
            elif time.time() - started > arguments.time_budget_s:
                entry["methods"]["sdpa_mask"] = {"skipped": "time budget of this run (--time-budget-s)"}
            else:
                record("sdpa_mask", lambda: make_sdpa_mask(length))
        summarise(entry, keep_window)
        report["results"][str(length)] = entry
        del inputs
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        write_json(report, arguments.output + ".partial")
    report["wall_s"] = time.time() - started
    write_json(report, arguments.output)
    os.remove(arguments.output + ".partial")
    print_table(report)
    return report


def summarise(entry, keep_window):
    methods = entry["methods"]
    ours_entry = methods["ours_bias"]
    for phase in ("fwd", "fwd_bwd"):
        block = {"ours_tflops": ours_entry[f"{phase}_tflops"]}
        for name, key in (("cudnn_causal", "cudnn"), ("flex_bias", "flex"), ("sdpa_mask", "sdpa_mask")):
            if f"{phase}_tflops" in methods.get(name, {}):
                block[f"{key}_tflops"] = methods[name][f"{phase}_tflops"]
                block[f"ratio_vs_{key}"] = ours_entry[f"{phase}_tflops"] / methods[name][f"{phase}_tflops"]
        entry[phase] = block
    entry["keep_window"] = {"w": keep_window}
    for mask_kind in ("clustered", "random"):
        kw = methods[f"ours_keep_window_{mask_kind}"]
        entry["keep_window"][mask_kind] = {
            "fwd_speedup_vs_full": ours_entry["fwd_ms"] / kw["fwd_ms"],
            "fwd_bwd_speedup_vs_full": ours_entry["fwd_bwd_ms"] / kw["fwd_bwd_ms"],
            "prepass_ms": kw["prepass_ms"], "fwd_bwd_ms": kw["fwd_bwd_ms"]}


def print_table(report):
    header = (f"{'l':>6} {'b':>3} | {'fwd ours':>8} {'cuDNN':>6} {'flex':>6} {'ratio':>6} | {'f+b ours':>8} {'cuDNN':>6} "
              f"{'flex':>6} {'mask':>6} {'ratio':>6} {'/flex':>6} | {'kw clu':>6} {'kw rnd':>6} {'pre ms':>7}")
    print("TFLOP/s (causal count); ratio = ours / cuDNN causal without mask; kw = keep-window w=l/8 "
          "fwd+bwd speedup over our full causal (clustered / random mask)")
    print(header)

    def cell(block, key, width=6, digits=0):
        value = block.get(key)
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    for length, entry in sorted(report["results"].items(), key=lambda item: int(item[0])):
        fwd, both, kw = entry["fwd"], entry["fwd_bwd"], entry["keep_window"]
        print(f"{length:>6} {entry['batch']:>3} | {cell(fwd, 'ours_tflops', 8)} {cell(fwd, 'cudnn_tflops')} "
              f"{cell(fwd, 'flex_tflops')} {cell(fwd, 'ratio_vs_cudnn', 6, 2)} | {cell(both, 'ours_tflops', 8)} "
              f"{cell(both, 'cudnn_tflops')} {cell(both, 'flex_tflops')} {cell(both, 'sdpa_mask_tflops')} "
              f"{cell(both, 'ratio_vs_cudnn', 6, 2)} {cell(both, 'ratio_vs_flex', 6, 2)} | "
              f"{cell(kw['clustered'], 'fwd_bwd_speedup_vs_full', 6, 2)} {cell(kw['random'], 'fwd_bwd_speedup_vs_full', 6, 2)} "
              f"{cell(kw['clustered'], 'prepass_ms', 7, 2)}")


def write_json(report, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(report, handle, indent=1)
    os.replace(temporary, path)


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    arguments = parse_arguments()
    try:
        run_benchmark(arguments)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
