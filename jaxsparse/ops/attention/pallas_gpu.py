"""Adapter: the Triton-backend block-sparse kernels behind the shared custom VJP.

On a GPU the kernels compile through Triton; on CPU they run in interpret mode (tests).
Limits of the GPU kernel (see ``pallas_kernels/gpu/block_sparse_attention.py``): block sizes and head
dims are powers of two >= 16; element masks that index arrays (``document``, per-batch
``prefix_lm``, ``global_tokens``) need a gather, which the Triton lowering lacks, so they run in
interpret mode only.
"""

from __future__ import annotations

from pallas_kernels.gpu import block_sparse_attention as kernel

from jaxsparse.masks.block_mask import BlockMask
from jaxsparse.ops.attention.differentiable import differentiable
from jaxsparse.ops.attention.kernel_inputs import check_common_support, element_mask_inputs, interpret_on

NAME = "pallas_gpu"


def _is_power_of_two_at_least_16(value: int) -> bool:
    return value >= 16 and value & (value - 1) == 0


def check_support(block_q: int, block_kv: int, head_dim: int, dtype, bias) -> None:
    """Raises unless the Triton kernel can run these sizes here."""
    interpret_on("gpu", NAME)
    check_common_support(NAME, dtype, bias)
    for name, value in (("block_sizes.block_q", block_q), ("block_sizes.block_kv", block_kv), ("head dim D", head_dim)):
        if not _is_power_of_two_at_least_16(value):
            raise ValueError(f"implementation='pallas_gpu' needs {name} to be a power of two >= 16, got {value}")


def _forward(q, k, v, bias, block_mask: BlockMask, *, scale, softcap):
    del bias  # rejected by check_support
    leaves, element_mask = element_mask_inputs(block_mask)
    return kernel.block_sparse_attention_forward(
        q, k, v, block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full, leaves,
        element_mask=element_mask, scale=scale, softcap=softcap, block_q=block_mask.block_q,
        block_kv=block_mask.block_kv, interpret=interpret_on("gpu", NAME),
    )


def _backward(q, k, v, bias, block_mask: BlockMask, out, lse, d_out, delta, *, scale, softcap):
    leaves, element_mask = element_mask_inputs(block_mask)
    dq, dk, dv = kernel.block_sparse_attention_backward(
        q, k, v, out, lse, d_out, block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full,
        block_mask.q_indices, block_mask.q_counts, block_mask.q_full, leaves,
        element_mask=element_mask, scale=scale, softcap=softcap, block_q=block_mask.block_q,
        block_kv=block_mask.block_kv, interpret=interpret_on("gpu", NAME), delta=delta,
    )
    return dq, dk, dv, None


attend = differentiable(_forward, _backward)
