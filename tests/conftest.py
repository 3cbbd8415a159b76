"""Shared fixtures: a one-process gloo group with megatron-core parallel_state (TP=1) for model tests."""
import os
import signal
import socket

import pytest
import torch

# Without a GPU, Triton kernels only run in its interpreter; it must be chosen before triton is first
# imported anywhere in the session (importing torch does not import triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A shell without job control starts background commands (`make test &`, nohup) with Ctrl-C ignored, and Python
# then raises no KeyboardInterrupt, in this process or in the tools the tests start: the tests of what Ctrl-C
# does need its default. A handler set here also makes children start with the default (exec resets it).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def single_process_group():
    import torch.distributed as dist

    from cheems_parallel.config import ParallelConfig
    from cheems_parallel.parallel import initialize_parallel

    if not dist.is_initialized():
        # an in-memory store: no MASTER_PORT left in os.environ for subprocesses of later tests to inherit
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    initialize_parallel(ParallelConfig())
    yield
