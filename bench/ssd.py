"""SSD throughput on one GPU: our Triton kernels vs mamba_ssm's `mamba_chunk_scan_combined`, the torch
reference, and the memory-bandwidth floor, forward and forward+backward, at B·L = 65 536 tokens.

Two problems per sequence length L (batch = tokens / L, bf16, dt_bias + softplus, D skip on):
  mamba   h=32 heads × p=128, state n=128, RoPE off, one group of B/C shared by all heads, for both
          mamba_ssm (the anchor measured earlier: 8.4 Mtok/s fwd+bwd) and ours (since v3; v2 materialised
          the group per head, 32× the B/C data).
  cheems  the same sizes with groups = heads and RoPE on B/C. mamba_ssm gets per-head B/C (ngroups = h)
          rotated by torch's apply_rope beforehand (that rotation is timed with it).
Mtok/s = tokens / median time (triton.testing.do_bench). Before the table, the kernel configurations in
SWEEP are timed on each problem at --sweep-length (per-kernel profiles, and the per-kernel-group
combination); the fastest is used for that problem's rows (--no-sweep: the module's defaults). The floor is the time to move each input once
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

# kernel configurations tried on each problem at one length before the table (v2/v3: bench/ssd_notes.md).
# v4 sweep: each variant changes several kernels' tiles at once; the per-kernel profile of every variant
# (`sweep_configs`) then picks the fastest setting of each kernel group separately (the groups' knobs are
# independent: fwd_* -> _chunk_fwd, state_* -> _state_fwd + _state_bwd, bwd_* / dx_group* -> the dx kernels,
# dqk_* -> the dB/dC kernels), and that combination is timed as "combined" (among the variants with the
# fastest one's kernel chunk and shared scores).
V2 = {"save_rotated": False, "dqk_merged": False, "fwd_block_p": 64, "fwd_warps": 4}
V3 = {"fwd_block_p": 128, "fwd_warps": 8, "fwd_save_block_p": 128, "fwd_save_warps": 8, "bwd_block_p": 128,
      "bwd_warps": 8, "bwd_stages": 1, "bwd_chunks_per_program": 1, "dqk_maxnreg": None}   # v3's defaults
LOOP = {"fwd_chunks_per_program": 4, "fwd_stages": 2}
DX_LOOP = {"bwd_chunks_per_program": 4, "bwd_stages": 2}
# call 1 of v4 (its variants were relative to V3; the winners are v4's defaults, bench/ssd_notes.md)
SWEEP_V4_CALL1 = [
    ("v3", 64, V3),
    ("v4-a", 64, dict(V3, fwd_block_p=64, fwd_warps=4, state_block_nh=64, state_warps=8,
                      bwd_block_p=64, bwd_warps=4, dqk_maxnreg=128)),
    ("v4-b", 64, dict(V3, **LOOP, **DX_LOOP, state_block_nh=64, state_warps=4, dqk_stages=3)),
    ("v4-c", 64, dict(V3, **LOOP, **DX_LOOP, fwd_block_p=64, fwd_warps=4, bwd_block_p=64, bwd_warps=8,
                      dqk_block_p=32)),
    ("v4-d", 64, dict(V3, **LOOP, **DX_LOOP, fwd_block_p=64, fwd_warps=8, bwd_block_p=64, bwd_warps=4,
                      dqk_stages=1)),
    ("v4-e", 64, dict(V3, fwd_maxnreg=128, bwd_maxnreg=128, state_maxnreg=96, dqk_block_p=32, dqk_maxnreg=128)),
]
# v4's call 2 and v9/v10's sweeps (sub-tiled chunks, shared scores in the backward, atomics, the group dB/dC
# kernel's stages) are recorded with their configs and numbers in bench/ssd_notes.md and bench/results/.
# v13 / v14 (session 9): the forward and the per-head dB/dC with full-width n operands; their sweeps (and v12's,
# v11's) are in bench/ssd_notes.md and bench/results/ssd_v1[1-4]_sweep_h200.json. The list below is the v14
# defaults (the reference of the "diff" column) and their nearest untried neighbours.
# v15: the merged one-launch dB/dC/dg kernel in full width (`dqk_merged`, the default for groups = heads since
# session 10); v16: the Gluon fused group backward (`gluon_bwd`). Their sweeps: bench/results/ssd_v16_sweep_h200.*.
SWEEP = [
    ("v19", 64, {"gluon_fwd": True}),
    ("v18", 64, {"gluon_fwd": False}),
    ("v17", 64, {"gluon_head_bwd": False}),
    ("v16-no-gluon", 64, {"gluon_bwd": False}),
]
# which config keys belong to which kernels (for the per-kernel combination)
KNOBS = {"fwd": ("_chunk_fwd_kernel", "_scores_kernel", "_fused_fwd_kernel"), "state": ("_state_fwd_kernel", "_state_bwd_kernel"),
         "bwd": ("_chunk_bwd_dx_kernel", "_chunk_bwd_dx_group_kernel", "_fused_group_bwd_kernel",
                 "_fused_head_bwd_kernel"),
         "dqk": ("_chunk_bwd_dbc_kernel", "_chunk_bwd_dqk_kernel", "_chunk_bwd_dqk_group_kernel")}


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
                                         D=problem["D"], seq_idx=problem.get("seq_idx"), kernel_chunk=kernel_chunk,
                                         config=config)
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


def kernel_profile(call, leaves, iterations=5):
    """Per-kernel device ms of one call (mean over `iterations`), from torch.profiler."""
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(iterations):
            for tensor in leaves:  # no gradient accumulation adds in the breakdown
                tensor.grad = None
            call()
        torch.cuda.synchronize()
    table = {}
    for event in profiler.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us:
            table[event.key] = device_us / iterations / 1e3
    return table


def print_breakdown(title, table, top=14):
    print(f"\nkernel breakdown, {title} (ms per call; sum {sum(table.values()):.3f}):")
    for key, ms in sorted(table.items(), key=lambda item: -item[1])[:top]:
        print(f"  {ms:7.3f}  {key[:90]}")


def _problem_shape(problem_name, heads):
    return (True, heads) if problem_name == "cheems" else (False, 1)


def _precompile_job(job):
    """Worker: one forward+backward and one no-grad forward of one config on a small problem, so that its
    kernels land in Triton's on-disk cache (same integer specializations as the timed problems)."""
    problem_name, tokens, length, heads, head_dim, state_dim, kernel_chunk, overrides = job
    started = time.time()
    try:
        rope, groups = _problem_shape(problem_name, heads)
        config = dict(ssd_kernels.CONFIG, **overrides)
        problem = make_problem(tokens, length, heads, head_dim, state_dim, rope=rope, groups=groups)
        run_ours(problem, kernel_chunk, config, backward=False)[0]()
        run_ours(with_grad(problem), kernel_chunk, config, backward=True)[0]()
        torch.cuda.synchronize()
        return None, time.time() - started
    except Exception as error:
        return str(error).splitlines()[0][:200], time.time() - started


