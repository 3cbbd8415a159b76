"""Sweep: the keep-window pre-pass (`dmattn.keep_window_thresholds`) per chunk size and counting method, against the
default settings in the same run, at bench/dmattn.py's shapes (b·l = 65 536, 16 heads, w = l/8).

Each variant's ranks and thresholds must equal the default's (exact integers), or the variant is reported as wrong.
Printed: ms per call and default/variant ratio per l and mask; last line `BEST chunk=C dot=D`, the variant with the
smallest total time over the lengths (the default when none is faster), in bench/dmattn.py --setting form.

  python bench/dmattn_thresholds.py --output bench/results/dmattn_thresholds_h200.json
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dmattn as bench  # noqa: E402  (bench/dmattn.py)

VARIANTS = [(chunk, dot) for dot in (False, True) for chunk in (128, 64, 32)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--output", default="bench/results/dmattn_thresholds_h200.json")
    arguments = parser.parse_args()
    import triton

    from cheems_parallel.kernels import dmattn as kernels

    default = (kernels.THRESHOLD_CHUNK, kernels.THRESHOLD_COUNT_BY_DOT)
    report = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "default": list(default),
              "results": []}
    totals = {variant: 0.0 for variant in VARIANTS}
    print(f"{'l':>6} | {'mask':<9} | {'chunk':>5} | {'dot':<5} | {'ms':>7} | {'default/this':>12}")
    for length in arguments.lengths:
        batch = arguments.tokens // length
        for mask_kind in ("clustered", "random"):
            mask_bias = bench.make_inputs(batch, arguments.heads, arguments.heads, length, 128, mask_kind=mask_kind,
                                          seed=1)[3].detach()
            window = length // 8
            expected = kernels.keep_window_thresholds(mask_bias, window)

            def time_variant(chunk, dot):
                return bench.median_ms(lambda: kernels.keep_window_thresholds(mask_bias, window, chunk_size=chunk,
                                                                              count_by_dot=dot), 10, 60)
            anchor = time_variant(*default)
            for chunk, dot in VARIANTS:
                result = kernels.keep_window_thresholds(mask_bias, window, chunk_size=chunk, count_by_dot=dot)
                equal = all(torch.equal(a, b) for a, b in zip(result, expected))
                milliseconds = time_variant(chunk, dot) if equal else float("inf")
                totals[(chunk, dot)] += milliseconds
                report["results"].append({"length": length, "mask": mask_kind, "chunk": chunk, "dot": dot,
                                          "equal": equal, "ms": milliseconds, "default_ms": anchor})
                shown = f"{milliseconds:>7.3f}" if equal else f"{'WRONG':>7}"
                print(f"{length:>6} | {mask_kind:<9} | {chunk:>5} | {str(dot):<5} | {shown} | "
                      f"{anchor / milliseconds:>12.2f}", flush=True)
    best = min(VARIANTS, key=lambda variant: (totals[variant], variant != default))
    report["best"] = list(best)
    os.makedirs(os.path.dirname(os.path.abspath(arguments.output)), exist_ok=True)
    with open(arguments.output, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"BEST chunk={best[0]} dot={'true' if best[1] else 'false'}")


if __name__ == "__main__":
    main()
