"""From how many (batch, head) sequences the Gluon forward walk beats the Triton forward (H200).

The walk runs one program per sequence on at most one SM each, so with few sequences most SMs idle, while the
Triton forward spreads the chunks over the whole GPU. `ssd_gluon_fwd.enough_sequences` picks between them by
`gluon_fwd_min_sequences`; this measures where the crossover is, on the Cheems shape (RoPE, groups = heads,
p = n = 128) at cheems-320m's heads (8) and sequence length (2048), varying the micro-batch: forward+backward and
the no-grad forward, walk forced on (min 1 sequence) against off, in the same run. For forward+backward also the
kernels' device time per call (torch.profiler) and the host's time to issue one call (10 calls
issued without a synchronisation): where the host is the slower side, do_bench's time is the host's and the choice
of forward cannot show. Prints the table last; JSON to --out.

  python bench/ssd_walk_threshold.py --out bench/results/ssd_walk_threshold_h200.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import time

import torch

from ssd import kernel_profile, make_problem, run_ours, time_ms, with_grad  # bench/ssd.py (this script's folder is on sys.path)

WALK = {"gluon_fwd": True, "gluon_fwd_min_sequences": 1}
TRITON = {"gluon_fwd": False}


def host_ms(call, leaves, calls=10):
    """The host's time to issue one call: `calls` calls without synchronising (few enough launches that the
    launch queue does not fill and make the host wait for the GPU)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        for tensor in leaves:
            tensor.grad = None
        call()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued / calls * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 6, 8, 10, 12, 14, 16, 20, 32])
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--out", default="bench/results/ssd_walk_threshold_h200.json")
    args = parser.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for batch in args.batches:
        problem = with_grad(make_problem(batch * args.length, args.length, args.heads, 128, 128, rope=True,
                                         groups=args.heads))
        row = {"batch": batch, "sequences": batch * args.heads, "tokens": batch * args.length}
        for mode, backward in (("fwd_bwd", True), ("fwd", False)):
            for name, config in (("walk", WALK), ("triton", TRITON)):
                call, leaves = run_ours(problem, 64, config, backward)
                if backward:
                    row[f"{mode}_{name}_ms"] = time_ms(call, leaves, args.rep_ms)
                    kernels = kernel_profile(call, leaves)
                    row[f"{mode}_{name}_kernel_ms"] = sum(kernels.values())
                    row[f"{mode}_{name}_host_ms"] = host_ms(call, leaves)
                else:
                    with torch.no_grad():
                        row[f"{mode}_{name}_ms"] = time_ms(call, [], args.rep_ms)
            row[f"{mode}_walk_speedup"] = row[f"{mode}_triton_ms"] / row[f"{mode}_walk_ms"]
        rows.append(row)
        del problem
    print(f"Cheems shape, L={args.length}, h={args.heads}, p=n=128, bf16, {sms} SMs: walk (forced on) vs Triton forward")
    print("fwd+bwd: do_bench ms (kernels' device ms / host ms to issue a call), walk and Triton forward; fwd: no-grad")
    print(f"{'batch':>5} {'seqs':>5} {'seqs/SM':>7} | {'fwd+bwd walk':>22} {'triton':>22} {'speedup':>7} | "
          f"{'fwd walk':>8} {'triton':>8} {'speedup':>7}")
    for row in rows:
        cells = [f"{row[f'fwd_bwd_{name}_ms']:6.3f} ({row[f'fwd_bwd_{name}_kernel_ms']:5.3f}/"
                 f"{row[f'fwd_bwd_{name}_host_ms']:5.3f})" for name in ("walk", "triton")]
        print(f"{row['batch']:5d} {row['sequences']:5d} {row['sequences'] / sms:7.2f} | {cells[0]:>22} {cells[1]:>22} "
              f"{row['fwd_bwd_walk_speedup']:7.2f} | "
              f"{row['fwd_walk_ms']:8.3f} {row['fwd_triton_ms']:8.3f} {row['fwd_walk_speedup']:7.2f}")
    with open(args.out, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "sms": sms, "length": args.length, "heads": args.heads,
                   "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
