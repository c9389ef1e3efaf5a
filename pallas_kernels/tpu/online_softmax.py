"""Online softmax (FlashAttention) over VMEM scratch refs, shared by the TPU attention kernels.

Row statistics live in float32 ``[rows, 1]`` columns (``max_ref``, ``sum_ref``) and the output
accumulator in float32 ``[rows, D]`` (``acc_ref``); a tile's logits are ``[rows, cols]``.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common.tiles import finite_or_zero, matmul


def tile_logits(q, k, *, scale, softcap):
    """Scaled (and soft-capped) logits of one tile.

    Args:
      q: [rows, D] in the input dtype.
      k: [cols, D] in the input dtype.

    Returns:
      (logits [rows, cols] float32, the soft cap's derivative d capped / d scaled logits
      [rows, cols] float32, or None without a soft cap).
    """
    logits = matmul(q, k, transpose_b=True) * scale
    if softcap is None:
        return logits, None
    capped = jnp.tanh(logits / softcap)
    return softcap * capped, 1.0 - capped * capped


def init(max_ref, sum_ref, acc_ref) -> None:
    """Empty statistics: max -inf, sum 0, accumulator 0."""
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def accumulate(logits, v, max_ref, sum_ref, acc_ref) -> None:
    """Folds one tile (``logits [rows, cols]``, -inf where masked; ``v [cols, D]``) into the statistics."""
    max_prev = max_ref[...]
    max_next = jnp.maximum(max_prev, logits.max(axis=1, keepdims=True))
    shift = finite_or_zero(max_next)
    p = jnp.exp(logits - shift)
    rescale = jnp.exp(max_prev - shift)
    sum_ref[...] = rescale * sum_ref[...] + p.sum(axis=1, keepdims=True)
    acc_ref[...] = rescale * acc_ref[...] + matmul(p.astype(v.dtype), v)
    max_ref[...] = max_next


def finalise(max_ref, sum_ref, acc_ref, o_ref, lse_ref) -> None:
    """Writes ``o = acc / sum`` and ``lse = max + log(sum)``; rows that saw nothing get 0 and -inf."""
    row_sum = sum_ref[...]
    has_keys = row_sum > 0.0
    safe_sum = jnp.where(has_keys, row_sum, 1.0)
    o_ref[...] = (acc_ref[...] / safe_sum).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_keys, max_ref[...] + jnp.log(safe_sum), -jnp.inf)
