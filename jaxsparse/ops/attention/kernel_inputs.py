"""How the Pallas adapters call the raw kernels: mask leaves, the element mask, interpret mode, VJP."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxsparse.masks.block_mask import BlockMask
from jaxsparse.ops.attention.differentiable import differentiable

_SUPPORTED_DTYPES = ("float32", "bfloat16")


def element_mask_inputs(block_mask: BlockMask, q_padded_len: int, kv_padded_len: int):
    """``(mask_operands, element_mask)`` for a kernel: the mask evaluated from tile slices, no gathers.

    ``mask_operands = (rows, columns, scalars)`` are int32 ``[B', Tp]``, ``[B', Sp]`` and ``[B']``
    arrays (see :meth:`Mask.tile_operands`) that the kernel slices per tile with block specs;
    ``element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx)`` equals
    ``block_mask.element_mask`` on the tile.
    """
    mask, kv_len = block_mask.mask, block_mask.kv_len
    # Operands as long as the padded sequences: padded queries are discarded, padded keys masked.
    rows, columns, scalars = mask.tile_operands(q_padded_len, kv_padded_len)
    row_leaves, row_tree = jax.tree.flatten(rows)
    column_leaves, column_tree = jax.tree.flatten(columns)
    scalar_leaves, scalar_tree = jax.tree.flatten(scalars)
    operands = (tuple(row_leaves), tuple(column_leaves), tuple(scalar_leaves))

    def element_mask(row_tiles, column_tiles, scalar_values, b, h, q_idx, kv_idx):
        visible = mask.tile_visible(
            jax.tree.unflatten(row_tree, list(row_tiles)),
            jax.tree.unflatten(column_tree, list(column_tiles)),
            jax.tree.unflatten(scalar_tree, list(scalar_values)),
            b, h, q_idx, kv_idx,
        )
        return visible & (kv_idx < kv_len)

    return operands, element_mask


def check_common_support(implementation: str, dtype, bias) -> None:
    """Rejections shared by the Pallas kernels: bias and dtypes they do not take."""
    if bias is not None:
        raise NotImplementedError(f"implementation={implementation!r} takes no bias; use implementation='xla'")
    if jnp.dtype(dtype).name not in _SUPPORTED_DTYPES:
        raise TypeError(f"implementation={implementation!r} supports dtypes {_SUPPORTED_DTYPES}, got {dtype}")


def differentiable_kernels(kernels, interpret: Callable[[], Any]) -> Callable:
    """The shared custom VJP around a kernel module's forward and backward.

    Args:
      kernels: a module of ``pallas_kernels`` with ``block_sparse_attention_forward`` and
        ``block_sparse_attention_backward`` (the contract of both backends).
      interpret: called at trace time; returns the kernels' ``interpret=`` value for this platform.
    """

    def forward(q, k, v, bias, block_mask: BlockMask, *, scale, softcap):
        del bias  # rejected by the adapters' check_support
        operands, element_mask = element_mask_inputs(block_mask, q.shape[2], k.shape[2])
        return kernels.block_sparse_attention_forward(
            q, k, v, block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full, operands,
            element_mask=element_mask, scale=scale, softcap=softcap, block_q=block_mask.block_q,
            block_kv=block_mask.block_kv, interpret=interpret(),
        )

    def backward(q, k, v, bias, block_mask: BlockMask, out, lse, d_out, delta, *, scale, softcap):
        operands, element_mask = element_mask_inputs(block_mask, q.shape[2], k.shape[2])
        dq, dk, dv = kernels.block_sparse_attention_backward(
            q, k, v, out, lse, d_out, block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full,
            block_mask.q_indices, block_mask.q_counts, block_mask.q_full, operands,
            element_mask=element_mask, scale=scale, softcap=softcap, block_q=block_mask.block_q,
            block_kv=block_mask.block_kv, interpret=interpret(), delta=delta,
        )
        return dq, dk, dv, None

    return differentiable(forward, backward)
