"""Where the host's time goes in one `ssd_fused` forward+backward (cProfile, GPU machine).

At cheems-320m's size (8 x 2048 tokens, 8 heads) the kernels take ~0.45 ms per forward+backward and the host
~2.3-2.8 ms to issue them (bench/ssd_walk_threshold.py), so the SSD layer's time there is the host's. This prints
the functions with the most time per call, own and cumulative.

  python bench/ssd_host_profile.py [--batch 8 --length 2048 --heads 8 --calls 50]
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch

from ssd import make_problem, run_ours, with_grad  # bench/ssd.py


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--top", type=int, default=35)
    args = parser.parse_args()
    problem = with_grad(make_problem(args.batch * args.length, args.length, args.heads, 128, 128, rope=True,
                                     groups=args.heads))
    call, leaves = run_ours(problem, 64, None, True)

    def calls(count):
        for _ in range(count):
            for tensor in leaves:
                tensor.grad = None
            call()
            torch.cuda.synchronize()   # keeps the launch queue empty: what is timed is the host's own work
    calls(5)
    start = time.perf_counter()
    calls(args.calls)
    per_call = (time.perf_counter() - start) / args.calls * 1e3
    profiler = cProfile.Profile()
    profiler.enable()
    calls(args.calls)
    profiler.disable()
    print(f"forward+backward: {per_call:.3f} ms per call (host work + GPU time, one call in flight)")
    stats = pstats.Stats(profiler).strip_dirs()
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
