"""Adapter: the Triton-backend grouped matmul kernels (``pallas_kernels/gpu/grouped_matmul.py``)."""

from __future__ import annotations

from pallas_kernels.gpu import grouped_matmul as kernel

from jaxsparse.ops.grouped_matmul.kernel_adapter import KernelBackend

_BACKEND = KernelBackend(kernel, "gpu", "pallas_gpu")
check_support = _BACKEND.check_support
grouped_matmul = _BACKEND.grouped_matmul
transposed_grouped_matmul = _BACKEND.transposed_grouped_matmul
