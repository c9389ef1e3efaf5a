"""Helpers shared by the TPU and GPU kernels."""
