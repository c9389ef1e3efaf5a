"""Adapter: the Mosaic TPU decode-attention kernel (``pallas_kernels/tpu/decode_attention.py``)."""

from pallas_kernels.tpu import decode_attention as kernel

from jaxsparse.ops.decode_attention.kernel_adapter import kernel_runner

run = kernel_runner(kernel, "tpu", "pallas_tpu", default_block=128)
