"""Scheduled garbage collection: automatic collection off in the loop, young-generation runs on the schedule."""
import gc

import pytest

from pretrain.config import ConfigError, PretrainConfig, validate
from pretrain.garbage import ScheduledGarbageCollection


@pytest.fixture
def collections():
    """The generations of the collections that start while the test runs."""
    started = []

    def record(phase, info):
        if phase == "start":
            started.append(info["generation"])
    gc.callbacks.append(record)
    yield started
    gc.callbacks.remove(record)


def test_collects_only_on_interval_steps(collections):
    assert gc.isenabled()
    with ScheduledGarbageCollection(3) as collector:
        assert not gc.isenabled()
        collections.clear()  # the entry collection
        for step in range(1, 8):
            for _ in range(5000):  # enough cyclic garbage to trigger several automatic collections
                cycle = []
                cycle.append(cycle)
            collector.after_step(step)
        assert collections == [1, 1]  # steps 3 and 6, young generations only
    assert gc.isenabled()


def test_interval_zero_leaves_automatic_collection_on(collections):
    with ScheduledGarbageCollection(0) as collector:
        assert gc.isenabled()
        for step in range(1, 4):
            collector.after_step(step)
        for _ in range(50000):
            cycle = []
            cycle.append(cycle)
    assert gc.isenabled()
    assert collections  # Python's own threshold-driven collections ran


def test_automatic_collection_stays_off_if_it_was_off():
    gc.disable()
    try:
        with ScheduledGarbageCollection(5):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_negative_interval_is_a_config_error():
    config = PretrainConfig()
    config.train.gc_interval = -1
    with pytest.raises(ConfigError, match="train.gc_interval=-1"):
        validate(config, world_size=1)
