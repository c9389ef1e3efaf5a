"""Adapter: the Mosaic TPU grouped matmul kernels (``pallas_kernels/tpu/grouped_matmul.py``)."""

from __future__ import annotations

from pallas_kernels.tpu import grouped_matmul as kernel

from jaxsparse.ops.grouped_matmul.kernel_adapter import KernelBackend

_BACKEND = KernelBackend(kernel, "tpu", "pallas_tpu")
check_support = _BACKEND.check_support
grouped_matmul = _BACKEND.grouped_matmul
transposed_grouped_matmul = _BACKEND.transposed_grouped_matmul