def precompile(jobs, processes=12):
    """Compile many configs at once in worker processes (Triton compiles one kernel at a time per process)."""
    import multiprocessing

    started = time.time()
    try:
        with multiprocessing.get_context("spawn").Pool(min(processes, len(jobs))) as pool:
            results = pool.map(_precompile_job, jobs, chunksize=1)
    except Exception as error:  # only a speed-up: the timed runs compile whatever is missing
        logger.warning("precompile failed: %s", str(error).splitlines()[0][:200])
        return
    failed = [(job[0], job[-1], error) for job, (error, _) in zip(jobs, results) if error]
    print(f"precompiled {len(jobs)} configs in {time.time() - started:.0f} s; failed: {failed or 'none'}")


def _close(a, b):
    return relative_error(a, b) if a is not None and b is not None else float("nan")


def _knob_values(config, knob):
    """Every setting of one kernel group in a config, unset ones at their launcher defaults."""
    values = {key: value for key, value in config.items() if key.startswith(knob + "_") and "nograd" not in key}
    if knob == "dqk":  # the two-launch backward and its group sum come with its tiles
        values.update(dqk_merged=config.get("dqk_merged"), group_reduce=config.get("group_reduce"))
    if knob == "bwd":  # the dx kernel: per head ("bwd_*") or per group ("dx_group*")
        values.update({key: value for key, value in config.items() if key.startswith("dx_group")})
    values.setdefault(knob + "_maxnreg", None)
    if knob in ("fwd", "bwd"):
        values.setdefault(knob + "_chunks_per_program", 1)
    return values


