"""Adapter: the Triton-backend sparse FFN kernel (``pallas_kernels/gpu/sparse_ffn.py``).

Split-K over the neuron list: one kernel instance per (group, block of listed neurons), partial
outputs summed afterwards, so one decoded token still spreads over many SMs.
"""

from __future__ import annotations

from pallas_kernels.gpu import sparse_ffn as kernel

from jaxsparse.ops.sparse_ffn import kernel_adapter

NAME = "pallas_gpu"


def check_support(model_dim: int, dtype) -> None:
    kernel_adapter.check_support(kernel, "gpu", NAME, model_dim, dtype)


run = kernel_adapter.differentiable_kernel(kernel, "gpu", NAME)
