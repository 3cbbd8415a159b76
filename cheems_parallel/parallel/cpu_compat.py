"""The one place that lets megatron-core's tensor-parallel code run on CPU (gloo). A no-op with CUDA.

megatron-core 0.16 allocates its communication buffers with `device=torch.cuda.current_device()`
(sequence-parallel all-gather / reduce-scatter, the global memory buffer). Without CUDA that call
raises; answering "cpu" instead makes those allocations land on the CPU, which is where every tensor
lives in a CPU run. Nothing else is patched: we never use megatron's CUDA RNG tracker (the model has
no dropout, and weights are initialised on CPU from the global seed, identically for every layout).
"""
import torch

_applied = False


def apply_cpu_compat() -> bool:
    """Install the patch when CUDA is unavailable. Returns whether a patch is active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        torch.cuda.current_device = lambda: "cpu"
        _applied = True
    return True
