"""How the Pallas adapters call the raw kernels: mask leaves, the element mask, interpret mode, VJP."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxsparse.masks.block_mask import BlockMask
from jaxsparse.ops.attention.differentiable import differentiable

_SUPPORTED_DTYPES = ("float32", "bfloat16")


def element_mask_inputs(block_mask: BlockMask):
    """``(leaves, element_mask)`` for a kernel.

    Kernels cannot capture arrays, so the mask's array leaves (segment ids, prefix lengths, ...) are
    passed as kernel inputs and the mask is rebuilt from their loaded values inside the tile:
    ``element_mask(leaf_values, b, h, q_idx, kv_idx)`` equals ``block_mask.element_mask``.
    """
    leaves, treedef = jax.tree.flatten(block_mask.mask)
    kv_len = block_mask.kv_len

    def element_mask(leaf_values, b, h, q_idx, kv_idx):
        mask = jax.tree.unflatten(treedef, list(leaf_values))
        return mask(b, h, q_idx, kv_idx) & (kv_idx < kv_len)

    return tuple(leaves), element_mask


def interpret_on(platform: str, implementation: str) -> bool:
    """True on CPU (run the kernel in interpret mode); False on its own platform.

    Raises:
      NotImplementedError: on the other accelerator (a TPU kernel on a GPU, or the reverse).
    """
    backend = jax.default_backend()
    if backend == "cpu":
        return True
    if backend != platform:
        raise NotImplementedError(
            f"implementation={implementation!r} runs on {platform} (or interpreted on CPU), not on {backend}; "
            f"use implementation='xla' or 'pallas_{backend}'"
        )
    return False


def check_common_support(implementation: str, block_mask: BlockMask, dtype, bias, *, interpret: bool) -> None:
    """Rejections shared by the Pallas kernels: bias, dtypes, and (compiled) masks that gather.

    A mask whose elementwise rule indexes an array (``document`` segment ids, per-sequence
    ``prefix_lm`` lengths, ``global_tokens`` positions) needs a gather inside the tile, which neither
    the Mosaic nor the Triton lowering supports; the interpreter runs it.
    """
    if bias is not None:
        raise NotImplementedError(f"implementation={implementation!r} takes no bias; use implementation='xla'")
    if jnp.dtype(dtype).name not in _SUPPORTED_DTYPES:
        raise TypeError(f"implementation={implementation!r} supports dtypes {_SUPPORTED_DTYPES}, got {dtype}")
    gathering = [leaf.shape for leaf in jax.tree.leaves(block_mask.mask) if jnp.size(leaf) > 1]
    if gathering and not interpret:
        raise NotImplementedError(
            f"implementation={implementation!r}: masks that index arrays inside a tile (here of shapes {gathering}: "
            "document, per-sequence prefix_lm, global_tokens) do not lower to the compiled kernel yet; "
            "use implementation='xla'"
        )


def differentiable_kernels(kernels, interpret: Callable[[], Any]) -> Callable:
    """The shared custom VJP around a kernel module's forward and backward.

    Args:
      kernels: a module of ``pallas_kernels`` with ``block_sparse_attention_forward`` and
        ``block_sparse_attention_backward`` (the contract of both backends).
      interpret: called at trace time; returns the kernels' ``interpret=`` value for this platform.
    """

    def forward(q, k, v, bias, block_mask: BlockMask, *, scale, softcap):
        del bias  # rejected by the adapters' check_support
        leaves, element_mask = element_mask_inputs(block_mask)
        return kernels.block_sparse_attention_forward(
            q, k, v, block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full, leaves,
            element_mask=element_mask, scale=scale, softcap=softcap, block_q=block_mask.block_q,
            block_kv=block_mask.block_kv, interpret=interpret(),
        )

    def backward(q, k, v, bias, block_mask: BlockMask, out, lse, d_out, delta, *, scale, softcap):
        leaves, element_mask = element_mask_inputs(block_mask)
        dq, dk, dv = kernels.block_sparse_attention_backward(
            q, k, v, out, lse, d_out, block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full,
            block_mask.q_indices, block_mask.q_counts, block_mask.q_full, leaves,
            element_mask=element_mask, scale=scale, softcap=softcap, block_q=block_mask.block_q,
            block_kv=block_mask.block_kv, interpret=interpret(), delta=delta,
        )
        return dq, dk, dv, None

    return differentiable(forward, backward)
