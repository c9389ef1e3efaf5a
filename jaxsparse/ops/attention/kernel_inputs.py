"""What the Pallas adapters hand to the raw kernels: mask leaves, the element mask, interpret mode."""

from __future__ import annotations

import jax

from jaxsparse.masks.block_mask import BlockMask

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


def check_common_support(implementation: str, dtype, bias) -> None:
    """Rejections shared by the Pallas kernels: bias and dtypes they do not take."""
    if bias is not None:
        raise NotImplementedError(f"implementation={implementation!r} takes no bias; use implementation='xla'")
    if jax.numpy.dtype(dtype).name not in _SUPPORTED_DTYPES:
        raise TypeError(f"implementation={implementation!r} supports dtypes {_SUPPORTED_DTYPES}, got {dtype}")
