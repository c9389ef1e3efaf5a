"""Adapter: the Triton-backend block-sparse kernels behind the shared custom VJP.

On a GPU the kernels compile through Triton; on CPU they run in interpret mode (tests).
Limits of the GPU kernel (see ``pallas_kernels/gpu/block_sparse_attention.py``): block sizes and head
dims are powers of two >= 16. Mask arrays reach the kernel as per-tile operands
(:func:`~jaxsparse.ops.attention.kernel_inputs.element_mask_inputs`), so nothing gathers in a tile.
"""

from __future__ import annotations

from pallas_kernels.gpu import block_sparse_attention as kernel

from jaxsparse.masks.block_mask import BlockMask
from jaxsparse.ops.attention.kernel_inputs import check_common_support, differentiable_kernels
from jaxsparse.ops.platform import interpret_on

NAME = "pallas_gpu"


def _is_power_of_two_at_least_16(value: int) -> bool:
    return value >= 16 and value & (value - 1) == 0


def check_support(block_mask: BlockMask, head_dim: int, dtype, bias) -> None:
    """Raises unless the Triton kernel can run these sizes here."""
    interpret_on("gpu", NAME)
    check_common_support(NAME, dtype, bias)
    block_q, block_kv = block_mask.block_q, block_mask.block_kv
    for name, value in (("block_sizes.block_q", block_q), ("block_sizes.block_kv", block_kv), ("head dim D", head_dim)):
        if not _is_power_of_two_at_least_16(value):
            raise ValueError(f"implementation='pallas_gpu' needs {name} to be a power of two >= 16, got {value}")


attend = differentiable_kernels(kernel, lambda: interpret_on("gpu", NAME))
