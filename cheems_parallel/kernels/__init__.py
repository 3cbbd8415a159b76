"""Triton kernels (each imported by its own module path; this package imports nothing)."""
