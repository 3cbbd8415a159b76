"""The SSD backward's reverse state pass on one GPU: the Gluon walk (`ssd_gluon_state_bwd`, one program per
(batch, head) sequence) against the Triton kernel it replaces (`ssd._state_bwd_kernel`, the anchor), inside a
whole forward+backward of `ssd_fused` at B·L = 65 536 tokens, on bench/ssd.py's two problems.

Per problem and L: the state pass's device time (torch.profiler, mean of 5 calls) for the Triton kernel and for the
walk at each ring depth in --stages, its share of the copy rate (dy and C~ read once, G written once; the mamba
problem's one C group counts once), and the whole forward+backward's median time (triton.testing.do_bench),
measured alternately (anchor, walk, anchor, walk) so drift shows as spread. Prints a table and writes JSON.

    python bench/ssd_state_bwd.py --lengths 4096 16384 --out bench/results/ssd_state_bwd_h200.json
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd import kernel_profile, make_problem, measure_copy_bandwidth, run_ours, time_ms, with_grad  # noqa: E402

from cheems_parallel.kernels import ssd_gluon_state_bwd  # noqa: E402

def state_pass_bytes(problem):
    """dy and C~ read once, every chunk's G (16-bit) written once."""
    dy, C = problem["dy"], problem["C"]
    batch, length, heads, head_dim = dy.shape
    chunks = length // 64
    return (dy.numel() + C.numel()) * dy.element_size() + batch * chunks * heads * head_dim * C.shape[-1] * 2


def measure(problem, config, stages):
    ssd_gluon_state_bwd.STAGES = stages
    call, leaves = run_ours(problem, 64, config, backward=True)
    launches = ssd_gluon_state_bwd.LAUNCHES
    table = kernel_profile(call, leaves)
    walked = ssd_gluon_state_bwd.LAUNCHES > launches
    state = {name: ms for name, ms in table.items() if "state_bwd" in name}
    if not state:
        print(f"no state kernel in the profile (walk launched: {walked}); kernels: {sorted(table)}")
    return sum(state.values()), walked, time_ms(call, leaves, 200)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--problems", nargs="+", default=["cheems", "mamba"], choices=["cheems", "mamba"])
    parser.add_argument("--stages", type=int, nargs="+", default=[ssd_gluon_state_bwd.STAGES],
                        help="ring depths of the walk to time (default: the module's)")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of anchor and walk")
    parser.add_argument("--min-sequences", type=int, default=None,
                        help="gluon_state_bwd_min_sequences for the walk (default: the module's bound)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    default_stages = ssd_gluon_state_bwd.STAGES
    bandwidth = measure_copy_bandwidth()
    rows = []
    for problem_name in args.problems:
        for length in args.lengths:
            rope = problem_name == "cheems"
            problem = with_grad(make_problem(args.tokens, length, 32, 128, 128, rope=rope, groups=32 if rope else 1))
            gbytes = state_pass_bytes(problem) / 1e9
            variants = [("triton", {"gluon_state_bwd": False}, default_stages)]
            walk = {"gluon_state_bwd": True, "gluon_state_bwd_min_sequences": args.min_sequences}
            variants += [(f"walk{stages}", walk, stages) for stages in args.stages]
            runs = {name: [] for name, _, _ in variants}
            for _ in range(args.rounds):
                for name, config, stages in variants:
                    state_ms, walked, total_ms = measure(problem, config, stages)
                    if walked != (name != "triton"):
                        print(f"{problem_name} L={length} {name}: the walk {'ran' if walked else 'did not run'}")
                    runs[name].append({"state_ms": state_ms, "fwd_bwd_ms": total_ms})
            ssd_gluon_state_bwd.STAGES = default_stages
            row = {"problem": problem_name, "length": length, "state_pass_GB": gbytes, "runs": runs}
            anchor = min(run["state_ms"] for run in runs["triton"])
            for name in runs:
                best = min(run["state_ms"] for run in runs[name])
                row[name] = {"state_ms": best, "copy_rate_share": gbytes * 1e9 / (best * 1e-3) / bandwidth,
                             "speedup_vs_triton": anchor / best,
                             "fwd_bwd_ms": min(run["fwd_bwd_ms"] for run in runs[name])}
            rows.append(row)
            del problem
            torch.cuda.empty_cache()
    print(f"\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s; state pass ms (best of {args.rounds}; % of the copy rate); "
          "fwd+bwd ms")
    names = [name for name, _, _ in variants]
    print(f"{'problem':8} {'L':>6} " + " ".join(f"{name:>22}" for name in names) + "  walk/triton  fwd+bwd "
          + " ".join(f"{name:>8}" for name in names))
    for row in rows:
        cells = " ".join(f"{row[name]['state_ms']:8.3f} ({100 * row[name]['copy_rate_share']:4.1f}%)      "
                         for name in names)
        speedups = " ".join(f"{row[name]['speedup_vs_triton']:.2f}x" for name in names[1:])
        totals = " ".join(f"{row[name]['fwd_bwd_ms']:8.3f}" for name in names)
        print(f"{row['problem']:8} {row['length']:6d} {cells}  {speedups:>11}  {totals}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump({"copy_bandwidth_GBps": bandwidth / 1e9, "tokens": args.tokens, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
