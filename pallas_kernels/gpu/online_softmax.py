"""Online softmax (FlashAttention) as a loop carry, shared by the GPU (Triton) attention kernels.

The carry is ``(acc [rows, D], row_max [rows], row_sum [rows])``, all float32; a tile's scores
are ``[rows, cols]`` with -inf where masked.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common.tiles import finite_or_zero, matmul


def init(rows: int, head_dim: int):
    """The empty carry: accumulator 0, max -inf, sum 0."""
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def step(carry, s, v):
    """Folds one tile (scores ``s [rows, cols]``, values ``v [cols, D]``) into the carry."""
    acc, row_max, row_sum = carry
    new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
    shift = finite_or_zero(new_max)
    correction = jnp.exp(row_max - shift)
    p = jnp.exp(s - shift[:, None])
    acc = correction[:, None] * acc + matmul(p.astype(v.dtype), v)
    row_sum = correction * row_sum + jnp.sum(p, axis=1)
    return acc, new_max, row_sum


def finish(carry):
    """``(o [rows, D], lse [rows])`` float32. Rows that saw nothing have row_sum == 0 and
    row_max == -inf: o = 0 and lse = -inf + log(1) = -inf."""
    acc, row_max, row_sum = carry
    safe_sum = jnp.where(row_sum == 0.0, 1.0, row_sum)
    return acc / safe_sum[:, None], row_max + jnp.log(safe_sum)
