"""Run logs: TensorBoard scalars, one `metrics.jsonl` line per logged step, a console line per interval.

Everything here runs on global rank 0 only (the trainer all-reduces values before handing them over).
Units: tokens/s are for the whole job (all ranks); MFU = tokens/s x training FLOPs per token /
(peak FLOP/s per device x devices); memory is the peak allocated on this rank's device in GiB (the
peak resident set size of the process on CPU).
"""
from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (vendor datasheets), FLOP/s per device; fp32 runs report no MFU.
_KNOWN_BF16_PEAKS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12))


def peak_flops_per_device(configured: float | None, precision: str) -> float | None:
    if configured:
        return configured
    if not torch.cuda.is_available() or precision != "bf16":
        return None
    name = torch.cuda.get_device_name()
    for marker, peak in _KNOWN_BF16_PEAKS:
        if marker in name:
            return peak
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a resumed run re-logs them), keeping the file otherwise intact."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, resumed_step: int | None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.tensorboard_dir = self.run_dir / "tensorboard"
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:
            self.jsonl_path.write_text("", encoding="utf-8")
        else:
            truncate_jsonl_after(self.jsonl_path, resumed_step)
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events after a resume point, so curves do not fold back on themselves.
            self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=resumed_step)

    def write(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3)}
        record.update({key: (float(value) if value is not None else None) for key, value in values.items()})
        self.jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(float(value)):
                    self.writer.add_scalar(key, float(value), step)
            self.writer.flush()

    def console(self, line: str) -> None:
        if self.enabled:
            logger.info(line)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def train_console_line(step: int, total_steps: int, values: dict, seconds_per_step: float) -> str:
    mfu = values.get("perf/mfu")
    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
    grad_norm = values.get("train/grad_norm")
    grad_text = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
    eta = format_duration(seconds_per_step * (total_steps - step))
    return (f"step {step}/{total_steps} | loss {values['train/loss']:.4f} | lr {values['train/lr']:.2e} | "
            f"grad norm {grad_text} | {values['perf/tokens_per_second']:,.0f} tok/s | MFU {mfu_text} | "
            f"mem {values['perf/peak_memory_gib']:.2f} GiB | skipped {int(values['train/skipped_steps'])} | "
            f"ETA {eta}")
