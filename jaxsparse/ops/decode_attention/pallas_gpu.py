"""Adapter: the Triton-backend decode-attention kernel (``pallas_kernels/gpu/decode_attention.py``)."""

from pallas_kernels.gpu import decode_attention as kernel

from jaxsparse.ops.decode_attention.kernel_adapter import kernel_runner

# Two programs per SM of an H100 (132 SMs): at batch 1 and 8 kv heads a whole-cache read splits each
# head's list 33 ways. With at most 8 splits the dense step reached 0.52 TB/s there (2026-11-23).
run = kernel_runner(kernel, "gpu", "pallas_gpu", default_block=64, target_programs=264)
