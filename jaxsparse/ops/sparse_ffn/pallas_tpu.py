"""Adapter: the Mosaic TPU sparse FFN kernel (``pallas_kernels/tpu/sparse_ffn.py``).

Listed neuron rows are copied from HBM by DMA (indices by scalar prefetch); blocks past a group's
count do no copy and no math.
"""

from __future__ import annotations

from pallas_kernels.tpu import sparse_ffn as kernel

from jaxsparse.ops.sparse_ffn import kernel_adapter

NAME = "pallas_tpu"


def check_support(model_dim: int, dtype) -> None:
    kernel_adapter.check_support(kernel, "tpu", NAME, model_dim, dtype)


run = kernel_adapter.differentiable_kernel(kernel, "tpu", NAME)