def sweep_configs(tokens, length, heads, head_dim, state_dim, rep_ms, problem_name, variants=None):
    """Time every SWEEP variant on one problem (forward+backward and no-grad forward, with per-kernel
    profiles), combine the fastest setting of each kernel group (KNOBS) into "combined", time that too,
    and return the fastest forward+backward config, with "fwd_nograd_*" set from the fastest no-grad forward."""
    rope, groups = _problem_shape(problem_name, heads)
    problem = with_grad(make_problem(tokens, length, heads, head_dim, state_dim, rope=rope, groups=groups))
    plain = make_problem(tokens, length, heads, head_dim, state_dim, rope=rope, groups=groups)
    for name in plain:  # the same values, no gradients wanted: the no-grad forward path
        if problem.get(name) is not None and name != "dy":
            plain[name] = problem[name].detach()
    results, profiles, fwd_profiles, fwd_ms, errors, configs = {}, {}, {}, {}, {}, {}
    reference_outputs = None

    def measure(name, kernel_chunk, config):
        try:
            call, leaves = run_ours(problem, kernel_chunk, config, backward=True)
            for tensor in leaves:
                tensor.grad = None
            y = call()
            outputs = [y.detach().clone()] + [problem[k].grad.clone() for k in ("x", "B", "C", "dt_raw")]
            results[name] = time_ms(call, leaves, rep_ms)
            profiles[name] = kernel_profile(call, leaves)
            fwd_call, _ = run_ours(plain, kernel_chunk, config, backward=False)
            fwd_ms[name] = time_ms(fwd_call, [], rep_ms)
            fwd_profiles[name] = kernel_profile(fwd_call, [])
            configs[name] = (kernel_chunk, config)
            return outputs
        except Exception as error:  # a configuration the compiler rejects (e.g. out of shared memory)
            logger.warning("config %s failed: %s", name, str(error).splitlines()[0][:200])
            return None

    for name, kernel_chunk, overrides in (variants or SWEEP):
        outputs = measure(name, kernel_chunk, dict(ssd_kernels.CONFIG, **overrides))
        if outputs is not None:
            if reference_outputs is None:
                reference_outputs = outputs
            errors[name] = [round(_close(a, b), 6) for a, b in zip(outputs, reference_outputs)]

    def kernel_ms(table, kernels):
        return sum(ms for key, ms in table.items() if any(key.startswith(k) for k in kernels))

    # the combination: per kernel group, the variant whose kernels of that group were fastest, among the
    # variants with the fastest one's layout (kernel chunk and shared scores: the kernels' work depends on it)
    fastest = min(results, key=results.get)

    def layout(name):
        chunk, config = configs[name]
        return chunk, config.get("shared_scores", False)

    same_layout = [name for name in profiles if layout(name) == layout(fastest)]
    combined = {"shared_scores": configs[fastest][1].get("shared_scores")}
    picks = {}
    for knob, kernels in KNOBS.items():
        best = min(same_layout, key=lambda name: kernel_ms(profiles[name], kernels))
        picks[knob] = (best, round(kernel_ms(profiles[best], kernels), 4))
        combined.update(_knob_values(configs[best][1], knob))
    # no-grad forward: the fastest _chunk_fwd among the variants (state kernels as chosen above)
    best_fwd = min(same_layout, key=lambda name: kernel_ms(fwd_profiles[name], ("_chunk_fwd_kernel",)))
    picks["fwd_nograd"] = (best_fwd, round(kernel_ms(fwd_profiles[best_fwd], ("_chunk_fwd_kernel",)), 4))
    combined.update({key.replace("fwd_", "fwd_nograd_", 1): value
                     for key, value in _knob_values(configs[best_fwd][1], "fwd").items() if "save" not in key})
    combined_config = dict(ssd_kernels.CONFIG, **combined)
    outputs = measure("combined", configs[fastest][0], combined_config)
    if outputs is not None:
        errors["combined"] = [round(_close(a, b), 6) for a, b in zip(outputs, reference_outputs)]

    print(f"\nsweep {problem_name} L={length} (ms; per kernel: state_fwd chunk_fwd | state_bwd dx dbc; "
          f"rel. diff vs the first entry of y, dx, dB, dC, d dt_raw):")
    columns = (("_state_fwd_kernel",), ("_chunk_fwd_kernel", "_fused_fwd_kernel"), ("_state_bwd_kernel",), KNOBS["bwd"],
               KNOBS["dqk"])
    for name in results:
        per_kernel = " ".join(f"{kernel_ms(profiles[name], kernels):6.3f}" for kernels in columns)
        fwd_kernels = " ".join(f"{kernel_ms(fwd_profiles[name], kernels):6.3f}" for kernels in columns[:2])
        print(f"  {name:12s} fwd+bwd {results[name]:7.3f} ms ({tokens / results[name] / 1e3:6.2f} Mtok/s) "
              f"[{per_kernel}]  fwd {fwd_ms[name]:6.3f} ms ({tokens / fwd_ms[name] / 1e3:6.2f}) [{fwd_kernels}]  "
              f"diff {errors.get(name)}")
    print(f"  picks: {picks}")
    best = min(results, key=results.get)
    sweep = {"fwd_bwd_ms": results, "fwd_ms": fwd_ms, "picks": picks, "diff_vs_v3": errors,
             "kernel_ms": profiles, "fwd_kernel_ms": fwd_profiles, "combined": combined}
    return best, configs[best][0], configs[best][1], sweep


