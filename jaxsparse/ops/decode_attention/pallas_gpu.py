"""Adapter: the Triton-backend decode-attention kernel (``pallas_kernels/gpu/decode_attention.py``)."""

from pallas_kernels.gpu import decode_attention as kernel

from jaxsparse.ops.decode_attention.kernel_adapter import kernel_runner

run = kernel_runner(kernel, "gpu", "pallas_gpu", default_block=64)
