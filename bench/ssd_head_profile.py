"""Where the Gluon head backward's time goes: cycles per tile in each phase of its two consumers (H200).

Runs `ssd_gluon_head_bwd.fused_head_backward` (the Cheems shape's backward: groups = heads) with its PROFILE build,
which sums %clock64 deltas per phase over each program's tiles, at B·L = 65 536 tokens, h = 32, p = n = 128, and
prints cycles per tile per phase beside the plain build's time per tile (do_bench). Inputs have the shapes the
layer hands the kernel (the forward's chunk states, B~, C~, the prologue's dt and g); their values are random, which
changes no instruction count or byte.

C side phases: 0 top (g loads, wait for the ring slot)
               1 S product (wait for S / G, (exp(g) dy) S, wait; release the previous slot)
               2 scores, dy x^T (issue, wait)
               3 decay, W; scores * Gam and W to shared memory; hand-off
               4 dg share, carried term (reductions)
               5 W k (issue, wait), dD; tell the B side the slot's tiles are free (c_read)
               6 epilogue (dg store, un-rotate dC: tables' loads; wait for the B side's k G^T, stage dC in k, TMA store)
B side phases: 0 top
               1 G products (k G^T, (w dt x) G, <S, G>; wait; release the previous slot)
               2 carried term of dg
               3 wait for the C side's hand-off
               4 dv, W^T q (issue, wait)
               5 d dt, dx (wait for c_read, stage dx in x, TMA store)
               6 epilogue (dg store, un-rotate dB, stage it in q, TMA store)
Both sides also report "of which S / G wait": the part of phase 1 spent waiting for the state tiles.

    python bench/ssd_head_profile.py --out bench/results/ssd_head_profile_h200.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch
import triton

from cheems_parallel.kernels import ssd_gluon_head_bwd
from ssd_walk_profile import problem as walk_problem  # bench/ (this script's folder is on sys.path as a script)

SIDES = {
    "C side": ("top", "S product", "scores, dy x^T", "decay, W, hand-off", "dg reductions", "W k, dD, release",
               "epilogue dC", "of which S / G wait"),
    "B side": ("top", "G products", "carried", "hand-off wait", "dv, W^T q", "d dt, dx, release", "epilogue dB",
               "of which S / G wait"),
}

# the default build only (v21 and v23 also ran the plain-stores, early-vectors, <S, G>-split, <S, G>-as-a-product and
# early-tables variants here; bench/ssd_notes.md has their numbers)
VARIANTS = {"default": {}}   # e.g. "b_side_240": {"b_side_registers": 240} (v26 compared 240, 248, 256)


def inputs(tokens, length, heads, dim, rope):
    """The kernel's arguments for bench/ssd.py's Cheems problem (RoPE on or off): the walk profile's inputs (through
    the kernels' prologue, 16-bit tables), a random dy and random chunk states and state gradients."""
    x, B, C, cos, sin, dt, g, D = walk_problem(tokens, length, heads, dim, rope, heads)
    states = 0.1 * torch.randn(x.shape[0], length // ssd_gluon_head_bwd.CHUNK + 1, heads, dim, dim, device=x.device,
                               dtype=x.dtype)
    tables = ssd_gluon_head_bwd.fragment_tables(cos, sin) if rope else None
    return (x, torch.randn_like(x), B, C, tables, dt, g, D, states, 0.1 * torch.randn_like(states))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--out", default="bench/results/ssd_head_profile_h200.json")
    parser.add_argument("--rope-only", action="store_true", help="skip the RoPE-off rows (half the compiles)")
    args = parser.parse_args()
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for rope in (True, ) if args.rope_only else (True, False):
        arguments = inputs(args.tokens, args.length, 32, 128, rope)
        tiles = args.tokens // ssd_gluon_head_bwd.CHUNK * 32
        tiles_per_sm = tiles / min(programs, tiles)
        for variant, options in VARIANTS.items():
            def run(profile=None):
                return ssd_gluon_head_bwd.fused_head_backward(*arguments, profile=profile, **options)
            ms = triton.testing.do_bench(run, rep=200)
            profile = torch.zeros(min(programs, tiles), 2, 8, dtype=torch.int64, device="cuda")
            profiled_ms = triton.testing.do_bench(lambda: run(profile), rep=50)
            profile.zero_()
            run(profile)
            torch.cuda.synchronize()
            per_tile = (profile.sum(0).double() / tiles).tolist()
            row = {"problem": "cheems" if rope else "cheems, RoPE off", "L": args.length, "variant": variant,
                   "ms": ms, "profile_build_ms": profiled_ms, "us_per_tile_per_sm": ms * 1e3 / tiles_per_sm,
                   "sides": {}}
            print(f"{row['problem']}, L={args.length}, {variant}: {ms:.3f} ms "
                  f"({profiled_ms:.3f} profile build), {row['us_per_tile_per_sm']:.2f} us per tile per SM")
            for side_index, (side, phases) in enumerate(SIDES.items()):
                cycles = per_tile[side_index][:len(phases)]
                total = sum(cycles[:-1])   # the last entry is part of phase 1
                row["sides"][side] = {"cycles_per_tile": dict(zip(phases, cycles)), "total": total,
                                      "implied_clock_GHz": total * tiles_per_sm / (profiled_ms * 1e-3) / 1e9}
                print(f"  {side}: {total:.0f} cycles per tile (implied clock "
                      f"{row['sides'][side]['implied_clock_GHz']:.2f} GHz): " +
                      ", ".join(f"{phase} {value:.0f}" for phase, value in zip(phases, cycles)))
            rows.append(row)
    with open(args.out, "w") as handle:
        json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
