"""Per-device facts the kernels' host code asks for on every call, looked up once per device: the CUDA queries
behind them cost the host microseconds per call, and at cheems-320m's size the SSD layer's forward+backward is the
host's time, not the GPU's (bench/ssd_host_profile.py)."""
import functools

import torch


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _sm_count_of(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _major_of(index):
    return torch.cuda.get_device_capability(index)[0]


def sm_count(device):
    """Streaming multiprocessors of a CUDA device (the persistent kernels' grid)."""
    return _sm_count_of(_index(device))


def is_hopper(device):
    """Whether a CUDA device is sm_90 (the Gluon kernels' wgmma / TMA target)."""
    return _major_of(_index(device)) == 9
