"""Where the Gluon forward walk's time goes: cycles per chunk in each phase of its chunk step (H200).

Runs `ssd_gluon_fwd.fused_forward` with its PROFILE build, which sums %clock64 deltas per phase over each program's
chunks, on both bench/ssd.py problems at B·L = 65 536 tokens, and prints cycles per chunk per phase beside the
plain build's time per chunk (do_bench). Phases (the kernel's order):
  0 load wait     TMA issue for a later chunk, global loads of g / dt (/ cos, sin), wait for this chunk's tiles
  1 store wait    the previous chunk's TMA stores leave shared memory; barrier
  2 operands      RoPE / weights into B~, C~, w B~ (uses the global loads); fence; barrier
  3 scores        three wgmma's issued (scores, C~ S^T, the state update); wait for the scores
  4 P             scores * Gam * dt into shared memory; fence; barrier
  5 y products    wait C~ S^T; exp(g) scale and D x; (scores * Gam * dt) x; wait for all
  6 y, S to smem  barrier; y and S (16-bit) into shared memory
  7 out           fence; barrier; TMA stores of y and S (and the final state)

Also measured in the same run: the card's copy, write-only (fill) and read-only (sum) bandwidth on 2 GiB, and each
walk without storing the chunk states (as the no-grad forward runs it): is the walk bound by what it writes?

  python bench/ssd_walk_profile.py --lengths 4096 --out bench/results/ssd_walk_profile_h200.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch
import triton

from cheems_parallel.kernels import ssd_gluon_fwd
from cheems_parallel.kernels.ssd_prologue import prologue_forward
from ssd import make_problem  # bench/ssd.py (this script's folder is on sys.path when run as a script)

PHASES = ("load wait", "store wait", "operands", "scores", "P", "y products", "y, S to smem", "out")


def problem(tokens, length, heads, dim, rope, groups):
    """bench/ssd.py's problem, through the kernels' prologue (dt, g) and with 16-bit tables, as `ssd_fused` hands
    them to the walk."""
    inputs = make_problem(tokens, length, heads, dim, dim, rope=rope, groups=groups)
    dt, g = prologue_forward(inputs["dt_raw"], inputs["dt_bias"], inputs["A"], ssd_gluon_fwd.CHUNK)
    cos, sin = inputs["cos"], inputs["sin"]
    if rope:
        cos, sin = cos.to(torch.bfloat16).contiguous(), sin.to(torch.bfloat16).contiguous()
    return inputs["x"], inputs["B"], inputs["C"], cos, sin, dt, g, inputs["D"]


def bandwidths(gib=2):
    """GB/s of copy (bytes read + written), fill (written) and sum (read) on `gib` GiB of bf16."""
    source = torch.empty(gib << 29, device="cuda", dtype=torch.bfloat16).normal_()
    target = torch.empty_like(source)
    size = source.numel() * source.element_size()
    rates = {}
    for name, call, moved in (("copy", lambda: target.copy_(source), 2 * size),
                              ("write", lambda: target.fill_(1.0), size),
                              ("read", lambda: source.sum(dtype=torch.float32), size)):
        rates[name] = moved / (triton.testing.do_bench(call, rep=200) * 1e-3) / 1e9
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--out", default="bench/results/ssd_walk_profile_h200.json")
    args = parser.parse_args()
    rows = []
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    rates = bandwidths()
    print("bandwidth GB/s: " + ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items()))
    for length in args.lengths:
        for name, rope, groups in (("mamba", False, 1), ("cheems", True, 32)):
            x, B, C, cos, sin, dt, g, D = problem(args.tokens, length, 32, 128, rope, groups)
            chunks = x.shape[0] * 32 * (length // ssd_gluon_fwd.CHUNK)

            def plain():
                return ssd_gluon_fwd.fused_forward(x, B, C, cos, sin, dt, g, D, None, rope)
            ms = triton.testing.do_bench(plain, rep=200)
            ms_no_states = triton.testing.do_bench(
                lambda: ssd_gluon_fwd.fused_forward(x, B, C, cos, sin, dt, g, D, None, False, store_states=False),
                rep=200)
            profile = torch.zeros(min(programs, x.shape[0] * 32), 8, dtype=torch.int64, device="cuda")
            ssd_gluon_fwd.fused_forward(x, B, C, cos, sin, dt, g, D, None, rope, profile=profile)
            profile.zero_()
            ssd_gluon_fwd.fused_forward(x, B, C, cos, sin, dt, g, D, None, rope, profile=profile)
            torch.cuda.synchronize()
            per_chunk = (profile.sum(0).double() / chunks * profile.shape[0] / programs).tolist()
            # cycles per chunk as one SM sees them: the sum over programs / chunks, times programs per SM (1)
            total = sum(per_chunk)
            chunks_per_sm = chunks / programs
            row = {"problem": name, "L": length, "ms": ms, "ms_without_states_or_rotated": ms_no_states,
                   "us_per_chunk_per_sm": ms * 1e3 / chunks_per_sm,
                   "cycles_per_chunk": dict(zip(PHASES, per_chunk)), "cycles_per_chunk_total": total,
                   "implied_clock_GHz": total * chunks_per_sm / (ms * 1e-3) / 1e9}
            rows.append(row)
            print(f"{name:7s} L={length:5d}: {ms:.3f} ms, {row['us_per_chunk_per_sm']:.2f} us per chunk per SM, "
                  f"{total:.0f} cycles per chunk profiled (implied clock {row['implied_clock_GHz']:.2f} GHz); "
                  f"without the states (and B~, C~) {ms_no_states:.3f} ms")
            for phase, cycles in zip(PHASES, per_chunk):
                print(f"    {phase:11s} {cycles:7.0f}  {100 * cycles / total:5.1f} %")
    with open(args.out, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "bandwidth_GBps": rates,
                   "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
