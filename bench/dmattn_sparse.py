"""Sweep: the DMAttn SPARSE path (keep-window and/or documents) — Triton block-list kernels vs the Gluon sparse
forward (cheems_parallel/kernels/dmattn_gluon_sparse.py, dmattn.GLUON_SPARSE) — against our full causal kernel.

Per l (b·l tokens fixed, bench/dmattn.py's shapes and inputs) and per case:
  clustered   keep-window w = l/8, mask levels in runs of 256 keys (block skipping works)
  random      keep-window w = l/8, i.i.d. mask (every causal block listed)
  documents   8 packed documents of l/8 keys, no keep-window
  both        keep-window w = l/8 on the clustered mask within 8 documents
it times forward and forward+backward (pre-pass and schedules included, as a user pays them) of: full causal
with the default settings ("causal"), and the sparse case with the Triton sparse kernels ("triton"), the Gluon sparse
forward + Triton sparse backward ("gluon": GLUON_SPARSE) and both Gluon sparse kernels ("gluon+bwd": GLUON_SPARSE and
GLUON_SPARSE_BACKWARD). x = time(causal) / time(method): > 1 is faster than full causal.
Before timing, each Gluon run's out and gradients are compared with the Triton run's (bench/dmattn.py's
`disagreement`, 2e-2 relative): a disagreeing Gluon row is recorded as failed, never timed.

  python bench/dmattn_sparse.py --lengths 1024 4096 16384 --output /tmp/dmattn_sparse.json
"""
import argparse
import json
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dmattn as bench  # noqa: E402  (bench/dmattn.py)

logger = logging.getLogger("bench.dmattn_sparse")
CASES = ("clustered", "random", "documents", "both")


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--keep-window-fraction", type=float, default=0.125)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--gluon-config", default="{}", help="JSON: dmattn.GLUON_SPARSE_CONFIG for the gluon rows")
    parser.add_argument("--gluon-backward-config", default="{}",
                        help="JSON: dmattn.GLUON_SPARSE_BACKWARD_CONFIG for the gluon+bwd rows")
    parser.add_argument("--warmup-ms", type=float, default=10.0)
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the host-side pre-pass per case: keep-window thresholds and the block schedules")
    parser.add_argument("--profile", type=int, default=0, metavar="L",
                        help="only profile (torch.profiler) forward+backward of each case at this l with the default "
                             "flags: the top kernels by GPU time and the host time per call")
    parser.add_argument("--output", default="/tmp/dmattn_sparse.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of the logic under TRITON_INTERPRET=1 (tiny --tokens; times meaningless)")
    return parser.parse_args()


def method(keep_window, segment_ids):
    from cheems_parallel.kernels.dmattn import dmattn_fused

    def run(q, k, v, bias):
        return dmattn_fused(q, k, v, bias, keep_window=keep_window, segment_ids=segment_ids)
    return run


