"""Learning-rate schedules as multipliers of optimizer.lr, indexed by the optimizer step (0-based).

    wsd     warmup (linear 0 -> 1) - stable (1) - decay (linear 1 -> min_lr/lr over the last
            decay_fraction of the steps), as in the Cheems paper's comparisons (MiniCPM's WSD)
    cosine  warmup (linear 0 -> 1) - cosine from 1 to min_lr/lr at the last step

`build_scheduler` wraps the multiplier in torch's LambdaLR, whose state (the step count) DeepSpeed
saves and restores with every checkpoint.
"""
import math
from functools import partial

import torch

from .config import OptimizerConfig, ScheduleConfig


def lr_multiplier(step: int, total_steps: int, schedule: ScheduleConfig, optimizer: OptimizerConfig) -> float:
    floor = optimizer.min_lr / optimizer.lr
    warmup = min(schedule.warmup_steps, total_steps)  # a short test run warms up over all its steps
    if step < warmup:
        # (step + 1) so that the first update already moves: lr = lr/warmup at step 0, lr at step warmup-1.
        return (step + 1) / warmup
    if schedule.kind == "wsd":
        decay_steps = round(schedule.decay_fraction * total_steps)
        decay_start = max(warmup, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        span = max(1, total_steps - 1 - decay_start)
        progress = min(1.0, (step - decay_start) / span)
        return 1.0 - (1.0 - floor) * progress
    # cosine
    span = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, schedule: ScheduleConfig,
                    optimizer_config: OptimizerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    # functools.partial (not a lambda) so the scheduler's state_dict stays picklable.
    function = partial(lr_multiplier, total_steps=total_steps, schedule=schedule, optimizer=optimizer_config)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, function)
