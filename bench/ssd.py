"""SSD throughput on one GPU: our Triton kernels vs mamba_ssm's `mamba_chunk_scan_combined`, the torch
reference, and the memory-bandwidth floor, forward and forward+backward, at B·L = 65 536 tokens.

Two problems per sequence length L (batch = tokens / L, bf16, dt_bias + softplus, D skip on):
  mamba   h=32 heads × p=128, state n=128, RoPE off, one group of B/C shared by all heads, for both
          mamba_ssm (the anchor measured earlier: 8.4 Mtok/s fwd+bwd) and ours (since v3; v2 materialised
          the group per head, 32× the B/C data).
  cheems  the same sizes with groups = heads and RoPE on B/C. mamba_ssm gets per-head B/C (ngroups = h)
          rotated by torch's apply_rope beforehand (that rotation is timed with it).
Mtok/s = tokens / median time (triton.testing.do_bench). Before the table, the kernel configurations in
SWEEP (GROUP_SWEEP for the mamba problem) are timed on each problem at --sweep-length; the fastest is used
for that problem's rows. The floor is the time to move each input once
and each output once at the copy bandwidth measured in the same run (forward: x, B, C, dt in, y out;
forward+backward adds dy in and dx, dB, dC, ddt out). Prints a table and writes JSON.

mamba_ssm is imported from its pure-Python wheel without its package __init__ (which loads CUDA
extensions): bench/gpu_ssd.sh installs the wheel into a folder on PYTHONPATH.

Example:
    python bench/ssd.py --lengths 1024 4096 --out bench/results/ssd_h200.json
"""
import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cheems_parallel.kernels import ssd as ssd_kernels  # noqa: E402
from cheems_parallel.ops import apply_rope, rope_tables  # noqa: E402

logger = logging.getLogger("bench.ssd")
DEVICE = "cuda"

# kernel configurations tried on each problem at one length before the table; the fastest forward+backward
# per problem is used (v2: the defaults of run 2; see bench/ssd_notes.md for each version)
V2 = {"save_rotated": False, "dqk_merged": False, "fwd_block_p": 64, "fwd_warps": 4}
SWEEP = [
    ("v2", 64, V2),
    ("v3-rot", 64, dict(V2, save_rotated=True)),
    ("v3-rot-fwd8", 64, dict(V2, save_rotated=True, fwd_block_p=128, fwd_warps=8)),
    ("v3-rot-fwd8-dqk32", 64, dict(V2, save_rotated=True, fwd_block_p=128, fwd_warps=8, dqk_block_p=32)),
    ("v3-merged", 64, dict(V2, save_rotated=True, fwd_block_p=128, fwd_warps=8, dqk_merged=True)),
    ("v3-merged-bp32", 64, dict(V2, save_rotated=True, fwd_block_p=128, fwd_warps=8, dqk_merged=True,
                                dqk_block_p=32)),
]
# the mamba problem (one B/C group): how dB/dC are summed over the group's heads
GROUP_SWEEP = [
    ("v3-rot-fwd8-sum", 64, dict(V2, save_rotated=True, fwd_block_p=128, fwd_warps=8, group_reduce="sum")),
    ("v3-merged-sum", 64, dict(V2, save_rotated=True, fwd_block_p=128, fwd_warps=8, dqk_merged=True,
                               group_reduce="sum")),
    ("v3-merged-atomic", 64, dict(V2, save_rotated=True, fwd_block_p=128, fwd_warps=8, dqk_merged=True,
                                  group_reduce="atomic")),
    ("v3-merged-bp32-atomic", 64, dict(V2, save_rotated=True, fwd_block_p=128, fwd_warps=8, dqk_merged=True,
                                       dqk_block_p=32, group_reduce="atomic")),
]


def load_mamba_chunk_scan_combined():
    """mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined without running mamba_ssm/__init__.py.

    The parent packages are registered as plain namespace modules over the wheel's own folders, so only
    the Triton submodules (and their imports) execute; nothing is replaced or stubbed."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    for name, folder in [("mamba_ssm", ""), ("mamba_ssm.ops", "ops"), ("mamba_ssm.ops.triton", "ops/triton"),
                         ("mamba_ssm.utils", "utils")]:
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, folder)]
        sys.modules[name] = module
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


def measure_copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy (the memory ceiling)."""
    import triton.testing

    source = torch.randn(1 << 30, device=DEVICE, dtype=torch.bfloat16)  # 2 GiB
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=20, rep=100, return_mode="median")
    del source, target
    return 2 * (1 << 30) * 2 / (ms * 1e-3)