def packed_documents(batch, length, documents, device):
    """(b, l) int32 ids of `documents` equal runs per row (the "documents" and "both" cases)."""
    ids = (torch.arange(length, device=device) // max(1, length // documents)).to(torch.int32)
    return ids[None].expand(batch, length).contiguous()


def prepass_breakdown(kernels, inputs, window, segments, warmup_ms, rep_ms):
    """ms of what a sparse call computes before its kernels: the thresholds (keep-window only) and the block
    schedules of the Gluon forward (128 x 128 tiles, by query) and backward (by key)."""
    q, mask_bias = inputs[0], inputs[3].detach()
    batch, heads, length, _ = q.shape
    masks = kernels._Masks(mask_bias, window, segments, batch, heads, length)
    times = {"thresholds_ms": 0.0}
    if masks.has_window:
        times["thresholds_ms"] = bench.median_ms(lambda: kernels.keep_window_thresholds(mask_bias, window, segments),
                                                 warmup_ms, rep_ms)
    times["schedule_fwd_ms"] = bench.median_ms(lambda: masks.schedule(128, 128, True), warmup_ms, rep_ms)
    times["schedule_bwd_ms"] = bench.median_ms(lambda: masks.schedule(128, 64, False), warmup_ms, rep_ms)
    return times


def profile(arguments, length):
    """GPU time per kernel and host time of forward+backward with the default flags, per case, at l."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    batch = arguments.tokens // length
    window = max(1, int(length * arguments.keep_window_fraction))
    segments = packed_documents(batch, length, arguments.documents, "cuda")
    for case in (None,) + tuple(arguments.cases):
        inputs = bench.make_inputs(batch, arguments.heads, arguments.kv_heads, length, arguments.head_dim,
                                   mask_kind="random" if case == "random" else "clustered", seed=1)
        run = method(None if case in (None, "documents") else window, segments if case in ("documents", "both") else None)
        grad_out = torch.randn_like(inputs[0])
        for _ in range(3):
            forward_backward(run, inputs, grad_out)
        torch.cuda.synchronize()
        repeats = 5
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            started = time.perf_counter()
            for _ in range(repeats):
                forward_backward(run, inputs, grad_out)  # no .float() copies in the profile
            host_ms = (time.perf_counter() - started) * 1e3 / repeats
            torch.cuda.synchronize()
        events = [event for event in profiler.key_averages()  # the kernels themselves, not the ops that launch them
                  if str(event.device_type).endswith("CUDA") and event.device_time_total > 0]
        events.sort(key=lambda event: -event.device_time_total)
        gpu_ms = sum(event.device_time_total for event in events) / 1e3 / repeats
        print(f"profile l={length} {case or 'causal'}: GPU {gpu_ms:.3f} ms per f+b (kernels summed), host "
              f"{host_ms:.3f} ms per call (profiled)")
        for event in events[:12]:
            print(f"  {event.device_time_total / 1e3 / repeats:8.3f} ms {event.count // repeats:4d}x  {event.key[:90]}")
        del inputs


def forward_backward(run, inputs, grad_out):
    out = run(*inputs)
    return [out.detach()] + list(torch.autograd.grad(out, inputs, grad_out))


def values(run, inputs, grad_out):
    return [value.float() for value in forward_backward(run, inputs, grad_out)]


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    arguments = parse_arguments()
    bench.DEVICE = arguments.device
    if arguments.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module is first imported, just below
    import triton

    import cheems_parallel.kernels.dmattn as kernels

    if arguments.profile:
        profile(arguments, arguments.profile)
        return
    gluon_config = json.loads(arguments.gluon_config)
    gluon_backward_config = json.loads(arguments.gluon_backward_config)
    report = {"device": torch.cuda.get_device_name() if arguments.device == "cuda" else "cpu (smoke run)", "torch": torch.__version__, "triton": triton.__version__,
              "tokens": arguments.tokens, "heads": arguments.heads, "kv_heads": arguments.kv_heads,
              "head_dim": arguments.head_dim, "gluon_config": gluon_config,
              "gluon_backward_config": gluon_backward_config, "results": {}}
    started = time.time()
    rows = []
    for length in arguments.lengths:
        batch = arguments.tokens // length
        window = max(1, int(length * arguments.keep_window_fraction))
        kernels.GLUON_SPARSE = kernels.GLUON_SPARSE_BACKWARD = False
        inputs = bench.make_inputs(batch, arguments.heads, arguments.kv_heads, length, arguments.head_dim)
        causal_fwd, causal_fb = bench.time_method(method(None, None), inputs, arguments.warmup_ms, arguments.rep_ms)
        logger.info("sparse l=%d causal fwd %.3f f+b %.3f", length, causal_fwd, causal_fb)
        entry = {"batch": batch, "w": window, "causal": {"fwd_ms": causal_fwd, "fwd_bwd_ms": causal_fb}}
        del inputs
        segments = packed_documents(batch, length, arguments.documents, arguments.device)
        for case in arguments.cases:
            mask_kind = "random" if case == "random" else "clustered"
            inputs = bench.make_inputs(batch, arguments.heads, arguments.kv_heads, length, arguments.head_dim,
                                       mask_kind=mask_kind, seed=1)
            run = method(None if case == "documents" else window, segments if case in ("documents", "both") else None)
            grad_out = torch.randn_like(inputs[0])
            entry[case] = {}
            if arguments.breakdown:
                entry[case]["prepass"] = prepass_breakdown(kernels, inputs, None if case == "documents" else window,
                                                           segments if case in ("documents", "both") else None,
                                                           arguments.warmup_ms, arguments.rep_ms)
                logger.info("sparse l=%d %-9s prepass %s", length, case,
                            " ".join(f"{key[:-3]} {value:.3f}" for key, value in entry[case]["prepass"].items()))
            kernels.GLUON_SPARSE = kernels.GLUON_SPARSE_BACKWARD = False
            reference = values(run, inputs, grad_out)
            for name in ("triton", "gluon", "gluon+bwd"):
                kernels.GLUON_SPARSE = name != "triton"
                kernels.GLUON_SPARSE_BACKWARD = name == "gluon+bwd"
                kernels.GLUON_SPARSE_BACKWARD_MIN_LENGTH_WITH_DOCUMENTS = 0  # the kernel itself at every length
                kernels.GLUON_SPARSE_CONFIG = dict(gluon_config)
                kernels.GLUON_SPARSE_BACKWARD_CONFIG = dict(gluon_backward_config)
                try:
                    if name != "triton":
                        wrong = bench.disagreement(values(run, inputs, grad_out), reference)
                        if wrong:
                            raise RuntimeError(wrong)
                    forward_ms, forward_backward_ms = bench.time_method(run, inputs, arguments.warmup_ms,
                                                                        arguments.rep_ms)
                except Exception as error:  # recorded, not fatal
                    entry[case][name] = {"failed": str(error).splitlines()[0][:300] if str(error) else repr(error)}
                    logger.warning("sparse l=%d %-9s %-9s failed: %s", length, case, name, entry[case][name]["failed"])
                    continue
                entry[case][name] = {"fwd_ms": forward_ms, "fwd_bwd_ms": forward_backward_ms,
                                     "x_fwd": causal_fwd / forward_ms, "x_fwd_bwd": causal_fb / forward_backward_ms}
                rows.append((length, case, name, forward_ms, forward_backward_ms, causal_fwd / forward_ms,
                             causal_fb / forward_backward_ms))
                logger.info("sparse l=%d %-9s %-9s fwd %.3f f+b %.3f x fwd %.2f f+b %.2f", *rows[-1])
            kernels.GLUON_SPARSE = kernels.GLUON_SPARSE_BACKWARD = False
            del inputs, reference
            if arguments.device == "cuda":
                torch.cuda.empty_cache()
        report["results"][str(length)] = entry
    report["wall_s"] = time.time() - started
    bench.write_json(report, arguments.output)
    print(f"{'l':>6} | {'case':<9} | {'method':<9} | {'fwd ms':>7} | {'f+b ms':>7} | {'x fwd':>5} | {'x f+b':>5}")
    for row in rows:
        print(f"{row[0]:>6} | {row[1]:<9} | {row[2]:<9} | {row[3]:>7.3f} | {row[4]:>7.3f} | {row[5]:>5.2f} | "
              f"{row[6]:>5.2f}")


if __name__ == "__main__":
    main()
