"""Where one training step's time goes on one GPU: the real `python -m pretrain` loop under torch.profiler.

bench/pretrain_gpu.py measures the trainer at 0.5-0.75 of the same model's bare forward + backward. This
script says where the rest goes: it runs the trainer in this process (same overrides as pretrain_gpu.py),
marks the phases of each step (data, forward, backward, finite-loss check, engine.step, grad-norm read)
with profiler ranges, profiles a few steady steps, and prints per step: wall time, GPU busy time (sum of
device kernel and copy time), each phase's host time, kernel launches, and the host-side calls that
waited the longest (synchronising reads).

    python bench/profile_pretrain.py --data-prefix smoke/gpu_data/data/stdlib_text_document \
        --tokenizer smoke/gpu_data/tokenizer/stdlib.model

Writes a JSON summary (--out, default bench/results/profile_pretrain_h200.json).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "backward", "finite_loss_check", "engine_step", "grad_norm_read")


def traced(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)
    return wrapper


LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaMemcpyAsync",
                "cudaMemsetAsync")


def phase_of(event):
    """The phase range an event runs under (walking up its CPU parents), or "other"."""
    parent = event
    while parent is not None:
        if parent.name in PHASES:
            return parent.name
        parent = parent.cpu_parent
    return "other"


def summarise(events, arguments) -> dict:
    """Per profiled step: wall time (the ProfilerStep ranges), GPU busy time (the union of device
    intervals: kernels, copies, sets; annotations left out), and per phase the host time of its range,
    the launches (kernel, copy, set calls) and the aten ops issued under it."""
    from collections import Counter
    from torch.autograd import DeviceType

    steps = arguments.profile_steps
    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    wall_us = sum(e.time_range.elapsed_us() for e in cpu_events if e.name.startswith("ProfilerStep"))
    device_intervals = sorted((e.time_range.start, e.time_range.end) for e in events
                              if e.device_type == DeviceType.CUDA and e.name not in PHASES
                              and not e.name.startswith("ProfilerStep"))
    busy_us, covered_until = 0.0, float("-inf")
    for start, end in device_intervals:  # union of intervals: overlapping work counts once
        if end > covered_until:
            busy_us += end - max(start, covered_until)
            covered_until = end
    phases = {}
    op_counts = Counter()
    for event in cpu_events:
        if event.name in PHASES:
            phase = phases.setdefault(event.name, Counter())
            phase["host_ms"] += event.time_range.elapsed_us() / 1e3 / steps
            continue
        if event.name.startswith("ProfilerStep"):
            continue
        phase_name = phase_of(event)
        phase = phases.setdefault(phase_name, Counter())
        if event.name in LAUNCH_CALLS:
            phase["launches"] += 1 / steps
        elif event.name.startswith("aten::") and (event.cpu_parent is None
                                                  or not event.cpu_parent.name.startswith("aten::")):
            phase["ops"] += 1 / steps   # outermost aten ops only: what the Python code called
            op_counts[f"{phase_name}: {event.name}"] += 1 / steps
    return {
        "model": arguments.model, "micro_batch": arguments.micro_batch, "seq_length": arguments.seq_length,
        "zero_stage": arguments.zero_stage, "profiled_steps": steps,
        "step_wall_ms": wall_us / 1e3 / steps, "gpu_busy_ms": busy_us / 1e3 / steps,
        "phases": {name: dict(values) for name, values in phases.items()},
        "top_ops_per_step": op_counts.most_common(20),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cheems-320m", help="configs/<name>.yaml")
    parser.add_argument("--data-prefix", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--skip-steps", type=int, default=8, help="steps before profiling (compile, warm-up)")
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--out", default="bench/results/profile_pretrain_h200.json")
    parser.add_argument("--trace", default=None, help="also write a Chrome trace here")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override (repeatable)")
    arguments = parser.parse_args()
    sys.path.insert(0, str(REPOSITORY_ROOT))

    from pretrain.__main__ import setup_logging
    from pretrain.config import default_paths, load_config, validate
    from pretrain import trainer as trainer_module

    steps = arguments.skip_steps + arguments.profile_steps + 2
    overrides = [
        f"data.blend={arguments.data_prefix}", f"data.tokenizer_model={arguments.tokenizer}",
        f"data.seq_length={arguments.seq_length}", "data.num_workers=2", f"train.steps={steps}",
        f"train.micro_batch_size={arguments.micro_batch}", f"train.global_batch_size={arguments.micro_batch}",
        "train.precision=bf16", f"train.zero_stage={arguments.zero_stage}", f"schedule.warmup_steps={steps}",
        "eval.interval=0", "eval.iterations=0", "checkpoint.interval=0", "checkpoint.save_at_exit=false",
        "logging.interval=1", "logging.tensorboard=false",
        f"logging.run_dir={tempfile.mkdtemp(prefix='profile_')}",
    ] + arguments.extra
    setup_logging()
    config = load_config(str(REPOSITORY_ROOT / "configs" / f"{arguments.model}.yaml"), overrides)
    default_paths(config)
    batch = validate(config, 1)
    trainer = trainer_module.Trainer(config, batch)
    trainer.setup()

    # Phase ranges: the engine's forward/backward/step, the trainer's finite-loss all-reduce, the batch's
    # move to the device, and the grad-norm read (a float() of a device tensor under bf16 ZeRO).
    engine = trainer.engine
    engine.forward = traced("forward", engine.forward)
    engine.backward = traced("backward", engine.backward)
    engine.step = traced("engine_step", engine.step)
    trainer._any_rank = traced("finite_loss_check", trainer._any_rank)
    trainer_module.to_model_inputs = traced("data", trainer_module.to_model_inputs)
    read_norm = engine.get_global_grad_norm

    def grad_norm_read():
        with record_function("grad_norm_read"):
            value = read_norm()
            return float(value) if value is not None else None
    engine.get_global_grad_norm = grad_norm_read

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities, schedule=schedule(wait=arguments.skip_steps, warmup=1,
                                                                 active=arguments.profile_steps, repeat=1))
    log_step = trainer._log_step

    def log_and_advance(*args, **kwargs):
        log_step(*args, **kwargs)
        profiler.step()
    trainer._log_step = log_and_advance
    with profiler:
        try:
            trainer.train()
        finally:
            trainer.close()

    summary = summarise(profiler.events(), arguments)
    Path(arguments.out).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments.out).write_text(json.dumps(summary, indent=2) + "\n")
    if arguments.trace:
        profiler.export_chrome_trace(arguments.trace)

    print(f"\n{arguments.model} | micro-batch {arguments.micro_batch} x {arguments.seq_length} | ZeRO-{arguments.zero_stage}"
          f" | {arguments.profile_steps} profiled steps (times include the profiler's own overhead)")
    busy = summary["gpu_busy_ms"]
    print(f"step wall {summary['step_wall_ms']:8.1f} ms | GPU busy {busy:8.1f} ms"
          + (f" ({busy / summary['step_wall_ms']:.0%})" if summary["step_wall_ms"] else ""))
    print(f"{'phase':22s}{'host ms/step':>14s}{'launches/step':>15s}{'ops/step':>10s}")
    for name in PHASES + ("other",):
        phase = summary["phases"].get(name, {})
        print(f"  {name:20s}{phase.get('host_ms', 0.0):14.1f}{phase.get('launches', 0.0):15,.0f}"
              f"{phase.get('ops', 0.0):10,.0f}")
    print("top ops by count per step (phase: op x count)")
    for name, count in summary["top_ops_per_step"]:
        print(f"  {name[:60]:60s}{count:8,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