def make_problem(tokens, length, heads, head_dim, state_dim, rope, groups, dtype=torch.bfloat16):
    batch = tokens // length
    device = DEVICE
    problem = {
        "x": torch.randn(batch, length, heads, head_dim, device=device, dtype=dtype),
        "dt_raw": torch.randn(batch, length, heads, device=device, dtype=torch.float32) - 2.0,
        "dt_bias": torch.randn(heads, device=device) * 0.5,
        "A": -torch.rand(heads, device=device) * 4 - 0.1,
        "B": torch.randn(batch, length, groups, state_dim, device=device, dtype=dtype) / state_dim ** 0.5,
        "C": torch.randn(batch, length, groups, state_dim, device=device, dtype=dtype) / state_dim ** 0.5,
        "D": torch.ones(heads, device=device),
    }
    if rope:
        problem["cos"], problem["sin"] = rope_tables(torch.arange(length, device=device)[None].expand(batch, -1),
                                                     state_dim)
    else:
        problem["cos"] = problem["sin"] = None
    return problem


def floor_seconds(problem, bandwidth, backward):
    """Each input read once, each output written once, at the measured copy bandwidth. B/C count as given:
    one group's bytes for the mamba problem (shared by all heads), per head for the cheems problem."""
    x, B = problem["x"], problem["B"]
    bc = B.numel() * B.element_size()
    dt_bytes = problem["dt_raw"].numel() * 4
    forward = 2 * x.numel() * x.element_size() + 2 * bc + dt_bytes        # x, B, C, dt in; y out
    if not backward:
        return forward / bandwidth
    backward_bytes = 3 * x.numel() * x.element_size() + 4 * bc + 2 * dt_bytes  # dy, x, B, C in; dx, dB, dC, ddt out
    return (forward + backward_bytes) / bandwidth


def run_ours(problem, kernel_chunk, config, backward):
    leaves = [problem[name] for name in ("x", "dt_raw", "dt_bias", "A", "B", "C", "D")]

    def call():
        y, final = ssd_kernels.ssd_fused(problem["x"], problem["dt_raw"], problem["dt_bias"], problem["A"],
                                         problem["B"], problem["C"], problem["cos"], problem["sin"],
                                         D=problem["D"], kernel_chunk=kernel_chunk, config=config)
        if backward:
            y.backward(problem["dy"])
        return y

    return call, leaves


def run_reference(problem, backward):
    leaves = [problem[name] for name in ("x", "dt_raw", "dt_bias", "A", "B", "C", "D")]

    def call():
        y, _ = ssd_kernels.ssd_fused_reference(problem["x"], problem["dt_raw"], problem["dt_bias"], problem["A"],
                                               problem["B"], problem["C"], problem["cos"], problem["sin"],
                                               chunk_size=256, D=problem["D"])
        if backward:
            y.backward(problem["dy"])
        return y

    return call, leaves


def run_mamba(mamba_fn, problem, backward):
    leaves = [problem[name] for name in ("x", "dt_raw", "dt_bias", "A", "B", "C", "D")]

    def call():
        B, C = problem["B"], problem["C"]
        if problem["cos"] is not None:
            cos, sin = problem["cos"][:, :, None], problem["sin"][:, :, None]
            B, C = apply_rope(B, cos, sin), apply_rope(C, cos, sin)
        y = mamba_fn(problem["x"], problem["dt_raw"], problem["A"], B, C, chunk_size=256, D=problem["D"],
                     dt_bias=problem["dt_bias"], dt_softplus=True)
        if backward:
            y.backward(problem["dy"])
        return y

    return call, leaves


