"""The SSD kernels with documents (seq_idx, a state reset at each boundary): the Gluon forward walk against the
Triton forward, forward and forward+backward, on bench/ssd.py's Cheems shape (B·L = 65 536, h = 32, p = n = 128,
RoPE, bf16) with a few documents per row at random boundaries, in one run: the defaults (Gluon forward walk and Gluon
head backward, both with documents since session 13), the walk with the Triton backward, and the Triton kernels
alone (what documents ran on before). Prints the table last; JSON to --out.

  python bench/ssd_documents.py --out bench/results/ssd_documents_h200.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch

from ssd import make_problem, run_ours, time_ms, with_grad  # bench/ssd.py (this script's folder is on sys.path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--documents", type=int, default=8, help="documents per row (boundaries at random)")
    parser.add_argument("--rep-ms", type=int, default=300)
    parser.add_argument("--out", default="bench/results/ssd_documents_h200.json")
    args = parser.parse_args()
    rows = []
    for length in args.lengths:
        problem = with_grad(make_problem(args.tokens, length, 32, 128, 128, rope=True, groups=32))
        batch = args.tokens // length
        ids = torch.randint(0, args.documents, (batch, length), device="cuda")
        problem["seq_idx"] = torch.sort(ids, dim=1).values

        def timed(config, backward):
            call, leaves = run_ours(problem, 64, config, backward)
            if backward:
                return time_ms(call, leaves, args.rep_ms)
            with torch.no_grad():
                return time_ms(call, [], args.rep_ms)
        row = {"L": length, "documents_per_row": args.documents}
        row["fwd_walk_ms"] = timed({"gluon_fwd": True}, False)
        row["fwd_triton_ms"] = timed({"gluon_fwd": False}, False)
        row["fwd_bwd_gluon_ms"] = timed({"gluon_fwd": True, "gluon_head_bwd": True}, True)
        row["fwd_bwd_walk_triton_bwd_ms"] = timed({"gluon_fwd": True, "gluon_head_bwd": False}, True)
        row["fwd_bwd_triton_ms"] = timed({"gluon_fwd": False, "gluon_head_bwd": False}, True)
        row["fwd_speedup"] = row["fwd_triton_ms"] / row["fwd_walk_ms"]
        row["fwd_bwd_speedup"] = row["fwd_bwd_triton_ms"] / row["fwd_bwd_gluon_ms"]
        rows.append(row)
    print(f"Cheems shape with documents ({args.documents} per row), B·L={args.tokens}, h=32, p=n=128, bf16 (ms): "
          "forward walk vs Triton; fwd+bwd all Gluon / walk + Triton backward / all Triton")
    print(f"{'L':>6} | {'fwd walk':>9} {'triton':>8} {'x':>5} | {'gluon':>7} {'walk+tri':>8} {'triton':>7} {'x':>5}")
    for row in rows:
        print(f"{row['L']:6d} | {row['fwd_walk_ms']:9.3f} {row['fwd_triton_ms']:8.3f} {row['fwd_speedup']:5.2f} | "
              f"{row['fwd_bwd_gluon_ms']:7.3f} {row['fwd_bwd_walk_triton_bwd_ms']:8.3f} {row['fwd_bwd_triton_ms']:7.3f} "
              f"{row['fwd_bwd_speedup']:5.2f}")
    with open(args.out, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
