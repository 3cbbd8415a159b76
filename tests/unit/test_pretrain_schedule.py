"""pretrain.schedule: warmup-stable-decay and cosine multipliers, and scheduler state round trips."""
import math

import pytest
import torch

from pretrain.config import OptimizerConfig, ScheduleConfig
from pretrain.schedule import build_scheduler, lr_multiplier

OPTIMIZER = OptimizerConfig(lr=1e-3, min_lr=1e-4)


def test_wsd_warms_up_holds_then_decays_linearly_to_the_floor():
    schedule = ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2)
    values = [lr_multiplier(step, 100, schedule, OPTIMIZER) for step in range(100)]
    assert values[:10] == pytest.approx([(step + 1) / 10 for step in range(10)])
    assert values[10:81] == [1.0] * 71                     # stable until the last 20 steps begin (step 80)
    # decay: linear from 1 at step 80 to min_lr/lr = 0.1 at the last step (99)
    assert values[80:] == pytest.approx([1.0 - 0.9 * (step - 80) / 19 for step in range(80, 100)])
    assert values[-1] == pytest.approx(0.1)


def test_cosine_reaches_half_way_at_the_middle_and_the_floor_at_the_end():
    schedule = ScheduleConfig(kind="cosine", warmup_steps=10)
    multiplier = lambda step: lr_multiplier(step, 101, schedule, OPTIMIZER)  # noqa: E731
    assert multiplier(9) == pytest.approx(1.0)
    assert multiplier(10) == pytest.approx(1.0)
    assert multiplier(55) == pytest.approx((1.0 + 0.1) / 2)  # progress 45/90
    assert multiplier(100) == pytest.approx(0.1)
    later = [multiplier(step) for step in range(10, 101)]
    assert all(a >= b for a, b in zip(later, later[1:]))
    assert multiplier(30) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 20 / 90)))


def test_warmup_longer_than_the_run_warms_up_over_the_whole_run():
    schedule = ScheduleConfig(kind="wsd", warmup_steps=50, decay_fraction=0.0)
    assert lr_multiplier(9, 10, schedule, OPTIMIZER) == pytest.approx(1.0)


def test_scheduler_state_round_trip_continues_the_same_rates():
    schedule = ScheduleConfig(kind="wsd", warmup_steps=3, decay_fraction=0.5)

    def make():
        parameter = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.AdamW([parameter], lr=OPTIMIZER.lr)
        return optimizer, build_scheduler(optimizer, 10, schedule, OPTIMIZER)

    optimizer, scheduler = make()
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    optimizer, scheduler = make()
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    optimizer, restored = make()
    restored.load_state_dict(state)
    continued = []
    for _ in range(6):
        continued.append(restored.get_last_lr()[0])
        optimizer.step()
        restored.step()
    assert continued == pytest.approx(rates[4:])
    assert rates[0] == pytest.approx(OPTIMIZER.lr / 3) and rates[-1] == pytest.approx(OPTIMIZER.min_lr)
