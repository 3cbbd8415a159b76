"""Cheems model library: config, reference ops, Triton kernels, tensor-parallel layers, the model."""