def profile_kernels(tokens, length, heads, head_dim, state_dim, kernel_chunk, config, problem_name, mamba_fn=None):
    """Per-kernel device time of one forward+backward of ours (and of mamba_ssm) on one problem."""
    rope, groups = _problem_shape(problem_name, heads)
    problem = with_grad(make_problem(tokens, length, heads, head_dim, state_dim, rope=rope, groups=groups))
    table = kernel_profile(*run_ours(problem, kernel_chunk, config, backward=True))
    print_breakdown(f"ours fwd+bwd, {problem_name} L={length}", table)
    result = {"ours": table}
    if mamba_fn is not None:
        result["mamba_ssm"] = kernel_profile(*run_mamba(mamba_fn, problem, backward=True))
        print_breakdown(f"mamba_ssm fwd+bwd, {problem_name} L={length}", result["mamba_ssm"], top=16)
    return result


def compile_report(overrides, kernel_chunk=64, batch=2, length=1024, heads=32, head_dim=128, state_dim=128):
    """Registers, stack (spills), shared memory and HGMMA count of every kernel launch of one forward+backward,
    compiled for sm_90 on this machine, no GPU needed (needs Triton's bundled cuobjdump). Each `kernel[grid]`
    of the launchers is intercepted and compiled with the JIT's specialization: integer arguments equal to 1
    become constants, integers and (16-byte aligned) pointers divisible by 16 get that hint. Without those
    hints the unit-stride loads are not known to be contiguous and the report shows spills that the GPU's
    compile does not have (bench/ssd_notes.md, v4)."""
    import triton

    from sm90_compile import compile_sm90

    pointer_types = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.float16: "*fp16"}
    rows = []

    def compile_launch(fn, args, kwargs):
        values = dict(zip(fn.arg_names, args), **kwargs)
        options = {"num_warps": values.pop("num_warps", 4), "num_stages": values.pop("num_stages", 3)}
        if values.get("maxnreg") is not None:
            options["maxnreg"] = values["maxnreg"]
        values.pop("maxnreg", None)
        constexpr_slots = {param.num for param in fn.params if param.is_constexpr}
        signature, constants, attrs = {}, {}, {}
        for index, name in enumerate(fn.arg_names):
            value = values[name]
            if index in constexpr_slots or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
                signature[name], constants[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name], attrs[(index,)] = pointer_types[value.dtype], [["tt.divisibility", 16]]
            elif isinstance(value, int):
                signature[name] = "i32" if abs(value) < 2 ** 31 else "i64"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "fp32"
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        report, _ = compile_sm90(source, options)
        rows.append((fn.__name__, options, report["regs"], report["stack"], report["smem"], report["hgmma"]))

    class Intercepted:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: compile_launch(self.fn, args, kwargs)

    saved = {}
    for name in dir(ssd_kernels):
        value = getattr(ssd_kernels, name)
        if name.endswith("_kernel") and isinstance(value, triton.runtime.jit.JITFunction):
            saved[name] = value
            setattr(ssd_kernels, name, Intercepted(value))
    try:
        config = dict(ssd_kernels.CONFIG, **overrides)
        for problem_name in ("mamba", "cheems"):
            rope, groups = _problem_shape(problem_name, heads)
            rows.clear()
            dtype = torch.bfloat16
            x = torch.empty(batch, length, heads, head_dim, dtype=dtype)
            B = torch.empty(batch, length, groups, state_dim, dtype=dtype)
            C = torch.empty_like(B)
            cos = torch.empty(batch, length, state_dim, dtype=dtype) if rope else None
            sin = torch.empty_like(cos) if rope else None
            lpad = length + (-length) % kernel_chunk
            dt = torch.empty(batch, heads, lpad)
            D = torch.empty(heads)
            for grad in (False, True):
                _, _, states, rotated_B, rotated_C = ssd_kernels._forward(
                    x, B, C, cos, sin, dt, dt, None, D, None, kernel_chunk, config, save_for_backward=grad)
            ssd_kernels._backward(torch.empty_like(x), None, x, B, C, cos, sin, dt, dt, None, D, states,
                     kernel_chunk, config, rotated_B, rotated_C)
            for name, options, registers, stack, shared, hgmma in rows:
                print(f"{problem_name:7s} {name:24s} warps {options['num_warps']} stages {options['num_stages']} "
                      f"cap {options.get('maxnreg', '-')!s:4s} registers {registers:3d} stack {stack:5d} B "
                      f"shared {shared:6d} B hgmma {hgmma}")
    finally:
        for name, value in saved.items():
            setattr(ssd_kernels, name, value)


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
    parser.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                        help="sweep only these SWEEP entries (default: all)")
    parser.add_argument("--profile-length", type=int, default=4096, help="L of the per-kernel breakdown (0: none)")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the torch reference")
    parser.add_argument("--skip-mamba", action="store_true",
                        help="do not time mamba_ssm nor break down its kernels (for A/B runs of our own versions)")
    parser.add_argument("--out", default="bench/results/ssd_h200.json", help="JSON output path")
    parser.add_argument("--kernel-chunk", type=int, default=None,
                        help="with --compile-report: the kernel chunk T to compile for (default: the module's)")
    parser.add_argument("--compile-report", metavar="JSON", nargs="?", const="{}",
                        help="no GPU: compile every kernel of the defaults (with these config overrides) for "
                             "sm_90 here and print registers / spills / shared memory, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.compile_report is not None:
        compile_report(json.loads(args.compile_report), kernel_chunk=args.kernel_chunk or ssd_kernels.KERNEL_CHUNK)
        return 0
    for length in args.lengths + [args.sweep_length, args.profile_length]:
        if length > args.tokens or (length and args.tokens % length):
            parser.error(f"--tokens {args.tokens} must be a multiple of every length, got {length}")
    if not torch.cuda.is_available():
        print("bench/ssd.py: needs a CUDA GPU (run it on the H200 through bench/gpu_ssd.sh)", file=sys.stderr)
        return 2

    started = time.time()
    bandwidth = measure_copy_bandwidth()
    mamba_fn = None if args.skip_mamba else load_mamba_chunk_scan_combined()
    if mamba_fn is None and not args.skip_mamba:
        logger.warning("mamba_ssm not importable: anchoring on the torch reference and the floor only")
    h, p, n = args.heads, args.head_dim, args.state
    chosen, sweeps, breakdown = {}, {}, {}
    variants = [entry for entry in SWEEP if args.variants is None or entry[0] in args.variants]
    if not variants:
        parser.error(f"--variants: none of {args.variants} is in SWEEP ({', '.join(e[0] for e in SWEEP)})")
    if not args.no_sweep:
        small = args.tokens // 4   # batch 16 at L = 1k: the same integer specializations as L = 4k's
        precompile([(problem_name, small, 1024, h, p, n, kernel_chunk, overrides)
                    for problem_name in ("mamba", "cheems") for _, kernel_chunk, overrides in variants])
    for problem_name in ("mamba", "cheems"):
        if args.no_sweep:
            chosen[problem_name] = ("default", ssd_kernels.KERNEL_CHUNK, dict(ssd_kernels.CONFIG))
        else:
            name, kernel_chunk, config, sweeps[problem_name] = sweep_configs(args.tokens, args.sweep_length, h, p, n,
                                                                             args.rep_ms, problem_name, variants)
            chosen[problem_name] = (name, kernel_chunk, config)
        print(f"config {problem_name}: {chosen[problem_name][0]} (kernel chunk {chosen[problem_name][1]}) "
              f"{chosen[problem_name][2]}")
        if args.profile_length:
            try:  # diagnostics only: a profiler problem must not cost the table
                breakdown[problem_name] = profile_kernels(args.tokens, args.profile_length, h, p, n,
                                                          chosen[problem_name][1], chosen[problem_name][2],
                                                          problem_name, mamba_fn)
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