def time_ms(call, leaves, rep_ms):
    import triton.testing

    for tensor in leaves:
        tensor.grad = None
    return triton.testing.do_bench(call, warmup=max(10, rep_ms // 4), rep=rep_ms, grad_to_none=leaves,
                                   return_mode="median")


def with_grad(problem):
    for name in ("x", "dt_raw", "dt_bias", "A", "B", "C", "D"):
        problem[name].requires_grad_(True)
    problem["dy"] = torch.randn_like(problem["x"])
    return problem


def relative_error(value, reference):
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def sweep_configs(tokens, length, heads, head_dim, state_dim, rep_ms, problem_name):
    """Fastest forward+backward kernel configuration on one problem at one length."""
    rope, groups, variants = (True, heads, SWEEP) if problem_name == "cheems" else (False, 1, SWEEP[:1] + GROUP_SWEEP)
    problem = with_grad(make_problem(tokens, length, heads, head_dim, state_dim, rope=rope, groups=groups))
    results = {}
    for name, kernel_chunk, overrides in variants:
        config = dict(ssd_kernels.CONFIG, **overrides)
        try:
            call, leaves = run_ours(problem, kernel_chunk, config, backward=True)
            results[name] = time_ms(call, leaves, rep_ms)
        except Exception as error:  # a configuration the compiler rejects (e.g. out of shared memory)
            logger.warning("config %s failed: %s", name, str(error).splitlines()[0][:200])
    for name, ms in results.items():
        print(f"  sweep {problem_name} L={length}: {name:22s} fwd+bwd {ms:7.3f} ms  {tokens / ms / 1e3:7.2f} Mtok/s")
    best = min(results, key=results.get)
    for name, kernel_chunk, overrides in variants:
        if name == best:
            return name, kernel_chunk, dict(ssd_kernels.CONFIG, **overrides), results
    raise RuntimeError("no kernel configuration ran")


def profile_kernels(tokens, length, heads, head_dim, state_dim, kernel_chunk, config, problem_name):
    """Per-kernel device time of one forward+backward of ours on one problem, from torch.profiler."""
    rope, groups = (True, heads) if problem_name == "cheems" else (False, 1)
    problem = with_grad(make_problem(tokens, length, heads, head_dim, state_dim, rope=rope, groups=groups))
    call, leaves = run_ours(problem, kernel_chunk, config, backward=True)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(5):
            for tensor in leaves:  # no gradient accumulation adds in the breakdown
                tensor.grad = None
            call()
        torch.cuda.synchronize()
    table = {}
    for event in profiler.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us:
            table[event.key] = device_us / 5 / 1e3
    total = sum(table.values())
    print(f"\nkernel breakdown, ours fwd+bwd, {problem_name} L={length} (ms per step; sum {total:.3f}):")
    for key, ms in sorted(table.items(), key=lambda item: -item[1])[:14]:
        print(f"  {ms:7.3f}  {key[:90]}")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536, help="B·L tokens per step (default 65536)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                        help="sequence lengths L to measure")
    parser.add_argument("--heads", type=int, default=32, help="SSD heads h")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim p")
    parser.add_argument("--state", type=int, default=128, help="state size n")
    parser.add_argument("--rep-ms", type=int, default=60, help="milliseconds of repeats per timing")
    parser.add_argument("--sweep-length", type=int, default=4096, help="L at which the kernel configs are swept")
    parser.add_argument("--no-sweep", action="store_true", help="use the module's default config")
    parser.add_argument("--profile-length", type=int, default=4096, help="L of the per-kernel breakdown (0: none)")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the torch reference")
    parser.add_argument("--out", default="bench/results/ssd_h200.json", help="JSON output path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for length in args.lengths + [args.sweep_length, args.profile_length]:
        if length > args.tokens or (length and args.tokens % length):
            parser.error(f"--tokens {args.tokens} must be a multiple of every length, got {length}")
    if not torch.cuda.is_available():
        print("bench/ssd.py: needs a CUDA GPU (run it on the H200 through bench/gpu_ssd.sh)", file=sys.stderr)
        return 2

    started = time.time()
    bandwidth = measure_copy_bandwidth()
    mamba_fn = load_mamba_chunk_scan_combined()
    if mamba_fn is None:
        logger.warning("mamba_ssm not importable: anchoring on the torch reference and the floor only")
    h, p, n = args.heads, args.head_dim, args.state
    chosen, sweeps, breakdown = {}, {}, {}
    for problem_name in ("mamba", "cheems"):
        if args.no_sweep:
            chosen[problem_name] = ("default", ssd_kernels.KERNEL_CHUNK, dict(ssd_kernels.CONFIG))
        else:
            name, kernel_chunk, config, sweeps[problem_name] = sweep_configs(args.tokens, args.sweep_length, h, p, n,
                                                                             args.rep_ms, problem_name)
            chosen[problem_name] = (name, kernel_chunk, config)
        print(f"config {problem_name}: {chosen[problem_name][0]} (kernel chunk {chosen[problem_name][1]}) "
              f"{chosen[problem_name][2]}")
        if args.profile_length:
            try:  # diagnostics only: a profiler problem must not cost the table
                breakdown[problem_name] = profile_kernels(args.tokens, args.profile_length, h, p, n,
                                                          chosen[problem_name][1], chosen[problem_name][2],
                                                          problem_name)
            except Exception as error:
                logger.warning("kernel breakdown failed: %s", str(error).splitlines()[0][:200])
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": importlib.import_module("triton").__version__, "tokens": args.tokens,
              "heads": h, "head_dim": p, "state": n, "dtype": "bfloat16",
              "copy_bandwidth_GBps": bandwidth / 1e9,
              "config_name": {name: chosen[name][0] for name in chosen},
              "kernel_chunk": {name: chosen[name][1] for name in chosen},
              "config": {name: chosen[name][2] for name in chosen},
              "sweep_fwd_bwd_ms": sweeps, "sweep_length": args.sweep_length,
              "kernel_breakdown_ms": breakdown, "problems": {}}
    rows = []
    for problem_name, rope in (("mamba", False), ("cheems", True)):
        per_length = {}
        _, kernel_chunk, config = chosen[problem_name]
        for length in args.lengths:
            groups = 1 if problem_name == "mamba" else h
            entry = {}
            for backward in (False, True):
                mode = "fwd_bwd" if backward else "fwd"
                problem = make_problem(args.tokens, length, h, p, n, rope, groups)
                if backward:
                    problem = with_grad(problem)
                ours_problem = problem  # the same tensors: one shared B/C group for the mamba problem
                timings = {}
                call, leaves = run_ours(ours_problem, kernel_chunk, config, backward)
                timings["ours"] = time_ms(call, leaves, args.rep_ms)
                if mamba_fn is not None:
                    call, leaves = run_mamba(mamba_fn, problem, backward)
                    timings["mamba_ssm"] = time_ms(call, leaves, args.rep_ms)
                if not args.skip_reference:
                    call, leaves = run_reference(ours_problem, backward)
                    timings["torch_reference"] = time_ms(call, leaves, max(20, args.rep_ms // 3))
                if not backward:  # same function: our output against the reference and mamba_ssm
                    with torch.no_grad():
                        y_ours = run_ours(ours_problem, kernel_chunk, config, False)[0]()
                        y_ref = run_reference(ours_problem, False)[0]()
                        entry["rel_err_vs_reference"] = relative_error(y_ours, y_ref)
                        if mamba_fn is not None:
                            entry["rel_err_vs_mamba"] = relative_error(y_ours, run_mamba(mamba_fn, problem, False)[0]())
                floor = floor_seconds(problem, bandwidth, backward) * 1e3
                result = {name + "_ms": ms for name, ms in timings.items()}
                result.update({name + "_Mtok_s": args.tokens / ms / 1e3 for name, ms in timings.items()})
                result["floor_ms"] = floor
                result["floor_Mtok_s"] = args.tokens / floor / 1e3
                result["ours_over_floor"] = timings["ours"] / floor
                if "mamba_ssm" in timings:
                    result["speedup_vs_mamba"] = timings["mamba_ssm"] / timings["ours"]
                if "torch_reference" in timings:
                    result["speedup_vs_reference"] = timings["torch_reference"] / timings["ours"]
                entry[mode] = result
                del problem, ours_problem
                torch.cuda.empty_cache()
            per_length[str(length)] = entry
            for mode in ("fwd", "fwd_bwd"):
                r = entry[mode]
                rows.append((problem_name, length, mode, r["ours_Mtok_s"], r.get("mamba_ssm_Mtok_s", float("nan")),
                             r.get("torch_reference_Mtok_s", float("nan")), r["floor_Mtok_s"],
                             r.get("speedup_vs_mamba", float("nan")), r["ours_over_floor"]))
        report["problems"][problem_name] = per_length
    report["wall_seconds"] = time.time() - started

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    temporary = args.out + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(report, handle, indent=1)
    os.replace(temporary, args.out)  # never a half-written JSON that looks valid

    print(f"\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s; Mtok/s at {args.tokens} tokens; h={h} p={p} n={n} bf16")
    print(f"{'problem':8s} {'L':>6s} {'mode':8s} {'ours':>8s} {'mamba':>8s} {'torch':>8s} {'floor':>8s} "
          f"{'x mamba':>8s} {'/floor':>7s}")
    for problem_name, length, mode, ours, mamba, ref, floor, speedup, over in rows:
        print(f"{problem_name:8s} {length:6d} {mode:8s} {ours:8.2f} {mamba:8.2f} {ref:8.2f} {floor:8.1f} "
              f"{speedup:8.2f} {over:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
