"""Python's garbage collector on a schedule (as torchtitan's gc_freq and Megatron's --manual-gc do).

An automatic collection starts whenever allocations pass a threshold, i.e. at a random point inside some
step, and pauses the host for milliseconds to tens of milliseconds; with thousands of kernel launches per
step the GPU then idles, and on many ranks the slowest rank's pause sets everyone's step time. Here
automatic collection is off during training and a young-generation collection runs every `interval` steps
instead, at the same step on every rank.
"""
import gc


class ScheduledGarbageCollection:
    """with ScheduledGarbageCollection(interval) as collector: ... collector.after_step(step)

    interval 0 leaves Python's automatic collection as it is.
    """

    def __init__(self, interval: int):
        if interval < 0:
            raise ValueError(f"garbage collection interval {interval} must be >= 0")
        self.interval = interval
        self._was_enabled = True  # read on entry

    def __enter__(self):
        if self.interval:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect(1)  # start the loop with the young generations empty
        return self

    def after_step(self, step: int) -> None:
        if self.interval and step % self.interval == 0:
            gc.collect(1)

    def __exit__(self, *exc_info):
        if self.interval and self._was_enabled:
            gc.enable()
        return False
