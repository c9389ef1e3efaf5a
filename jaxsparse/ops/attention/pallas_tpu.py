"""Adapter: the Mosaic TPU block-sparse kernels behind the shared custom VJP.

On a TPU the kernels compile through Mosaic; on CPU they run in the TPU interpreter (tests). Limits
of the TPU kernel (see ``pallas_kernels/tpu/block_sparse_attention.py``): ``block_q`` a multiple of 8
and ``block_kv`` a multiple of 128; mask arrays reach the kernel as per-tile operands (no gathers);
the flattened block lists live in SMEM (prefer masks shared across batch and heads at long sequence
lengths).
"""

from __future__ import annotations

from pallas_kernels.common import compat
from pallas_kernels.tpu import block_sparse_attention as kernel

from jaxsparse.masks.block_mask import BlockMask
from jaxsparse.ops.attention.kernel_inputs import check_common_support, differentiable_kernels
from jaxsparse.ops.platform import interpret_on

NAME = "pallas_tpu"


def check_support(block_mask: BlockMask, head_dim: int, dtype, bias) -> None:
    """Raises unless the Mosaic kernel can tile these sizes here."""
    interpret_on("tpu", NAME)
    check_common_support(NAME, dtype, bias)
    block_q, block_kv = block_mask.block_q, block_mask.block_kv
    if block_q % 8:
        raise ValueError(f"implementation='pallas_tpu' needs block_sizes.block_q to be a multiple of 8, got {block_q}")
    if block_kv % 128:
        raise ValueError(f"implementation='pallas_tpu' needs block_sizes.block_kv to be a multiple of 128, got {block_kv}")
    del head_dim  # any head dim tiles (it is the full last dimension of every block)


def _interpret():
    return compat.tpu_interpret_params() if interpret_on("tpu", NAME) else False


attend = differentiable_kernels(kernel, _interpret)
