"""Tile arithmetic shared by the GPU (Triton) and TPU (Mosaic) kernels.

Plain ``lax`` and ``jnp`` on 2-D tiles that both Pallas backends lower: matmuls with float32
accumulation, and the -inf guard of online softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """``op(a) @ op(b)`` for 2-D tiles, in the inputs' dtype with float32 accumulation."""
    dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def finite_or_zero(x) -> jax.Array:
    """``x`` with -inf replaced by 0: a safe shift for rows whose max (or lse) is -inf, so that
    ``exp(s - shift)`` is 0 (not NaN) for ``s = -inf``."""
    return jnp.where(jnp.isneginf(x), 0.0, x)
