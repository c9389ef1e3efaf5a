"""Mosaic TPU Pallas kernels."""
