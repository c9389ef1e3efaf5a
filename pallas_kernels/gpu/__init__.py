"""Triton-backend GPU Pallas kernels."""
